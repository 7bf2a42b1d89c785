"""What the monitor shows about real workers: who is a worker, and why a message died.

Workers are in-process ``dramatiq.Worker`` instances on real brokers (Redis,
SQLite, PostgreSQL) carrying :class:`MonitorMiddleware`, as the brokers built
by ``botkit_tasks.config`` do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import dramatiq
import pytest
import redis
from conftest import unique_name
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries

from botkit_tasks._sql import create_engine
from botkit_tasks.brokers.sql import SqlBroker
from botkit_tasks.monitor import inspect
from botkit_tasks.monitor.middleware import MonitorMiddleware

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def redis_namespace(redis_url: str) -> Iterator[str]:
    namespace = unique_name("botkit-test-")
    yield namespace
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{namespace}:*"):
        client.delete(key)
    client.close()


def redis_broker(url: str, namespace: str) -> RedisBroker:
    return RedisBroker(url=url, namespace=namespace, middleware=[Retries(), MonitorMiddleware()])  # type: ignore[no-untyped-call]


@pytest.fixture(params=["redis", "sqlite", "postgres"])
def broker(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[dramatiq.Broker]:
    if request.param == "redis":
        namespace = request.getfixturevalue("redis_namespace")
        broker = redis_broker(request.getfixturevalue("redis_url"), namespace)
        yield broker
        broker.close()
        return
    url = (
        f"sqlite:///{tmp_path}/broker.sqlite3"
        if request.param == "sqlite"
        else request.getfixturevalue("database_url")
    )
    engine = create_engine(url)
    prefix = unique_name("mm") + "_"
    sql = SqlBroker(engine, middleware=[Retries(), MonitorMiddleware()], table_prefix=prefix)
    yield sql
    sql.close()
    if request.param == "postgres":
        import sqlalchemy as sa

        with engine.begin() as conn:
            for (table,) in conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE tablename LIKE :p"),
                {"p": prefix + "%"},
            ):
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}" CASCADE'))
    engine.dispose()


@pytest.fixture
def worker(broker: dramatiq.Broker) -> Callable[[], dramatiq.Worker]:
    started: list[dramatiq.Worker] = []

    def start() -> dramatiq.Worker:
        w = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
        w.start()
        started.append(w)
        return w

    yield start  # type: ignore[misc]
    for w in started:
        w.stop()


def test_a_message_dying_on_its_first_attempt_keeps_its_traceback(
    broker: dramatiq.Broker, worker: Callable[[], dramatiq.Worker]
) -> None:
    queue = unique_name("first")

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def once(n: int) -> None:
        raise KeyError(f"first attempt {n}")

    @dramatiq.actor(broker=broker, queue_name=queue, throws=(LookupError,))
    def thrown(n: int) -> None:
        raise IndexError(f"thrown {n}")

    # Given an actor without retries and one whose error is "expected" (throws)
    worker()
    no_retries = once.send(1)
    expected = thrown.send(2)
    # When both die on their first attempt
    letters = wait_for(lambda: len(inspect(broker).dead_letters()) == 2 and inspect(broker))
    by_id = {d.message_id: d for d in letters.dead_letters()}
    # Then each dead letter carries the traceback of that attempt
    first = by_id[no_retries.message_id]
    assert first.traceback is not None and "KeyError: 'first attempt 1'" in first.traceback
    assert first.retries == 1
    second = by_id[expected.message_id]
    assert second.traceback is not None and "IndexError: thrown 2" in second.traceback


def test_a_dead_letter_shows_its_last_attempt_not_an_earlier_one(
    broker: dramatiq.Broker, worker: Callable[[], dramatiq.Worker]
) -> None:
    queue = unique_name("last")
    attempts: list[int] = []

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=2, min_backoff=10, max_backoff=20)
    def flaky() -> None:
        attempts.append(1)
        raise ValueError(f"attempt {len(attempts)}")

    worker()
    message = flaky.send()
    (letter,) = wait_for(lambda: inspect(broker).dead_letters(), timeout=30)
    # Then the dead letter shows the third attempt's error and three failures
    assert letter.message_id == message.message_id
    assert len(attempts) == 3
    assert letter.traceback is not None and "ValueError: attempt 3" in letter.traceback
    assert "attempt 2" not in letter.traceback
    assert letter.retries == 3


def test_redis_producers_are_not_listed_as_workers(redis_url: str, redis_namespace: str) -> None:
    # Given a worker process (idle) and two processes that only enqueue
    consuming = redis_broker(redis_url, redis_namespace)
    producers = [redis_broker(redis_url, redis_namespace) for _ in range(2)]
    queue = unique_name("p")

    @dramatiq.actor(broker=consuming, queue_name=queue)
    def job(n: int) -> None:
        pass

    w = dramatiq.Worker(consuming, worker_timeout=50, worker_threads=1)
    w.start()
    try:
        for n, producer in enumerate(producers):
            producer.declare_queue(queue)
            producer.enqueue(job.message(n))
        insp = inspect(producers[0])
        wait_for(lambda: [q for q in insp.queues() if q.name == queue and q.ready == 0])
        # Then only the worker is listed, although all three have heartbeats
        beats = redis.Redis.from_url(redis_url).zcard(f"{redis_namespace}:__heartbeats__")
        assert beats == 3
        (listed,) = wait_for(insp.workers)
        assert listed.id == consuming.broker_id
        assert listed.in_flight == 0
    finally:
        w.stop()
    # And a worker that has shut down is listed no more
    assert inspect(producers[0]).workers() == []
    for b in (consuming, *producers):
        b.close()


def test_a_busy_consumer_without_the_middleware_is_still_listed(
    redis_url: str, redis_namespace: str
) -> None:
    # Given a plain RedisBroker consumer holding a message (no MonitorMiddleware)
    plain = RedisBroker(url=redis_url, namespace=redis_namespace, middleware=[])  # type: ignore[no-untyped-call]
    producer = RedisBroker(url=redis_url, namespace=redis_namespace, middleware=[])  # type: ignore[no-untyped-call]
    queue = unique_name("b")
    plain.declare_queue(queue)
    producer.enqueue(
        dramatiq.Message(queue_name=queue, actor_name="a", args=(), kwargs={}, options={})
    )
    consumer = plain.consume(queue, prefetch=1, timeout=100)
    held = wait_for(lambda: next(consumer))
    try:
        # Then it is listed with the message it holds, and the producer is not
        (listed,) = inspect(producer).workers()
        assert (listed.id, listed.in_flight) == (plain.broker_id, 1)
    finally:
        consumer.ack(held)
        consumer.close()
        plain.close()
        producer.close()
