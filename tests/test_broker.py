"""Broker conformance: one body of specifications run through real Dramatiq workers
against SqlBroker on PostgreSQL, SqlBroker on SQLite and Dramatiq's RedisBroker.

RedisBroker is here as the reference users know: where a test cannot hold for
it (no ``enqueue_many``, no transactions, no traceback in dead letters) the
difference is stated in the test.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import pytest
import sqlalchemy as sa
from _broker_support import dramatiq_cli, make_counter, running_worker, wait_until
from conftest import unique_name
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name
from dramatiq.encoder import PickleEncoder
from dramatiq.errors import QueueJoinTimeout
from dramatiq.message import Message
from dramatiq.middleware import Middleware

from botkit_tasks import atomic
from botkit_tasks._sql import create_engine
from botkit_tasks.brokers import SqlBroker

pytestmark = pytest.mark.timeout(90)


@dataclass
class Backend:
    """One broker backend under test and everything it created."""

    kind: str  # "postgres" | "pgbouncer" (PostgreSQL through it, listen=False) | "sqlite" | "redis"
    url: str
    prefix: str = field(default_factory=lambda: unique_name("bk") + "_")
    brokers: list[Any] = field(default_factory=list)
    counters: list[Any] = field(default_factory=list)

    @property
    def is_sql(self) -> bool:
        return self.kind != "redis"

    def make_broker(self, url_or_engine: Any = None, **kwargs: Any) -> Any:
        if self.kind == "pgbouncer":
            kwargs.setdefault("listen", False)
        if self.is_sql:
            broker: Any = SqlBroker(url_or_engine or self.url, table_prefix=self.prefix, **kwargs)
        else:
            broker = RedisBroker(url=self.url, namespace=self.prefix, **kwargs)
        self.brokers.append(broker)
        return broker

    def counter(self) -> Any:
        counter = make_counter("sql" if self.is_sql else "redis", self.url, self.prefix)
        self.counters.append(counter)
        return counter

    def env(self, queue: str) -> dict[str, str]:
        return {
            "BOTKIT_BROKER_KIND": "sql" if self.is_sql else "redis",
            "BOTKIT_BROKER_URL": self.url,
            "BOTKIT_BROKER_PREFIX": self.prefix,
            "BOTKIT_BROKER_QUEUE": queue,
            "BOTKIT_PG_LISTEN": "0" if self.kind == "pgbouncer" else "1",
        }

    def dead_letters(self, broker: Any, queue: str) -> list[Message[Any]]:
        if self.is_sql:
            return list(broker.dead_letters(queue))
        data = broker.client.hvals(f"{self.prefix}:{queue}.XQ.msgs")
        return [Message.decode(d) for d in data]

    def requeue_dead(self, broker: Any, queue: str) -> int:
        if self.is_sql:
            return int(broker.requeue_dead(queue))
        # RedisBroker has no API for it: do what dramatiq_dashboard does.
        client, key = broker.client, f"{self.prefix}:{queue}.XQ"
        entries = client.hgetall(f"{key}.msgs")
        for redis_id, data in entries.items():
            message = Message.decode(data)
            broker.enqueue(message.copy(queue_name=queue, options={"retries": 0}))
            client.hdel(f"{key}.msgs", redis_id)
            client.zrem(key, redis_id)
        return len(entries)

    def cleanup(self) -> None:
        for counter in self.counters:
            counter.drop()
        for broker in self.brokers:
            if self.is_sql:
                broker.drop_tables()
            else:
                for key in broker.client.scan_iter(f"{self.prefix}*"):
                    broker.client.delete(key)
            broker.close()


def _backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    fixture = {
        "postgres": "database_url",
        "pgbouncer": "pgbouncer_url",
        "sqlite": "sqlite_url",
        "redis": "redis_url",
    }
    backend = Backend(request.param, request.getfixturevalue(fixture[request.param]))
    try:
        yield backend
    finally:
        backend.cleanup()


@pytest.fixture(params=["postgres", "pgbouncer", "sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Every broker: SqlBroker on both databases (PostgreSQL also through PgBouncer
    in transaction mode, with ``listen=False``), and RedisBroker as the yardstick."""
    yield from _backend(request)


