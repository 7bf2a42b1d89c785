"""``botkit-tasks dashboard``: the bind rule, and a real server on a populated SQLite file."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from _dashboard_support import free_port, populate

from botkit_tasks.cli import main
from botkit_tasks.monitor import inspect

pytestmark = pytest.mark.timeout(120)

SCRIPT = str(Path(sys.executable).parent / "botkit-tasks")
TOKEN = "cli-test-token-123"


def _run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = subprocess.run(
        [SCRIPT, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def test_a_non_loopback_bind_without_a_token_is_refused(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("BOTKIT_DASHBOARD_TOKEN", raising=False)
    url = f"sqlite:///{tmp_path}/bot.sqlite3"
    err = io.StringIO()
    for host in ("0.0.0.0", "::", "192.0.2.7"):
        code = main(["--database-url", url, "dashboard", "--host", host], stdout=err)
        assert code == 2, host
    code, _, stderr = _run(["--database-url", url, "dashboard", "--host", "0.0.0.0"])
    assert code == 2
    assert "not loopback, without a token" in stderr and "BOTKIT_DASHBOARD_TOKEN" in stderr
    code, _, stderr = _run(["--database-url", url, "dashboard", "--token", "short"])
    assert code == 2 and "at least 8 characters" in stderr


def _serve(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [SCRIPT, *args],
            env={**os.environ, **env},
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def _get(url: str, **kw: Any) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.get(url, timeout=5, **kw)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_the_command_serves_the_page_and_metrics(tmp_path: Any) -> None:
    from botkit_tasks.brokers import SqlBroker

    url = f"sqlite:///{tmp_path}/bot.sqlite3"
    broker = SqlBroker(url, middleware=[])
    populate(broker, "botkit.outbox", dead=2)
    expected = {q.name: q for q in inspect(broker).queues()}
    broker.close()

    # On loopback without a token
    port = free_port()
    proc = _serve(
        ["--database-url", url, "dashboard", "--port", str(port)],
        {"BOTKIT_DASHBOARD_TOKEN": ""},
        tmp_path / "loopback.log",
    )
    try:
        page = _get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200, (tmp_path / "loopback.log").read_text()
        snapshot = _get(f"http://127.0.0.1:{port}/snapshot.json").json()
        assert {q["name"]: q["dead"] for q in snapshot["queues"]} == {
            n: q.dead for n, q in expected.items()
        }
        metrics = _get(f"http://127.0.0.1:{port}/metrics").text
        assert 'botkit_dead_letters{queue="botkit.outbox"} 2.0' in metrics
    finally:
        _stop(proc)

    # On every address, with the token from the environment
    port = free_port()
    proc = _serve(
        ["--database-url", url, "dashboard", "--host", "0.0.0.0", "--port", str(port)],
        {"BOTKIT_DASHBOARD_TOKEN": TOKEN},
        tmp_path / "any.log",
    )
    try:
        assert _get(f"http://127.0.0.1:{port}/").status_code == 401
        assert _get(f"http://127.0.0.1:{port}/metrics").status_code == 401
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert _get(f"http://127.0.0.1:{port}/metrics", headers=auth).status_code == 200
    finally:
        _stop(proc)
    assert "access token required" in (tmp_path / "any.log").read_text()
