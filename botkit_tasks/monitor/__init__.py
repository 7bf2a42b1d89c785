"""See what the queues are doing: depths, workers, retries and dead letters.

``inspect(broker)`` returns an :class:`Inspector` for a
:class:`~botkit_tasks.brokers.SqlBroker` (plain SQL over its tables) or for
Dramatiq's ``RedisBroker`` (its Redis keys, read the way its ``dispatch.lua``
writes them)::

    from botkit_tasks.monitor import inspect

    insp = inspect(broker)
    for q in insp.queues():
        print(q.name, q.ready, q.delayed, q.in_flight, q.dead)
    insp.requeue([d.message_id for d in insp.dead_letters()])

Counts are exact at the moment they are read, not estimates.  Every queue is
reported under its canonical name: the ``.DQ`` copy of a delayed message counts
as ``delayed`` of its queue and a dead letter as ``dead``.
"""

from __future__ import annotations

from typing import Any

from .base import DeadLetter, Inspector, QueueStats, RetryingMessage, WorkerInfo

__all__ = [
    "DeadLetter",
    "Inspector",
    "QueueStats",
    "RetryingMessage",
    "WorkerInfo",
    "inspect",
]


def inspect(broker: Any) -> Inspector:
    """Return an :class:`Inspector` for ``broker``.

    Supported: :class:`~botkit_tasks.brokers.SqlBroker`,
    ``dramatiq.brokers.redis.RedisBroker``, and a ``celery.Celery`` app on
    the ``botkit+…`` SQL transport or on Redis (:mod:`.celery`).

    Raises:
        TypeError: for any other broker.
    """
    from dramatiq.brokers.redis import RedisBroker

    if isinstance(broker, RedisBroker):
        from .redis import RedisInspector

        return RedisInspector(broker)
    from ..brokers.sql import SqlBroker

    if isinstance(broker, SqlBroker):
        from .sql import SqlInspector

        return SqlInspector(broker)
    from ..runners.select import is_celery_app

    if is_celery_app(broker):
        from .celery import inspect_celery

        return inspect_celery(broker)
    raise TypeError(
        f"cannot inspect a {type(broker).__name__}: botkit_tasks.monitor supports "
        "SqlBroker, dramatiq's RedisBroker and Celery apps on botkit+ SQL or Redis"
    )
