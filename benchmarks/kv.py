"""Per-operation cost of each key-value backend against its raw driver, same run.

For every backend the same operation is timed through botkit-tasks and through
the bare driver doing the equivalent work (the same SQL shape, JSON encoding
and decoding included):

* ``SqlKvStore`` on SQLite vs ``sqlite3`` (WAL, ``synchronous=NORMAL``, the
  pragmas botkit-tasks sets), statements in autocommit;
* ``SqlKvStore`` on PostgreSQL vs psycopg 3 in autocommit (prepared
  statements after the fifth execution, psycopg's default) — once with the
  engine a URL gives (``pool_pre_ping=True``) and once (``pg-noping``) with the
  same engine without the pre-ping.  Outside ``atomic()`` the store runs on
  the calling thread's own connection, not a pooled one, so the two rows
  should agree: the pre-ping is not paid per operation;
* ``RedisKvStore`` vs redis-py ``GET``/``SET``/``MGET``, and a ``WATCH``-free
  check-and-set done as a Lua script for ``cas``.

Operations: ``get`` (existing key), ``set`` (upsert of an existing key),
``cas`` (swap an existing value for another) and ``list`` (a 100-entry prefix).
The runs are interleaved (ours, raw, raw, ours, ...) over several repetitions
and the medians reported, with the ratio ours/raw and whether it is >= 0.8.

Usage::

    .venv/bin/python benchmarks/kv.py            # ~1-2 minutes
    .venv/bin/python benchmarks/kv.py --quick    # a few seconds per backend
    BOTKIT_TEST_DATABASE_URL=... BOTKIT_TEST_REDIS_URL=... .venv/bin/python benchmarks/kv.py

Everything is written to a random table / key prefix that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from botkit_tasks._sql import create_engine
from botkit_tasks.kv import KvStore, MemoryKvStore, RedisKvStore, SqlKvStore

DATABASE_URL = os.environ.get(
    "BOTKIT_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("BOTKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

KEYS = 100  # distinct keys cycled through by get/set/cas
LIST_SIZE = 100  # entries under the listed prefix
TARGET = 0.8

OPS = ("get", "set", "cas", "list")

Runner = Callable[[int], None]


def value_for(i: int) -> dict[str, Any]:
    return {"n": i, "name": "alice", "tags": ["a", "b"]}


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def raw_key(key: tuple[str, ...]) -> bytes:
    return ("\x00".join(key) + "\x00").encode()


def ours(store: KvStore) -> dict[str, Runner]:
    keys = [("bench", f"k{i}") for i in range(KEYS)]
    for i, key in enumerate(keys):
        store.set(key, value_for(i))
    for i in range(LIST_SIZE):
        store.set(("listed", f"e{i:03d}"), value_for(i))
    state = {"flip": [0] * KEYS}

    def get(n: int) -> None:
        for i in range(n):
            store.get(keys[i % KEYS])

    def set_(n: int) -> None:
        for i in range(n):
            store.set(keys[i % KEYS], value_for(i))

    def cas(n: int) -> None:
        flip = state["flip"]
        for i in range(n):
            j = i % KEYS
            old = {"v": flip[j]}
            if not store.cas(keys[j], old if flip[j] else None, {"v": flip[j] + 1}):
                # First pass: the key holds a set() value; take it over once.
                store.set(keys[j], {"v": flip[j] + 1})
            flip[j] += 1

    def list_(n: int) -> None:
        for _ in range(n):
            for _entry in store.list(("listed",)):
                pass

    return {"get": get, "set": set_, "cas": cas, "list": list_}


def raw_sql(
    execute: Callable[[str, tuple[Any, ...]], Any],
    rowcount: Callable[[Any], int],
    table: str,
    ph: str,
) -> dict[str, Runner]:
    """Raw-driver runners; ``execute(sql, params)`` returns a cursor."""
    keys = [raw_key(("bench", f"k{i}")) for i in range(KEYS)]
    upsert = (
        f"INSERT INTO {table} (key, value) VALUES ({ph}, {ph}) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )
    select = f"SELECT value FROM {table} WHERE key = {ph}"
    update = f"UPDATE {table} SET value = {ph} WHERE key = {ph} AND value = {ph}"
    scan = f"SELECT key, value FROM {table} WHERE key >= {ph} AND key < {ph} ORDER BY key"
    for i, key in enumerate(keys):
        execute(upsert, (key, dumps(value_for(i))))
    for i in range(LIST_SIZE):
        execute(upsert, (raw_key(("listed", f"e{i:03d}")), dumps(value_for(i))))
    flip = [0] * KEYS
    low, high = raw_key(("listed",)), raw_key(("listed",))[:-1] + b"\x01"

    def get(n: int) -> None:
        for i in range(n):
            row = execute(select, (keys[i % KEYS],)).fetchone()
            json.loads(row[0])

    def set_(n: int) -> None:
        for i in range(n):
            execute(upsert, (keys[i % KEYS], dumps(value_for(i))))

    def cas(n: int) -> None:
        for i in range(n):
            j = i % KEYS
            new = dumps({"v": flip[j] + 1})
            cur = execute(update, (new, keys[j], dumps({"v": flip[j]})))
            if rowcount(cur) != 1:
                execute(upsert, (keys[j], new))  # as ours: take the key over once
            flip[j] += 1

    def list_(n: int) -> None:
        for _ in range(n):
            for key, value in execute(scan, (low, high)).fetchall():
                (tuple(bytes(key)[:-1].decode().split("\x00")), json.loads(value))

    return {"get": get, "set": set_, "cas": cas, "list": list_}


@contextmanager
def sqlite_pair(tmp: str) -> Iterator[tuple[KvStore, dict[str, Runner]]]:
    path = os.path.join(tmp, "bench.sqlite3")
    store = SqlKvStore(f"sqlite:///{path}", table_name="bench_kv")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL"):
        conn.execute(f"PRAGMA {pragma}")
    conn.execute(
        "CREATE TABLE raw_kv (key BLOB PRIMARY KEY, value TEXT NOT NULL, expires_at INTEGER)"
        " WITHOUT ROWID"
    )
    try:
        yield store, raw_sql(conn.execute, lambda c: c.rowcount, "raw_kv", "?")
    finally:
        store.close()
        conn.close()


@contextmanager
def postgres_pair(pre_ping: bool = True) -> Iterator[tuple[KvStore, dict[str, Runner]]]:
    import psycopg

    suffix = uuid.uuid4().hex[:8]
    table, raw_table = f"bench_kv_{suffix}", f"bench_raw_{suffix}"
    if pre_ping:
        # What users get from a URL: botkit_tasks._sql.create_engine's defaults.
        store = SqlKvStore(DATABASE_URL, table_name=table)
    else:
        # The same engine without pool_pre_ping (one round trip less per operation).
        engine = create_engine(DATABASE_URL, pool_pre_ping=False)
        store = SqlKvStore(engine, table_name=table)
    dsn = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(
        f"CREATE TABLE {raw_table} (key bytea PRIMARY KEY, value text NOT NULL, expires_at bigint)"
    )
    try:
        yield store, raw_sql(conn.execute, lambda c: c.rowcount, raw_table, "%s")
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {raw_table}")
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.close()
        store.close()
        if not pre_ping:
            store.engine.dispose()


@contextmanager
def redis_pair() -> Iterator[tuple[KvStore, dict[str, Runner]]]:
    import redis

    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    store = RedisKvStore(REDIS_URL, key_prefix=prefix + "ours:")
    client = redis.Redis.from_url(REDIS_URL)
    raw_prefix = (prefix + "raw:").encode()
    keys = [raw_prefix + raw_key(("bench", f"k{i}")) for i in range(KEYS)]
    for i, key in enumerate(keys):
        client.set(key, dumps(value_for(i)))
    for i in range(LIST_SIZE):
        client.set(raw_prefix + raw_key(("listed", f"e{i:03d}")), dumps(value_for(i)))
    swap = client.register_script(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then "
        "redis.call('SET', KEYS[1], ARGV[2]) return 1 end return 0"
    )
    flip = [0] * KEYS
    pattern = raw_prefix + raw_key(("listed",)) + b"*"

    def get(n: int) -> None:
        for i in range(n):
            json.loads(client.get(keys[i % KEYS]))  # type: ignore[arg-type]

    def set_(n: int) -> None:
        for i in range(n):
            client.set(keys[i % KEYS], dumps(value_for(i)))

    def cas(n: int) -> None:
        for i in range(n):
            j = i % KEYS
            new = dumps({"v": flip[j] + 1})
            if not swap(keys=[keys[j]], args=[dumps({"v": flip[j]}), new]):
                client.set(keys[j], new)  # as ours: take the key over once
            flip[j] += 1

    def list_(n: int) -> None:
        for _ in range(n):
            names = sorted(set(client.scan_iter(match=pattern, count=500)))
            for name, value in zip(names, client.mget(names), strict=True):
                if value is not None:
                    (tuple(name[len(raw_prefix) : -1].decode().split("\x00")), json.loads(value))

    try:
        yield store, {"get": get, "set": set_, "cas": cas, "list": list_}
    finally:
        store.close()
        for name in client.scan_iter(match=prefix.encode() + b"*", count=1000):
            client.delete(name)
        client.close()


@contextmanager
def memory_pair() -> Iterator[tuple[KvStore, dict[str, Runner]]]:
    yield MemoryKvStore(), {}


#: Each repetition alternates this many slices of ours and raw, so a burst of
#: load from other processes hits both sides about equally.
SLICES = 10


def timed(run: Runner, n: int) -> float:
    start = time.perf_counter()
    run(n)
    return time.perf_counter() - start


def bench(name: str, pair: Any, counts: dict[str, int], reps: int) -> list[tuple[Any, ...]]:
    rows = []
    with pair as (store, raw):
        mine = ours(store)
        for op in OPS:
            n = counts[op]
            step = max(1, n // SLICES)
            mine[op](step)  # warm-up: pools, prepared statements, caches
            if op in raw:
                raw[op](step)
            a: list[float] = []
            b: list[float] = []
            ratios: list[float] = []
            for rep in range(reps):
                t_ours = t_raw = 0.0
                for i in range(SLICES):
                    # Alternate who goes first so drift hurts both sides equally.
                    if (rep + i) % 2 == 0:
                        t_ours += timed(mine[op], step)
                        if op in raw:
                            t_raw += timed(raw[op], step)
                    else:
                        if op in raw:
                            t_raw += timed(raw[op], step)
                        t_ours += timed(mine[op], step)
                a.append(step * SLICES / t_ours)
                if op in raw:
                    b.append(step * SLICES / t_raw)
                    ratios.append(t_raw / t_ours)
            ours_rate = statistics.median(a)
            raw_rate = statistics.median(b) if b else None
            ratio = statistics.median(ratios) if ratios else None
            rows.append((name, op, ours_rate, raw_rate, ratio))
            print(
                f"  {name:<10} {op:<5} ours {ours_rate:>10,.0f}/s  raw "
                f"{raw_rate or 0:>10,.0f}/s  ratio {ratio or 0:.2f}",
                file=sys.stderr,
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (noisier numbers)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    parser.add_argument(
        "--backends",
        default="memory,sqlite,postgres,pg-noping,redis",
        help="comma-separated subset",
    )
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    scale = 1 if args.quick else 5
    wanted = args.backends.split(",")
    rows: list[tuple[Any, ...]] = []
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        pairs: list[tuple[str, Callable[[], Any], dict[str, int]]] = [
            ("memory", memory_pair, {"get": 20000, "set": 10000, "cas": 10000, "list": 200}),
            (
                "sqlite",
                lambda: sqlite_pair(tmp),
                {"get": 4000, "set": 2000, "cas": 2000, "list": 100},
            ),
            ("postgres", postgres_pair, {"get": 600, "set": 300, "cas": 300, "list": 60}),
            (
                "pg-noping",
                lambda: postgres_pair(pre_ping=False),
                {"get": 600, "set": 300, "cas": 300, "list": 60},
            ),
            ("redis", redis_pair, {"get": 1000, "set": 1000, "cas": 1000, "list": 60}),
        ]
        for name, make, counts in pairs:
            if name not in wanted:
                continue
            counts = {op: n * scale for op, n in counts.items()}
            try:
                rows += bench(name, make(), counts, reps)
            except Exception as exc:  # a service that is down skips its rows
                print(f"  {name}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
    print()
    print(f"{'backend':<10} {'op':<5} {'botkit ops/s':>13} {'raw ops/s':>11} {'ratio':>6}  >=0.8")
    for name, op, ours_rate, raw_rate, ratio in rows:
        if raw_rate:
            print(
                f"{name:<10} {op:<5} {ours_rate:>13,.0f} {raw_rate:>11,.0f} {ratio:>6.2f}  "
                f"{'yes' if ratio >= TARGET else 'NO'}"
            )
        else:
            print(f"{name:<10} {op:<5} {ours_rate:>13,.0f} {'-':>11} {'-':>6}  -")
    print(
        f"\n(medians of {reps} repetitions, each {SLICES} interleaved slices; ratio = median "
        "of per-repetition ratios; list = one 100-entry list() call)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
