"""A Celery app whose one job checks ordering keys: ``ordered.step(key, seq)``.

Configured from the environment like :mod:`celery_apps.jobs`.  Every attempt
marks its key as running in Redis (``{KEY}:running:{key}``; finding it
already running is a violation, appended to ``{KEY}:overlaps``); the first
attempt of about one step in four fails, and is retried by the policy; a
successful step appends ``seq`` to ``{KEY}:done:{key}``.  The steps listed
in ``CELERY_TEST_DOOMED`` (``key/seq`` pairs, comma-separated) always fail.
"""

from __future__ import annotations

import json
import os
import time
import zlib

import redis
from celery import Celery

from botkit_tasks.runners import JobSpec, RetryPolicy
from botkit_tasks.runners.celery import declare_task

QUEUE = os.environ.get("CELERY_TEST_QUEUE", "ordered")
KEY = os.environ.get("CELERY_TEST_KEY", "celery-ordered")
DOOMED = set(filter(None, os.environ.get("CELERY_TEST_DOOMED", "").split(",")))

app = Celery("ordered", broker=os.environ.get("CELERY_TEST_BROKER", "memory://"))
app.conf.update(
    task_default_queue=QUEUE,
    broker_transport_options=json.loads(os.environ.get("CELERY_TEST_OPTIONS", "{}")),
    worker_hijack_root_logger=False,
)
_redis = redis.Redis.from_url(os.environ.get("CELERY_TEST_REDIS", "redis://127.0.0.1:6379/0"))


def fails_first(key: str, seq: int) -> bool:
    """Whether the first attempt of this step fails (about one in four)."""
    return zlib.crc32(f"{key}/{seq}".encode()) % 4 == 0


def step(key: str, seq: int) -> None:
    """Run one step of ``key``: fail where the test asked, else record ``seq``."""
    if _redis.incr(f"{KEY}:running:{key}") != 1:
        _redis.rpush(f"{KEY}:overlaps", f"{key}/{seq}")
    try:
        time.sleep(0.002)
        attempt = _redis.incr(f"{KEY}:attempts:{key}/{seq}")
        if f"{key}/{seq}" in DOOMED:
            raise RuntimeError(f"{key}/{seq} always fails")
        if attempt == 1 and fails_first(key, seq):
            raise RuntimeError(f"{key}/{seq} fails once")
        _redis.rpush(f"{KEY}:done:{key}", seq)
    finally:
        _redis.decr(f"{KEY}:running:{key}")


SPEC = JobSpec(
    name="ordered.step",
    queue=QUEUE,
    body=step,
    policy=RetryPolicy(max_retries=2, min_backoff=0.05, max_backoff=0.2),
)
step_task = declare_task(SPEC, app)
