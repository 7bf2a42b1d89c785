"""Ordering keys on Celery (our ``botkit+`` SQL transport, Celery's Redis), real ``celery worker``s.

Two workers (``-c 4``, prefork) run 20 keys x 15 steps of ``ordered.step``
(``celery_apps/ordered.py``), sent interleaved with ``ordering_key=key``;
about one step in four fails once and is retried, one step always fails and
is dead-lettered.  Per key the steps must run one at a time and succeed in
enqueue order, the dead step must not hold its key's later steps back, and
nothing may be lost.  On SQL the ``SqlBroker`` table orders the rows; on
Redis the runner does, with :class:`~botkit_tasks.brokers.ordering.KeyTurns`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa
from _celery_support import CeleryWorker, wait_until
from celery import Celery
from celery_apps.ordered import step
from conftest import unique_name

from botkit_tasks._sql import create_engine
from botkit_tasks.monitor import inspect
from botkit_tasks.runners import Job, JobSpec, RetryPolicy
from botkit_tasks.runners.select import runner_for

pytestmark = [pytest.mark.timeout(240)]

KEYS = [f"note-{i}" for i in range(20)]
STEPS = 15
DOOMED = ("note-3", 5)


@pytest.fixture(params=["postgres", "sqlite", "redis"])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "redis":
        yield str(request.getfixturevalue("redis_url"))
        return
    name = "database_url" if request.param == "postgres" else "sqlite_url"
    db = sa.make_url(str(request.getfixturevalue(name)))
    yield "botkit+" + db.render_as_string(hide_password=False)


def test_celery_steps_of_one_key_run_one_at_a_time_in_enqueue_order(
    broker_url: str, redis_url: str
) -> None:
    prefix = unique_name("co") + "_"
    key = unique_name("celery-ordered-")
    queue = unique_name("oq")
    on_redis = not broker_url.startswith("botkit+")
    options: dict[str, object] = (
        {"global_keyprefix": f"{key}:kombu:", "botkit_key_prefix": f"{key}:celery:"}
        if on_redis
        else {"table_prefix": prefix, "heartbeat_timeout": 3.0}
    )
    env = {
        "CELERY_TEST_BROKER": broker_url,
        "CELERY_TEST_QUEUE": queue,
        "CELERY_TEST_KEY": key,
        "CELERY_TEST_REDIS": redis_url,
        "CELERY_TEST_OPTIONS": json.dumps(options),
        "CELERY_TEST_DOOMED": "/".join(map(str, DOOMED)),
    }
    client = redis.Redis.from_url(redis_url)
    app = Celery("ordered-sender", broker=broker_url, set_as_current=False)
    app.conf.broker_transport_options = options
    runner = runner_for(app)
    policy = RetryPolicy(max_retries=2, min_backoff=0.05, max_backoff=0.2)
    runner.declare(JobSpec(name="ordered.step", queue=queue, body=step, policy=policy))
    workers: list[CeleryWorker] = []
    try:
        # Given every step sent, interleaved across keys, each with its key
        runner.enqueue_many(
            [Job("ordered.step", (k, seq), ordering_key=k) for seq in range(STEPS) for k in KEYS]
        )
        # When two workers run them
        workers = [CeleryWorker("celery_apps.ordered", queue, env, concurrency=4) for _ in range(2)]
        expected = {k: [seq for seq in range(STEPS) if (k, seq) != DOOMED] for k in KEYS}

        def done() -> dict[str, list[int]]:
            return {k: [int(s) for s in client.lrange(f"{key}:done:{k}", 0, -1)] for k in KEYS}

        finished = wait_until(lambda: done() == expected, 150, interval=0.2)
        output = "\n".join(w.output() for w in workers)
        # Then per key every step succeeded once, in enqueue order
        assert finished, f"{done()}\n{output}"
        # and no two steps of one key ever ran at the same time
        assert client.lrange(f"{key}:overlaps", 0, -1) == []
        # and the step that always failed is a dead letter (after 3 attempts)
        # that did not hold back the later steps of its key
        insp = inspect(app)
        assert wait_until(lambda: len(insp.dead_letters()) == 1, 20), output
        (dead,) = insp.dead_letters()
        assert (dead.actor, list(dead.args)) == ("ordered.step", list(DOOMED))
        assert "always fails" in (dead.traceback or "")
        assert client.get(f"{key}:attempts:note-3/5") == b"3"
        # and the retried steps ran more than once, so ordering held across retries
        retried = sum(
            int(client.get(f"{key}:attempts:{k}/{seq}") or 0) > 1
            for k in KEYS
            for seq in range(STEPS)
        )
        assert retried > 20
    finally:
        for worker in workers:
            worker.stop()
        for found in client.scan_iter(f"{key}:*"):
            client.delete(found)
        client.close()
        app.close()
        if not on_redis:
            from botkit_tasks.runners.kombu_sql import close_brokers

            db_url = broker_url.removeprefix("botkit+")
            close_brokers(db_url)
            engine = create_engine(db_url)
            with engine.begin() as conn:
                for table in ("messages", "workers"):
                    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{prefix}{table}"'))
            engine.dispose()