@pytest.fixture(params=["postgres", "pgbouncer", "sqlite"])
def sql_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """SqlBroker only, for what RedisBroker does not offer (enqueue_many,
    transactions, a dead-letter TTL in seconds)."""
    yield from _backend(request)


class Recorder(Middleware):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def after_declare_queue(self, broker: Any, queue_name: str) -> None:
        self.events.append(("declare_queue", queue_name))

    def after_declare_delay_queue(self, broker: Any, queue_name: str) -> None:
        self.events.append(("declare_delay_queue", queue_name))

    def before_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
        self.events.append(("before_enqueue", message.queue_name))

    def after_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
        self.events.append(("after_enqueue", message.queue_name))


def test_declares_queues_and_emits_hooks(backend: Backend) -> None:
    # Given a broker with a recording middleware
    recorder = Recorder()
    broker = backend.make_broker(middleware=[recorder])
    queue = unique_name("q")

    # When an actor is declared and messages are sent, now and later
    @dramatiq.actor(broker=broker, queue_name=queue)
    def noop() -> None:
        pass

    noop.send()
    delayed = noop.send_with_options(delay=60_000)

    # Then the queue and its delay queue are declared and every hook ran
    assert broker.get_declared_queues() == {queue}
    assert broker.get_declared_delay_queues() == {dq_name(queue)}
    assert recorder.events == [
        ("declare_queue", queue),
        ("declare_delay_queue", dq_name(queue)),
        ("before_enqueue", queue),
        ("after_enqueue", queue),
        ("before_enqueue", dq_name(queue)),
        ("after_enqueue", dq_name(queue)),
    ]
    assert delayed.queue_name == dq_name(queue)
    assert delayed.options["eta"] > time.time() * 1000


def test_sent_messages_run(backend: Backend) -> None:
    broker = backend.make_broker()
    queue = unique_name("q")
    seen: list[int] = []

    @dramatiq.actor(broker=broker, queue_name=queue)
    def add(x: int) -> None:
        seen.append(x)

    with running_worker(broker):
        for i in range(50):
            add.send(i)
        broker.join(queue, timeout=20_000)

    assert sorted(seen) == list(range(50))


def test_retries_with_backoff_and_explicit_retry_delay(backend: Backend) -> None:
    broker = backend.make_broker()
    queue = unique_name("q")
    runs: dict[str, list[float]] = defaultdict(list)

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=5, min_backoff=20, max_backoff=80)
    def flaky(key: str) -> None:
        runs[key].append(time.monotonic())
        if len(runs[key]) < 3:
            raise ValueError("not yet")

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=5)
    def later(key: str) -> None:
        runs[key].append(time.monotonic())
        if len(runs[key]) == 1:
            raise dramatiq.Retry(delay=400)

    with running_worker(broker):
        flaky.send("flaky")
        later.send("later")
        assert wait_until(lambda: len(runs["flaky"]) == 3 and len(runs["later"]) == 2, 20)
        broker.join(queue, timeout=10_000)

    # Backoff: each retry waits at least min_backoff; Retry(delay=) is honoured.
    first, second, third = runs["flaky"]
    assert second - first >= 0.02 and third - second >= 0.02
    gap = runs["later"][1] - runs["later"][0]
    assert 0.4 <= gap < 2.5, gap
    assert backend.dead_letters(broker, queue) == []


def test_delayed_message_runs_after_its_eta_and_not_before(backend: Backend) -> None:
    # SqlBroker polls only every 30 s here: only its timer for the ETA can run
    # the message within the bound below, however loaded the machine is.
    broker = backend.make_broker(poll_interval=30) if backend.is_sql else backend.make_broker()
    queue = unique_name("q")
    ran_at: list[float] = []

    @dramatiq.actor(broker=broker, queue_name=queue)
    def stamp() -> None:
        ran_at.append(time.monotonic())

    with running_worker(broker):
        stamp.send()  # warm the worker up so that only the delay is measured
        assert wait_until(lambda: len(ran_at) == 1, 10)
        sent = time.monotonic()
        stamp.send_with_options(delay=500)
        assert wait_until(lambda: len(ran_at) == 2, 10)

    elapsed = ran_at[1] - sent
    assert elapsed >= 0.5
    # SqlBroker sets a timer for the ETA; RedisBroker polls with backoff.
    assert elapsed < 2.0, elapsed


