"""The monitor against a populated broker: SqlBroker (SQLite, PostgreSQL) and RedisBroker.

Every broker is filled the same way — in-flight messages held by a consumer, a
dead letter, ready, delayed and retrying messages — and the inspector must
report the exact counts, then repair what it is asked to.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import dramatiq
import pytest
from conftest import unique_name

from botkit_tasks.monitor import DeadLetter, QueueStats, RetryingMessage, inspect

pytestmark = pytest.mark.timeout(120)

TRACEBACK = "Traceback (most recent call last):\nValueError: boom"


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def broker(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[dramatiq.Broker]:
    if request.param == "redis":
        import redis
        from dramatiq.brokers.redis import RedisBroker

        url = request.getfixturevalue("redis_url")
        namespace = unique_name("botkit-test-")
        redis_broker = RedisBroker(url=url, namespace=namespace, middleware=[])
        yield redis_broker
        redis_broker.close()
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=f"{namespace}:*"):
            client.delete(key)
        client.close()
        return
    pytest.importorskip("botkit_tasks.brokers.sql")
    from botkit_tasks._sql import create_engine
    from botkit_tasks.brokers.sql import SqlBroker

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/broker.sqlite3"
    else:
        url = request.getfixturevalue("database_url")
    engine = create_engine(url)
    prefix = unique_name("m") + "_"
    sql_broker = SqlBroker(engine, middleware=[], table_prefix=prefix)
    yield sql_broker
    sql_broker.close()
    if request.param == "postgres":
        import sqlalchemy as sa

        with engine.begin() as conn:
            for (table,) in conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE tablename LIKE :p"),
                {"p": prefix + "%"},
            ):
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}" CASCADE'))
    engine.dispose()


def _message(queue: str, n: int, **options: Any) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=queue, actor_name="job", args=(n,), kwargs={"tag": "x"}, options=options
    )


def _take(consumer: Any, count: int) -> list[Any]:
    taken: list[Any] = []
    deadline = time.monotonic() + 30
    while len(taken) < count and time.monotonic() < deadline:
        message = next(consumer)
        if message is not None:
            taken.append(message)
    assert len(taken) == count, f"consumer delivered {len(taken)} of {count}"
    return taken


def _stats(broker: dramatiq.Broker, queue: str) -> QueueStats:
    (stats,) = [q for q in inspect(broker).queues() if q.name == queue]
    return stats


def test_exact_counts_retrying_dead_letters_and_repairs(broker: dramatiq.Broker) -> None:
    queue = unique_name("q")
    other = unique_name("other")
    broker.declare_queue(queue)
    broker.declare_queue(other)
    insp = inspect(broker)

    # Given three messages claimed by a consumer (prefetch 3), one of which
    # fails for good after an earlier retry had recorded its traceback
    broker.enqueue(_message(queue, 1))
    broker.enqueue(_message(queue, 2))
    doomed = broker.enqueue(_message(queue, 3, retries=1, traceback=TRACEBACK))
    consumer = broker.consume(queue, prefetch=3, timeout=200)
    try:
        held = _take(consumer, 3)
        (to_kill,) = [m for m in held if m.message_id == doomed.message_id]
        to_kill.fail()
        consumer.nack(to_kill)

        # And four ready messages, two delayed ones and one waiting for a retry
        for n in range(4):
            broker.enqueue(_message(queue, 10 + n))
        broker.enqueue(_message(queue, 20), delay=60_000)
        broker.enqueue(_message(queue, 21), delay=120_000)
        retry = broker.enqueue(_message(queue, 30, retries=2, traceback=TRACEBACK), delay=90_000)
        before = datetime.now(timezone.utc)

        # Then the counts are exact
        stats = _stats(broker, queue)
        assert stats == QueueStats(name=queue, ready=4, delayed=3, in_flight=2, dead=1)
        # And a declared queue without messages is listed with zeros
        assert _stats(broker, other) == QueueStats(other, 0, 0, 0, 0)

        # And the consumer's worker reports the two messages it holds
        workers = insp.workers()
        assert sum(w.in_flight for w in workers) == 2
        assert all(abs((w.last_heartbeat - before).total_seconds()) < 120 for w in workers)

        # And the retrying message shows its attempt count, next ETA and error
        (retrying,) = insp.retrying()
        assert isinstance(retrying, RetryingMessage)
        assert (retrying.message_id, retrying.queue, retrying.actor, retrying.retries) == (
            retry.message_id,
            queue,
            "job",
            2,
        )
        assert retrying.last_error == TRACEBACK
        assert retrying.eta is not None
        assert 60 < (retrying.eta - before).total_seconds() <= 95

        # And the dead letter carries its arguments, retries and traceback
        (dead,) = insp.dead_letters()
        assert isinstance(dead, DeadLetter)
        assert (dead.message_id, dead.queue, dead.actor) == (doomed.message_id, queue, "job")
        assert (dead.args, dead.kwargs, dead.retries) == ((3,), {"tag": "x"}, 1)
        assert dead.traceback == TRACEBACK
        assert dead.died_at is not None
        assert abs((dead.died_at - before).total_seconds()) < 60
        assert insp.dead_letters(other) == []

        # And the snapshot is JSON
        snapshot = json.loads(json.dumps(insp.to_dict()))
        assert {q["name"] for q in snapshot["queues"]} >= {queue, other}
        assert snapshot["dead_letters"][0]["message_id"] == doomed.message_id

        # When the dead letter is requeued (twice, and with an unknown id)
        assert insp.requeue([doomed.message_id, "no-such-id"]) == 1
        assert insp.requeue([doomed.message_id]) == 0

        # Then it is ready again, as a first attempt
        assert _stats(broker, queue) == QueueStats(queue, 5, 3, 2, 0)
        for message in held:
            if message is not to_kill:
                consumer.ack(message)
        # Take the five ready messages one by one, keeping the first as a victim
        seen: dict[str, Any] = {}
        victim = None
        deadline = time.monotonic() + 30
        while len(seen) < 5 and time.monotonic() < deadline:
            message = next(consumer)
            if message is None:
                continue
            seen[message.message_id] = message
            if victim is None:
                victim = message
            else:
                consumer.ack(message)
        assert len(seen) == 5
        requeued = seen[doomed.message_id]
        assert requeued.options.get("retries") == 0
        assert "traceback" not in requeued.options
        assert requeued.queue_name == queue
        assert tuple(requeued.args) == (3,)

        # When another message dies and the dead letters of the queue are purged
        assert victim is not None
        victim.fail()
        consumer.nack(victim)
        assert _stats(broker, queue).dead == 1
        assert insp.purge_dead(other) == 0
        assert insp.purge_dead(queue) == 1
        # Then nothing dead is left
        assert _stats(broker, queue).dead == 0
        assert insp.dead_letters() == []
    finally:
        consumer.close()


def test_purge_all_and_requeue_many(broker: dramatiq.Broker) -> None:
    queues = [unique_name("a"), unique_name("b")]
    dead_ids = []
    for queue in queues:
        broker.declare_queue(queue)
        for n in range(3):
            broker.enqueue(_message(queue, n))
        consumer = broker.consume(queue, prefetch=3, timeout=200)
        try:
            for message in _take(consumer, 3):
                message.fail()
                consumer.nack(message)
                dead_ids.append(message.message_id)
        finally:
            consumer.close()
    insp = inspect(broker)
    assert [(q.name, q.dead) for q in insp.queues() if q.name in queues] == sorted(
        (q, 3) for q in queues
    )
    assert len(insp.dead_letters(limit=4)) == 4
    # Requeue two letters of different queues, then purge everything else
    assert insp.requeue([dead_ids[0], dead_ids[3]]) == 2
    assert {(q.name, q.ready, q.dead) for q in insp.queues() if q.name in queues} == {
        (queues[0], 1, 2),
        (queues[1], 1, 2),
    }
    assert insp.purge_dead() == 4
    assert all(q.dead == 0 for q in insp.queues())


def test_inspect_rejects_unknown_brokers() -> None:
    from dramatiq.brokers.stub import StubBroker

    with pytest.raises(TypeError, match="StubBroker"):
        inspect(StubBroker())


def _wait_for(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_worker_retries_and_dead_letters_then_requeue(broker: dramatiq.Broker) -> None:
    from dramatiq.middleware import Retries

    if not any(isinstance(m, Retries) for m in broker.middleware):
        broker.add_middleware(Retries())
    queue = unique_name("w")
    attempts: list[str] = []
    healed = False

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=3, min_backoff=60_000)
    def flaky(n: int) -> None:
        attempts.append("flaky")
        raise ValueError(f"flaky {n}")

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def doomed(n: int) -> None:
        attempts.append("doomed")
        if not healed:
            raise KeyError(f"doomed {n}")

    insp = inspect(broker)
    worker = dramatiq.Worker(broker, worker_timeout=100, worker_threads=2)
    worker.start()
    try:
        # Given a failing actor with retries left and one without any
        retry = flaky.send(1)
        dead = doomed.send(2)
        # Then the first waits for its retry with the real traceback of the failure
        (retrying,) = _wait_for(insp.retrying)
        assert (retrying.message_id, retrying.actor, retrying.retries) == (
            retry.message_id,
            "flaky",
            1,
        )
        assert retrying.last_error is not None and "ValueError: flaky 1" in retrying.last_error
        assert retrying.eta is not None
        # And the second is a dead letter
        (letter,) = _wait_for(insp.dead_letters)
        assert (letter.message_id, letter.actor, letter.args) == (dead.message_id, "doomed", (2,))
        stats = _wait_for(
            lambda: [q for q in insp.queues() if q.name == queue and q.in_flight == 0]
        )
        assert stats == [QueueStats(queue, ready=0, delayed=1, in_flight=0, dead=1)]
        # When the dead letter is requeued after the bug is fixed
        healed = True
        assert insp.requeue([dead.message_id]) == 1
        # Then the worker runs it again and it succeeds
        _wait_for(lambda: attempts.count("doomed") == 2)
        _wait_for(lambda: next(q for q in insp.queues() if q.name == queue).dead == 0)
        assert insp.dead_letters() == []
    finally:
        worker.stop()
