"""Periodic upkeep, run by whichever consumer finds it due.

Rows claimed by consumers whose heartbeat lapsed go back to their queues,
stale worker rows are removed, and dead letters older than the broker's
``dead_message_ttl`` are purged.  On PostgreSQL one process at a time does it
(a transaction-scoped advisory lock).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ._hub import Hub
from ._schema import CONSUMED, DEAD, QUEUED, Statements

__all__ = ["Maintenance"]

# A private generator: jitter must not consume or reseed the application's
# global random state (tests and users may seed it).
_random = random.Random()


class Maintenance:
    """When upkeep is due, and the upkeep itself, for one broker."""

    def __init__(
        self,
        *,
        engine: Engine,
        messages: sa.Table,
        workers: sa.Table,
        statements: Statements,
        hub: Hub[Any],
        lock_key: int,
        heartbeat_timeout: float,
        dead_message_ttl: float,
        logger: logging.Logger,
    ) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self.messages = messages
        self.workers = workers
        self.statements = statements
        self.hub = hub
        self.lock_key = lock_key
        self.heartbeat_timeout = heartbeat_timeout
        self.dead_message_ttl = dead_message_ttl
        self.logger = logger
        self._lock = threading.Lock()
        self._next = time.monotonic() + self.interval * _random.random()

    @property
    def interval(self) -> float:
        """Seconds between two runs in one process (a quarter of the heartbeat timeout)."""
        return self.heartbeat_timeout / 4

    def due(self) -> bool:
        """Whether this process should run the upkeep now (then it is not due again soon)."""
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                return False
            self._next = now + self.interval * _random.uniform(0.75, 1.25)
            return True

    def run(self, conn: Connection) -> None:
        """Hand back rows of consumers whose heartbeat lapsed; purge old dead letters.

        ``conn`` is the calling consumer's connection; on PostgreSQL it is in
        autocommit mode, so a pooled connection runs the transaction instead
        (the advisory lock must last until it commits).
        """
        if self.postgres:
            with self.engine.connect() as pooled:
                self._run_in(pooled)
        else:
            self._run_in(conn)

    def _run_in(self, conn: Connection) -> None:
        m, w = self.messages, self.workers
        now = self.statements.now
        with conn.begin():
            if self.postgres:
                locked = conn.execute(
                    sa.select(sa.func.pg_try_advisory_xact_lock(self.lock_key))
                ).scalar()
                if not locked:
                    return
            cutoff = now - int(self.heartbeat_timeout * 1000)
            live = sa.select(w.c.worker_id).where(w.c.heartbeat_at >= cutoff)
            requeued = (
                conn.execute(
                    m.update()
                    .where(
                        m.c.state == CONSUMED,
                        sa.or_(m.c.worker_id.is_(None), m.c.worker_id.not_in(live)),
                    )
                    .values(state=QUEUED, worker_id=None, consumed_at=None)
                    .returning(m.c.queue_name)
                )
                .scalars()
                .all()
            )
            conn.execute(w.delete().where(w.c.heartbeat_at < cutoff))
            conn.execute(
                m.delete().where(
                    m.c.state == DEAD,
                    m.c.dead_at < now - int(self.dead_message_ttl * 1000),
                )
            )
            if requeued:
                self.logger.warning(
                    "Handed %d message(s) of unresponsive workers back to their queues.",
                    len(requeued),
                )
                self.hub.notify_on(conn, sorted(set(requeued)), local=False)
        if requeued:
            self.hub.announce(set(requeued))