def test_dead_letters_keep_the_traceback_and_can_be_requeued(backend: Backend) -> None:
    broker = backend.make_broker()
    queue = unique_name("q")
    failing = threading.Event()
    failing.set()
    done: list[int] = []

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def fragile(x: int) -> None:
        if failing.is_set():
            raise RuntimeError("kaput")
        done.append(x)

    with running_worker(broker):
        fragile.send(7)
        broker.join(queue, timeout=10_000)
        dead = backend.dead_letters(broker, queue)
        assert [list(m.args) for m in dead] == [[7]]
        if backend.is_sql:
            # RedisBroker keeps the payload as first enqueued, without traceback.
            assert "RuntimeError: kaput" in dead[0].options["traceback"]
            assert dead[0].options["retries"] == 1

        failing.clear()
        assert backend.requeue_dead(broker, queue) == 1
        broker.join(queue, timeout=10_000)

    assert done == [7]
    assert backend.dead_letters(broker, queue) == []


def test_dead_letters_expire_after_their_ttl(sql_backend: Backend) -> None:
    backend = sql_backend
    # Given dead letters kept 1 s and maintenance every 0.1 s (heartbeat_timeout / 4)
    broker = backend.make_broker(dead_message_ttl=1.0, heartbeat_timeout=0.4)
    queue = unique_name("q")

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def doomed() -> None:
        raise RuntimeError("doomed")

    with running_worker(broker):
        doomed.send()
        broker.join(queue, timeout=10_000)
        assert len(broker.dead_letters(queue)) == 1
        # Then a running consumer's maintenance purges it once it is old enough
        assert wait_until(lambda: broker.dead_letters(queue) == [], 10, interval=0.1)


def test_enqueue_many_zero_one_thousands_and_all_or_nothing(sql_backend: Backend) -> None:
    backend = sql_backend
    broker = backend.make_broker()
    queue = unique_name("q")
    seen: list[Any] = []

    @dramatiq.actor(broker=broker, queue_name=queue)
    def add(x: Any) -> None:
        seen.append(x)

    assert broker.enqueue_many([]) == []
    [one] = broker.enqueue_many([add.message("one")])
    assert one.queue_name == queue
    many = broker.enqueue_many([add.message(i) for i in range(3000)])
    assert [m.args[0] for m in many] == list(range(3000))
    [late] = broker.enqueue_many([add.message("late")], delay=200)
    assert late.queue_name == dq_name(queue) and "eta" in late.options

    # An unencodable message anywhere in the batch means nothing is stored.
    with pytest.raises(TypeError):
        broker.enqueue_many([add.message("valid"), add.message(object())])
    with broker.engine.connect() as conn:
        stored = conn.execute(sa.select(sa.func.count()).select_from(broker.messages)).scalar()
    assert stored == 3002

    with running_worker(broker, threads=8):
        broker.join(queue, timeout=60_000)
    assert len(seen) == 3002 and {"one", "late"} <= set(seen)


def test_prefetch_is_respected(backend: Backend) -> None:
    broker = backend.make_broker()
    queue = unique_name("q")

    @dramatiq.actor(broker=broker, queue_name=queue)
    def noop(x: int) -> None:
        pass

    for i in range(5):
        noop.send(i)
    consumer = broker.consume(queue, prefetch=2, timeout=300)
    try:
        first, second = next(consumer), next(consumer)
        assert first is not None and second is not None
        # Two unacked: the consumer must not hand out a third.
        assert next(consumer) is None
        if backend.is_sql:
            m = broker.messages
            with broker.engine.connect() as conn:
                claimed = conn.execute(
                    sa.select(sa.func.count()).where(m.c.state == "consumed")
                ).scalar()
            assert claimed == 2
        consumer.ack(first)
        third = next(consumer)
        assert third is not None and third.args[0] not in (first.args[0], second.args[0])
        assert next(consumer) is None
        consumer.ack(second)
        consumer.ack(third)
    finally:
        consumer.close()


