"""Dramatiq results and rate limiting on botkit key-value stores.

The same specifications run against every store (memory, SQLite, PostgreSQL,
Redis) and, for results, through a real ``dramatiq.Worker`` on a StubBroker
and on SqlBroker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from conftest import unique_name
from dramatiq.brokers.stub import StubBroker
from dramatiq.rate_limits import Barrier, ConcurrentRateLimiter, WindowRateLimiter
from dramatiq.results import ResultFailure, ResultMissing, Results, ResultTimeout

from botkit_tasks.results import KvRateLimiterBackend, KvResultBackend

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
def kv(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    from botkit_tasks.kv import MemoryKvStore, RedisKvStore, SqlKvStore

    store: Any
    if request.param == "memory":
        store = MemoryKvStore()
    elif request.param == "sqlite":
        store = SqlKvStore(f"sqlite:///{tmp_path}/kv.sqlite3")
    elif request.param == "postgres":
        url = request.getfixturevalue("database_url")
        store = SqlKvStore(url, table_name=unique_name("kv_"))
    else:
        url = request.getfixturevalue("redis_url")
        store = RedisKvStore(url, key_prefix=unique_name("botkit-test:") + ":")
    yield store
    if request.param == "postgres":
        import sqlalchemy as sa

        with store.engine.begin() as conn:
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{store.table_name}"'))
    elif request.param == "redis":
        import redis

        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        for key in client.scan_iter(match=f"{store.key_prefix}*"):
            client.delete(key)
        client.close()
    store.close()


def _run_threads(target: Any, count: int) -> None:
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)


# --- results ------------------------------------------------------------------


def _results_roundtrip(broker: dramatiq.Broker, backend: KvResultBackend) -> None:
    queue = unique_name("q")

    @dramatiq.actor(broker=broker, queue_name=queue, store_results=True, max_retries=0)
    def add(x: int, y: int) -> int:
        time.sleep(0.05)  # the caller really has to wait
        return x + y

    @dramatiq.actor(broker=broker, queue_name=queue, store_results=True, max_retries=0)
    def fail() -> None:
        raise ValueError("boom")

    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        # Given messages sent to running workers
        message = add.send(20, 22)
        failing = fail.send()
        # When the caller blocks on their results
        # Then it receives the return value, and the failure as ResultFailure
        assert backend.get_result(message, block=True, timeout=20_000) == 42
        with pytest.raises(ResultFailure) as info:
            backend.get_result(failing, block=True, timeout=20_000)
        assert info.value.orig_exc_type == "ValueError"
        assert info.value.orig_exc_msg == "boom"
        # And a result read later without blocking is still there
        assert message.get_result(backend=backend) == 42
    finally:
        worker.stop()


def test_results_through_a_worker_on_stub_broker(kv: Any) -> None:
    backend = KvResultBackend(kv, namespace=unique_name("ns"))
    broker = StubBroker()
    broker.add_middleware(Results(backend=backend))
    broker.emit_after("process_boot")
    try:
        _results_roundtrip(broker, backend)
    finally:
        broker.close()


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
def test_results_through_a_worker_on_sql_broker(
    backend_name: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    pytest.importorskip("botkit_tasks.brokers.sql")
    from botkit_tasks._sql import create_engine
    from botkit_tasks.brokers.sql import SqlBroker
    from botkit_tasks.kv import SqlKvStore

    if backend_name == "sqlite":
        url = f"sqlite:///{tmp_path}/bot.sqlite3"
    else:
        url = request.getfixturevalue("database_url")
    engine = create_engine(url)
    prefix = unique_name("r") + "_"
    kv = SqlKvStore(engine, table_name=f"{prefix}kv")
    backend = KvResultBackend(kv)
    broker = SqlBroker(engine, table_prefix=prefix)
    broker.add_middleware(Results(backend=backend))
    try:
        _results_roundtrip(broker, backend)
    finally:
        broker.close()
        kv.close()
        if backend_name == "postgres":
            import sqlalchemy as sa

            with engine.begin() as conn:
                for (table,) in conn.execute(
                    sa.text("SELECT tablename FROM pg_tables WHERE tablename LIKE :p"),
                    {"p": prefix + "%"},
                ):
                    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}" CASCADE'))
        engine.dispose()


def test_result_missing_timeout_and_expiry(kv: Any) -> None:
    backend = KvResultBackend(kv)
    message = dramatiq.Message(queue_name="default", actor_name="a", args=(), kwargs={}, options={})
    # Given no result yet: a plain get raises ResultMissing, a blocking one times out
    with pytest.raises(ResultMissing):
        backend.get_result(message)
    started = time.monotonic()
    with pytest.raises(ResultTimeout):
        backend.get_result(message, block=True, timeout=300)
    assert 0.25 <= time.monotonic() - started < 5
    # When a result is stored with a 1 s TTL, it is readable, then gone
    backend.store_result(message, {"answer": [1, 2]}, 1000)
    assert backend.get_result(message) == {"answer": [1, 2]}
    time.sleep(1.2)
    with pytest.raises(ResultMissing):
        backend.get_result(message)


def test_blocking_get_wakes_when_another_thread_stores(kv: Any) -> None:
    backend = KvResultBackend(kv)
    message = dramatiq.Message(queue_name="default", actor_name="a", args=(), kwargs={}, options={})
    timer = threading.Timer(0.2, backend.store_result, (message, "done", 60_000))
    timer.start()
    started = time.monotonic()
    assert backend.get_result(message, block=True, timeout=10_000) == "done"
    assert time.monotonic() - started < 2
    timer.join()


# --- rate limiting --------------------------------------------------------------


def test_incr_and_decr_are_exact_under_concurrency(kv: Any) -> None:
    backend = KvRateLimiterBackend(kv)
    key = unique_name("counter")
    results: list[bool] = []
    lock = threading.Lock()

    # Given 6 threads each incrementing 10 times with a ceiling of 45
    def work() -> None:
        for _ in range(10):
            ok = backend.incr(key, 1, 45, 60_000)
            with lock:
                results.append(ok)

    _run_threads(work, 6)
    # Then exactly 45 increments succeed and the counter is exactly 45
    assert results.count(True) == 45
    assert backend.decr(key, 45, 0, 60_000)
    assert not backend.decr(key, 1, 0, 60_000)
    assert backend.add(key + "-new", 3, 60_000)
    assert not backend.add(key + "-new", 4, 60_000)


def test_concurrent_rate_limiter_admits_at_most_limit(kv: Any) -> None:
    backend = KvRateLimiterBackend(kv)
    limiter = ConcurrentRateLimiter(backend, unique_name("mutex"), limit=2, ttl=30_000)
    lock = threading.Lock()
    active = 0
    peak = 0
    admitted = 0

    def work() -> None:
        nonlocal active, peak, admitted
        for _ in range(3):
            with limiter.acquire(raise_on_failure=False) as acquired:
                if not acquired:
                    time.sleep(0.01)
                    continue
                with lock:
                    active += 1
                    admitted += 1
                    peak = max(peak, active)
                time.sleep(0.05)
                with lock:
                    active -= 1

    _run_threads(work, 6)
    # Then never more than two holders at once, and slots were really handed out
    assert peak <= 2
    assert admitted >= 2
    # And every slot was released: two fresh acquisitions succeed
    with (
        limiter.acquire(raise_on_failure=False) as first,
        limiter.acquire(raise_on_failure=False) as second,
    ):
        assert first and second


def test_window_rate_limiter_admits_limit_per_window(kv: Any) -> None:
    backend = KvRateLimiterBackend(kv)
    limiter = WindowRateLimiter(backend, unique_name("window"), limit=5, window=3)
    admitted = 0
    lock = threading.Lock()
    # Align to the start of a second so the whole burst lands in one window
    time.sleep(1 - (time.time() % 1))

    def work() -> None:
        nonlocal admitted
        for _ in range(4):
            with limiter.acquire(raise_on_failure=False) as acquired:
                if acquired:
                    with lock:
                        admitted += 1

    _run_threads(work, 4)
    # Then 16 attempts inside a 3-second window admit exactly the limit
    assert admitted == 5


def test_barrier_releases_all_parties(kv: Any) -> None:
    backend = KvRateLimiterBackend(kv)
    barrier = Barrier(backend, unique_name("barrier"), ttl=30_000)
    assert barrier.create(parties=3)
    assert not barrier.create(parties=3)  # created once
    outcomes: list[bool] = []
    lock = threading.Lock()

    def party() -> None:
        released = barrier.wait(block=True, timeout=20_000)
        with lock:
            outcomes.append(released)

    # Given two parties blocked on the barrier
    waiting = [threading.Thread(target=party) for _ in range(2)]
    for thread in waiting:
        thread.start()
    time.sleep(0.2)
    assert outcomes == []
    # When the third arrives, everyone is released
    assert barrier.wait(block=False)
    for thread in waiting:
        thread.join(20)
    assert outcomes == [True, True]


def test_barrier_wait_times_out(kv: Any) -> None:
    backend = KvRateLimiterBackend(kv)
    barrier = Barrier(backend, unique_name("barrier"), ttl=30_000)
    barrier.create(parties=2)
    started = time.monotonic()
    assert barrier.wait(block=True, timeout=300) is False
    assert time.monotonic() - started >= 0.25


_INCR_SCRIPT = """
import sys
from botkit_tasks.kv import SqlKvStore
from botkit_tasks.results import KvRateLimiterBackend

