"""Ordering keys on :class:`~botkit_tasks.brokers.sql.SqlBroker`: one message per key at a time.

A message sent with ``send_with_options(ordering_key="…")`` is stored in the
state ``waiting``, which no claim ever looks at (the ready index covers
``queued`` rows only), so ordering costs the claims of unkeyed messages
nothing.  Per key, at most one row is the *head*: ``queued`` or ``consumed``.
Whenever the head may have gone (an ack, a dead letter, a requeue) and
whenever a keyed message arrives, the key is *released*: if it has no head,
its waiting row with the smallest ``ordering_seq`` becomes ``queued``.

``ordering_seq`` is the enqueue order: the row id of the message's first
delivery.  A retry or a delayed message's move from ``X.DQ`` to ``X`` is a new
row under the same ``message_id``, inserted while the old row still exists; it
inherits the old row's ``ordering_seq``, so it becomes the head again before
any later message of its key.  A head that keeps failing therefore holds its
successors back until it succeeds or is dead-lettered; dead letters are not
heads.

Acks: on PostgreSQL a keyed ack is grouped like an unkeyed one (the hub keeps
it for the consumers of its queue, which wake up for it).  The consumer's next
claim runs one transaction: it locks the keys, then one statement
(:meth:`SqlOrdering.hand_on`) deletes the acked rows, finds each headless
key's next waiting row, and claims the oldest ``limit`` rows among those
successors and the queue's queued rows, as a separate claim would; the
successors it does not take become ``queued`` (with a ``NOTIFY``).  So one
transaction per batch acks, releases and claims, instead of one transaction
per keyed ack plus a claim.  Until that flush the acked row stays
``consumed``: a crash loses the ack and the message runs again, still as its
key's head.  On SQLite a keyed ack is deleted and released at once.

Concurrency: every transaction that inserts or releases rows of a key first
takes a transaction-scoped lock on it (PostgreSQL ``pg_advisory_xact_lock``,
which transaction poolers allow; SQLite serializes writers anyway), so a
release always sees the inserts of the transactions before it: the lock is a
statement of its own, because a statement's snapshot is taken when it starts.
Locks on several keys are taken in one sorted order.  A maintenance sweep
releases any key left without a head (a crash between a dead letter and its
release, an undecodable head), so no key stays stuck.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.engine import Connection, Engine

from .._sql import transaction
from ._dberrors import closed, is_transient
from ._hub import Hub
from ._schema import CONSUMED, QUEUED, WAITING, Statements

__all__ = ["SqlOrdering", "ensure_ordering_schema"]


def ensure_ordering_schema(conn: Connection, messages: sa.Table) -> None:
    """Add the ordering columns and index to a messages table created before them."""
    present = {column["name"] for column in sa.inspect(conn).get_columns(messages.name)}
    preparer = conn.dialect.identifier_preparer
    for name in ("ordering_key", "ordering_seq"):
        if name not in present:
            column = messages.c[name]
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(
                f"ALTER TABLE {preparer.format_table(messages)} "
                f"ADD COLUMN {preparer.quote(name)} {kind}"
            )
    for index in messages.indexes:
        if index.name and index.name.endswith("_order_idx"):
            index.create(conn, checkfirst=True)


#: The key locks of a pipelined hand-on (psycopg parameter style).  The plan
#: settings go with them: an ack needs no durable commit (losing it reruns
#: the message, and the release it made is lost with it), and the prepared
#: hand-on statement keeps its generic plan (PostgreSQL may otherwise plan
#: it anew each time, 0.5 ms a batch).
_PIPELINED_LOCKS = (
    "SELECT set_config('synchronous_commit', 'off', true), "
    "set_config('plan_cache_mode', 'force_generic_plan', true), "
    "count(pg_advisory_xact_lock(k)) FROM unnest(CAST(%(locks)s AS bigint[])) AS k"
)


def _lock_id(prefix: str, key: str) -> int:
    digest = hashlib.sha1(f"{prefix}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _hand_on_statement(engine: Engine, messages: sa.Table, channel: str) -> sa.TextClause:
    """Ack, release and claim in one statement (PostgreSQL; see ``SqlOrdering.hand_on``)."""
    t = engine.dialect.identifier_preparer.format_table(messages)
    now = "floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint"
    # Every CTE sees the snapshot taken when the statement began, after the key
    # locks: the acked rows still look like heads (hence "id <> ALL(:acks)"),
    # and the successors made here look "waiting" to the claim of "ready".
    sql = f"""
