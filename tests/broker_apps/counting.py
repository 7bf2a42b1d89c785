"""A worker module for the broker tests, configured from the environment.

``dramatiq tests.broker_apps.counting`` imports this in each worker process.
``BOTKIT_BROKER_KIND`` is ``sql`` or ``redis``; ``BOTKIT_BROKER_URL``,
``BOTKIT_BROKER_PREFIX`` and ``BOTKIT_BROKER_QUEUE`` say where; the actor
``count(key)`` adds one to a per-key counter kept in the same backend so the
test can check that each message ran exactly once.
"""

from __future__ import annotations

import os
import time

import dramatiq

from tests._broker_support import make_counter

KIND = os.environ["BOTKIT_BROKER_KIND"]
URL = os.environ["BOTKIT_BROKER_URL"]
PREFIX = os.environ["BOTKIT_BROKER_PREFIX"]
QUEUE = os.environ["BOTKIT_BROKER_QUEUE"]
SLEEP = float(os.environ.get("BOTKIT_TASK_SLEEP", "0"))

broker: dramatiq.Broker
if KIND == "sql":
    from botkit_tasks.brokers import SqlBroker

    broker = SqlBroker(
        URL,
        table_prefix=PREFIX,
        poll_interval=0.2,
        heartbeat_timeout=float(os.environ.get("BOTKIT_HEARTBEAT_TIMEOUT", "60")),
        listen=os.environ.get("BOTKIT_PG_LISTEN", "1") != "0",
    )
else:
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=URL, namespace=PREFIX)
dramatiq.set_broker(broker)
counter = make_counter(KIND, URL, PREFIX)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def count(key: str) -> None:
    if SLEEP:
        time.sleep(SLEEP)
    counter.incr(key)
