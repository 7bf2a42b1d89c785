"""Ordering keys: per key one message at a time, in enqueue order, on every broker.

``send_with_options(ordering_key=…)`` on SqlBroker (PostgreSQL directly and
through PgBouncer, SQLite) and on RedisBroker with the ``OrderingKeys``
middleware.  The main specification runs three ``dramatiq`` worker processes
of eight threads over 50 keys x 40 messages with random failures and retries.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import sqlalchemy as sa
from _broker_support import dramatiq_cli, make_event_log, running_worker, wait_until
from conftest import unique_name
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.message import Message
from dramatiq.middleware import Retries

from botkit_tasks import atomic
from botkit_tasks.brokers import SqlBroker
from botkit_tasks.brokers.ordering import OrderingKeys
from botkit_tasks.kv import MemoryKvStore, RedisKvStore
from botkit_tasks.monitor import inspect

pytestmark = pytest.mark.timeout(240)

KINDS = ["postgres", "pgbouncer", "sqlite", "redis"]
URLS = {
    "postgres": "database_url",
    "pgbouncer": "pgbouncer_url",
    "sqlite": "sqlite_url",
    "redis": "redis_url",
}


class Setup:
    """A producer-side broker of one kind with the ``step``/``doomed`` actors declared."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind, self.url = kind, url
        self.prefix = unique_name("ord") + "_"
        self.queue = unique_name("q")
        self.broker: Any
        if kind == "redis":
            self.broker = RedisBroker(url=url, namespace=self.prefix)
            self.kv = RedisKvStore(url, key_prefix=f"{self.prefix}:kv:")
            self.broker.add_middleware(OrderingKeys(self.kv, max_defer=0.1), before=Retries)
        else:
            self.broker = SqlBroker(url, table_prefix=self.prefix, listen=kind != "pgbouncer")
        self.events = make_event_log("redis" if kind == "redis" else "sql", url, self.prefix)
        for name in ("step", "doomed"):
            dramatiq.actor(
                lambda key, i: None, broker=self.broker, actor_name=name, queue_name=self.queue
            )

    def message(self, actor: str, key: str, i: int) -> Message[Any]:
        return Message(
            queue_name=self.queue,
            actor_name=actor,
            args=(key, i),
            kwargs={},
            options={"ordering_key": key},
        )

    def env(self, fail_rate: float) -> dict[str, str]:
        return {
            "BOTKIT_BROKER_KIND": "redis" if self.kind == "redis" else "sql",
            "BOTKIT_BROKER_URL": self.url,
            "BOTKIT_BROKER_PREFIX": self.prefix,
            "BOTKIT_BROKER_QUEUE": self.queue,
            "BOTKIT_FAIL_RATE": str(fail_rate),
            "BOTKIT_PG_LISTEN": "0" if self.kind == "pgbouncer" else "1",
        }

    def cleanup(self) -> None:
        self.events.drop()
        if self.kind == "redis":
            for key in self.broker.client.scan_iter(f"{self.prefix}*"):
                self.broker.client.delete(key)
            self.kv.close()
        else:
            self.broker.drop_tables()
        self.broker.close()


def made_setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    """The body of the fixtures below: the ``Setup`` of ``request.param``, cleaned up after."""
    s = Setup(request.param, request.getfixturevalue(URLS[request.param]))
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture(params=KINDS)
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    yield from made_setup(request)


@pytest.fixture(params=["postgres", "pgbouncer", "sqlite"])
def sql_setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    yield from made_setup(request)


@pytest.fixture(params=["postgres", "pgbouncer"])
def pg_setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    yield from made_setup(request)


def sql_states(setup: Setup) -> list[tuple[int, str]]:
    """(message number, state) of every row, in row order."""
    m = setup.broker.messages
    with setup.broker.engine.connect() as conn:
        rows = conn.execute(sa.select(m.c.data, m.c.state).order_by(m.c.id)).all()
    return [(Message.decode(bytes(data)).args[1], state) for data, state in rows]


