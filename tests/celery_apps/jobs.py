"""A Celery app with one runner-neutral job whose behaviour its arguments choose.

Configured from the environment like :mod:`celery_apps.counting`.  Every
attempt of ``jobs.flaky(case, token)`` is appended (as a timestamp) to the
Redis list ``{KEY}:{token}``, then the case decides the outcome.
"""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from botkit_tasks.runners import JobSpec, PermanentJobError, RetryLater, RetryPolicy
from botkit_tasks.runners import celery as celery_runner
from botkit_tasks.runners.celery import declare_task

QUEUE = os.environ.get("CELERY_TEST_QUEUE", "jobs")
KEY = os.environ.get("CELERY_TEST_KEY", "celery-jobs")
#: Seconds a "long" job asks to be retried after.
LONG_DELAY = 6 * 3600.0

app = Celery("jobs", broker=os.environ.get("CELERY_TEST_BROKER", "memory://"))
app.conf.update(
    task_default_queue=QUEUE,
    broker_transport_options=json.loads(os.environ.get("CELERY_TEST_OPTIONS", "{}")),
    worker_hijack_root_logger=False,
)
_redis = redis.Redis.from_url(os.environ.get("CELERY_TEST_REDIS", "redis://127.0.0.1:6379/0"))


def flaky(case: str, token: str) -> None:
    """Record the attempt, then succeed, fail or ask for a retry as ``case`` says."""
    attempt = _redis.rpush(f"{KEY}:{token}", time.time())
    if case == "ok":
        return
    if case == "permanent":
        raise PermanentJobError(f"{token}: gone for good")
    if case == "boom":
        raise RuntimeError(f"{token}: boom")
    if case == "retry_after" and attempt == 1:
        raise RetryLater("429 Too Many Requests", delay=1.0)
    if case == "long" and attempt == 1:
        raise RetryLater("503 Service Unavailable", delay=LONG_DELAY)
    if case == "sick":
        # Fails until the test sets {KEY}:{token}:healed; then takes 0.5 s and
        # records when it ended in {KEY}:{token}:done.
        if not _redis.exists(f"{KEY}:{token}:healed"):
            raise RuntimeError(f"{token}: sick")
        time.sleep(0.5)
        _redis.rpush(f"{KEY}:{token}:done", time.time())


flaky_task = declare_task(
    JobSpec(
        name="jobs.flaky",
        queue=QUEUE,
        body=flaky,
        policy=RetryPolicy(max_retries=2, min_backoff=0.2),
    ),
    app,
)

#: Seconds a "hang" job may run (the soft limit); the hard limit is 1 s later here.
HANG_LIMIT = 0.5
celery_runner.HARD_LIMIT_GRACE = 1.0  # instead of 30 s, so the test ends soon


def hang(token: str) -> None:
    """Record the attempt, then outlive the soft time limit (it is caught) until killed."""
    _redis.rpush(f"{KEY}:{token}", time.time())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            continue  # a body that swallows the soft limit: only the hard one stops it


hang_task = declare_task(
    JobSpec(name="jobs.hang", queue=QUEUE, body=hang, time_limit=HANG_LIMIT), app
)