WITH acked AS (
    DELETE FROM {t} WHERE id = ANY(:acks)
),
successor AS MATERIALIZED (
    SELECT w.id, w.queue_name, w.available_at
    FROM unnest(CAST(:keys AS varchar[])) AS k(key)
    CROSS JOIN LATERAL (
        SELECT id, queue_name, available_at FROM {t}
        WHERE ordering_key = k.key AND state = 'waiting'
        ORDER BY ordering_seq, id
        LIMIT 1
    ) AS w
    WHERE NOT EXISTS (
        SELECT 1 FROM {t} AS h
        WHERE h.ordering_key = k.key AND h.state IN ('queued', 'consumed')
            AND h.id <> ALL(:acks)
    )
),
mine AS MATERIALIZED (
    SELECT id, available_at FROM successor
    WHERE queue_name = :queue AND available_at <= {now}
),
-- Only as many queued rows as "chosen" can take: each one is locked.
ready AS MATERIALIZED (
    SELECT id, available_at FROM {t}
    WHERE queue_name = :queue AND state = 'queued' AND available_at <= {now}
    ORDER BY available_at, id
    LIMIT GREATEST(:reserve, :limit - (SELECT count(*) FROM mine))
    FOR UPDATE SKIP LOCKED
),
-- Successors first (their consumer keeps draining their keys), except that
-- the :reserve oldest queued rows compete with them by age: a claim never
-- leaves the oldest queued rows behind hand-offs alone, so keys that stay
-- busy cannot starve the rest of the queue.
chosen AS MATERIALIZED (
    SELECT id FROM (
        SELECT id, available_at, 0 AS rank FROM mine
        UNION ALL
        SELECT id, available_at,
            CASE WHEN row_number() OVER (ORDER BY available_at, id) <= :reserve THEN 0 ELSE 1 END
        FROM ready
    ) AS candidate
    ORDER BY rank, available_at, id
    LIMIT :limit
),
handed AS (
    UPDATE {t} AS m SET
        state = CASE WHEN m.id IN (SELECT id FROM chosen) THEN 'consumed' ELSE 'queued' END,
        worker_id = CASE WHEN m.id IN (SELECT id FROM chosen) THEN CAST(:worker AS varchar) END,
        consumed_at = CASE WHEN m.id IN (SELECT id FROM chosen) THEN {now} END
    FROM successor AS s
    WHERE m.id = s.id
    RETURNING m.id, m.available_at, m.state, m.queue_name, m.data
),
claimed AS (
    UPDATE {t} AS m SET state = 'consumed', worker_id = :worker, consumed_at = {now}
    FROM ready AS r
    WHERE m.id = r.id AND r.id IN (SELECT id FROM chosen)
    RETURNING m.id, m.available_at, m.state, m.queue_name, m.data
),
notified AS (
    SELECT queue_name, pg_notify(:channel, queue_name) FROM (
        SELECT DISTINCT queue_name FROM handed WHERE state = 'queued'
    ) AS released
    WHERE :notify
)
SELECT id, available_at, state, queue_name, CASE WHEN state = 'consumed' THEN data END AS data
FROM handed
UNION ALL
SELECT id, available_at, state, queue_name, data FROM claimed
UNION ALL
-- One row per queue woken by NOTIFY: a CTE runs only if it is read.
SELECT NULL, NULL, 'notified', queue_name, NULL FROM notified
"""
    return sa.text(sql).bindparams(
        sa.bindparam("acks", type_=pg_dialect.ARRAY(sa.BigInteger)),
        sa.bindparam("keys", type_=pg_dialect.ARRAY(sa.String)),
        sa.bindparam("queue", type_=sa.String),
        sa.bindparam("limit", type_=sa.Integer),
        sa.bindparam("reserve", type_=sa.Integer),
        sa.bindparam("worker", type_=sa.String),
        sa.bindparam("channel", type_=sa.String, value=channel),
        sa.bindparam("notify", type_=sa.Boolean),
    )


class SqlOrdering:
    """The ordering-key statements and hooks of one broker (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        messages: sa.Table,
        statements: Statements,
        hub: Hub[Any],
        prefix: str,
        channel: str,
    ) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self.hub = hub
        self.prefix = prefix
        self.channel = channel
        m = messages
        now = statements.now
        o, w, h = m.alias("o"), m.alias("w"), m.alias("h")
        first_seq = (
            sa.select(sa.func.min(o.c.ordering_seq))
            .where(
                o.c.message_id == sa.bindparam("seq_message_id"),
                o.c.ordering_key == sa.bindparam("seq_key"),
            )
            .scalar_subquery()
        )
        self._insert = m.insert().values(
            available_at=now + sa.bindparam("delay_ms", type_=sa.BigInteger),
            enqueued_at=now,
            state=WAITING,
            ordering_seq=first_seq,
        )
        self._number = (
            m.update()
            .where(
                m.c.ordering_key.in_(sa.bindparam("keys", expanding=True)),
                m.c.state == WAITING,
                m.c.ordering_seq.is_(None),
            )
            .values(ordering_seq=m.c.id)
        )
        key = sa.bindparam("key", type_=sa.String)
        next_row = (
            sa.select(w.c.id)
            .where(w.c.ordering_key == key, w.c.state == WAITING)
            .order_by(w.c.ordering_seq, w.c.id)
            .limit(1)
            .scalar_subquery()
        )
        head = sa.exists().where(h.c.ordering_key == key, h.c.state.in_([QUEUED, CONSUMED]))
        self._release = (
            m.update()
            .where(m.c.id == next_row, ~head)
            .values(state=QUEUED)
            .returning(m.c.queue_name)
        )
        self._delete = m.delete().where(m.c.id == sa.bindparam("row_id"))
        self._stuck = (
            sa.select(w.c.ordering_key)
            .where(
                w.c.ordering_key.isnot(None),
                w.c.state == WAITING,
                ~sa.exists().where(
                    h.c.ordering_key == w.c.ordering_key, h.c.state.in_([QUEUED, CONSUMED])
                ),
            )
            .distinct()
        )
        self._to_waiting = (
            m.update()
            .where(m.c.id.in_(sa.bindparam("ids", expanding=True)), m.c.ordering_key.isnot(None))
            .values(state=WAITING)
            .returning(m.c.ordering_key)
        )
        self._lock_many = sa.text(
            "SELECT count(pg_advisory_xact_lock(k)) FROM "
            "(SELECT unnest(CAST(:locks AS bigint[])) AS k ORDER BY 1) AS sorted"
        ).bindparams(sa.bindparam("locks", type_=pg_dialect.ARRAY(sa.BigInteger)))
        # An ack needs no durable commit (losing it reruns the message, and the
        # release it made is lost with it), as on the consumers' connections.
        self._lock_one_async = sa.text(
            "SELECT set_config('synchronous_commit', 'off', true), pg_advisory_xact_lock(:lock)"
        )
        self._lock_many_async = sa.text(
            "SELECT set_config('synchronous_commit', 'off', true), "
            "(SELECT count(pg_advisory_xact_lock(k)) FROM "
            "(SELECT unnest(CAST(:locks AS bigint[])) AS k ORDER BY 1) AS sorted)"
        ).bindparams(sa.bindparam("locks", type_=pg_dialect.ARRAY(sa.BigInteger)))
        self._hand_on = _hand_on_statement(engine, messages, channel) if self.postgres else None
        # The same statement in the driver's own parameter style, for the
        # pipelined hand-on on a consumer's connection.
        self._hand_on_sql = (
            None if self._hand_on is None else str(self._hand_on.compile(dialect=engine.dialect))
        )
        if self.postgres:
            hub.release_keyed = self.release_acked

    # -- locking and releasing ------------------------------------------------

    def lock(self, conn: Connection, keys: Iterable[str]) -> list[str]:
        """Lock ``keys`` for the rest of the transaction; returns them sorted, unique."""
        unique = sorted(set(keys))
        if self.postgres and unique:
            locks = [_lock_id(self.prefix, k) for k in unique]
            conn.execute(self._lock_many, {"locks": locks})
        return unique

    def release(self, conn: Connection, keys: Iterable[str]) -> list[str]:
        """Make the next waiting row of each headless key ``queued``; its queues.

        The keys must be locked in this transaction.
        """
        queues: list[str] = []
        for key in keys:
            queues.extend(conn.execute(self._release, {"key": key}).scalars())
        return queues

    def release_in(self, conn: Connection, keys: Iterable[str]) -> list[str]:
        """Lock and release ``keys`` on a transaction not opened by ``transaction()``.

        PostgreSQL consumers are notified at its commit; the caller wakes this
        process (and SQLite's others) with the returned queues after the commit.
        """
        queues = self.release(conn, self.lock(conn, keys))
        if queues:
            self.hub.notify_on(conn, sorted(set(queues)), local=False)
        return queues

    # -- the broker's hooks ---------------------------------------------------

    def insert(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Store keyed rows as ``waiting``, number them, release their keys."""
        keys = self.lock(conn, (row["ordering_key"] for row in rows))
        conn.execute(
            self._insert,
            [
                {**row, "seq_message_id": row["message_id"], "seq_key": row["ordering_key"]}
                for row in rows
            ],
        )
        conn.execute(self._number, {"keys": keys})
        queues = self.release(conn, keys)
        if queues:
            self.hub.notify_on(conn, sorted(set(queues)))

    def ack(self, row_id: int, key: str | None, queue: str) -> bool:
        """Record the ack of ``row_id``, claimed by a consumer of ``queue``.

        Grouped by the hub, keyed or not, on PostgreSQL: the consumer's next
        claim deletes the row and hands its key on (:meth:`hand_on`).  On
        SQLite a keyed row is deleted at once in a transaction that hands its
        key to the next message.  Returns whether the consumer should wake up
        to flush (the first keyed ack pending for ``queue``).
        """
        if key is None or self.postgres:
            return self.hub.add_ack(row_id, key, queue)
        self._locked_release(key, delete=row_id)
        return False

    def hand_on(
        self,
        conn: Connection | None,
        acks: list[int],
        keys: list[str],
        *,
        queue: str,
        limit: int,
        worker: str,
    ) -> list[tuple[int, int, bytes]]:
        """Delete acked rows, release their ``keys``, claim up to ``limit`` rows of ``queue``.

        One transaction (PostgreSQL only): lock the keys, then one statement
        deletes ``acks``, finds the next waiting row of each key left without
        a head, and claims for ``worker`` up to ``limit`` of those successors
        in ``queue`` and of its queued rows: successors first, except that
        the oldest quarter of the queued rows competes with them by age.
        Successors not claimed become ``queued``, and their queues are
        notified.  So a key's next message usually needs neither a
        transaction of its own nor a claim.

        Args:
            conn: The consumer's connection, in autocommit mode (the
                transaction is opened on it explicitly), or ``None`` for a
                pooled one.

        Returns:
            The claimed rows as ``(id, available_at, data)``.
        """
        assert self._hand_on is not None
        params = {
            "acks": acks,
            "keys": keys,
            "queue": queue,
            "limit": limit,
            "reserve": (limit + 3) // 4,
            "worker": worker,
            "notify": self.hub.notify,
        }
        locks = sorted(_lock_id(self.prefix, k) for k in keys)
        if conn is None:
            with transaction(self.engine) as pooled:
                pooled.execute(self._lock_many_async, {"locks": locks})
                rows = pooled.execute(self._hand_on, params).all()
        else:
            rows = self._hand_on_pipelined(conn, locks, params)
        queued = sorted({row.queue_name for row in rows if row.state == "queued"})
        if queued:
            self.hub.announce(queued)  # NOTIFY went with the statement
        return [(row.id, row.available_at, row.data) for row in rows if row.state == "consumed"]

    def _hand_on_pipelined(
        self, conn: Connection, locks: list[int], params: dict[str, Any]
    ) -> list[Any]:
        """BEGIN, the key locks, the hand-on statement and COMMIT in one round trip.

        Four statements sent at once in psycopg's pipeline mode: the server
        still runs them one after the other, so the hand-on statement's
        snapshot is taken after the locks are held (the reason they are a
        statement of their own), but the consumer waits for the server once
        per batch instead of three times.
        """
        assert self._hand_on_sql is not None
        raw = conn.connection.dbapi_connection
        assert raw is not None
        try:
            with raw.pipeline():
                raw.execute("BEGIN")
                raw.execute(_PIPELINED_LOCKS, {"locks": locks})
                cursor = raw.cursor(row_factory=namedtuple_row)
                cursor.execute(self._hand_on_sql, {**params, "channel": self.channel})
                raw.execute("COMMIT")
            return list(cursor.fetchall())
        except BaseException:
            if not conn.invalidated:
                # Else the connection is replaced at the consumer's next claim.
                with contextlib.suppress(Exception):
                    raw.execute("ROLLBACK")
            raise

    def release_acked(self, acks: list[int], keys: list[str]) -> None:
        """Delete acked rows and hand their ``keys`` on, claiming nothing (PostgreSQL)."""
        self.hand_on(None, acks, sorted(set(keys)), queue="", limit=0, worker="")

    def dead_lettered(self, key: str) -> None:
        """Hand ``key`` on after its head became a dead letter."""
        self._locked_release(key, delete=None)

    def _locked_release(self, key: str, *, delete: int | None) -> None:
        try:
            with transaction(self.engine) as conn:
                if self.postgres:
                    conn.execute(self._lock_one_async, {"lock": _lock_id(self.prefix, key)})
                if delete is not None:
                    conn.execute(self._delete, {"row_id": delete})
                queues = self.release(conn, [key])
                if queues:
                    self.hub.notify_on(conn, queues)
        except sa.exc.DBAPIError as exc:
            if is_transient(self.engine, exc):
                raise closed(exc) from exc
            raise

    def requeued(self, conn: Connection, row_ids: Sequence[int]) -> list[str]:
        """Turn just-requeued keyed dead letters back into ``waiting`` rows and release.

        A requeued dead letter keeps its ``ordering_seq``: it runs after its
        key's current head, before the messages sent after it.
        """
        if not row_ids:
            return []
        keys = list(conn.execute(self._to_waiting, {"ids": list(row_ids)}).scalars())
        return self.release_in(conn, keys) if keys else []

    def sweep(self, conn: Connection) -> list[str]:
        """Release every key that has waiting rows and no head (maintenance)."""
        stuck = list(conn.execute(self._stuck).scalars())
        return self.release_in(conn, stuck) if stuck else []
