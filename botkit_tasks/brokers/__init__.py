"""Dramatiq brokers: :class:`SqlBroker` on PostgreSQL or SQLite.

Dramatiq's own ``RedisBroker`` works with everything in botkit-tasks as well;
``SqlBroker`` adds transactional enqueueing with :func:`botkit_tasks.atomic`.
"""

from __future__ import annotations

from .sql import SqlBroker, SqlMessageProxy

__all__ = ["SqlBroker", "SqlMessageProxy"]
