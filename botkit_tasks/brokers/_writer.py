"""How :class:`~botkit_tasks.brokers.SqlBroker` writes enqueued rows: batched, keyed, retried.

Unkeyed rows go in with the cheapest statement for their number (one
autocommitted ``INSERT … pg_notify`` for a single message on PostgreSQL, one
``INSERT … SELECT FROM unnest()`` for a batch); rows with an ordering key go
through :class:`~botkit_tasks.brokers._ordering.SqlOrdering`, in the same
transaction.  Transient errors are retried here, because a retry-enqueue that
fails inside Dramatiq's ``Retries`` middleware would lose its message.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .._sql import ambient_connection, transaction
from ._dberrors import closed, is_transient
from ._hub import Hub
from ._ordering import SqlOrdering
from ._schema import Statements, batch_columns

__all__ = ["ENQUEUE_ATTEMPTS", "write_rows"]

#: Attempts ``enqueue`` makes on a transient database error before raising.
ENQUEUE_ATTEMPTS = 6

# A private generator: jitter must not consume or reseed the application's
# global random state (tests and users may seed it).
_random = random.Random()


def write_rows(
    rows: list[dict[str, Any]],
    *,
    engine: Engine,
    statements: Statements,
    hub: Hub[Any],
    ordering: SqlOrdering,
    listen: bool,
    logger: logging.Logger,
) -> None:
    """Insert ``rows`` (from ``message_row``) in one transaction and wake their consumers.

    Raises:
        dramatiq.errors.ConnectionClosed: The database stayed unreachable
            through :data:`ENQUEUE_ATTEMPTS` attempts, or the caller's
            :func:`~botkit_tasks.atomic` transaction was lost.
    """
    postgres = engine.dialect.name == "postgresql"
    queues = sorted({row["queue_name"] for row in rows})
    keyed = [row for row in rows if row["ordering_key"] is not None]
    # Unkeyed rows keep the statements' own column list (no ordering_key).
    plain = [
        {k: v for k, v in row.items() if k != "ordering_key"}
        for row in rows
        if row["ordering_key"] is None
    ]
    attempt = 0
    while True:
        try:
            if postgres and not keyed and len(plain) == 1 and ambient_connection(engine) is None:
                # One message outside atomic(): one autocommitted statement
                # that inserts and notifies, a single round trip.
                insert = statements.insert_notify if listen else statements.insert
                with statements.autocommit.connect() as conn:
                    conn.execute(insert, plain[0])
                    conn.commit()
                hub.wake(queues)
                return
            with transaction(engine) as conn:
                if postgres and len(plain) > 1:
                    # One statement over arrays: the server builds the rows,
                    # instead of one pipelined INSERT per message.
                    assert statements.insert_unnest is not None
                    conn.exec_driver_sql(statements.insert_unnest, batch_columns(plain))
                elif plain:
                    conn.execute(statements.insert, plain)
                if keyed:
                    ordering.insert(conn, keyed)
                hub.notify_on(conn, queues)
            return
        except sa.exc.DBAPIError as exc:
            attempt += 1
            if not is_transient(engine, exc):
                raise
            # Inside atomic() the caller's transaction is gone; only they can retry.
            if ambient_connection(engine) is not None or attempt >= ENQUEUE_ATTEMPTS:
                raise closed(exc) from exc
            logger.warning("enqueue failed (%s), retrying (attempt %d)", exc, attempt)
            time.sleep(min(0.1 * 2**attempt, 3.0) * _random.uniform(0.5, 1.0))
