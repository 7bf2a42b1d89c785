"""Dead letters of a :class:`~botkit_tasks.brokers.SqlBroker`: read them, requeue them.

A message whose retries are exhausted stays in the messages table with
``state = 'dead'`` (and its final traceback in ``last_error``) until the
broker's ``dead_message_ttl`` has passed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import dramatiq
import sqlalchemy as sa
from dramatiq.common import dq_name, q_name
from dramatiq.message import Message
from sqlalchemy.engine import Engine

from .._sql import on_commit, transaction
from ._hub import Hub
from ._ordering import SqlOrdering
from ._schema import DEAD, QUEUED, Statements

if TYPE_CHECKING:
    from ._host import ConsumerHost

__all__ = ["dead_letters", "mark_dead", "requeue_dead"]


def mark_dead(broker: ConsumerHost, row_id: int, message: Message[Any]) -> None:
    """Turn the claimed row ``row_id`` into a dead letter of ``message`` (its final options)."""
    m = broker.messages
    retries, traceback = message.options.get("retries", 0), message.options.get("traceback")
    with broker.engine.begin() as conn:
        conn.execute(
            m.update()
            .where(m.c.id == row_id)
            .values(
                state=DEAD,
                dead_at=broker.statements.now,
                worker_id=None,
                data=message.encode(),
                retries=retries if isinstance(retries, int) else 0,
                last_error=traceback if isinstance(traceback, str) else None,
            )
        )


def dead_letters(engine: Engine, messages: sa.Table, queue_name: str) -> list[Message[Any]]:
    """The decodable dead letters of ``queue_name`` (and its delay queue), oldest first."""
    m = messages
    names = [q_name(queue_name), dq_name(queue_name)]
    query = (
        sa.select(m.c.data)
        .where(m.c.queue_name.in_(names), m.c.state == DEAD)
        .order_by(m.c.dead_at, m.c.id)
    )
    result = []
    with transaction(engine, read_only=True) as conn:
        for (data,) in conn.execute(query):
            try:
                result.append(Message.decode(bytes(data)))
            except dramatiq.errors.DecodeError:
                continue
    return result


def requeue_dead(
    engine: Engine,
    messages: sa.Table,
    statements: Statements,
    hub: Hub[Any],
    queue_name: str,
    message_ids: Iterable[str] | None,
    *,
    ordering: SqlOrdering,
) -> int:
    """Move dead letters back to their queue with retries reset; return how many.

    Undecodable rows stay dead; keyed ones wait behind their key's head.
    """
    m = messages
    canonical = q_name(queue_name)
    query = sa.select(m.c.id, m.c.data).where(
        m.c.queue_name.in_([canonical, dq_name(canonical)]), m.c.state == DEAD
    )
    if message_ids is not None:
        query = query.where(m.c.message_id.in_(list(message_ids)))
    update = (
        m.update()
        .where(m.c.id == sa.bindparam("row_id"), m.c.state == DEAD)
        .values(
            state=QUEUED,
            queue_name=canonical,
            available_at=statements.now,
            dead_at=None,
            worker_id=None,
            retries=0,
            last_error=None,
            data=sa.bindparam("new_data"),
        )
    )
    with transaction(engine) as conn:
        params = []
        for row_id, data in conn.execute(query).all():
            try:
                message = Message.decode(bytes(data))
            except dramatiq.errors.DecodeError:
                continue
            options = {k: v for k, v in message.options.items() if k not in ("eta", "traceback")}
            options["retries"] = 0
            fresh: Message[Any] = Message(
                queue_name=canonical,
                actor_name=message.actor_name,
                args=message.args,
                kwargs=message.kwargs,
                options=options,
                message_id=message.message_id,
                message_timestamp=message.message_timestamp,
            )
            params.append({"row_id": row_id, "new_data": fresh.encode()})
        if params:
            conn.execute(update, params)
            hub.notify_on(conn, [canonical])
            promoted = ordering.requeued(conn, [p["row_id"] for p in params])
            if promoted:
                on_commit(conn, lambda: hub.announce(promoted))
    return len(params)
