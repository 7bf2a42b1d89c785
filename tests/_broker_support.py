"""Helpers shared by the broker tests and the worker modules they start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent


class SqlCounter:
    """Per-key run counts in a ``{prefix}runs`` table, safe across processes."""

    def __init__(self, url: str, prefix: str) -> None:
        from botkit_tasks._sql import create_engine

        # No prepared statements: the URL may point at PgBouncer in transaction mode.
        postgres = sa.make_url(url).get_backend_name() == "postgresql"
        self.engine = create_engine(
            url, connect_args={"prepare_threshold": None} if postgres else {}
        )
        self.table = sa.Table(
            f"{prefix}runs",
            sa.MetaData(),
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("n", sa.Integer, nullable=False),
        )
        self.table.metadata.create_all(self.engine, checkfirst=True)
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(self.table).values(key=sa.bindparam("key"), n=1)
        self._incr = stmt.on_conflict_do_update(
            index_elements=[self.table.c.key], set_={"n": self.table.c.n + 1}
        )

    def incr(self, key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(self._incr, {"key": key})

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {k: n for k, n in conn.execute(sa.select(self.table.c.key, self.table.c.n))}

    def drop(self) -> None:
        self.table.metadata.drop_all(self.engine, checkfirst=True)
        self.engine.dispose()


class RedisCounter:
    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.key = f"{prefix}:runs"

    def incr(self, key: str) -> None:
        self.client.hincrby(self.key, key, 1)

    def counts(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(self.key).items()}

    def drop(self) -> None:
        self.client.delete(self.key)
        self.client.close()


def make_counter(kind: str, url: str, prefix: str) -> Any:
    return SqlCounter(url, prefix) if kind == "sql" else RedisCounter(url, prefix)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextmanager
def dramatiq_cli(
    module: str, env: dict[str, str], *args: str, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``dramatiq <module> *args`` in its own process group; stop it on exit."""
    command = [str(Path(sys.executable).parent / "dramatiq"), module, *args]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **env, "dramatiq_restart_delay": "300"},
        stdout=out,
        stderr=out,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            # The master forwards SIGTERM to its workers; signalling the whole
            # group would deliver a second one, which Dramatiq treats as "kill".
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if log:
            out.close()  # type: ignore[union-attr]


class SqlEventLog:
    """``(key, i, event)`` rows in a ``{prefix}events`` table, in commit order."""

    def __init__(self, url: str, prefix: str) -> None:
        from botkit_tasks._sql import create_engine

        postgres = sa.make_url(url).get_backend_name() == "postgresql"
        self.engine = create_engine(
            url, connect_args={"prepare_threshold": None} if postgres else {}
        )
        self.table = sa.Table(
            f"{prefix}events",
            sa.MetaData(),
            sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
            sa.Column("key", sa.String(64), nullable=False),
            sa.Column("i", sa.Integer, nullable=False),
            sa.Column("event", sa.String(8), nullable=False),
        )
        self.table.metadata.create_all(self.engine, checkfirst=True)

    def add(self, key: str, i: int, event: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.table.insert().values(key=key, i=i, event=event))

    def all(self) -> list[tuple[str, int, str]]:
        t = self.table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.key, t.c.i, t.c.event).order_by(t.c.id))
            return [(k, i, e) for k, i, e in rows]

    def drop(self) -> None:
        self.table.metadata.drop_all(self.engine, checkfirst=True)
        self.engine.dispose()


class RedisEventLog:
    """The same log as a Redis list (``RPUSH`` is atomic and ordered)."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.key = f"{prefix}:events"

    def add(self, key: str, i: int, event: str) -> None:
        self.client.rpush(self.key, f"{key}\t{i}\t{event}")

    def all(self) -> list[tuple[str, int, str]]:
        out = []
        for raw in self.client.lrange(self.key, 0, -1):
            key, i, event = raw.decode().split("\t")
            out.append((key, int(i), event))
        return out

    def drop(self) -> None:
        self.client.delete(self.key)
        self.client.close()


def make_event_log(kind: str, url: str, prefix: str) -> Any:
    return SqlEventLog(url, prefix) if kind == "sql" else RedisEventLog(url, prefix)


@contextmanager
def running_worker(broker: Any, threads: int = 4) -> Iterator[Any]:
    """An in-process ``dramatiq.Worker`` on ``broker``, stopped on the way out."""
    import dramatiq

    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(timeout=10_000)
