"""A Celery app whose tasks record every run in Redis, configured from the environment.

``CELERY_TEST_BROKER``: the broker URL; ``CELERY_TEST_QUEUE``: the one queue;
``CELERY_TEST_REDIS``/``CELERY_TEST_KEY``: where runs are recorded (a set of
done job numbers and a counter of runs); ``CELERY_TEST_OPTIONS``: JSON
broker transport options; ``CELERY_TEST_SLEEP``: seconds each job takes.
"""

from __future__ import annotations

import json
import os
import time

import redis
from celery import Celery

import botkit_tasks.runners.kombu_sql  # noqa: F401  (registers botkit+… URLs)

QUEUE = os.environ.get("CELERY_TEST_QUEUE", "celery")
KEY = os.environ.get("CELERY_TEST_KEY", "celery-test")
SLEEP = float(os.environ.get("CELERY_TEST_SLEEP", "0.05"))

app = Celery("counting", broker=os.environ.get("CELERY_TEST_BROKER", "memory://"))
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=4,
    broker_transport_options=json.loads(os.environ.get("CELERY_TEST_OPTIONS", "{}")),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
_redis = redis.Redis.from_url(os.environ.get("CELERY_TEST_REDIS", "redis://127.0.0.1:6379/0"))


@app.task(name="counting.work")
def work(job: int) -> None:
    """Take ``SLEEP`` seconds, then record that ``job`` ran."""
    time.sleep(SLEEP)
    pipe = _redis.pipeline()
    pipe.sadd(f"{KEY}:done", job)
    pipe.incr(f"{KEY}:runs")
    pipe.execute()