url, table, key = sys.argv[1:4]
backend = KvRateLimiterBackend(SqlKvStore(url, table_name=table))
print(sum(backend.incr(key, 1, 50, 60_000) for _ in range(25)))
"""


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
def test_counters_are_exact_across_processes(
    backend_name: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    import subprocess
    import sys

    from botkit_tasks.kv import SqlKvStore

    if backend_name == "sqlite":
        url = f"sqlite:///{tmp_path}/kv.sqlite3"
    else:
        url = request.getfixturevalue("database_url")
    table = unique_name("kv_")
    store = SqlKvStore(url, table_name=table)  # created before the race
    key = unique_name("counter")
    try:
        # Given three processes each trying 25 increments under a ceiling of 50
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _INCR_SCRIPT, url, table, key],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        successes = [int(p.communicate(timeout=100)[0]) for p in procs]
        # Then exactly 50 succeed in total and the stored counter is 50
        assert sum(successes) == 50
        assert KvRateLimiterBackend(store).decr(key, 50, 0, 60_000)
        assert not KvRateLimiterBackend(store).decr(key, 1, 0, 60_000)
    finally:
        if backend_name == "postgres":
            import sqlalchemy as sa

            with store.engine.begin() as conn:
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        store.close()


@pytest.mark.parametrize("backend", [KvResultBackend, KvRateLimiterBackend])
@pytest.mark.parametrize("key_prefix", ["myapp", b"myapp", [1], ("ok", None)])
def test_malformed_key_prefix_is_refused_at_construction(backend: Any, key_prefix: Any) -> None:
    from botkit_tasks.kv import MemoryKvStore

    # A bare string used to become one key part per letter: ("m", "y", "a", "p", "p")
    with pytest.raises(TypeError, match="key_prefix"):
        backend(MemoryKvStore(), key_prefix=key_prefix)


@pytest.mark.parametrize("namespace", [5, None])
def test_non_string_result_namespace_is_refused_at_construction(namespace: Any) -> None:
    from botkit_tasks.kv import MemoryKvStore

    with pytest.raises(TypeError, match="namespace"):
        KvResultBackend(MemoryKvStore(), namespace=namespace)