def test_closing_a_consumer_hands_back_its_prefetched_messages(sql_backend: Backend) -> None:
    backend = sql_backend
    broker = backend.make_broker()
    queue = unique_name("q")

    @dramatiq.actor(broker=broker, queue_name=queue)
    def noop(x: int) -> None:
        pass

    for i in range(6):
        noop.send(i)
    # Given a consumer that claimed a batch but handed out only one message
    consumer = broker.consume(queue, prefetch=6, timeout=300)
    first = next(consumer)
    assert first is not None
    consumer.ack(first)
    # When it closes (as a stopping worker closes it)
    consumer.close()
    # Then the five it still held are queued again at once, not after a heartbeat lapse
    m = broker.messages
    with broker.engine.connect() as conn:
        states = conn.execute(
            sa.select(m.c.state, sa.func.count()).where(m.c.queue_name == queue).group_by(m.c.state)
        ).all()
    assert dict(states) == {"queued": 5}
    other = broker.consume(queue, prefetch=6, timeout=300)
    try:
        got = [next(other) for _ in range(5)]
        assert sorted(p.args[0] for p in got if p is not None) == [
            i for i in range(6) if i != first.args[0]
        ]
        for proxy in got:
            assert proxy is not None
            other.ack(proxy)
    finally:
        other.close()


def test_join_flush_and_flush_all(backend: Backend) -> None:
    broker = backend.make_broker()
    q1, q2 = unique_name("q"), unique_name("q")

    @dramatiq.actor(broker=broker, queue_name=q1)
    def one() -> None:
        pass

    @dramatiq.actor(broker=broker, queue_name=q2)
    def two() -> None:
        pass

    for _ in range(3):
        one.send()
        two.send()
    one.send_with_options(delay=60_000)

    with pytest.raises(QueueJoinTimeout):
        broker.join(q1, timeout=100)
    broker.flush(q1)  # drops ready and delayed messages
    broker.join(q1, timeout=1_000)
    with pytest.raises(QueueJoinTimeout):
        broker.join(q2, timeout=100)
    broker.flush_all()
    broker.join(q2, timeout=1_000)


def test_pickle_encoded_messages(backend: Backend) -> None:
    previous = dramatiq.get_encoder()
    dramatiq.set_encoder(PickleEncoder())
    try:
        broker = backend.make_broker()
        queue = unique_name("q")
        seen: list[Any] = []

        @dramatiq.actor(broker=broker, queue_name=queue)
        def keep(value: Any) -> None:
            seen.append(value)

        with running_worker(broker):
            keep.send({1, 2, 3})  # a set: JSON cannot carry it
            keep.send_with_options(args=(frozenset({"x"}),), delay=50)
            broker.join(queue, timeout=10_000)
    finally:
        dramatiq.set_encoder(previous)
    assert sorted(seen, key=len) == [frozenset({"x"}), {1, 2, 3}]


def test_dramatiq_cli_runs_messages_enqueued_before_it_started(backend: Backend) -> None:
    # Given messages (one delayed) stored before any worker exists
    broker = backend.make_broker()
    queue = unique_name("q")
    counter = backend.counter()

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name="count")
    def count(key: str) -> None:
        raise AssertionError("runs in the CLI worker only")

    for i in range(20):
        count.send(f"k{i}")
    count.send_with_options(args=("delayed",), delay=500)

    # When the dramatiq CLI starts a worker process on the module
    with dramatiq_cli("tests.broker_apps.counting", backend.env(queue), "-p", "1", "-t", "2"):
        broker.join(queue, timeout=60_000)

    # Then every message ran once
    expected = {f"k{i}" for i in range(20)} | {"delayed"}
    assert counter.counts() == dict.fromkeys(expected, 1)