def check_per_key(events: list[tuple[str, int, str]], count: int, dead: set[str]) -> None:
    """Per key: start/outcome pairs never overlap, and successes come in order 0..count-1."""
    by_key: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for key, i, event in events:
        by_key[key].append((i, event))
    for key, seq in by_key.items():
        # one at a time: every start is followed by that same message's outcome
        for (i, first), (j, second) in zip(seq[::2], seq[1::2], strict=False):
            assert first == "start" and second in ("end", "fail") and i == j, (key, seq)
        assert len(seq) % 2 == 0, (key, seq)
        done = [i for i, event in seq if event == "end"]
        expected = list(range(1, count)) if key in dead else list(range(count))
        assert done == expected, (key, done)
        if key in dead:
            # the head failed three times (dead-lettered) before anything else started
            assert seq[:6] == [(0, "start"), (0, "fail")] * 3, (key, seq[:8])


@pytest.mark.slow
def test_three_workers_keep_per_key_order_through_random_failures(
    setup: Setup, tmp_path: Path
) -> None:
    # Given 50 keys x 40 messages enqueued round-robin (so keys interleave), two of the
    # keys led by a message that always fails and is dead-lettered after 2 retries
    keys = [f"key{n}" for n in range(48)] + ["dead-a", "dead-b"]
    messages = [
        setup.message("doomed" if key.startswith("dead") and i == 0 else "step", key, i)
        for i in range(40)
        for key in keys
    ]
    if setup.kind == "redis":
        for message in messages:
            setup.broker.enqueue(message)
    else:
        half = len(messages) // 2
        for message in messages[:half]:
            setup.broker.enqueue(message)
        for start in range(half, len(messages), 250):
            setup.broker.enqueue_many(messages[start : start + 250])

    # When three worker processes of eight threads run them, 15% of attempts failing
    def finished() -> bool:
        return sum(e == "end" for _, _, e in setup.events.all()) >= 50 * 40 - 2

    with ExitStack() as stack:
        for n in range(3):
            log = tmp_path / f"worker{n}.log"
            stack.enter_context(
                dramatiq_cli(
                    "tests.broker_apps.ordered", setup.env(0.15), "-p", "1", "-t", "8", log=log
                )
            )
        if not wait_until(finished, 180, interval=0.5):
            done = defaultdict(int)
            for key, _, event in setup.events.all():
                done[key] += event == "end"
            behind = {key: n for key, n in done.items() if n < 40}
            detail = {
                key: [(i, e) for k, i, e in setup.events.all() if k == key][-6:]
                + ([setup.kv.get(("botkit-ordering", key))] if setup.kind == "redis" else [])
                for key in behind
                if not key.startswith("dead")
            }
            pytest.fail(f"not finished in 180 s; successes per unfinished key: {behind} {detail}")

    # Then per key the messages ran one at a time, in enqueue order, and none was lost;
    # the dead-lettered heads released the rest of their keys
    check_per_key(setup.events.all(), 40, dead={"dead-a", "dead-b"})


def test_a_retrying_head_does_not_slow_other_keys_or_unkeyed_messages(
    setup: Setup,
) -> None:
    broker = setup.broker
    ran: dict[str, float] = {}
    attempts: list[float] = []
    queue = unique_name("q")

    @dramatiq.actor(
        broker=broker, queue_name=queue, max_retries=1, min_backoff=1500, max_backoff=1500
    )
    def slow_head() -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails; the retry comes 1.5 s later")
        ran["head"] = time.monotonic()

    @dramatiq.actor(broker=broker, queue_name=queue)
    def mark(name: str) -> None:
        ran[name] = time.monotonic()

    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
    worker.start()
    try:
        # Given key A whose head fails and retries in 1.5 s
        slow_head.send_with_options(ordering_key="A")
        assert wait_until(lambda: len(attempts) == 1, 10)
        sent = time.monotonic()
        # When A's successor, a key-B message and an unkeyed message are sent
        mark.send_with_options(args=("A-next",), ordering_key="A")
        mark.send_with_options(args=("B",), ordering_key="B")
        mark.send("plain")
        # Then B and the unkeyed one run at once, A's successor only after its head
        assert wait_until(lambda: {"B", "plain"} <= ran.keys(), 5)
        assert ran["B"] - sent < 1.0 and ran["plain"] - sent < 1.0  # the retry is 1.5 s away
        assert wait_until(lambda: "A-next" in ran, 10)
        assert ran["head"] < ran["A-next"]
    finally:
        worker.stop()


