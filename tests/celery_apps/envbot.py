"""A Celery app built by ``config.from_env()`` with ``BOTKIT_RUNNER=celery``.

What a bot's module does for ``celery -A mybot worker``.  ``envbot.record(token)``
appends ``token`` to the Redis list ``CELERY_TEST_KEY``.
"""

from __future__ import annotations

import os

import redis

from botkit_tasks.config import from_env
from botkit_tasks.runners import JobSpec, RetryPolicy
from botkit_tasks.runners.celery import declare_task

QUEUE = os.environ.get("CELERY_TEST_QUEUE", "envbot")
KEY = os.environ.get("CELERY_TEST_KEY", "celery-envbot")

backends = from_env()
app = backends.celery_app("envbot")
app.conf.update(task_default_queue=QUEUE, worker_hijack_root_logger=False)
_redis = redis.Redis.from_url(os.environ.get("CELERY_TEST_REDIS", "redis://127.0.0.1:6379/0"))


def record(token: str) -> None:
    """Append ``token`` to the test's Redis list."""
    _redis.rpush(KEY, token)


record_task = declare_task(
    JobSpec(name="envbot.record", queue=QUEUE, body=record, policy=RetryPolicy()), app
)
