"""The broker's tables and the statements it runs on them.

Two tables per prefix: ``{prefix}messages`` (one row per message, its
``state`` ``queued`` → ``consumed`` → deleted on ack, or ``dead``; a message
with an ordering key starts ``waiting`` behind its key's head, see
``_ordering.py``) and
``{prefix}workers`` (one heartbeat row per consumer).  :class:`Statements`
builds every statement once per broker, for its dialect.
"""

from __future__ import annotations

import hashlib
import re
import socket
from typing import Any

import sqlalchemy as sa
from dramatiq.message import Message
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Engine

from .._sql import is_postgres
from .ordering import MAX_KEY_LENGTH, check_ordering_key

__all__ = [
    "CONSUMED",
    "DEAD",
    "PREFIX_RE",
    "QUEUED",
    "WAITING",
    "Statements",
    "batch_columns",
    "channel_name",
    "define_tables",
    "lock_key",
    "message_row",
    "now_ms",
]

# States are rendered as literals, never bound: with a bound value a prepared
# (generic) plan cannot prove "state = 'queued'" and skips the partial index.
QUEUED: sa.ColumnElement[str] = sa.literal_column("'queued'")
CONSUMED: sa.ColumnElement[str] = sa.literal_column("'consumed'")
DEAD: sa.ColumnElement[str] = sa.literal_column("'dead'")
#: A keyed message behind its key's head; no claim looks at these rows.
WAITING: sa.ColumnElement[str] = sa.literal_column("'waiting'")

#: What a table prefix may be: a short SQL identifier.
PREFIX_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


def now_ms(engine: Engine) -> sa.ColumnElement[int]:
    """The database's clock in epoch milliseconds, as a SQL expression."""
    if is_postgres(engine):
        # statement_timestamp(): unlike now() it does not stick to the start of
        # a long atomic() block, and unlike clock_timestamp() it is STABLE, so
        # the planner can use it as a bound of the ready-index scan.
        return sa.cast(
            sa.func.floor(sa.extract("epoch", sa.func.statement_timestamp()) * 1000),
            sa.BigInteger,
        )
    return sa.cast((sa.func.julianday("now") - 2440587.5) * 86400000.0, sa.BigInteger)


