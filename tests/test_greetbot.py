"""examples/greetbot.py runs on SQLite, PostgreSQL and Redis by environment alone."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import dramatiq
import httpx
import pytest
from _http_server import Reply, ScriptedServer
from conftest import unique_name

from botkit_tasks.federation.inbox import process_inbox_job

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "greetbot.py"
BACKEND_VARS = (
    "DATABASE_URL",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "REDIS_TLS",
    "BOTKIT_BACKEND",
    "BOTKIT_PREFIX",
    "BOTKIT_SQLITE_PATH",
)


def _eventually(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for: {what}")


@pytest.fixture
def load_greetbot(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[dict[str, str]], ModuleType]]:
    """Import a fresh copy of the example with exactly the given environment."""
    loaded: list[ModuleType] = []
    previous = dramatiq.get_broker()

    def load(env: dict[str, str]) -> ModuleType:
        for name in BACKEND_VARS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("GREETBOT_BASE_URL", "http://127.0.0.1:8000")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        spec = importlib.util.spec_from_file_location(f"greetbot_{uuid.uuid4().hex}", EXAMPLE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded.append(module)
        return module

    yield load
    for module in loaded:
        module.bot.close()
        backends = module.backends
        if backends.kind == "redis":
            client = backends.broker.client
            for pattern in (f"{backends.broker.namespace}:*", f"{backends.kv.key_prefix}*"):
                keys = list(client.scan_iter(match=pattern, count=1000))
                if keys:
                    client.delete(*keys)
        elif backends.kind == "postgresql":
            import sqlalchemy as sa

            backends.broker.close()
            backends.broker.drop_tables()
            with backends.engine.begin() as conn:
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{backends.kv.table_name}"'))
        backends.close()
    dramatiq.set_broker(previous)


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    prefix = unique_name("greet_")
    if request.param == "sqlite":
        return {"BOTKIT_SQLITE_PATH": str(tmp_path / "greetbot.sqlite3")}
    if request.param == "postgres":
        return {"DATABASE_URL": request.getfixturevalue("database_url"), "BOTKIT_PREFIX": prefix}
    return {"REDIS_URL": request.getfixturevalue("redis_url"), "BOTKIT_PREFIX": prefix}


@pytest.mark.timeout(90)
def test_schedule_posts_repeatedly_and_only_once_per_interval(
    load_greetbot: Callable[[dict[str, str]], ModuleType], env: dict[str, str]
) -> None:
    greetbot = load_greetbot({**env, "GREETBOT_INTERVAL": "0.2"})
    expected_kind = {"DATABASE_URL": "postgresql", "REDIS_URL": "redis"}
    kind = next((k for var, k in expected_kind.items() if var in env), "sqlite")
    assert greetbot.backends.kind == kind
    # Starting the schedule twice starts one chain
    assert greetbot.start_schedule() is True
    assert greetbot.start_schedule() is False
    worker = dramatiq.Worker(greetbot.bot.broker, worker_threads=2, worker_timeout=50)
    worker.start()
    try:
        _eventually(lambda: greetbot.bot.note_count() >= 3, "three scheduled posts")
    finally:
        worker.stop(timeout=10_000)
    # Every post bumped the schedule's counter exactly once: no doubled chain
    state = greetbot.bot.kv.get(greetbot.SCHEDULE_KEY)
    assert state["count"] == greetbot.bot.note_count()


@pytest.mark.timeout(60)
def test_greets_new_followers(
    load_greetbot: Callable[[dict[str, str]], ModuleType], tmp_path: Path
) -> None:
    greetbot = load_greetbot({"BOTKIT_SQLITE_PATH": str(tmp_path / "g.sqlite3")})
    bot = greetbot.bot
    with ScriptedServer() as remote:
        remote.script("/users/alice/inbox", Reply(202))
        alice = {
            "id": remote.url("/users/alice"),
            "type": "Person",
            "name": "Alice",
            "preferredUsername": "alice",
            "inbox": remote.url("/users/alice/inbox"),
        }
        # The inbox job normally fetches the follower; here its document is cached.
        bot.kv.set(("botkit", "remote-actors", alice["id"]), alice)
        follow = {
            "id": f"{alice['id']}/follows/1",
            "type": "Follow",
            "actor": alice["id"],
            "object": bot.actor_id,
        }
        process_inbox_job(bot.federation, follow, alice["id"])
        worker = dramatiq.Worker(bot.broker, worker_threads=2, worker_timeout=50)
        worker.start()
        try:
            _eventually(
                lambda: len(remote.requests("/users/alice/inbox")) >= 2,
                "the Accept and the welcome reach alice",
            )
        finally:
            worker.stop(timeout=10_000)
        bodies = [json.loads(r.body) for r in remote.requests("/users/alice/inbox")]
    by_type = {b["type"]: b for b in bodies}
    assert by_type["Accept"]["object"]["id"] == follow["id"]
    welcome = by_type["Create"]["object"]
    assert "Welcome, Alice!" in welcome["content"]
    assert welcome["to"] == [alice["id"]]
    assert welcome["tag"][0]["href"] == alice["id"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(60)
def test_botkit_tasks_run_serves_greetbot(tmp_path: Path) -> None:
    # `botkit-tasks run greetbot:bot` from the examples directory, environment only
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in BACKEND_VARS}
    env.update(
        GREETBOT_BASE_URL=f"http://127.0.0.1:{port}",
        BOTKIT_SQLITE_PATH=str(tmp_path / "run.sqlite3"),
        PYTHONUNBUFFERED="1",
    )
    code = "import sys; from botkit_tasks.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "run", "greetbot:bot", "--port", str(port), "--threads", "2"],
        cwd=ROOT / "examples",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = (
            f"http://127.0.0.1:{port}/.well-known/webfinger?resource=acct:greetbot@127.0.0.1:{port}"
        )
        response: Any = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                response = httpx.get(url)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert response is not None and response.status_code == 200, proc.poll()
        assert response.json()["links"][0]["href"] == f"http://127.0.0.1:{port}/users/greetbot"
        actor = httpx.get(f"http://127.0.0.1:{port}/users/greetbot")
        assert actor.json()["name"] == "Greet Bot"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "Workers: 2 threads" in output
    assert "Worker has been shut down" in output


@pytest.mark.timeout(90)
def test_dramatiq_cli_runs_greetbots_jobs(
    load_greetbot: Callable[[dict[str, str]], ModuleType], tmp_path: Path
) -> None:
    # Given greetbot's environment: an embedded SQLite file and a short interval
    env = {"BOTKIT_SQLITE_PATH": str(tmp_path / "cli.sqlite3"), "GREETBOT_INTERVAL": "0.3"}
    greetbot = load_greetbot(env)
    assert greetbot.start_schedule() is True
    # When standard `dramatiq greetbot` workers run (another process, same environment)
    proc_env = {k: v for k, v in os.environ.items() if k not in BACKEND_VARS}
    proc_env.update(env, GREETBOT_BASE_URL="http://127.0.0.1:8000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "greetbot", "--processes", "1", "--threads", "2"],
        cwd=ROOT / "examples",
        env=proc_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Then the scheduled posts are made by those workers
        _eventually(
            lambda: greetbot.bot.note_count() >= 2, "two posts made by dramatiq workers", timeout=60
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