def test_a_successor_is_claimed_in_enqueue_order_after_its_heads_ack(
    sql_setup: Setup,
) -> None:
    setup = sql_setup
    broker = setup.broker
    # Given A1 and A2 of key A with an unkeyed message sent between them
    plain = Message(queue_name=setup.queue, actor_name="step", args=("u", 0), kwargs={}, options={})
    broker.enqueue(setup.message("step", "A", 1))
    broker.enqueue(plain)
    broker.enqueue(setup.message("step", "A", 2))
    consumer = broker.consume(setup.queue, prefetch=1, timeout=2000)
    try:
        # When a consumer that holds one message at a time acks A1
        first = next(consumer)
        assert first is not None and first.args == ("A", 1)
        consumer.ack(first)
        if setup.kind != "sqlite":
            # (on PostgreSQL the ack waits for the consumer's next claim, which
            # deletes A1 and releases A in its own transaction)
            assert sql_states(setup) == [(1, "consumed"), (0, "queued"), (2, "waiting")]
        # Then its next claims take the unkeyed message, older than A2, and then A2
        second = next(consumer)
        assert second is not None and second.args == ("u", 0)
        assert sql_states(setup) == [(0, "consumed"), (2, "queued")]
        consumer.ack(second)
        third = next(consumer)
        assert third is not None and third.args == ("A", 2)
        consumer.ack(third)
        broker.join(setup.queue, timeout=5000)
    finally:
        consumer.close()


def test_a_keyed_ack_flushed_outside_a_claim_hands_its_key_on(sql_setup: Setup) -> None:
    setup = sql_setup
    broker = setup.broker
    # Given A1 claimed and acked by a consumer that then claims nothing more
    broker.enqueue(setup.message("step", "A", 1))
    broker.enqueue(setup.message("step", "A", 2))
    consumer = broker.consume(setup.queue, prefetch=1, timeout=2000)
    try:
        first = next(consumer)
        assert first is not None and first.args == ("A", 1)
        consumer.ack(first)
        # When its acks are flushed in a transaction of their own (as join()
        # and a closing consumer do; on PostgreSQL not through a claim)
        broker.hub.flush_acks_now()
        # Then A1 is gone and A2, its key's next message, is queued
        assert sql_states(setup) == [(2, "queued")]
    finally:
        consumer.close()