def test_two_worker_processes_run_each_message_exactly_once(backend: Backend) -> None:
    broker = backend.make_broker()
    queue = unique_name("q")
    counter = backend.counter()

    @dramatiq.actor(broker=broker, queue_name=queue, actor_name="count")
    def count(key: str) -> None:
        raise AssertionError("runs in the CLI workers only")

    keys = [f"k{i}" for i in range(3000)]
    if backend.is_sql:
        broker.enqueue_many([count.message(k) for k in keys])
    else:
        for key in keys:
            count.send(key)

    with dramatiq_cli("tests.broker_apps.counting", backend.env(queue), "-p", "2", "-t", "4"):
        broker.join(queue, timeout=80_000)

    counts = counter.counts()
    assert len(counts) == len(keys)
    assert set(counts.values()) == {1}


def test_atomic_commit_and_rollback(sql_backend: Backend) -> None:
    backend = sql_backend
    engine = create_engine(backend.url)
    try:
        broker = backend.make_broker(engine)
        queue = unique_name("q")
        seen: list[str] = []

        @dramatiq.actor(broker=broker, queue_name=queue)
        def record(x: str) -> None:
            seen.append(x)

        # A block that raises leaves no message behind...
        with pytest.raises(RuntimeError), atomic(engine):
            record.send("rolled back")
            raise RuntimeError("abort")
        broker.join(queue, timeout=1_000)

        # ...and one that commits delivers its messages.
        with running_worker(broker):
            with atomic(engine):
                record.send("committed")
                record.send_with_options(args=("committed later",), delay=10)
            broker.join(queue, timeout=10_000)
        assert sorted(seen) == ["committed", "committed later"]
    finally:
        for broker in backend.brokers:
            broker.drop_tables()
        backend.brokers.clear()
        engine.dispose()


