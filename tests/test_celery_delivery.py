"""The delivery outcome table on Celery: retries, ``Retry-After``, gone and permanent answers.

A real ``celery worker`` runs the federation's ``botkit_deliver`` tasks
against a scripted loopback HTTP server, on Celery's Redis transport and on
our ``botkit+sqlite`` transport; the same answers must lead to the same
attempts and dead letters as on Dramatiq (``tests/test_delivery.py``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _celery_support import celery_worker
from _http_server import Reply, ScriptedServer
from celery_apps.deliverybot import OPTIONS, build
from conftest import unique_name

from botkit_tasks.federation.delivery import host_of
from botkit_tasks.monitor import inspect

pytest.importorskip("celery")

ACTIVITY: dict[str, Any] = {
    "@context": "https://www.w3.org/ns/activitystreams",
    "id": "http://127.0.0.1/activities/celery-1",
    "type": "Create",
    "actor": "http://127.0.0.1:1/users/deliverer",
    "object": {"id": "http://127.0.0.1/notes/celery-1", "type": "Note", "content": "hé"},
}


@pytest.fixture(params=["sqlite", "redis"])
def env(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[dict[str, str]]:
    prefix = unique_name("cd")
    env = {"BOTKIT_RUNNER": "celery", "BOTKIT_PREFIX": prefix, "DELIVERYBOT": "1"}
    if request.param == "sqlite":
        env |= {"BOTKIT_BACKEND": "sqlite", "BOTKIT_SQLITE_PATH": str(tmp_path / "d.sqlite3")}
    else:
        env |= {"BOTKIT_BACKEND": "redis", "REDIS_URL": redis_url}
    yield env
    if request.param == "redis":
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()


def _wait(condition: Any, timeout: float, output: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out\n{output()}")


@pytest.mark.timeout(180)
def test_delivery_outcome_table_on_celery(env: dict[str, str]) -> None:
    backends, federation = build(env)
    with ScriptedServer() as server:
        server.script("/ok", Reply(202))
        server.script("/flaky", Reply(500), Reply(500), Reply(202))
        server.script("/limited", Reply(429, headers={"Retry-After": "1"}), Reply(202))
        server.script("/gone", Reply(410))
        server.script("/bad", Reply(400, body=b"bad activity"))
        server.script("/down", *[Reply(503)] * 10)
        paths = ["/ok", "/flaky", "/limited", "/gone", "/bad", "/down"]
        federation.send(ACTIVITY, [server.url(p) for p in paths])
        # and a delivery job whose arguments the task cannot take
        federation.runner.target.send_task(
            "botkit_deliver", args=["deliverer"], queue="botkit.outbox"
        )
        insp = inspect(backends.broker)
        with celery_worker("celery_apps.deliverybot", "botkit.outbox", env) as worker:
            attempts = OPTIONS.max_retries + 1
            _wait(lambda: len(server.requests("/down")) == attempts, 60, worker.output)
            _wait(lambda: len(insp.dead_letters()) == 3, 30, worker.output)
            time.sleep(1.0)  # anything that would run too often has had the time to
            worker.stop()
        counts = {p: len(server.requests(p)) for p in paths}
    dead = {d.args[2] if len(d.args) > 2 else "malformed": d for d in insp.dead_letters()}
    # 2xx once; 500 twice then 202: three attempts, delivered
    assert counts["/ok"] == 1 and counts["/flaky"] == 3
    # 429 with Retry-After: 1 waits its second, then delivered
    limited = server.requests("/limited")
    assert len(limited) == 2 and limited[1].received_at - limited[0].received_at >= 1.0
    # 410: one attempt, no retry, no dead letter (the followers behind it are dropped)
    assert counts["/gone"] == 1
    # 400: one attempt, dead at once with the permanent error
    assert counts["/bad"] == 1
    assert "PermanentDeliveryError" in str(dead[server.url("/bad")].traceback)
    # 503 every time: max_retries + 1 attempts, then dead; the host has a failure day
    assert counts["/down"] == OPTIONS.max_retries + 1
    assert "retries exhausted" in str(dead[server.url("/down")].traceback) or "503" in str(
        dead[server.url("/down")].traceback
    )
    assert federation.kv.get(("botkit", "hosts", host_of(server.url()))) is not None
    # malformed arguments: dead without an attempt
    assert "malformed job arguments" in str(dead["malformed"].traceback)
    assert set(dead) == {server.url("/bad"), server.url("/down"), "malformed"}
    federation.close()
    backends.close()
