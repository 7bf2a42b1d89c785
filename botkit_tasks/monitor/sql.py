"""The inspector for :class:`~botkit_tasks.brokers.SqlBroker`: SQL over its tables.

It reads ``{prefix}messages`` and ``{prefix}workers`` (schema in
``botkit_tasks/brokers/sql.py``).  "Ready" and "delayed" are told apart with
the database clock, the same clock the broker uses for ``available_at``, so a
skewed client clock cannot move a message from one column to the other.
Repairs (requeue, purge) run in one transaction each; a requeue re-enqueues
through the broker in the same transaction, so the middleware's enqueue hooks
run and the dead letter is gone exactly when its new copy exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import dramatiq
import sqlalchemy as sa
from dramatiq.common import dq_name, q_name
from sqlalchemy.engine import Connection, Engine

from .._sql import atomic, is_sqlite, transaction
from ..brokers.sql import SqlBroker
from .base import (
    DeadLetter,
    Inspector,
    QueueStats,
    RetryingMessage,
    WorkerInfo,
    at_ms,
    from_ms,
    requeue_copy,
)

__all__ = ["SqlInspector"]


def _now_ms(conn: Connection) -> int:
    """Milliseconds since the epoch on the database server's clock."""
    if is_sqlite(conn.engine):
        expr = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    else:
        expr = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    return int(conn.exec_driver_sql(f"SELECT {expr}").scalar_one())