def test_consumer_restart_does_not_hand_out_messages_still_running(
    sql_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dramatiq.worker
    from dramatiq.errors import ConnectionClosed

    from botkit_tasks.brokers._consumer import SqlConsumer

    monkeypatch.setattr(dramatiq.worker, "CONSUMER_RESTART_DELAY_SECS", 0.1)
    backend = sql_backend
    broker = backend.make_broker(heartbeat_timeout=1.0)
    queue = unique_name("q")
    runs: list[int] = []
    started = threading.Event()
    fail_once = threading.Event()

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def slow(x: int) -> None:
        runs.append(x)
        started.set()
        time.sleep(3.0)

    original = SqlConsumer._next

    def flaky_next(self: SqlConsumer) -> Any:
        if self.queue_name == queue and fail_once.is_set():
            fail_once.clear()
            raise ConnectionClosed(RuntimeError("simulated outage"))  # type: ignore[no-untyped-call]
        return original(self)

    monkeypatch.setattr(SqlConsumer, "_next", flaky_next)
    slow.send(1)
    with running_worker(broker, threads=2):
        assert started.wait(10)
        # Given a message still running when its consumer hits a connection error
        # and the worker restarts that consumer (under a new worker id)
        fail_once.set()
        # Then the message is not handed out again once the old id's heartbeat lapses
        broker.join(queue, timeout=20_000)
    assert runs == [1]


def test_grouped_acks_survive_a_failed_flush_transaction(sql_backend: Backend) -> None:
    backend = sql_backend
    broker = backend.make_broker()
    queue = unique_name("q")

    @dramatiq.actor(broker=broker, queue_name=queue)
    def noop(x: int) -> None:
        pass

    noop.send(1)
    consumer = broker.consume(queue, prefetch=1, timeout=300)
    try:
        proxy = next(consumer)
        assert proxy is not None
        consumer.ack(proxy)
        # Given a flush whose transaction fails after the pending acks were deleted in it
        calls = []

        def failing_heartbeat(conn: Any, now: float) -> None:
            calls.append(now)
            raise sa.exc.OperationalError("UPDATE", {}, Exception("disk I/O error"))

        consumer._next_heartbeat = 0.0
        consumer._heartbeat = failing_heartbeat
        with pytest.raises(sa.exc.OperationalError):
            consumer._flush()
        assert calls
        # When the next flush succeeds
        del consumer._heartbeat
        consumer._flush()
        # Then the ack was not lost: the row is gone and the queue joins
        broker.join(queue, timeout=2_000)
    finally:
        consumer.close()


def test_join_sees_an_ack_the_consumer_has_not_flushed_yet(sql_backend: Backend) -> None:
    backend = sql_backend
    broker = backend.make_broker()
    queue = unique_name("q")

    @dramatiq.actor(broker=broker, queue_name=queue)
    def noop(x: int) -> None:
        pass

    noop.send(1)
    # Given a consumer that acked its message and then stopped iterating
    consumer = broker.consume(queue, prefetch=1, timeout=300)
    try:
        proxy = next(consumer)
        assert proxy is not None
        consumer.ack(proxy)
        # Then join returns (the ack removed the message, as on RedisBroker)
        broker.join(queue, timeout=2_000)
    finally:
        consumer.close()


def test_notify_is_sent_again_after_a_rolled_back_savepoint(database_url: str) -> None:
    import psycopg

    backend = Backend("postgres", database_url)
    engine = create_engine(database_url)
    try:
        broker = backend.make_broker(engine)
        queue = unique_name("q")

        @dramatiq.actor(broker=broker, queue_name=queue)
        def noop(x: int) -> None:
            pass

        listen_url = sa.make_url(database_url).set(drivername="postgresql")
        with psycopg.connect(
            listen_url.render_as_string(hide_password=False), autocommit=True
        ) as listener:
            listener.execute(f'LISTEN "{broker.channel}"')
            # Given a message sent in a savepoint that rolls back, then one in the outer block
            with atomic(engine):
                try:
                    with atomic(engine):
                        noop.send(1)
                        raise RuntimeError("roll the savepoint back")
                except RuntimeError:
                    pass
                noop.send(2)
            # Then the commit notifies the queue (other processes wake at once)
            payloads = [n.payload for n in listener.notifies(timeout=2.0, stop_after=1)]
        assert payloads == [queue]
    finally:
        backend.cleanup()
        engine.dispose()


def test_enqueue_many_keeps_order_and_copies_options_into_columns(sql_backend: Backend) -> None:
    backend = sql_backend
    broker = backend.make_broker()
    q1, q2 = unique_name("q"), unique_name("q")

    @dramatiq.actor(broker=broker, queue_name=q1)
    def one(x: int) -> None:
        pass

    @dramatiq.actor(broker=broker, queue_name=q2)
    def two(x: int) -> None:
        pass

    # Given a batch over two queues, some messages carrying retry state, binary-unfriendly bytes
    messages = []
    for i in range(50):
        actor = one if i % 2 else two
        message = actor.message(i)
        if i % 5 == 0:
            message = message.copy(options={"retries": i, "traceback": f"Traceback {i}\n\x01é"})
        messages.append(message)
    broker.enqueue_many(messages)
    # Then every row is stored in batch order with its queue, actor and retry columns
    m = broker.messages
    with broker.engine.connect() as conn:
        rows = conn.execute(
            sa.select(m.c.message_id, m.c.queue_name, m.c.actor_name, m.c.retries, m.c.last_error)
            .where(m.c.queue_name.in_([q1, q2]))
            .order_by(m.c.id)
        ).all()
    assert [r.message_id for r in rows] == [msg.message_id for msg in messages]
    for row, msg in zip(rows, messages, strict=True):
        assert (row.queue_name, row.actor_name) == (msg.queue_name, msg.actor_name)
        assert row.retries == msg.options.get("retries", 0)
        assert row.last_error == msg.options.get("traceback")
    # And the bytes decode back to the same messages
    consumer = broker.consume(q1, prefetch=50, timeout=300)
    try:
        got = []
        while (proxy := next(consumer)) is not None:
            got.append(proxy.message_id)
            consumer.ack(proxy)
        assert got == [msg.message_id for msg in messages if msg.queue_name == q1]
    finally:
        consumer.close()
