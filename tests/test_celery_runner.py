"""The Celery runner: the retry/permanent table and long retries, with real ``celery worker``s.

Each broker (our SQL transport on PostgreSQL and SQLite, Celery's Redis
transport) runs the same table of outcomes through ``jobs.flaky``
(``celery_apps/jobs.py``), and a retry due in 6 h must survive SIGKILL of
every worker and never run early or twice (on Redis the visibility timeout
is set to 1 s, so a Celery countdown would have come back many times).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
import sqlalchemy as sa
from _celery_support import CeleryWorker, send_tasks, wait_until
from celery import Celery
from conftest import unique_name

from botkit_tasks._sql import create_engine
from botkit_tasks.monitor import inspect
from botkit_tasks.runners import Job, JobSpec, Runner
from botkit_tasks.runners.celery_store import JobStore, RedisJobStore, SqlJobStore, store_for_url
from botkit_tasks.runners.select import runner_for

pytestmark = [pytest.mark.timeout(120)]

LONG_DELAY = 6 * 3600.0


@dataclass
class Setup:
    url: str
    options: dict[str, object]
    queue: str
    key: str
    redis: redis.Redis
    env: dict[str, str]

    @property
    def app(self) -> Celery:
        """A producer-side app on the test's broker (for ``monitor.inspect``)."""
        app = Celery("inspecting", broker=self.url, set_as_current=False)
        app.conf.broker_transport_options = self.options
        return app

    @property
    def store(self) -> JobStore:
        return store_for_url(self.url, self.options)

    def attempts(self, token: str) -> list[float]:
        return [float(t) for t in self.redis.lrange(f"{self.key}:{token}", 0, -1)]

    def send(self, *calls: list[object]) -> list[str]:
        return send_tasks(self.url, self.options, self.queue, "jobs.flaky", list(calls))

    def worker(self) -> CeleryWorker:
        return CeleryWorker("celery_apps.jobs", self.queue, self.env, concurrency=2)

    def dead_letter(self, task_id: str) -> str | None:
        store = self.store
        if isinstance(store, SqlJobStore):
            m = store.broker.messages
            with store.broker.engine.begin() as conn:
                row = conn.execute(
                    sa.select(m.c.last_error).where(m.c.message_id == task_id, m.c.state == "dead")
                ).first()
            return None if row is None else str(row[0])
        assert isinstance(store, RedisJobStore)
        raw = self.redis.hget(store.dead_key, task_id)
        return None if raw is None else str(RedisJobStore.decode(raw)[1]["error"])

    def scheduled_due(self, task_id: str) -> float | None:
        """When the retry of ``task_id`` is due (UNIX time), if one is scheduled."""
        store = self.store
        if isinstance(store, SqlJobStore):
            m = store.broker.messages
            with store.broker.engine.begin() as conn:
                due = conn.execute(
                    sa.select(m.c.available_at).where(
                        m.c.message_id == task_id, m.c.queue_name.like("%.DQ")
                    )
                ).scalar()
            return None if due is None else due / 1000
        assert isinstance(store, RedisJobStore)
        for member, score in self.redis.zrange(store.schedule_key, 0, -1, withscores=True):
            if RedisJobStore.decode(member)[0].task_id == task_id:
                return float(score) / 1000
        return None

    def first_copy_acked(self, task_id: str) -> bool:
        store = self.store
        if isinstance(store, SqlJobStore):
            m = store.broker.messages
            with store.broker.engine.begin() as conn:
                left = conn.execute(
                    sa.select(sa.func.count())
                    .select_from(m)
                    .where(
                        m.c.message_id == task_id,
                        m.c.queue_name == self.queue,
                        m.c.state != "dead",  # a dead letter is a row of its own
                    )
                ).scalar_one()
            return left == 0
        # Celery's Redis transport keeps unacked messages in the "unacked" hash.
        unacked = str(self.options.get("unacked_key", "unacked"))
        return not any(task_id.encode() in raw for raw in self.redis.hvals(unacked))

    def make_due(self, task_id: str) -> None:
        """Move the clock: the retry of ``task_id`` is due now."""
        store = self.store
        if isinstance(store, SqlJobStore):
            m = store.broker.messages
            with store.broker.engine.begin() as conn:
                conn.execute(m.update().where(m.c.message_id == task_id).values(available_at=0))
            return
        assert isinstance(store, RedisJobStore)
        for member in self.redis.zrange(store.schedule_key, 0, -1):
            if RedisJobStore.decode(member)[0].task_id == task_id:
                self.redis.zadd(store.schedule_key, {member: 0}, xx=True)


