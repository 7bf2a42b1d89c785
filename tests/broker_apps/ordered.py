"""A worker module for the ordering-key tests, configured from the environment.

``BOTKIT_BROKER_KIND`` is ``sql`` (``SqlBroker``) or ``redis`` (``RedisBroker``
with the :class:`~botkit_tasks.brokers.ordering.OrderingKeys` middleware);
``BOTKIT_BROKER_URL``, ``BOTKIT_BROKER_PREFIX``, ``BOTKIT_BROKER_QUEUE`` say
where; ``BOTKIT_FAIL_RATE`` is the chance that an attempt raises.  The actor
``step(key, i)`` appends ``start``/``end``/``fail`` events to a log kept in
the same backend, in the order the backend receives them, so the test can
check that each key ran one message at a time, in enqueue order.  A key
starting with ``dead`` always fails its message ``0``.  ``BOTKIT_TASK_SLEEP``
(seconds between ``start`` and ``end``) and ``BOTKIT_HEARTBEAT_TIMEOUT`` are
for the crash tests.
"""

from __future__ import annotations

import os
import random
import time

import dramatiq

from tests._broker_support import make_event_log

KIND = os.environ["BOTKIT_BROKER_KIND"]
URL = os.environ["BOTKIT_BROKER_URL"]
PREFIX = os.environ["BOTKIT_BROKER_PREFIX"]
QUEUE = os.environ["BOTKIT_BROKER_QUEUE"]
FAIL_RATE = float(os.environ.get("BOTKIT_FAIL_RATE", "0"))
SLEEP = float(os.environ.get("BOTKIT_TASK_SLEEP", "0"))

broker: dramatiq.Broker
if KIND == "sql":
    from botkit_tasks.brokers import SqlBroker

    broker = SqlBroker(
        URL,
        table_prefix=PREFIX,
        poll_interval=0.5,
        heartbeat_timeout=float(os.environ.get("BOTKIT_HEARTBEAT_TIMEOUT", "60")),
        listen=os.environ.get("BOTKIT_PG_LISTEN", "1") != "0",
    )
else:
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.middleware import Retries

    from botkit_tasks.brokers.ordering import OrderingKeys
    from botkit_tasks.kv import RedisKvStore

    broker = RedisBroker(url=URL, namespace=PREFIX)
    broker.add_middleware(
        OrderingKeys(RedisKvStore(URL, key_prefix=f"{PREFIX}:kv:"), max_defer=0.1),
        before=Retries,
    )
dramatiq.set_broker(broker)
events = make_event_log(KIND, URL, PREFIX)


class Planned(Exception):
    """The failure this test injects."""


@dramatiq.actor(queue_name=QUEUE, max_retries=30, min_backoff=5, max_backoff=40)
def step(key: str, i: int) -> None:
    events.add(key, i, "start")
    if (key.startswith("dead") and i == 0) or random.random() < FAIL_RATE:
        events.add(key, i, "fail")
        raise Planned(f"{key}/{i}")
    if SLEEP:
        time.sleep(SLEEP)
    events.add(key, i, "end")


@dramatiq.actor(queue_name=QUEUE, max_retries=2, min_backoff=5, max_backoff=20)
def doomed(key: str, i: int) -> None:
    """Like ``step``, for the dead-letter keys: message 0 exhausts its retries."""
    step.fn(key, i)
