"""A federation whose delivery jobs are Celery tasks, for the delivery table on Celery.

Built from ``config.from_env()`` with ``BOTKIT_RUNNER=celery``; fast
backoffs (0.2 s doubling, 3 retries) keep the retry cases short.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from botkit_tasks.config import Backends, from_env
from botkit_tasks.federation import Federation
from botkit_tasks.federation.delivery import DeliveryOptions

OPTIONS = DeliveryOptions(
    max_retries=3, min_backoff=0.2, max_backoff=5.0, read_timeout=1.0, total_timeout=3.0
)


def build(env: Mapping[str, str]) -> tuple[Backends, Federation]:
    """The backends and the federation described by ``env``."""
    backends = from_env(env)
    federation = Federation(
        kv=backends.kv,
        broker=backends.broker,
        base_url="http://127.0.0.1:1",
        username="deliverer",
        allow_private_addresses=True,
        delivery_options=OPTIONS,
    )
    return backends, federation


if "DELIVERYBOT" in os.environ:
    backends, federation = build(os.environ)
    # What `celery -A celery_apps.deliverybot worker` finds.
    app = federation.runner.target
    app.conf.update(worker_hijack_root_logger=False)
