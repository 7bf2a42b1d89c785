"""SqlBroker under faults: killed workers, killed connections, garbage rows, lost LISTEN.

Each test starts from a healthy queue, breaks one thing while workers run, and
checks that every message still runs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import dramatiq
import dramatiq.worker
import pytest
import sqlalchemy as sa
from _broker_support import dramatiq_cli, make_counter, make_event_log, wait_until
from conftest import DEFAULT_DATABASE_URL, unique_name
from dramatiq.message import Message

from botkit_tasks._sql import create_engine
from botkit_tasks.brokers import SqlBroker

DIRECT_URL = os.environ.get("BOTKIT_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


_URL_FIXTURES = {"postgres": "database_url", "pgbouncer": "pgbouncer_url", "sqlite": "sqlite_url"}


@pytest.fixture(params=["postgres", "pgbouncer", "sqlite"])
def url(request: pytest.FixtureRequest) -> str:
    """Each database; "pgbouncer" is PostgreSQL through PgBouncer in transaction mode."""
    return str(request.getfixturevalue(_URL_FIXTURES[request.param]))


@pytest.fixture(params=["postgres", "pgbouncer"])
def pg_url(request: pytest.FixtureRequest) -> str:
    """PostgreSQL, directly and through PgBouncer in transaction mode."""
    return str(request.getfixturevalue(_URL_FIXTURES[request.param]))


def listen_for(url: str) -> bool:
    """``listen=False`` when ``url`` is PgBouncer's (its port is not the database's)."""
    parsed = sa.make_url(url)
    return parsed.get_backend_name() != "postgresql" or parsed.port == sa.make_url(DIRECT_URL).port


@pytest.fixture
def prefix() -> str:
    return unique_name("flt") + "_"


@pytest.fixture
def fast_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dramatiq waits 3 s before restarting a consumer after a connection error.
    monkeypatch.setattr(dramatiq.worker, "CONSUMER_RESTART_DELAY_SECS", 0.2)


@pytest.fixture
def admin(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def with_app_name(url: str, app: str) -> str:
    return str(sa.make_url(url).update_query_dict({"application_name": app}))


def start_worker(broker: SqlBroker, threads: int = 4) -> dramatiq.Worker:
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    worker.start()
    return worker


def message(queue: str, actor: str, *args: Any) -> Message[Any]:
    return Message(queue_name=queue, actor_name=actor, args=args, kwargs={}, options={})


def test_sigkilled_worker_messages_run_again(url: str, prefix: str) -> None:
    # Given 300 slow-ish messages and a worker process with a 2 s heartbeat timeout
    broker = SqlBroker(url, table_prefix=prefix, heartbeat_timeout=2, listen=listen_for(url))
    counter = make_counter("sql", url, prefix)
    queue = unique_name("q")
    env = {
        "BOTKIT_BROKER_KIND": "sql",
        "BOTKIT_BROKER_URL": url,
        "BOTKIT_BROKER_PREFIX": prefix,
        "BOTKIT_BROKER_QUEUE": queue,
        "BOTKIT_HEARTBEAT_TIMEOUT": "2",
        "BOTKIT_TASK_SLEEP": "0.02",
        "BOTKIT_PG_LISTEN": "1" if listen_for(url) else "0",
    }
    keys = [f"k{i}" for i in range(300)]
    try:
        broker.enqueue_many([message(queue, "count", k) for k in keys])

        # When the worker is killed with SIGKILL in the middle of the queue
        with dramatiq_cli("tests.broker_apps.counting", env, "-p", "1", "-t", "4") as proc:
            assert wait_until(lambda: len(counter.counts()) >= 40, 60)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        m = broker.messages
        with broker.engine.connect() as conn:
            orphaned = conn.execute(
                sa.select(sa.func.count()).where(m.c.state == "consumed")
            ).scalar()
        assert orphaned, "the kill should leave claimed rows behind"

        # Then a new worker hands the dead worker's rows out again: every message runs
        with dramatiq_cli("tests.broker_apps.counting", env, "-p", "1", "-t", "4"):
            broker.join(queue, timeout=90_000)
        assert set(counter.counts()) == set(keys)
    finally:
        counter.drop()
        broker.drop_tables()
        broker.close()


def test_sigkilled_worker_keeps_ordering_keys_in_order(url: str, prefix: str) -> None:
    # Given 10 keys x 30 keyed messages and a worker process with a 2 s heartbeat timeout
    broker = SqlBroker(url, table_prefix=prefix, heartbeat_timeout=2, listen=listen_for(url))
    events = make_event_log("sql", url, prefix)
    queue = unique_name("q")
    env = {
        "BOTKIT_BROKER_KIND": "sql",
        "BOTKIT_BROKER_URL": url,
        "BOTKIT_BROKER_PREFIX": prefix,
        "BOTKIT_BROKER_QUEUE": queue,
        "BOTKIT_HEARTBEAT_TIMEOUT": "2",
        "BOTKIT_TASK_SLEEP": "0.01",
        "BOTKIT_PG_LISTEN": "1" if listen_for(url) else "0",
    }
    keys = [f"k{n}" for n in range(10)]
    messages = [
        Message(
            queue_name=queue,
            actor_name="step",
            args=(key, i),
            kwargs={},
            options={"ordering_key": key},
        )
        for i in range(30)
        for key in keys
    ]

    def ends() -> list[tuple[str, int]]:
        return [(key, i) for key, i, event in events.all() if event == "end"]

    try:
        broker.enqueue_many(messages)

        # When the worker is killed with SIGKILL while keys are mid-way
        with dramatiq_cli("tests.broker_apps.ordered", env, "-p", "1", "-t", "4") as proc:
            assert wait_until(lambda: len(ends()) >= 60, 60)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        m = broker.messages
        with broker.engine.connect() as conn:
            orphaned = conn.execute(
                sa.select(sa.func.count()).where(m.c.state == "consumed")
            ).scalar()
        assert orphaned, "the kill should leave claimed heads behind"

        # Then a new worker runs the dead worker's heads again, and only then
        # their successors: per key, the successes never go backwards
        with dramatiq_cli("tests.broker_apps.ordered", env, "-p", "1", "-t", "4"):
            broker.join(queue, timeout=90_000)
        done = ends()
        for key in keys:
            seq = [i for k, i in done if k == key]
            assert seq == sorted(seq), (key, seq)
            assert set(seq) == set(range(30)), (key, seq)
    finally:
        events.drop()
        broker.drop_tables()
        broker.close()


def test_undecodable_row_is_dead_lettered_and_others_flow(url: str, prefix: str) -> None:
    broker = SqlBroker(url, table_prefix=prefix, listen=listen_for(url))
    queue = unique_name("q")
    seen: list[int] = []

    @dramatiq.actor(broker=broker, queue_name=queue)
    def add(x: int) -> None:
        seen.append(x)

    try:
        # Given a row of garbage bytes at the head of the queue
        with broker.engine.begin() as conn:
            conn.execute(
                broker.messages.insert().values(
                    message_id="garbage",
                    queue_name=queue,
                    actor_name="add",
                    state="queued",
                    available_at=0,
                    enqueued_at=0,
                    retries=0,
                    data=b"\xff\xfe\x00 this is not a message",
                )
            )
        for i in range(20):
            add.send(i)

        # When a worker consumes the queue
        worker = start_worker(broker)
        try:
            broker.join(queue, timeout=20_000)
        finally:
            worker.stop(timeout=10_000)

        # Then the garbage is a dead letter saying why, and the rest ran
        assert sorted(seen) == list(range(20))
        m = broker.messages
        with broker.engine.connect() as conn:
            state, error = conn.execute(
                sa.select(m.c.state, m.c.last_error).where(m.c.message_id == "garbage")
            ).one()
        assert state == "dead"
        assert "could not decode message" in error
    finally:
        broker.drop_tables()
        broker.close()


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_terminated_connections_recover_without_losing_messages(
    pg_url: str,
    prefix: str,
    admin: sa.Engine,
    fast_restart: None,
    keyed: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # keyed: 20 ordering keys, so that the cuts also hit the claims that hand
    # keys on (one pipelined round trip on PostgreSQL).
    app = unique_name("botkit_fault_")
    broker = SqlBroker(
        with_app_name(pg_url, app),
        table_prefix=prefix,
        heartbeat_timeout=3,
        listen=listen_for(pg_url),
    )
    queue = unique_name("q")
    runs: Counter[int] = Counter()
    per_key: dict[int, list[int]] = {}
    lock = threading.Lock()

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def work(x: int) -> None:
        time.sleep(0.002)
        with lock:
            runs[x] += 1
            per_key.setdefault(x % 20, []).append(x)

    def kill_backends() -> int:
        with admin.begin() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :app AND pid <> pg_backend_pid()"
                ),
                {"app": app},
            ).scalar()
        return int(killed or 0)

    try:
        broker.enqueue_many(
            [
                work.message_with_options(args=(i,), ordering_key=f"k{i % 20}")
                if keyed
                else work.message(i)
                for i in range(800)
            ]
        )
        worker = start_worker(broker)
        try:
            # When every connection of the worker is terminated, twice, mid-queue
            assert wait_until(lambda: len(runs) >= 100, 30)
            assert kill_backends() >= 1
            assert wait_until(lambda: len(runs) >= 400, 60)
            assert kill_backends() >= 1
            # Then the worker reconnects and drains the queue
            broker.join(queue, timeout=60_000)
        finally:
            worker.stop(timeout=10_000)
        assert set(runs) == set(range(800))
        # The consumers saw lost connections, not unexpected errors
        unexpected = [r for r in caplog.records if "unexpected error" in r.getMessage()]
        assert unexpected == [], unexpected[0].exc_text
        if keyed:
            # and per key the first runs came in enqueue order (a rerun of a
            # message whose ack was lost comes before its successors)
            for key, seen in per_key.items():
                first = list(dict.fromkeys(seen))
                assert first == sorted(first), (key, seen)
    finally:
        broker.drop_tables()
        broker.close()


def test_lost_listen_connection_is_reestablished(
    database_url: str, prefix: str, admin: sa.Engine
) -> None:
    # Given a worker that polls only every 30 s, so only NOTIFY can wake it fast
    app = unique_name("botkit_listen_")
    broker = SqlBroker(with_app_name(database_url, app), table_prefix=prefix, poll_interval=30)
    sender = SqlBroker(database_url, table_prefix=prefix, create_tables=False)
    queue = unique_name("q")
    ran: dict[int, float] = {}

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name="ping")
    def ping(i: int) -> None:
        ran[i] = time.monotonic()

    def listen_pid() -> int | None:
        with admin.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = :app "
                    "AND query LIKE 'LISTEN%'"
                ),
                {"app": app},
            ).scalar()

    def pickup(i: int) -> float:
        sent = time.monotonic()
        sender.enqueue(message(queue, "ping", i))
        assert wait_until(lambda: i in ran, 10)
        return ran[i] - sent

    worker = start_worker(broker)
    try:
        assert wait_until(lambda: listen_pid() is not None, 10)
        time.sleep(0.3)  # bounded: let the consumers settle into their idle wait
        before = sorted(pickup(i) for i in range(5))
        assert before[2] < 0.5, before

        # When the LISTEN connection is terminated
        old = listen_pid()
        with admin.begin() as conn:
            conn.execute(sa.select(sa.func.pg_terminate_backend(old)))

        # Then it is re-established and wake-ups are fast again
        assert wait_until(lambda: listen_pid() not in (None, old), 15)
        after = sorted(pickup(i) for i in range(5, 10))
        assert after[2] < 0.5, after
    finally:
        worker.stop(timeout=10_000)
        broker.drop_tables()
        sender.close()
        broker.close()


def test_enqueue_retries_over_terminated_connections(
    pg_url: str, prefix: str, admin: sa.Engine
) -> None:
    # Given a broker whose pooled connections the server has since terminated
    app = unique_name("botkit_enqueue_")
    broker = SqlBroker(with_app_name(pg_url, app), table_prefix=prefix, listen=listen_for(pg_url))
    queue = unique_name("q")
    try:
        broker.enqueue(message(queue, "noop", 1))
        broker.enqueue_many([message(queue, "noop", 2), message(queue, "noop", 3)])
        with admin.begin() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :app"
                ),
                {"app": app},
            ).scalar()
        assert killed

        # When messages are enqueued again, one at a time and in a batch
        broker.enqueue(message(queue, "noop", 4))
        broker.enqueue_many([message(queue, "noop", 5), message(queue, "noop", 6)])

        # Then the broker retried on fresh connections and stored all of them
        m = broker.messages
        with broker.engine.connect() as conn:
            stored = conn.execute(sa.select(sa.func.count()).select_from(m)).scalar()
        assert stored == 6
    finally:
        broker.drop_tables()
        broker.close()
