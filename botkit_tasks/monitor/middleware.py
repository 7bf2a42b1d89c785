"""Middleware that records what the monitor needs and Dramatiq does not keep.

Install :class:`MonitorMiddleware` on the broker of every worker process (the
brokers built by :func:`botkit_tasks.config.from_env` carry it)::

    broker.add_middleware(MonitorMiddleware())

It does three things:

- **The traceback of every failed attempt**, in ``message.options["traceback"]``.
  Dramatiq's ``Retries`` records it only when it will retry or give up, not for
  an actor's ``throws`` exceptions, so such a message died without one.
- **The final state of a Redis dead letter.**  ``RedisBroker`` dead-letters the
  copy it stored at enqueue time, so the dead-letter view showed the error and
  retry count of the attempt *before* the last one (and none at all for a
  message that died on its first attempt).  After the nack the stored copy is
  replaced by the message as it died.  :class:`~botkit_tasks.brokers.SqlBroker`
  stores the final state itself.
- **Which Redis broker instances are workers.**  Every ``RedisBroker``
  instance heartbeats on every command, so a process that only enqueues looks
  like a worker.  Each booting worker registers its broker id under
  :data:`WORKERS_KEY`, and deregisters when it shuts down.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from typing import Any

import dramatiq
from dramatiq import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name, xq_name

__all__ = ["TRACEBACK_LIMIT", "WORKERS_KEY", "MonitorMiddleware"]

#: Stack frames kept per traceback (as Dramatiq's ``Retries``).
TRACEBACK_LIMIT = 30
#: Hash under the broker's namespace: worker broker id → JSON of pid, host, since (ms).
WORKERS_KEY = "__botkit_workers__"

# Replaces the dead letter's data only if the nack put it there: a message that
# was requeued or purged meanwhile is not brought back.
_REPLACE_IF_PRESENT = """
if redis.call("hexists", KEYS[1], ARGV[1]) == 1 then
    redis.call("hset", KEYS[1], ARGV[1], ARGV[2])
    return 1
end
return 0
"""


class MonitorMiddleware(dramatiq.Middleware):
    """Keeps tracebacks and, on Redis, final dead letters and the list of workers."""

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        message.options["traceback"] = "".join(
            traceback.format_exception(
                type(exception), exception, exception.__traceback__, limit=TRACEBACK_LIMIT
            )
        )

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if not isinstance(broker, RedisBroker):
            return
        redis_id = message.options.get("redis_message_id")
        if not isinstance(redis_id, str):
            return
        key = f"{broker.namespace}:{xq_name(q_name(message.queue_name))}.msgs"
        broker.client.eval(_REPLACE_IF_PRESENT, 1, key, redis_id, message.encode())

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if isinstance(broker, RedisBroker):
            record = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now_ms()}
            broker.client.hset(_workers_key(broker), broker.broker_id, json.dumps(record))

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if isinstance(broker, RedisBroker):
            broker.client.hdel(_workers_key(broker), broker.broker_id)


def _workers_key(broker: RedisBroker) -> str:
    return f"{broker.namespace}:{WORKERS_KEY}"


def _now_ms() -> int:
    return int(time.time() * 1000)
