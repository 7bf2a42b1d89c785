"""Helpers for the dashboard tests: a populated broker with its KV store, and a live server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dramatiq
import pytest
from conftest import unique_name

from botkit_tasks.kv.base import KvStore

TRACEBACK = 'Traceback (most recent call last):\n  File "job.py", line 3\nValueError: boom'


@dataclass
class Backend:
    """A broker and a KV store on the same technology, isolated by a random prefix."""

    kind: str
    broker: dramatiq.Broker
    kv: KvStore


@contextmanager
def backend(request: pytest.FixtureRequest, kind: str, tmp_path: Any) -> Iterator[Backend]:
    """A fresh broker and KV store of ``kind`` (sqlite, postgres, redis), removed afterwards."""
    if kind == "redis":
        import redis
        from dramatiq.brokers.redis import RedisBroker

        from botkit_tasks.kv.redis import RedisKvStore

        url = request.getfixturevalue("redis_url")
        namespace = unique_name("botkit-test-")
        redis_broker = RedisBroker(url=url, namespace=namespace, middleware=[])
        kv = RedisKvStore(url, key_prefix=f"{namespace}:kv:")
        try:
            yield Backend(kind, redis_broker, kv)
        finally:
            kv.close()
            redis_broker.close()
            client = redis.Redis.from_url(url)
            for key in client.scan_iter(match=f"{namespace}:*"):
                client.delete(key)
            client.close()
        return
    import sqlalchemy as sa

    from botkit_tasks._sql import create_engine
    from botkit_tasks.brokers.sql import SqlBroker
    from botkit_tasks.kv.sql import SqlKvStore

    url = (
        f"sqlite:///{tmp_path}/broker.sqlite3"
        if kind == "sqlite"
        else request.getfixturevalue("database_url")
    )
    engine = create_engine(url)
    prefix = unique_name("d") + "_"
    sql_broker = SqlBroker(engine, middleware=[], table_prefix=prefix)
    kv = SqlKvStore(engine, table_name=f"{prefix}kv")
    try:
        yield Backend(kind, sql_broker, kv)
    finally:
        kv.close()
        sql_broker.close()
        if kind == "postgres":
            with engine.begin() as conn:
                for (table,) in conn.execute(
                    sa.text("SELECT tablename FROM pg_tables WHERE tablename LIKE :p"),
                    {"p": prefix + "%"},
                ):
                    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}" CASCADE'))
        engine.dispose()


def message(queue: str, n: Any, *, actor: str = "job", **options: Any) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=queue, actor_name=actor, args=(n,), kwargs={"tag": "x"}, options=options
    )


def populate(
    broker: dramatiq.Broker,
    queue: str,
    *,
    dead: int = 2,
    actor: str = "job",
    errors: list[str] | None = None,
) -> list[str]:
    """``dead`` dead letters, 3 ready, 1 delayed and 1 retrying message on ``queue``.

    ``errors`` are the dead letters' tracebacks (``TRACEBACK`` for each by default).
    Returns the dead letters' message ids.
    """
    broker.declare_queue(queue)
    errors = errors or [TRACEBACK] * dead
    doomed = [
        broker.enqueue(
            message(queue, n, actor=actor, retries=1, traceback=errors[n % len(errors)])
        ).message_id
        for n in range(dead)
    ]
    consumer = broker.consume(queue, prefetch=dead, timeout=200)
    try:
        taken: list[Any] = []
        deadline = time.monotonic() + 30
        while len(taken) < dead and time.monotonic() < deadline:
            got = next(consumer)
            if got is not None:
                taken.append(got)
        assert len(taken) == dead
        for proxy in taken:
            proxy.fail()
            consumer.nack(proxy)
    finally:
        consumer.close()
    for n in range(3):
        broker.enqueue(message(queue, 100 + n, actor=actor))
    broker.enqueue(message(queue, 200, actor=actor), delay=600_000)
    broker.enqueue(message(queue, 300, actor=actor, retries=2, traceback=errors[0]), delay=900_000)
    return doomed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free loopback port; yield its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
