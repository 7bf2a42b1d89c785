"""Dead-letter a failed message whose retry could not be enqueued, instead of losing it.

Dramatiq's ``Retries`` re-enqueues a failed message (same ``message_id``, with
a delay) from its ``after_process_message`` hook, and the worker then acks the
attempt.  When that enqueue raises — the database refuses connections, Redis
is unreachable — ``Broker.emit_after`` logs the error and carries on, and the
ack deletes the only copy: the message is gone without a trace.

:class:`RetryGuard` notices that no copy was enqueued and fails the message
instead, so the worker nacks it into the dead letters (with its traceback),
where the monitor shows it and ``requeue`` brings it back.  Add it *before*
``Retries`` — Dramatiq runs ``after_*`` hooks in reverse order, so it then runs
after ``Retries``::

    broker.add_middleware(RetryGuard(), before=Retries)
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import dramatiq
from dramatiq import MessageProxy
from dramatiq.middleware import Retries

__all__ = ["RetryGuard", "install_retry_guard"]

logger = logging.getLogger(__name__)


class RetryGuard(dramatiq.Middleware):
    """Fails (dead-letters) a message whose retry ``Retries`` could not enqueue."""

    def __init__(self) -> None:
        self._local = threading.local()

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._local.message_id = message.message_id
        self._local.enqueued = False

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        # The retry copy keeps the message id; other messages the job sends do not.
        if message.message_id == getattr(self._local, "message_id", None):
            self._local.enqueued = True

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        enqueued = getattr(self._local, "enqueued", False)
        self._local.message_id = None
        if exception is None or message.failed or enqueued:
            return
        if not any(isinstance(m, Retries) for m in broker.middleware):
            return  # without Retries a failed message is dropped by design
        logger.error(
            "The retry of message %s (%s) could not be enqueued; it is dead-lettered instead",
            message.message_id,
            message.actor_name,
        )
        message.fail()


def install_retry_guard(broker: dramatiq.Broker) -> None:
    """Add a :class:`RetryGuard` to ``broker`` where it works: just before ``Retries``."""
    if any(isinstance(m, RetryGuard) for m in broker.middleware):
        return
    if any(isinstance(m, Retries) for m in broker.middleware):
        broker.add_middleware(RetryGuard(), before=Retries)
