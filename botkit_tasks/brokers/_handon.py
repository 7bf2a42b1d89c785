"""The PostgreSQL statements of ordering keys: the hand-on (ack, release and
claim in one statement), the step of a run (``_runs.py``) and the numbered
insert of keyed rows.

``SqlOrdering.hand_on`` runs it when a consumer's next claim carries keyed
acks (see ``_ordering.py``).  :func:`hand_on_sql` builds the statement and
:data:`LOCKS_SQL` takes the key locks before it, both in the driver's own
parameter style; :func:`run_pipelined` sends ``BEGIN``, the locks, the
statement and ``COMMIT`` to the server in one round trip, on a consumer's own
connection.  :func:`step_sql` moves keys whose next rows were read ahead on
to those rows.  :func:`insert_numbered_sql` stores a batch of keyed rows,
each numbered as it is inserted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.engine import Connection, Engine

__all__ = [
    "LOCKS_SQL",
    "hand_on_sql",
    "insert_numbered_sql",
    "keyed_columns",
    "run_pipelined",
    "step_sql",
]

_KEYED_COLUMNS = (
    ("message_id", "varchar"),
    ("queue_name", "varchar"),
    ("actor_name", "varchar"),
    ("retries", "integer"),
    ("last_error", "text"),
    ("data", "bytea"),
    ("delay_ms", "bigint"),
    ("ordering_key", "varchar"),
)

#: The key locks of a hand-on, sorted by the caller (psycopg parameter style).
#: The plan settings go with them: an ack needs no durable commit (losing it reruns
#: the message, and the release it made is lost with it), and the prepared
#: hand-on statement keeps its generic plan (PostgreSQL may otherwise plan
#: it anew each time, 0.5 ms a batch).
LOCKS_SQL = (
    "SELECT set_config('synchronous_commit', 'off', true), "
    "set_config('plan_cache_mode', 'force_generic_plan', true), "
    "count(pg_advisory_xact_lock(k)) FROM unnest(CAST(%(locks)s AS bigint[])) AS k"
)


def insert_numbered_sql(engine: Engine, messages: sa.Table) -> str:
    """Insert keyed rows as ``waiting`` with their ``ordering_seq``, in one statement.

    A message's first delivery is numbered with its own new id, taken from
    the id sequence in the statement; a later delivery (a retry) inherits
    the number of the rows its message still has under its key (as
    ``_ordering.first_delivery_seq`` finds it).  Rows get their ids in the
    order of the batch.  Parameters: one array per column
    (:func:`keyed_columns`).
    """
    preparer = engine.dialect.identifier_preparer
    t = preparer.format_table(messages)
    now = "floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint"
    names = ", ".join(name for name, _ in _KEYED_COLUMNS)
    arrays = ", ".join(f"%({name})b::{kind}[]" for name, kind in _KEYED_COLUMNS)
    # nextval() in a subquery of its own: evaluated once per row, in batch order.
    return f"""
INSERT INTO {t} (id, message_id, queue_name, actor_name, retries, last_error, data,
    available_at, enqueued_at, state, ordering_key, ordering_seq)
SELECT b.id, b.message_id, b.queue_name, b.actor_name, b.retries, b.last_error, b.data,
    {now} + b.delay_ms, {now}, 'waiting', b.ordering_key,
    COALESCE(
        (SELECT min(o.ordering_seq) FROM {t} AS o
         WHERE o.ordering_key = b.ordering_key AND o.state IN ('queued', 'consumed', 'dead')
             AND o.message_id = b.message_id),
        b.id
    )
