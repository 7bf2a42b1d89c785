"""The worker module of the delivery soak (``tests/test_soak.py``), configured from the environment.

``dramatiq tests.broker_apps.delivery_soak:broker`` imports this in each worker
process: the soak's federation on a ``SqlBroker`` and ``SqlKvStore`` in
PostgreSQL.  ``SOAK_DATABASE_URL`` (with an ``application_name`` the chaos
thread terminates), ``SOAK_PREFIX`` (tables) and ``SOAK_BASE_URL`` (the bot's
URL) say where; :data:`SOAK_DELIVERY` is the delivery policy both sides use.
"""

from __future__ import annotations

import os

import dramatiq

from botkit_tasks._sql import create_engine
from botkit_tasks.brokers import SqlBroker
from botkit_tasks.brokers.retry_guard import install_retry_guard
from botkit_tasks.federation import Federation
from botkit_tasks.federation.delivery import DeliveryOptions
from botkit_tasks.kv import SqlKvStore
from botkit_tasks.monitor.middleware import MonitorMiddleware

#: Seven attempts, 0.2 s doubling to 1 s, 1 s read timeout (a hanging inbox costs 1 s an attempt).
SOAK_DELIVERY = DeliveryOptions(
    max_retries=6,
    min_backoff=0.2,
    max_backoff=1.0,
    connect_timeout=2.0,
    read_timeout=1.0,
    total_timeout=2.0,
)
#: Seconds without a heartbeat before a killed worker's messages are handed out again.
SOAK_HEARTBEAT_TIMEOUT = 5.0


def soak_federation(url: str, prefix: str, base_url: str) -> Federation:
    """The soak's federation (the test process builds the same one to publish)."""
    engine = create_engine(url)
    kv = SqlKvStore(engine, table_name=f"{prefix}kv")
    broker = SqlBroker(
        engine, table_prefix=prefix, poll_interval=0.2, heartbeat_timeout=SOAK_HEARTBEAT_TIMEOUT
    )
    broker.add_middleware(MonitorMiddleware())
    install_retry_guard(broker)
    return Federation(
        kv=kv,
        broker=broker,
        base_url=base_url,
        username="soak",
        allow_private_addresses=True,
        delivery_options=SOAK_DELIVERY,
    )


if "SOAK_DATABASE_URL" in os.environ:
    federation = soak_federation(
        os.environ["SOAK_DATABASE_URL"], os.environ["SOAK_PREFIX"], os.environ["SOAK_BASE_URL"]
    )
    broker = federation.broker
    dramatiq.set_broker(broker)
