"""Two bots over real loopback HTTP whose jobs run on real ``celery worker`` processes.

The bots are built as a user builds them (``from_env()`` with
``BOTKIT_RUNNER=celery``, ``Bot(..., broker=backends.broker)``,
``celery -A celery_apps.twobots worker``), on Celery's Redis transport and on
our ``botkit+`` transport over PostgreSQL and SQLite.  The test process serves
the bots' web apps; the workers deliver, fan out and process inboxes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from _celery_support import celery_worker
from celery_apps.twobots import build
from conftest import unique_name

from botkit_tasks.demo.servers import Server, free_socket
from botkit_tasks.federation.keys import remote_key_kv_key
from botkit_tasks.monitor import inspect

pytest.importorskip("celery")

QUEUES = "botkit.outbox,botkit.fanout,botkit.inbox"


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def env(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[dict[str, str]]:
    prefix = unique_name("cb")
    sockets = [free_socket(), free_socket()]
    request.node.sockets = sockets
    env = {
        "BOTKIT_RUNNER": "celery",
        "BOTKIT_PREFIX": prefix,
        "TWOBOTS_ALICE_URL": f"http://127.0.0.1:{sockets[0].getsockname()[1]}",
        "TWOBOTS_BOB_URL": f"http://127.0.0.1:{sockets[1].getsockname()[1]}",
    }
    if request.param == "sqlite":
        env |= {"BOTKIT_BACKEND": "sqlite", "BOTKIT_SQLITE_PATH": str(tmp_path / "bots.sqlite3")}
    elif request.param == "postgres":
        database_url = str(request.getfixturevalue("database_url"))
        env |= {"BOTKIT_BACKEND": "postgres", "DATABASE_URL": database_url}
    else:
        env |= {"BOTKIT_BACKEND": "redis", "REDIS_URL": redis_url}
    yield env
    for sock in sockets:
        sock.close()
    if request.param == "postgres":
        engine = sa.create_engine(env["DATABASE_URL"])
        with engine.begin() as conn:
            for table in ("kv", "messages", "workers"):
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{prefix}_{table}"'))
        engine.dispose()
    elif request.param == "redis":
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()


def _eventually(condition: Callable[[], bool], what: str, output: Callable[[], str]) -> None:
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for: {what}\n{output()}")


@pytest.mark.timeout(180)
def test_two_celery_bots_talk_over_loopback(
    env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    backends, alice, bob = build(env)
    kv = backends.kv
    # Both bots run on Celery, on one app
    assert alice.runner.kind == "celery" and bob.celery is alice.celery
    assert {"botkit_deliver", "botkit_fanout", "botkit_inbox", "remember"} <= set(bob.celery.tasks)

    def seen(event: str) -> list[Any]:
        value = kv.get(("test", event))
        return value if isinstance(value, list) else []

    sockets = request.node.sockets
    servers = [
        Server(alice.asgi_app(), [sockets[0]], "alice"),
        Server(bob.asgi_app(), [sockets[1]], "bob"),
    ]
    for server in servers:
        server.start()
    try:
        with celery_worker("celery_apps.twobots", QUEUES, env, concurrency=4) as worker:
            # When alice follows bob: bob's worker verifies and stores her, and
            # sends a signed Accept that alice's worker verifies
            alice.follow(bob.actor_id)
            _eventually(lambda: alice.is_following(bob.actor_id), "Accept", worker.output)
            _eventually(lambda: seen("followed") == [alice.actor_id], "on_follow", worker.output)
            assert bob.federation.followers.get(alice.actor_id) is not None
            assert kv.get(remote_key_kv_key(alice.federation.key_id)) is not None

            # When bob publishes, the fan-out delivers the note to alice
            activity_id = bob.publish("Hello from bob, on Celery")
            _eventually(lambda: len(seen("received")) == 1, "bob's note", worker.output)
            note = seen("received")[0]
            assert note["id"] == activity_id.removesuffix("/activity")
            assert "Hello from bob, on Celery" in note["content"]

            # When alice mentions bob, bob's mention handler runs
            alice.publish("Hi bob!", to=[bob.actor_id])
            _eventually(lambda: len(seen("mentioned")) == 1, "mention", worker.output)
            assert "Hi bob!" in seen("mentioned")[0]["content"]

            # A bot.job on Celery: retried after its first failure, then done
            bob.celery.tasks["remember"].send("token-1")
            _eventually(lambda: seen("jobs") == ["token-1"], "bot.job retried", worker.output)

            # An unsigned request is refused
            unsigned = httpx.post(bob.federation.inbox_url, json={"type": "Follow"})
            assert unsigned.status_code == 401

            # When alice unfollows, bob removes her
            alice.unfollow(bob.actor_id)
            _eventually(lambda: seen("unfollowed") == [alice.actor_id], "Undo", worker.output)
            assert bob.federation.followers.count() == 0
            worker.stop()
    finally:
        for server in servers:
            server.stop()
        alice.close()
        bob.close()
    # Nothing was dead-lettered, and monitoring reads the Celery bot's queues
    insp = inspect(backends.broker)
    dead = insp.dead_letters()
    assert dead == [], [d.traceback for d in dead]
    backends.close()
