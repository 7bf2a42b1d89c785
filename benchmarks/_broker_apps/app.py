"""The benchmark's actors on the broker named by the environment.

``benchmarks/broker.py`` imports :func:`make` to enqueue, and starts
``dramatiq _broker_apps.app`` with ``BENCH_KIND``, ``BENCH_URL``,
``BENCH_PREFIX``, ``BENCH_QUEUE`` and ``BENCH_LATENCY_FILE`` set, so the
workers build the very same broker and actors.

Kinds: ``sql-pg`` / ``sql-pg-ordered`` (messages with 50 ordering keys) /
``sql-pgbouncer`` (``listen=False`` through PgBouncer) / ``sql-sqlite``
(botkit's SqlBroker), ``redis`` (Dramatiq's
RedisBroker; the prefix is its namespace) and ``dramatiq-postgres`` (its
PostgresBroker; the prefix is its schema).  Every broker keeps Dramatiq's
default middleware, as a user would.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq


def make_broker(kind: str, url: str, prefix: str) -> dramatiq.Broker:
    """Build the broker ``kind`` on ``url`` under the namespace ``prefix``."""
    if kind.startswith("sql-"):
        from botkit_tasks.brokers.sql import SqlBroker

        # sql-pgbouncer: PostgreSQL through PgBouncer in transaction mode.
        return SqlBroker(url, table_prefix=prefix, listen=kind != "sql-pgbouncer")
    if kind == "redis":
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=url, namespace=prefix)
    if kind == "dramatiq-postgres":
        from dramatiq_postgres import PostgresBroker

        # Results off: the other brokers store none either.
        return PostgresBroker(url=url, schema=prefix, results=False)
    raise ValueError(f"unknown broker kind {kind!r}")


def make(kind: str, url: str, prefix: str, queue: str) -> tuple[dramatiq.Broker, Any, Any]:
    """Return ``(broker, noop, ping)``: the broker and the two benchmark actors."""
    broker = make_broker(kind, url, prefix)
    dramatiq.set_broker(broker)
    latency_file = os.environ.get("BENCH_LATENCY_FILE", os.devnull)

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def noop() -> None:
        pass

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def ping(sent: float) -> None:
        received = time.time()
        # O_APPEND writes of one short line are atomic between worker processes.
        with open(latency_file, "a") as f:
            f.write(f"{sent!r} {received!r}\n")

    return broker, noop, ping


if os.environ.get("BENCH_KIND"):
    broker, noop, ping = make(
        os.environ["BENCH_KIND"],
        os.environ["BENCH_URL"],
        os.environ["BENCH_PREFIX"],
        os.environ["BENCH_QUEUE"],
    )
