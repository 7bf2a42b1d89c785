"""Fan-out of one activity to 10,000 followers: expand and enqueue every delivery.

For each backend pair the followers live in the key-value store and the
deliveries go to the broker of the same technology:

* ``SqlKvStore`` + ``SqlBroker`` on SQLite (one file, WAL);
* ``SqlKvStore`` + ``SqlBroker`` on PostgreSQL;
* ``RedisKvStore`` + Dramatiq's ``RedisBroker``.

Timed: :func:`botkit_tasks.federation.fanout.fan_out` -- read every follower
(keyset pages from the KV store), prefer shared inboxes, de-duplicate, drop
unavailable hosts, and enqueue one ``botkit_deliver`` message per inbox
(``enqueue_many`` in batches of 1,000 on ``SqlBroker``; on ``RedisBroker``,
which has no batch API, its own enqueue script calls sent through one
pipeline per batch).

Baseline, same run, same stores: the naive fan-out -- the same follower scan
but one ``actor.send()`` per inbox.  The ratio ours/baseline is printed.

Worst case for the enqueue side: every follower has its own inbox (no
shared-inbox collapsing), so 10,000 followers become 10,000 deliveries.

Usage::

    .venv/bin/python benchmarks/fanout.py              # 10,000 followers, 3 runs each
    .venv/bin/python benchmarks/fanout.py --followers 2000 --runs 1
    BOTKIT_TEST_DATABASE_URL=... BOTKIT_TEST_REDIS_URL=... .venv/bin/python benchmarks/fanout.py

Everything is written to random tables / key prefixes that are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dramatiq
import sqlalchemy as sa

from botkit_tasks.federation import Federation
from botkit_tasks.federation.delivery import DELIVER_ACTOR_NAME, activity_key
from botkit_tasks.federation.fanout import expand_inboxes, fan_out
from botkit_tasks.kv import KvStore

DATABASE_URL = os.environ.get(
    "BOTKIT_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("BOTKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ACTIVITY_ID = "https://bot.example/activities/bench"


def populate(fed: Federation, n: int) -> None:
    """Store ``n`` follower records directly (setup, not timed)."""
    for i in range(n):
        actor = f"https://h{i:06d}.example/users/u"
        fed.kv.set(
            ("botkit", fed.username, "followers", actor),
            {"id": actor, "inbox": f"{actor}/inbox", "followedAt": "2026-01-01T00:00:00+00:00"},
        )
    fed.kv.set(activity_key(fed.username, ACTIVITY_ID), {"id": ACTIVITY_ID, "type": "Create"})


def naive_fan_out(fed: Federation) -> int:
    """The baseline: the same expansion, one ``send`` per delivery."""
    deliver = fed.broker.get_actor(DELIVER_ACTOR_NAME)
    count = 0
    for inbox in expand_inboxes(fed.followers.iter()):
        deliver.send(fed.username, ACTIVITY_ID, inbox)
        count += 1
    return count


def measure(fed: Federation, n: int, runs: int) -> tuple[float, float]:
    """Median seconds of (ours, baseline), interleaved, outbox flushed between runs."""
    ours: list[float] = []
    base: list[float] = []
    for _ in range(runs):
        contenders: list[tuple[str, Callable[[], int]]] = [
            ("ours", lambda: fan_out(fed, ACTIVITY_ID).inboxes),
            ("base", lambda: naive_fan_out(fed)),
        ]
        for label, fn in contenders:
            fed.kv.delete(("botkit", fed.username, "fanout-progress", ACTIVITY_ID))
            fed.broker.flush("botkit.outbox")
            started = time.perf_counter()
            enqueued = fn()
            elapsed = time.perf_counter() - started
            assert enqueued == n, (label, enqueued)
            (ours if label == "ours" else base).append(elapsed)
    fed.broker.flush("botkit.outbox")
    return statistics.median(ours), statistics.median(base)


@contextmanager
def sqlite_pair() -> Iterator[tuple[KvStore, dramatiq.Broker]]:
    from botkit_tasks.brokers.sql import SqlBroker
    from botkit_tasks.kv import SqlKvStore

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.sqlite3"
        kv = SqlKvStore(url)
        broker = SqlBroker(url)
        try:
            yield kv, broker
        finally:
            broker.close()
            kv.close()


@contextmanager
def postgres_pair() -> Iterator[tuple[KvStore, dramatiq.Broker]]:
    from botkit_tasks.brokers.sql import SqlBroker
    from botkit_tasks.kv import SqlKvStore

    name = f"bench_{uuid.uuid4().hex[:10]}"
    kv = SqlKvStore(DATABASE_URL, table_name=f"{name}_kv")
    broker = SqlBroker(DATABASE_URL, table_prefix=f"{name}_")
    try:
        yield kv, broker
    finally:
        broker.drop_tables()
        broker.close()
        with kv.engine.begin() as conn:
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{kv.table_name}"'))
        kv.close()


@contextmanager
def redis_pair() -> Iterator[tuple[KvStore, dramatiq.Broker]]:
    import redis
    from dramatiq.brokers.redis import RedisBroker

    from botkit_tasks.kv import RedisKvStore

    name = f"bench-{uuid.uuid4().hex[:10]}"
    kv = RedisKvStore(REDIS_URL, key_prefix=f"{name}-kv:")
    broker = RedisBroker(url=REDIS_URL, namespace=f"{name}-mq")  # type: ignore[no-untyped-call]
    try:
        yield kv, broker
    finally:
        broker.flush_all()
        broker.close()
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{name}-*", count=1000):
            client.delete(key)
        client.close()
        kv.close()


PAIRS = {
    "SQLite  (SqlKvStore + SqlBroker, enqueue_many)": sqlite_pair,
    "Postgres(SqlKvStore + SqlBroker, enqueue_many)": postgres_pair,
    "Redis   (RedisKvStore + RedisBroker, pipelined)": redis_pair,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--followers", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    n = args.followers
    print(
        f"fan-out of one activity to {n:,} followers ({n:,} distinct inboxes), "
        f"median of {args.runs} runs"
    )
    print(f"{'backend':48} {'ours s':>8} {'followers/s':>12} {'naive s':>8} {'ratio':>6}")
    for label, pair in PAIRS.items():
        try:
            with pair() as (kv, broker):
                fed = Federation(
                    kv=kv, broker=broker, base_url="https://bot.example", username="bench"
                )
                populate(fed, n)
                ours, base = measure(fed, n, args.runs)
        except Exception as exc:  # a backend that is not running is reported, not fatal
            print(f"{label:48} unavailable: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        print(f"{label:48} {ours:8.3f} {n / ours:12,.0f} {base:8.3f} {base / ours:5.1f}x")


if __name__ == "__main__":
    main()