@pytest.fixture(params=["postgres", "sqlite", "redis"])
def setup(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Setup]:
    prefix = unique_name("cr") + "_"
    key = unique_name("celery-jobs-")
    options: dict[str, object]
    if request.param == "redis":
        url = redis_url
        # Unacked messages under keys of this test's own: with a 1 s visibility
        # timeout, workers sharing kombu's default "unacked" hash would restore
        # each other's messages.
        options = {
            "visibility_timeout": 1,
            "botkit_key_prefix": f"{key}:",
            "unacked_key": f"{key}:unacked",
            "unacked_index_key": f"{key}:unacked_index",
            "unacked_mutex_key": f"{key}:unacked_mutex",
        }
    else:
        name = "database_url" if request.param == "postgres" else "sqlite_url"
        db = sa.make_url(str(request.getfixturevalue(name)))
        url = "botkit+" + db.render_as_string(hide_password=False)
        options = {"table_prefix": prefix, "heartbeat_timeout": 3.0}
    client = redis.Redis.from_url(redis_url)
    queue = unique_name("jq")
    env = {
        "CELERY_TEST_BROKER": url,
        "CELERY_TEST_QUEUE": queue,
        "CELERY_TEST_KEY": key,
        "CELERY_TEST_REDIS": redis_url,
        "CELERY_TEST_OPTIONS": json.dumps(options),
    }
    yield Setup(url, options, queue, key, client, env)
    for found in client.scan_iter(f"{key}:*"):
        client.delete(found)
    client.delete(queue, f"_kombu.binding.{queue}")
    client.close()
    if request.param != "redis":
        engine = create_engine(url.removeprefix("botkit+"))
        with engine.begin() as conn:
            for table in ("messages", "workers"):
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{prefix}{table}"'))
        engine.dispose()


def test_retry_and_permanent_failure_table(setup: Setup) -> None:
    # Given one job of each kind
    cases = ["ok", "permanent", "boom", "retry_after"]
    ids = dict(zip(cases, setup.send(*([case, case] for case in cases)), strict=True))
    # and one whose arguments the job cannot take
    (malformed,) = setup.send(["ok", "malformed", "extra"])
    worker = setup.worker()
    try:
        # When a worker runs them until each has reached its end
        assert wait_until(lambda: len(setup.attempts("boom")) == 3, 30), worker.output()
        assert wait_until(lambda: len(setup.attempts("retry_after")) == 2, 30), worker.output()
        assert wait_until(lambda: setup.dead_letter(ids["boom"]) is not None, 10)
        assert wait_until(lambda: setup.dead_letter(malformed) is not None, 10)
        time.sleep(1.0)  # anything that would run too often has had the time to
        # Then success runs once and leaves nothing
        assert len(setup.attempts("ok")) == 1
        assert setup.dead_letter(ids["ok"]) is None
        # A permanent error runs once and is dead at once, with its traceback
        assert len(setup.attempts("permanent")) == 1
        assert "PermanentJobError: permanent: gone for good" in str(
            setup.dead_letter(ids["permanent"])
        )
        # Any other error is retried (max_retries=2: three attempts), then dead
        boom = setup.attempts("boom")
        assert len(boom) == 3
        assert boom[1] - boom[0] >= 0.2 and boom[2] - boom[1] >= 0.4  # doubling backoff
        assert "RuntimeError: boom: boom" in str(setup.dead_letter(ids["boom"]))
        # RetryLater(delay=1) waits at least its delay, then succeeds
        first, second = setup.attempts("retry_after")
        assert second - first >= 1.0
        assert setup.dead_letter(ids["retry_after"]) is None
        # Malformed arguments fail at once, without running the body
        assert setup.attempts("malformed") == []
        assert "malformed job arguments" in str(setup.dead_letter(malformed))
    finally:
        worker.stop()


def test_a_retry_due_in_six_hours_survives_killing_every_worker_and_runs_once(
    setup: Setup,
) -> None:
    # Given a job whose first attempt asks to be retried in 6 h
    (task_id,) = setup.send(["long", "long"])
    workers = [setup.worker(), setup.worker()]
    try:
        assert wait_until(lambda: setup.scheduled_due(task_id) is not None, 30), workers[0].output()
        due = setup.scheduled_due(task_id)
        assert due is not None and abs(due - (time.time() + LONG_DELAY)) < 60
        # (the retry is written before the first message is acked; a kill in
        # between would run the first attempt again, which at-least-once allows)
        assert wait_until(lambda: setup.first_copy_acked(task_id), 10)
        # When every worker is SIGKILLed and new ones start
    finally:
        for worker in workers:
            worker.kill()
    workers = [setup.worker(), setup.worker()]
    try:
        time.sleep(5.0)  # several Redis visibility timeouts (1 s)
        # Then the retry is still scheduled for 6 h from the first attempt, not run
        assert setup.scheduled_due(task_id) == due
        assert len(setup.attempts("long")) == 1
        # And once it is due it runs exactly once
        setup.make_due(task_id)
        assert wait_until(lambda: len(setup.attempts("long")) == 2, 20), workers[0].output()
        time.sleep(4.0)
        assert len(setup.attempts("long")) == 2
        assert setup.scheduled_due(task_id) is None
        assert setup.dead_letter(task_id) is None
    finally:
        for worker in workers:
            worker.stop()


