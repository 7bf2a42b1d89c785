"""What counting delivery outcomes costs a delivery: batched recorder vs a KV write per attempt.

The delivery actor calls :func:`botkit_tasks.federation.stats.record` once per
attempt.  The recorder adds up counts in memory and writes them at most once a
second (one compare-and-swap per touched minute, host and total); the baseline,
in the same run on the same store, writes on every attempt
(``flush_interval=0``), which is what a naive counter would do.  Reported: the
median cost per attempt of each over several interleaved rounds, and the ratio.

Usage::

    .venv/bin/python benchmarks/delivery_stats.py                 # SQLite, a few seconds
    .venv/bin/python benchmarks/delivery_stats.py --backend postgres
    .venv/bin/python benchmarks/delivery_stats.py --backend redis

PostgreSQL and Redis come from ``BOTKIT_TEST_DATABASE_URL`` / ``BOTKIT_TEST_REDIS_URL``;
data goes under a random table / key prefix, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid

from botkit_tasks.federation.stats import DeliveryStats
from botkit_tasks.kv.base import KvStore

HOSTS = 50


def _store(backend: str, tag: str) -> tuple[KvStore, object]:
    if backend == "redis":
        import redis

        from botkit_tasks.kv.redis import RedisKvStore

        url = os.environ.get("BOTKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
        return RedisKvStore(url, key_prefix=f"bench-{tag}:"), (redis.Redis.from_url(url), tag)
    from botkit_tasks.kv.sql import SqlKvStore

    if backend == "postgres":
        url = os.environ.get(
            "BOTKIT_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        )
    else:
        url = f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"
    return SqlKvStore(url, table_name=f"bench_{tag}"), None


def _per_attempt(recorder: DeliveryStats, attempts: int) -> float:
    started = time.perf_counter()
    for i in range(attempts):
        recorder.record(f"h{i % HOSTS}.example", "delivered" if i % 7 else "retry")
    recorder.flush()  # the batched one pays its write here, inside the timing
    return (time.perf_counter() - started) / attempts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "redis"], default="sqlite")
    parser.add_argument("--attempts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]
    kv, cleanup = _store(args.backend, tag)
    batched, naive = [], []
    try:
        for _ in range(args.rounds):
            batched.append(_per_attempt(DeliveryStats(kv, flush_interval=3600), args.attempts))
            naive.append(_per_attempt(DeliveryStats(kv, flush_interval=0), args.attempts // 10))
    finally:
        if args.backend == "postgres":
            import sqlalchemy as sa

            engine = kv.engine  # type: ignore[attr-defined]
            kv.close()
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "bench_{tag}"'))
            engine.dispose()
        elif cleanup is not None:
            client, prefix = cleanup  # type: ignore[misc]
            for key in client.scan_iter(match=f"bench-{prefix}:*"):
                client.delete(key)
            kv.close()
        else:
            kv.close()
    b, n = statistics.median(batched), statistics.median(naive)
    print(
        f"backend {args.backend}: {args.attempts} attempts over {HOSTS} hosts, {args.rounds} rounds"
    )
    print(f"  batched recorder (flush included): {b * 1e6:8.1f} us per attempt")
    print(f"  write per attempt (baseline):      {n * 1e6:8.1f} us per attempt")
    print(f"  ratio baseline / batched:          {n / b:8.1f}x")


if __name__ == "__main__":
    main()