FROM (
    SELECT u.*, nextval(pg_get_serial_sequence('{t.replace("'", "''")}', 'id')) AS id
    FROM unnest({arrays}) WITH ORDINALITY AS u({names}, n)
    ORDER BY u.n
) AS b
ORDER BY b.n
"""


def keyed_columns(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """The parameters of :func:`insert_numbered_sql`: one array per column."""
    return {name: [row[name] for row in rows] for name, _ in _KEYED_COLUMNS}


def hand_on_sql(engine: Engine, messages: sa.Table) -> str:
    """Ack, release and claim in one statement (PostgreSQL; see ``SqlOrdering.hand_on``).

    Compiled for ``engine``'s driver; its parameters are ``acks``, ``keys``,
    ``queue``, ``limit``, ``reserve``, ``run``, ``worker``, ``channel`` and
    ``notify``.  Rows: ``(id, available_at, state, queue_name, data, lease,
    seq)``; ``state`` is ``consumed`` for a claimed row, ``run`` for a member
    of the run of the claimed row ``lease`` (``seq``: its ``ordering_seq``),
    ``queued`` for a released successor left to others, ``notified`` for a
    queue woken.
    """
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
    SELECT w.id, w.queue_name, w.available_at, k.key AS ordering_key
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
    SELECT id, available_at, ordering_key FROM successor
    WHERE queue_name = :queue AND available_at <= {now}
),
-- Only as many queued rows as "chosen" can take: each one is locked.
ready AS MATERIALIZED (
    SELECT id, available_at, ordering_key FROM {t}
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
    SELECT id, ordering_key FROM (
        SELECT id, available_at, ordering_key, 0 AS rank FROM mine
        UNION ALL
        SELECT id, available_at, ordering_key,
            CASE WHEN row_number() OVER (ORDER BY available_at, id) <= :reserve THEN 0 ELSE 1 END
        FROM ready
    ) AS candidate
    ORDER BY rank, available_at, id
    LIMIT :limit
),
-- The run of each keyed row claimed here: up to :run of its key's next
-- waiting rows, as long as they are in this queue and due.  They stay
-- waiting; the consumer takes them one after the other, each in the
-- statement that deletes its predecessor (see _runs.py).
run AS (
    SELECT r.id, r.available_at, r.data, r.ordering_seq, c.id AS lease
    FROM chosen AS c
    CROSS JOIN LATERAL (
        SELECT x.*, bool_and(x.queue_name = :queue AND x.available_at <= {now})
            OVER (ORDER BY x.ordering_seq, x.id) AS ok
        FROM (
            SELECT id, queue_name, available_at, data, ordering_seq FROM {t}
            WHERE ordering_key = c.ordering_key AND state = 'waiting'
                AND id <> c.id
            ORDER BY ordering_seq, id
            LIMIT :run
        ) AS x
    ) AS r
    WHERE c.ordering_key IS NOT NULL AND r.ok
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
SELECT id, available_at, state, queue_name,
    CASE WHEN state = 'consumed' THEN data END AS data, NULL::bigint AS lease, NULL::bigint AS seq
FROM handed
UNION ALL
SELECT id, available_at, state, queue_name, data, NULL, NULL FROM claimed
UNION ALL
SELECT id, available_at, 'run', :queue, data, lease, ordering_seq FROM run
UNION ALL
-- One row per queue woken by NOTIFY: a CTE runs only if it is read.
SELECT NULL, NULL, 'notified', queue_name, NULL, NULL, NULL FROM notified
"""
    statement = sa.text(sql).bindparams(
        sa.bindparam("acks", type_=pg_dialect.ARRAY(sa.BigInteger)),
        sa.bindparam("keys", type_=pg_dialect.ARRAY(sa.String)),
        sa.bindparam("queue", type_=sa.String),
        sa.bindparam("limit", type_=sa.Integer),
        sa.bindparam("run", type_=sa.Integer),
        sa.bindparam("reserve", type_=sa.Integer),
        sa.bindparam("worker", type_=sa.String),
        sa.bindparam("channel", type_=sa.String),
        sa.bindparam("notify", type_=sa.Boolean),
    )
    return str(statement.compile(dialect=engine.dialect))


def step_sql(engine: Engine, messages: sa.Table) -> str:
    """Delete acked heads and make each run's next member its key's head (PostgreSQL).

    Parameters: ``acks`` (row ids to delete), the members ``ids`` with their
    ``keys`` and ``seqs`` (``ordering_seq``), and ``worker``.  A member
    becomes ``consumed`` by ``worker`` only if it is still ``waiting`` and
    still its key's next waiting row: a retry of its predecessor (which
    inherits the predecessor's place) or a requeued dead letter may have
    come before it.  Returns the ids of the members taken.  No key lock is
    needed: each key keeps a head throughout, since the acked head is
    deleted in the transaction that makes the member the head, so no other
    transaction releases the key meanwhile (see ``_runs.py``).
    """
    t = engine.dialect.identifier_preparer.format_table(messages)
    now = "floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint"
    sql = f"""
WITH acked AS (
    DELETE FROM {t} WHERE id = ANY(:acks)
),
step AS (
    SELECT * FROM unnest(
        CAST(:ids AS bigint[]), CAST(:keys AS varchar[]), CAST(:seqs AS bigint[])
    ) AS s(id, key, seq)
)
UPDATE {t} AS m SET state = 'consumed', worker_id = :worker, consumed_at = {now}
FROM step AS s
WHERE m.id = s.id AND m.state = 'waiting' AND m.ordering_key = s.key
    AND NOT EXISTS (
        SELECT 1 FROM {t} AS w
        WHERE w.ordering_key = s.key AND w.state = 'waiting'
            AND (w.ordering_seq, w.id) < (s.seq, s.id)
    )
RETURNING m.id
"""
    statement = sa.text(sql).bindparams(
        sa.bindparam("acks", type_=pg_dialect.ARRAY(sa.BigInteger)),
        sa.bindparam("ids", type_=pg_dialect.ARRAY(sa.BigInteger)),
        sa.bindparam("keys", type_=pg_dialect.ARRAY(sa.String)),
        sa.bindparam("seqs", type_=pg_dialect.ARRAY(sa.BigInteger)),
        sa.bindparam("worker", type_=sa.String),
    )
    return str(statement.compile(dialect=engine.dialect))


def run_pipelined(
    conn: Connection, sql: str, locks: list[int], params: dict[str, Any]
) -> list[Any]:
    """BEGIN, the key ``locks``, the hand-on ``sql`` and COMMIT in one round trip.

    Four statements sent at once in psycopg's pipeline mode on ``conn`` (in
    autocommit mode, so the transaction is ours): the server still runs them
    one after the other, so the hand-on statement's snapshot is taken after
    the locks are held (the reason they are a statement of their own), but
    the consumer waits for the server once per batch instead of three times.

    Returns:
        The statement's rows (named tuples).
    """
    raw = conn.connection.dbapi_connection
    assert isinstance(raw, psycopg.Connection)
    try:
        with raw.pipeline():
            raw.execute("BEGIN")
            raw.execute(LOCKS_SQL, {"locks": locks})
            cursor = raw.cursor(row_factory=namedtuple_row)
            cursor.execute(sql, params)
            raw.execute("COMMIT")
        return list(cursor.fetchall())
    except psycopg.Error as exc:
        # A pipeline that failed part-way can leave the connection in any
        # state ("cannot exit pipeline mode while busy"): replace it (at the
        # consumer's next claim), and report the error as SQLAlchemy reports
        # the driver's, so that the consumer tells a lost connection from
        # other failures, as for its other statements.
        lost = raw.closed or raw.broken
        conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(
            sql, None, exc, psycopg.Error, connection_invalidated=lost, dialect=conn.dialect
        ) from exc
    except BaseException:
        conn.invalidate()  # interrupted mid-pipeline: its state is unknown
        raise