def batch_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows of one batch as one array per column (they share one delay)."""
    names = ("message_id", "queue_name", "actor_name", "retries", "last_error", "data")
    params: dict[str, Any] = {name: [row[name] for row in rows] for name in names}
    params["delay_ms"] = rows[0]["delay_ms"]
    return params


def message_row(message: Message[Any], delay: int | None) -> dict[str, Any]:
    """The insert parameters of one message (its retry count and last error kept)."""
    retries = message.options.get("retries", 0)
    traceback = message.options.get("traceback")
    return {
        "message_id": message.message_id,
        "queue_name": message.queue_name,
        "actor_name": message.actor_name,
        "retries": retries if isinstance(retries, int) else 0,
        "last_error": traceback if isinstance(traceback, str) else None,
        "data": message.encode(),
        "delay_ms": max(int(delay or 0), 0),
        "ordering_key": check_ordering_key(message.options.get("ordering_key")),
    }


def _bigint_id() -> sa.Column[int]:
    # SQLite only auto-increments an INTEGER PRIMARY KEY; AUTOINCREMENT (set on
    # the table) keeps deleted ids from being reused by a later delivery.
    return sa.Column(
        "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(), primary_key=True
    )


def define_tables(prefix: str) -> tuple[sa.MetaData, sa.Table, sa.Table]:
    """The metadata, messages table and workers table of ``prefix``."""
    metadata = sa.MetaData()
    messages = sa.Table(
        f"{prefix}messages",
        metadata,
        _bigint_id(),
        sa.Column("message_id", sa.String(36), nullable=False, index=True),
        sa.Column("queue_name", sa.String(255), nullable=False),
        sa.Column("actor_name", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("available_at", sa.BigInteger, nullable=False),
        sa.Column("enqueued_at", sa.BigInteger, nullable=False),
        sa.Column("worker_id", sa.String(64)),
        sa.Column("consumed_at", sa.BigInteger),
        sa.Column("dead_at", sa.BigInteger),
        sa.Column("retries", sa.Integer, nullable=False, default=0),
        sa.Column("last_error", sa.Text),
        sa.Column("data", sa.LargeBinary, nullable=False),
        # Ordering keys: the key, and the row id of the message's first delivery.
        sa.Column("ordering_key", sa.String(MAX_KEY_LENGTH)),
        sa.Column("ordering_seq", sa.BigInteger),
        sqlite_autoincrement=True,
    )
    keyed = messages.c.ordering_key.isnot(None)
    sa.Index(
        f"{prefix}messages_order_idx",
        messages.c.ordering_key,
        messages.c.state,
        messages.c.ordering_seq,
        messages.c.id,
        postgresql_where=keyed,
        sqlite_where=keyed,
    )
    queued = messages.c.state == QUEUED
    sa.Index(
        f"{prefix}messages_ready_idx",
        messages.c.queue_name,
        messages.c.available_at,
        messages.c.id,
        postgresql_where=queued,
        sqlite_where=queued,
    )
    workers = sa.Table(
        f"{prefix}workers",
        metadata,
        sa.Column("worker_id", sa.String(64), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("heartbeat_at", sa.BigInteger, nullable=False),
        sa.Column("queues", sa.Text, nullable=False),
    )
    return metadata, messages, workers


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_*lock`` derived from ``name``."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)


def channel_name(prefix: str) -> str:
    """The ``LISTEN/NOTIFY`` channel of ``prefix`` (at most 63 bytes)."""
    channel = f"{prefix}messages"
    # Postgres truncates identifiers to 63 bytes, which would let two long
    # prefixes share a channel; hash them down instead.
    if len(channel.encode()) > 63:
        channel = f"{prefix[:40]}_{hashlib.sha1(prefix.encode()).hexdigest()[:16]}"
    return channel


class Statements:
    """Every statement a broker and its consumers run, built once for the dialect."""

    #: The bulk insert over arrays (PostgreSQL only; ``None`` on SQLite).
    insert_unnest: str | None = None
    #: Delete the pending acks and claim in one statement (PostgreSQL only).
    ack_and_claim: Any = None

    def __init__(self, engine: Engine, messages: sa.Table, workers: sa.Table, channel: str) -> None:
        postgres = is_postgres(engine)
        m, w = messages, workers
        now = now_ms(engine)
        self.now = now
        self.insert = m.insert().values(
            available_at=now + sa.bindparam("delay_ms", type_=sa.BigInteger),
            enqueued_at=now,
            state=QUEUED,
        )
        self.notify = sa.select(sa.func.pg_notify(channel, sa.bindparam("queue")))
        if postgres:
            table = engine.dialect.identifier_preparer.format_table(m)
            now_sql = "floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint"
            # WITH ORDINALITY + ORDER BY: ids follow the order of the batch (FIFO).
            self.insert_unnest = (
                f"INSERT INTO {table} (message_id, queue_name, actor_name, retries, "
                "last_error, data, available_at, enqueued_at, state) "
                "SELECT u.message_id, u.queue_name, u.actor_name, u.retries, u.last_error, "
                f"u.data, {now_sql} + %(delay_ms)s, {now_sql}, 'queued' "
                # %(…)b: psycopg sends these arrays in binary, no escaping.
                "FROM unnest(%(message_id)b::varchar[], %(queue_name)b::varchar[], "
                "%(actor_name)b::varchar[], %(retries)b::integer[], %(last_error)b::text[], "
                "%(data)b::bytea[]) WITH ORDINALITY "
                "AS u(message_id, queue_name, actor_name, retries, last_error, data, n) "
                "ORDER BY u.n"
            )
        self.autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        columns = ("message_id", "queue_name", "actor_name", "retries", "last_error", "data")
        inserted = (
            self.insert.values({name: sa.bindparam(name, type_=m.c[name].type) for name in columns})
            .returning(m.c.id)
            .cte("inserted")
        )
        self.insert_notify = sa.select(
            sa.func.pg_notify(channel, sa.bindparam("queue_name", type_=sa.String))
        ).add_cte(inserted)
        pick = (
            sa.select(m.c.id)
            .where(
                m.c.queue_name == sa.bindparam("queue"),
                m.c.state == QUEUED,
                m.c.available_at <= now,
            )
            .order_by(m.c.available_at, m.c.id)
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .with_for_update(skip_locked=True)
        )
        if postgres:
            # A materialized CTE runs the locking SELECT exactly once.  With
            # "id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)" the planner may
            # re-run the subquery per row of a join, each run locking further
            # rows, and claim far more than n (seen on a bloated table).
            picked = pick.cte("picked").prefix_with("MATERIALIZED")
            target = m.c.id == picked.c.id
        else:
            target = m.c.id.in_(pick.scalar_subquery())
        self.claim = (
            m.update()
            .where(target)
            .values(state=CONSUMED, worker_id=sa.bindparam("worker"), consumed_at=now)
            .returning(m.c.id, m.c.available_at, m.c.data)
        )
        if postgres:
            # The pending acks ride along with the claim: one statement, one
            # round trip, one commit per batch.
            acked = (
                m.delete()
                .where(
                    m.c.id == sa.any_(sa.bindparam("acks", type_=pg_dialect.ARRAY(sa.BigInteger)))
                )
                .cte("acked")
            )
            self.ack_and_claim = self.claim.add_cte(acked)
        # Over every queued row, due ones included: a row that fell due between
        # the claim that missed it and this query gives 0 (poll again at once),
        # where "available_at > now" left it to the next poll_interval.
        self.next_due = sa.select(sa.func.min(m.c.available_at) - now).where(
            m.c.queue_name == sa.bindparam("queue"),
            m.c.state == QUEUED,
        )
        self.delete = m.delete().where(m.c.id.in_(sa.bindparam("ids", expanding=True)))
        insert = pg_dialect.insert if postgres else sqlite_dialect.insert
        upsert = insert(w).values(
            worker_id=sa.bindparam("worker"),
            hostname=socket.gethostname()[:255],
            pid=sa.bindparam("pid"),
            heartbeat_at=now,
            queues=sa.bindparam("queues"),
        )
        self.heartbeat = upsert.on_conflict_do_update(
            index_elements=[w.c.worker_id],
            set_={"heartbeat_at": upsert.excluded.heartbeat_at, "pid": upsert.excluded.pid},
        )

        # -- Dramatiq's broker contract --------------------------------------------