class Counted:
    """Counts the hand-ons and run steps of a broker's ordering (wrapping the real ones)."""

    def __init__(self, broker: SqlBroker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hand_ons = self.steps = 0
        self.refused = 0
        ordering = broker.ordering
        hand_on, step = ordering.hand_on, ordering.step

        def counted_hand_on(*args: Any, **kwargs: Any) -> Any:
            self.hand_ons += 1
            return hand_on(*args, **kwargs)

        def counted_step(conn: Any, acks: Any, members: Any, worker: str) -> set[int]:
            self.steps += 1
            taken = step(conn, acks, members, worker)
            self.refused += len(members) - len(taken)
            return taken

        monkeypatch.setattr(ordering, "hand_on", counted_hand_on)
        monkeypatch.setattr(ordering, "step", counted_step)


def second_of_run(setup: Setup, count: int) -> tuple[Any, Any]:
    """Send A1..A``count``; with a consumer of one message at a time, claim and
    ack A1: the hand-on that deletes it claims A2 and reads A3.. ahead as its
    run.  Returns the consumer and A2."""
    for i in range(1, count + 1):
        setup.broker.enqueue(setup.message("step", "A", i))
    consumer = setup.broker.consume(setup.queue, prefetch=1, timeout=2000)
    first = next(consumer)
    assert first is not None and first.args == ("A", 1)
    consumer.ack(first)
    second = next(consumer)
    assert second is not None and second.args == ("A", 2)
    return consumer, second


def ack_in_turn(consumer: Any, count: int) -> list[int]:
    """The numbers of the next ``count`` messages ``consumer`` hands out, each acked."""
    numbers = []
    for _ in range(count):
        message = next(consumer)
        assert message is not None
        numbers.append(message.args[1])
        consumer.ack(message)
    return numbers


def test_a_run_takes_its_keys_next_messages_without_a_hand_on(
    pg_setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup, broker = pg_setup, pg_setup.broker
    counted = Counted(broker, monkeypatch)
    # Given A2 claimed by the hand-on that deleted A1, with A3..A5 as its run
    consumer, second = second_of_run(setup, 5)
    try:
        assert counted.hand_ons == 1
        assert sql_states(setup) == [(2, "consumed")] + [(i, "waiting") for i in (3, 4, 5)]
        # When A2..A5 are acked one by one
        got = []
        message = second
        for _ in range(3):
            consumer.ack(message)
            message = next(consumer)
            assert message is not None
            got.append(message.args[1])
            # Then each next message became its key's head (consumed) in the
            # step that deleted its predecessor, before it was handed out
            assert sql_states(setup)[0] == (message.args[1], "consumed")
        assert got == [3, 4, 5]
        assert counted.hand_ons == 1 and counted.steps == 3
        consumer.ack(message)
        broker.join(setup.queue, timeout=5000)
        assert sql_states(setup) == []
    finally:
        consumer.close()


def test_a_retry_in_a_run_runs_before_the_keys_later_messages(
    pg_setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup, broker = pg_setup, pg_setup.broker
    counted = Counted(broker, monkeypatch)
    consumer, second = second_of_run(setup, 4)  # A2, with A3 and A4 in its run
    try:
        # When A2 fails and is enqueued again (as Retries does) before its ack
        broker.enqueue(second._message.copy(options={**second.options, "retries": 1}))
        consumer.ack(second)
        # Then the run's next member (A3) is refused, and the retry of A2 runs next
        third = next(consumer)
        assert third is not None and (third.args, third.options.get("retries")) == (("A", 2), 1)
        assert counted.refused == 1
        consumer.ack(third)
        assert ack_in_turn(consumer, 2) == [3, 4]
        broker.join(setup.queue, timeout=5000)
    finally:
        consumer.close()


def test_a_dead_lettered_or_requeued_run_head_leaves_the_rest_in_order(pg_setup: Setup) -> None:
    setup, broker = pg_setup, pg_setup.broker
    consumer, second = second_of_run(setup, 5)  # A2, with A3..A5 in its run
    try:
        # When A2 becomes a dead letter
        second.fail()
        consumer.nack(second)
        # Then A3 is next, taken from the database (the run ended)
        third = next(consumer)
        assert third is not None and third.args == ("A", 3)
        # And when A3 is handed back unprocessed (a worker shutting down)
        consumer.requeue([third])
        # Then A3 runs again before A4 and A5
        assert ack_in_turn(consumer, 3) == [3, 4, 5]
        broker.join(setup.queue, timeout=5000)
        assert sql_states(setup) == [(2, "dead")]
    finally:
        consumer.close()


def test_a_consumer_closed_mid_run_leaves_the_key_to_its_next_message(pg_setup: Setup) -> None:
    setup, broker = pg_setup, pg_setup.broker
    consumer, second = second_of_run(setup, 4)  # A2, with A3 and A4 in its run
    # When A2 is acked and the consumer closes before taking A3
    consumer.ack(second)
    consumer.close()
    # Then A2 is gone and A3, still waiting for no one, is queued for any consumer
    assert sql_states(setup) == [(3, "queued"), (4, "waiting")]
    other = broker.consume(setup.queue, prefetch=1, timeout=2000)
    try:
        assert ack_in_turn(other, 2) == [3, 4]
    finally:
        other.close()


def test_keyed_rows_are_numbered_in_enqueue_order_and_retries_keep_their_place(
    sql_setup: Setup,
) -> None:
    broker = sql_setup.broker
    m = broker.messages

    def numbered() -> list[tuple[int, int, int, int]]:
        """(row id, ordering_seq, message number, retries) of every row."""
        with broker.engine.connect() as conn:
            rows = conn.execute(
                sa.select(m.c.id, m.c.ordering_seq, m.c.data, m.c.retries).order_by(m.c.id)
            ).all()
        return [(i, seq, Message.decode(bytes(d)).args[1], r) for i, seq, d, r in rows]

    # Given one batch of six messages over keys A and B
    batch = [sql_setup.message("step", "AB"[i % 2], i) for i in range(6)]
    with atomic(broker.engine) as conn:
        broker.enqueue_many(batch)
        if sql_setup.kind == "postgres":
            # (PostgreSQL counts this transaction's row versions as it goes:
            # only the two heads were updated, to queued; the rows were
            # numbered as they were inserted, not by an update after)
            updated = conn.exec_driver_sql(
                "SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = %(t)s",
                {"t": m.name},
            ).scalar()
            assert updated == 2
    # Then each is numbered with its own row id, the rows in batch order
    rows = numbered()
    assert [n for _, _, n, _ in rows] == list(range(6))
    assert all(seq == row_id for row_id, seq, _, _ in rows), rows
    consumer = broker.consume(sql_setup.queue, prefetch=1, timeout=2000)
    try:
        # When A's head (0) is claimed and retried, and message 2, still
        # waiting, is sent again under its message id
        head = next(consumer)
        assert head is not None and head.args == ("A", 0)
        broker.enqueue(head._message.copy(options={"retries": 1}))
        broker.enqueue(batch[2])
        # Then the retry takes the place of its first delivery, and the
        # copy of a message that never ran goes last, numbered as new
        head_id = rows[0][0]
        *_, (_, retry_seq, retry_n, retries), (copy_id, copy_seq, copy_n, _) = numbered()
        assert (retry_n, retries, retry_seq) == (0, 1, head_id)
        assert (copy_n, copy_seq) == (2, copy_id)
    finally:
        consumer.close()


def test_a_requeued_dead_letter_runs_again_in_its_keys_order(setup: Setup) -> None:
    broker = setup.broker
    queue = unique_name("q")
    ran: list[str] = []
    healed = threading.Event()

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def apply(step: str) -> None:
        if step == "create" and not healed.is_set():
            raise RuntimeError("the remote server is down")
        ran.append(step)

    insp = inspect(broker)
    with running_worker(broker):
        # Given a key whose head died and whose successor then ran
        apply.send_with_options(args=("create",), ordering_key="note")
        apply.send_with_options(args=("update",), ordering_key="note")
        assert wait_until(lambda: ran == ["update"], 10)
        assert wait_until(lambda: len(insp.dead_letters(queue)) == 1, 10)
        # When the cause is fixed and the dead letter is requeued, and the
        # key's next message is sent after the requeue
        healed.set()
        (letter,) = insp.dead_letters(queue)
        assert insp.requeue([letter.message_id]) == 1
        apply.send_with_options(args=("delete",), ordering_key="note")
        # Then the dead letter runs (it is not taken for a duplicate of a
        # passed turn), once, before what was sent after its requeue
        assert wait_until(lambda: len(ran) == 3, 10), ran
        time.sleep(0.3)
        assert ran == ["update", "create", "delete"]
        assert insp.dead_letters(queue) == []


def test_a_requeued_dead_letter_takes_back_its_place_on_sql(sql_setup: Setup) -> None:
    broker = sql_setup.broker
    queue = unique_name("q")
    ran: list[str] = []
    healed, release_b, b_started = threading.Event(), threading.Event(), threading.Event()

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def apply(step: str) -> None:
        if step == "A" and not healed.is_set():
            raise RuntimeError("the remote server is down")
        if step == "B":
            b_started.set()
            release_b.wait(10)
        ran.append(step)

    insp = inspect(broker)
    with running_worker(broker):
        try:
            # Given A (it dies), B (it runs, held) and C (waiting behind B) of one key
            for step in "ABC":
                apply.send_with_options(args=(step,), ordering_key="note")
            assert b_started.wait(10)
            assert wait_until(lambda: len(insp.dead_letters(queue)) == 1, 10)
            # When A is requeued while B still runs
            healed.set()
            assert insp.requeue([insp.dead_letters(queue)[0].message_id]) == 1
            release_b.set()
            # Then A runs after its key's head (B), before C, which was sent after it
            assert wait_until(lambda: len(ran) == 3, 10), ran
            assert ran == ["B", "A", "C"]
        finally:
            release_b.set()  # so that the worker can stop


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (123, TypeError),
        (("obj", "inbox"), TypeError),
        ("", ValueError),
        ("x" * 256, ValueError),
        ("a\x00b", ValueError),
        ("\ud800", ValueError),
    ],
)
def test_a_bad_ordering_key_is_refused_and_nothing_is_written(
    setup: Setup, key: object, error: type[Exception]
) -> None:
    broker = setup.broker
    good = setup.message("step", "fine", 0)
    bad = setup.message("step", "x", 1)
    bad.options["ordering_key"] = key
    with pytest.raises(error, match="ordering_key"):
        if isinstance(broker, SqlBroker):
            broker.enqueue_many([good, bad])
        else:
            broker.enqueue(bad)
    if isinstance(broker, SqlBroker):
        broker.join(setup.queue, timeout=100)  # nothing queued: returns at once


def test_ordering_middleware_on_stub_broker_in_process() -> None:
    # Given a StubBroker with the middleware on an in-memory store
    broker = StubBroker()
    broker.add_middleware(OrderingKeys(MemoryKvStore(), max_defer=0.05), before=Retries)
    broker.emit_after("process_boot")
    log: list[tuple[str, int]] = []
    lock = threading.Lock()
    rng = random.Random(7)

    @dramatiq.actor(broker=broker, max_retries=30, min_backoff=5, max_backoff=20)
    def work(key: str, i: int) -> None:
        with lock:
            if rng.random() < 0.2:
                raise RuntimeError("flaky")
            log.append((key, i))

    for i in range(15):
        for key in ("a", "b", "c"):
            work.send_with_options(args=(key, i), ordering_key=key)
    worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=50)
    worker.start()
    try:
        assert wait_until(lambda: len(log) == 45, 60)
    finally:
        worker.stop()
    # Then each key ran in order
    for key in ("a", "b", "c"):
        assert [i for k, i in log if k == key] == list(range(15))