def test_a_job_killed_by_the_hard_time_limit_is_a_dead_letter_once(setup: Setup) -> None:
    # Given a job that swallows its soft time limit, so the hard one kills its
    # pool process (soft 0.5 s, hard 1.5 s in celery_apps/jobs.py)
    (task_id,) = send_tasks(setup.url, setup.options, setup.queue, "jobs.hang", [["hang"]])
    worker = setup.worker()
    try:
        # Then it is kept as a dead letter that names the time limit
        assert wait_until(lambda: setup.dead_letter(task_id) is not None, 30), worker.output()
        assert "TimeLimitExceeded" in str(setup.dead_letter(task_id))
        assert [d.message_id for d in inspect(setup.app).dead_letters()] == [task_id]  # once
        # And the message was acked, not delivered again (nor retried)
        assert wait_until(lambda: setup.first_copy_acked(task_id), 10)
        time.sleep(4.0)  # several Redis visibility timeouts (1 s)
        assert len(setup.attempts("hang")) == 1
        assert setup.scheduled_due(task_id) is None
    finally:
        worker.stop()


def _keyed_sender(setup: Setup) -> tuple[Celery, Runner]:
    """A producer app with the test jobs declared, to send them with ordering keys."""
    app = Celery("keyed-sender", broker=setup.url, set_as_current=False)
    app.conf.broker_transport_options = setup.options
    runner = runner_for(app)
    for name in ("jobs.flaky", "jobs.hang"):
        runner.declare(JobSpec(name=name, queue=setup.queue, body=_sent_only))
    return app, runner


def _sent_only(*args: object) -> None:
    raise AssertionError("the workers run the jobs, not the sender")


def test_a_keyed_job_killed_by_the_hard_time_limit_hands_its_key_on(setup: Setup) -> None:
    # Given a keyed job that only the hard time limit stops, and its successor
    app, runner = _keyed_sender(setup)
    runner.enqueue(Job("jobs.hang", ("hang",), ordering_key="note"))
    runner.enqueue(Job("jobs.flaky", ("ok", "next"), ordering_key="note"))
    worker = setup.worker()
    try:
        # When the hard limit kills the first one (1.5 s), it is a dead letter
        assert wait_until(lambda: len(inspect(app).dead_letters()) == 1, 30), worker.output()
        (letter,) = inspect(app).dead_letters()
        assert "TimeLimitExceeded" in (letter.traceback or "")
        # Then its successor runs soon after, not after the stall timeout (1 h)
        assert wait_until(lambda: len(setup.attempts("next")) == 1, 15), worker.output()
        assert setup.attempts("next")[0] > setup.attempts("hang")[0] + 1.0
        assert len(setup.attempts("hang")) == 1
    finally:
        worker.stop()
        app.close()


def test_a_requeued_keyed_dead_letter_runs_in_its_keys_order(setup: Setup) -> None:
    # Given a keyed job that failed until it was dead, and its key's next job
    app, runner = _keyed_sender(setup)
    runner.enqueue(Job("jobs.flaky", ("sick", "create"), ordering_key="note"))
    runner.enqueue(Job("jobs.flaky", ("ok", "update"), ordering_key="note"))
    worker = setup.worker()
    insp = inspect(app)
    try:
        assert wait_until(lambda: len(insp.dead_letters()) == 1, 30), worker.output()
        assert wait_until(lambda: len(setup.attempts("update")) == 1, 15), worker.output()
        assert len(setup.attempts("create")) == 3
        # When the cause is fixed, the dead letter requeued, and the key's
        # next job sent right after the requeue
        setup.redis.set(f"{setup.key}:create:healed", 1)
        (letter,) = insp.dead_letters()
        assert insp.requeue([letter.message_id]) == 1
        runner.enqueue(Job("jobs.flaky", ("ok", "delete"), ordering_key="note"))
        # Then the requeued job runs once more, and the next one only after it
        # ended (0.5 s: two pool processes would have overlapped them)
        assert wait_until(lambda: len(setup.attempts("delete")) == 1, 15), worker.output()
        done = [float(t) for t in setup.redis.lrange(f"{setup.key}:create:done", 0, -1)]
        assert len(done) == 1 and len(setup.attempts("create")) == 4
        assert setup.attempts("delete")[0] >= done[0]
        assert insp.dead_letters() == []
    finally:
        worker.stop()
        app.close()
