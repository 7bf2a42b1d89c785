"""A worker module that records when each ``ping(sent)`` ran, for pickup-latency tests.

``BOTKIT_BROKER_URL``, ``BOTKIT_BROKER_PREFIX``, ``BOTKIT_BROKER_QUEUE`` say
where; ``BOTKIT_POLL_INTERVAL`` is the broker's poll interval and
``BOTKIT_PICKUP_FILE`` the file that gets one ``sent received`` line per ping
(wall-clock seconds; O_APPEND lines are atomic between processes).
"""

from __future__ import annotations

import os
import time

import dramatiq

from botkit_tasks.brokers import SqlBroker

broker = SqlBroker(
    os.environ["BOTKIT_BROKER_URL"],
    table_prefix=os.environ["BOTKIT_BROKER_PREFIX"],
    poll_interval=float(os.environ.get("BOTKIT_POLL_INTERVAL", "1")),
    listen=os.environ.get("BOTKIT_PG_LISTEN", "1") != "0",
)
dramatiq.set_broker(broker)
PICKUP_FILE = os.environ["BOTKIT_PICKUP_FILE"]


@dramatiq.actor(queue_name=os.environ["BOTKIT_BROKER_QUEUE"], max_retries=0)
def ping(sent: float) -> None:
    received = time.time()
    with open(PICKUP_FILE, "a") as f:
        f.write(f"{sent!r} {received!r}\n")