class SqlInspector(Inspector):
    """An :class:`~botkit_tasks.monitor.Inspector` over a SqlBroker's tables."""

    def __init__(self, broker: SqlBroker) -> None:
        self.broker = broker
        self.engine: Engine = broker.engine
        prefix: str = broker.table_prefix
        self.messages = sa.table(
            f"{prefix}messages",
            sa.column("id", sa.BigInteger),
            sa.column("message_id", sa.String),
            sa.column("queue_name", sa.String),
            sa.column("actor_name", sa.String),
            sa.column("state", sa.String),
            sa.column("available_at", sa.BigInteger),
            sa.column("worker_id", sa.String),
            sa.column("dead_at", sa.BigInteger),
            sa.column("retries", sa.Integer),
            sa.column("last_error", sa.Text),
            sa.column("data", sa.LargeBinary),
        )
        self.workers_table = sa.table(
            f"{prefix}workers",
            sa.column("worker_id", sa.String),
            sa.column("heartbeat_at", sa.BigInteger),
        )

    def _queue_filter(self, queue: str) -> sa.ColumnElement[bool]:
        return self.messages.c.queue_name.in_([q_name(queue), dq_name(queue)])

    def queues(self) -> list[QueueStats]:
        m = self.messages
        counts: dict[str, dict[str, int]] = {}
        for name in self.broker.get_declared_queues():
            counts[q_name(name)] = dict.fromkeys(("ready", "delayed", "in_flight", "dead"), 0)
        with transaction(self.engine, read_only=True) as conn:
            now = _now_ms(conn)
            due = sa.case((m.c.available_at <= now, 1), else_=0).label("due")
            rows = conn.execute(
                sa.select(m.c.queue_name, m.c.state, due, sa.func.count().label("n")).group_by(
                    m.c.queue_name, m.c.state, due
                )
            ).all()
        for queue_name, state, is_due, n in rows:
            entry = counts.setdefault(
                q_name(queue_name), dict.fromkeys(("ready", "delayed", "in_flight", "dead"), 0)
            )
            delay_queue = queue_name.endswith(".DQ")
            if state == "queued":
                entry["ready" if is_due and not delay_queue else "delayed"] += n
            elif state == "waiting":  # behind an earlier message of its ordering key
                entry["delayed"] += n
            elif state == "consumed":
                entry["in_flight"] += n
            elif state == "dead":
                entry["dead"] += n
        return [QueueStats(name, **counts[name]) for name in sorted(counts)]

    def workers(self) -> list[WorkerInfo]:
        m, w = self.messages, self.workers_table
        timeout_ms = int(float(getattr(self.broker, "heartbeat_timeout", 60.0)) * 1000)
        in_flight = (
            sa.select(m.c.worker_id, sa.func.count().label("n"))
            .where(m.c.state == "consumed")
            .group_by(m.c.worker_id)
            .subquery()
        )
        with transaction(self.engine, read_only=True) as conn:
            now = _now_ms(conn)
            rows = conn.execute(
                sa.select(w.c.worker_id, w.c.heartbeat_at, sa.func.coalesce(in_flight.c.n, 0))
                .select_from(w.outerjoin(in_flight, in_flight.c.worker_id == w.c.worker_id))
                .where(w.c.heartbeat_at >= now - timeout_ms)
                .order_by(w.c.worker_id)
            ).all()
        return [
            WorkerInfo(id=worker_id, last_heartbeat=at_ms(beat), in_flight=int(n))
            for worker_id, beat, n in rows
        ]

    def retrying(self, *, limit: int | None = None) -> list[RetryingMessage]:
        m = self.messages
        query = (
            sa.select(
                m.c.message_id,
                m.c.queue_name,
                m.c.actor_name,
                m.c.retries,
                m.c.available_at,
                m.c.last_error,
            )
            .where(m.c.queue_name.like("%.DQ"), m.c.state != "dead", m.c.retries > 0)
            .order_by(m.c.available_at, m.c.id)
            .limit(limit)
        )
        with transaction(self.engine, read_only=True) as conn:
            rows = conn.execute(query).all()
        return [
            RetryingMessage(
                message_id=message_id,
                queue=q_name(queue_name),
                actor=actor_name,
                retries=int(retries),
                eta=from_ms(available_at),
                last_error=last_error,
            )
            for message_id, queue_name, actor_name, retries, available_at, last_error in rows
        ]

    def dead_letters(
        self, queue: str | None = None, *, limit: int | None = None
    ) -> list[DeadLetter]:
        m = self.messages
        query = (
            sa.select(
                m.c.message_id,
                m.c.queue_name,
                m.c.actor_name,
                m.c.retries,
                m.c.last_error,
                m.c.dead_at,
                m.c.data,
            )
            .where(m.c.state == "dead")
            .order_by(m.c.dead_at.desc(), m.c.id.desc())
            .limit(limit)
        )
        if queue is not None:
            query = query.where(self._queue_filter(queue))
        with transaction(self.engine, read_only=True) as conn:
            rows = conn.execute(query).all()
        letters = []
        for message_id, queue_name, actor_name, retries, last_error, dead_at, data in rows:
            args: tuple[Any, ...] = ()
            kwargs: dict[str, Any] = {}
            traceback = last_error
            try:
                message = dramatiq.Message.decode(bytes(data))
            except Exception:
                # An undecodable row stays listable; its error column says why it died.
                pass
            else:
                args, kwargs = tuple(message.args), dict(message.kwargs)
                traceback = traceback or message.options.get("traceback")
            letters.append(
                DeadLetter(
                    message_id=message_id,
                    queue=q_name(queue_name),
                    actor=actor_name,
                    args=args,
                    kwargs=kwargs,
                    retries=int(retries or 0),
                    traceback=traceback,
                    died_at=from_ms(dead_at),
                )
            )
        return letters

    def requeue(self, message_ids: Iterable[str]) -> int:
        ids = list(dict.fromkeys(message_ids))
        if not ids:
            return 0
        m = self.messages
        count = 0
        # One transaction: the dead rows disappear exactly when their new copies
        # exist; the row locks make a concurrent requeue of the same id a no-op.
        with atomic(self.engine) as conn:
            rows = conn.execute(
                sa.select(m.c.id, m.c.data)
                .where(m.c.state == "dead", m.c.message_id.in_(ids))
                .with_for_update()
            ).all()
            for row_id, data in rows:
                try:
                    message = dramatiq.Message.decode(bytes(data))
                except Exception:
                    continue  # nothing to run; left in place for purge_dead()
                # The copy first: while the dead row exists, a keyed copy
                # inherits its place in its key's order (it runs after the
                # key's current head, before what was sent after it).
                self.broker.enqueue(requeue_copy(message))
                conn.execute(sa.delete(m).where(m.c.id == row_id, m.c.state == "dead"))
                count += 1
        return count

    def purge_dead(self, queue: str | None = None) -> int:
        m = self.messages
        statement = sa.delete(m).where(m.c.state == "dead")
        if queue is not None:
            statement = statement.where(self._queue_filter(queue))
        with transaction(self.engine) as conn:
            return int(conn.execute(statement).rowcount)
