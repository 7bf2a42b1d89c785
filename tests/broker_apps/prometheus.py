"""A worker module with Dramatiq's ``Prometheus`` middleware and botkit's beside it.

``dramatiq tests.broker_apps.prometheus`` runs it; ``BOTKIT_BROKER_URL`` is an
SQLite URL and ``BOTKIT_BROKER_QUEUE`` the queue of the actor ``tick(n)``.
Dramatiq's exposition server listens on ``dramatiq_prom_port``.
"""

from __future__ import annotations

import os
import sys

import dramatiq
from dramatiq.middleware import default_middleware
from dramatiq.middleware.prometheus import Prometheus

from botkit_tasks.brokers import SqlBroker
from botkit_tasks.metrics import MetricsMiddleware

# Importing botkit's metrics must not have imported prometheus_client: it picks
# its multi-process mode at first import, which must come after worker boot.
assert "prometheus_client" not in sys.modules

broker = SqlBroker(
    os.environ["BOTKIT_BROKER_URL"],
    middleware=[Prometheus(), *(m() for m in default_middleware), MetricsMiddleware()],
    table_prefix=os.environ["BOTKIT_BROKER_PREFIX"],
    poll_interval=0.1,
)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=os.environ["BOTKIT_BROKER_QUEUE"], max_retries=0)
def tick(n: int) -> None:
    if n < 0:
        raise ValueError("negative tick")