def test_a_key_left_without_head_is_released_by_maintenance(sqlite_url: str) -> None:
    # Given a key whose head became a dead letter without releasing the key
    # (as after a crash between the two), and a worker with frequent maintenance
    broker = SqlBroker(sqlite_url, table_prefix=unique_name("ord") + "_", heartbeat_timeout=0.4)
    ran: list[int] = []

    @dramatiq.actor(broker=broker, max_retries=0)
    def note(i: int) -> None:
        ran.append(i)

    try:
        for i in range(3):
            note.send_with_options(args=(i,), ordering_key="k")
        m = broker.messages
        with broker.engine.begin() as conn:
            conn.execute(m.update().where(m.c.state == "queued").values(state="dead"))
        # When a worker runs
        worker = dramatiq.Worker(broker, worker_timeout=100)
        worker.start()
        try:
            # Then maintenance hands the key on and the rest run in order
            assert wait_until(lambda: ran == [1, 2], 10), ran
        finally:
            worker.stop()
    finally:
        broker.drop_tables()
        broker.close()


def test_tables_made_before_ordering_keys_gain_the_columns(sqlite_url: str) -> None:
    # Given a messages table without the ordering columns (an older version's)
    prefix = unique_name("ord") + "_"
    broker = SqlBroker(sqlite_url, table_prefix=prefix)
    with broker.engine.begin() as conn:
        conn.exec_driver_sql(f"DROP INDEX {prefix}messages_order_idx")
        conn.exec_driver_sql(f"ALTER TABLE {prefix}messages DROP COLUMN ordering_key")
        conn.exec_driver_sql(f"ALTER TABLE {prefix}messages DROP COLUMN ordering_seq")
    broker.close()
    # When a broker starts on it
    broker = SqlBroker(sqlite_url, table_prefix=prefix)
    try:
        with broker.engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns(f"{prefix}messages")}
        # Then the columns are back and keyed messages can be stored
        assert {"ordering_key", "ordering_seq"} <= columns
        broker.enqueue(
            Message(
                queue_name="default",
                actor_name="a",
                args=(),
                kwargs={},
                options={"ordering_key": "k"},
            )
        )
    finally:
        broker.drop_tables()
        broker.close()
