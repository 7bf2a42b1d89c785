"""How an :class:`~._consumer.SqlConsumer` takes over or hands back rows.

Orphans of a closed consumer, undecodable messages, and claimed rows it
hands back to their queue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ._dberrors import closed, is_transient
from ._hub import chunks
from ._schema import CONSUMED, DEAD, QUEUED

if TYPE_CHECKING:
    from ._host import ConsumerHost

__all__ = ["adopt_orphans", "begun", "dead_letter_rows", "requeue_rows"]


@contextmanager
def begun(conn: Connection) -> Iterator[Connection]:
    """``engine.begin()`` for a connection we already hold: yields the connection."""
    with conn.begin():
        yield conn


def requeue_rows(consumer: Any, ids: list[int], begin: Callable[[], Any]) -> None:
    """Put the rows ``ids`` claimed by ``consumer`` back in its queue (``begin``: the transaction).

    Raises:
        dramatiq.errors.ConnectionClosed: On a transient database error.
    """
    m = consumer.broker.messages
    try:
        with begin() as conn:
            for chunk in chunks(ids):
                conn.execute(
                    m.update()
                    .where(m.c.id.in_(chunk), m.c.state == CONSUMED)
                    .values(state=QUEUED, worker_id=None, consumed_at=None)
                )
            consumer.broker.hub.notify_on(conn, [consumer.queue_name], local=False)
    except sa.exc.DBAPIError as exc:
        if is_transient(consumer.broker.engine, exc):
            raise closed(exc) from exc
        raise


def adopt_orphans(consumer: Any, conn: Connection) -> None:
    """Have ``consumer`` (a ``SqlConsumer``) take over its queue's orphaned rows.

    The orphans are the in-flight rows of closed consumers of the same queue
    in this process.

    After a connection error Dramatiq restarts a consumer (a new worker id)
    while the worker threads still run or hold the messages the old one
    handed out; without this, the old id's heartbeat lapses and those
    messages are handed out again while they run.
    """
    m = consumer.broker.messages
    orphans = consumer.broker.hub.take_orphans(consumer.queue_name)
    while orphans:
        old = orphans[0]
        with old._lock:
            ids = old._unacked - old._abandoned
        adopted: set[int] = set()
        try:
            for chunk in chunks(sorted(ids)):
                adopted.update(
                    conn.execute(
                        m.update()
                        .where(m.c.id.in_(chunk), m.c.state == CONSUMED)
                        .where(m.c.worker_id == old.worker_id)
                        .values(worker_id=consumer.worker_id)
                        .returning(m.c.id)
                    )
                    .scalars()
                    .all()
                )
        except BaseException:
            for orphan in orphans:  # the next consumer tries again
                consumer.broker.hub.add_orphan(orphan)
            raise
        with old._lock:
            # Acks that came through the old consumer meanwhile are excluded;
            # later ones are forwarded by its _release.
            with consumer._lock:
                consumer._unacked.update(old._unacked & adopted)
            old._adopter = consumer
        orphans.pop(0)


def dead_letter_rows(broker: ConsumerHost, conn: Connection, bad: list[tuple[int, str]]) -> None:
    """Make the rows ``(row id, error)`` dead letters (messages that cannot be decoded)."""
    m = broker.messages
    conn.execute(
        m.update()
        .where(m.c.id == sa.bindparam("row_id"))
        .values(
            state=DEAD,
            dead_at=broker.statements.now,
            worker_id=None,
            last_error=sa.bindparam("error"),
        ),
        [{"row_id": row_id, "error": error} for row_id, error in bad],
    )
