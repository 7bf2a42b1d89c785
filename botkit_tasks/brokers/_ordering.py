"""Ordering keys on :class:`~botkit_tasks.brokers.sql.SqlBroker`: one message per key at a time.

A message sent with ``send_with_options(ordering_key="…")`` is stored in the
state ``waiting``, which no claim ever looks at (the ready index covers
``queued`` rows only), so ordering costs the claims of unkeyed messages
nothing.  Per key, at most one row is the *head*: ``queued`` or ``consumed``.
Whenever the head may have gone (an ack, a dead letter, a requeue) and
whenever a keyed message arrives, the key is *released*: if it has no head,
its waiting row with the smallest ``ordering_seq`` becomes ``queued``.

``ordering_seq`` is the enqueue order: the row id of the message's first
delivery (on PostgreSQL set by the insert itself, from the id sequence; on
SQLite by an update in the same transaction).  A retry or a delayed
message's move from ``X.DQ`` to ``X`` is a new row under the same
``message_id``, inserted while the old row still exists; it inherits the
old row's ``ordering_seq``, so it becomes the head again before any later
message of its key.  A head that keeps failing therefore holds its
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
key's head.  The hand-on also reads each claimed key's next waiting rows
ahead (its *run*, ``_runs.py``): the consumer then moves the key from one to
the next with a lighter statement that needs neither the key's lock nor a
lookup.  On SQLite a keyed ack is deleted and released at once.

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

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.engine import Connection, Engine

from .._sql import transaction
from ._dberrors import closed, is_transient
from ._handon import (
    LOCKS_SQL,
    hand_on_sql,
    insert_numbered_sql,
    keyed_columns,
    run_pipelined,
    step_sql,
)
from ._hub import Hub
from ._runs import Runs
from ._schema import CONSUMED, DEAD, QUEUED, WAITING, Statements

__all__ = ["SqlOrdering", "ensure_ordering_schema", "first_delivery_seq"]


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


def _lock_id(prefix: str, key: str) -> int:
    digest = hashlib.sha1(f"{prefix}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def first_delivery_seq(messages: sa.Table, message_id: Any, key: Any) -> Any:
    """The ``ordering_seq`` of message ``message_id``'s rows under ``key`` (a scalar
    subquery; ``NULL`` when it has none): the place a new row of it inherits.

    Only rows that are or were a head count (``queued``, ``consumed``,
    ``dead``): a retry, a delayed message's move and a dead letter's requeue
    all come from such a row, and the index on (key, state, …) then skips
    the key's waiting rows instead of reading every one of them.
    """
    o = messages.alias("o")
    return (
        sa.select(sa.func.min(o.c.ordering_seq))
        .where(
            o.c.ordering_key == key,
            o.c.state.in_([QUEUED, CONSUMED, DEAD]),
            o.c.message_id == message_id,
        )
        .scalar_subquery()
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
        #: The runs this process's consumers read ahead (PostgreSQL; ``_runs.py``).
        self.runs = Runs()
        m = messages
        now = statements.now
        w, h = m.alias("w"), m.alias("h")
        first_seq = first_delivery_seq(m, sa.bindparam("seq_message_id"), sa.bindparam("seq_key"))
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
        self._hand_on = hand_on_sql(engine, messages) if self.postgres else None
        self._insert_numbered = insert_numbered_sql(engine, messages) if self.postgres else None
        self._step = step_sql(engine, messages) if self.postgres else None
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
        if self._insert_numbered is not None:
            # Numbered as they are inserted: no second version of each row.
            conn.exec_driver_sql(self._insert_numbered, keyed_columns(rows))
        else:
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
        run: int = 0,
    ) -> tuple[list[tuple[int, int, bytes]], dict[int, list[tuple[int, bytes, int]]]]:
        """Delete acked rows, release their ``keys``, claim up to ``limit`` rows of ``queue``.

        One transaction (PostgreSQL only): lock the keys, then one statement
        deletes ``acks``, finds the next waiting row of each key left without
        a head, and claims for ``worker`` up to ``limit`` of those successors
        in ``queue`` and of its queued rows: successors first, except that
        the oldest quarter of the queued rows competes with them by age.
        Successors not claimed become ``queued``, and their queues are
        notified.  So a key's next message usually needs neither a
        transaction of its own nor a claim.  With ``run`` > 0, each claimed
        keyed row also brings up to ``run`` of its key's next waiting rows
        (its run, ``_runs.py``).

        Args:
            conn: The consumer's connection, in autocommit mode (the
                transaction is opened on it explicitly), or ``None`` for a
                pooled one.

        Returns:
            The claimed rows as ``(id, available_at, data)``, and the runs:
            claimed row id -> its members as ``(id, data, ordering_seq)``,
            in order.
        """
        assert self._hand_on is not None
        params = {
            "acks": acks,
            "keys": keys,
            "queue": queue,
            "limit": limit,
            "run": run,
            "reserve": (limit + 3) // 4,
            "worker": worker,
            "channel": self.channel,
            "notify": self.hub.notify,
        }
        locks = sorted(_lock_id(self.prefix, k) for k in keys)
        rows: Sequence[Any]
        if conn is None:
            with transaction(self.engine) as pooled:
                pooled.exec_driver_sql(LOCKS_SQL, {"locks": locks})
                rows = pooled.exec_driver_sql(self._hand_on, params).all()
        else:
            rows = run_pipelined(conn, self._hand_on, locks, params)
        queued = sorted({row.queue_name for row in rows if row.state == "queued"})
        if queued:
            self.hub.announce(queued)  # NOTIFY went with the statement
        runs: dict[int, list[tuple[int, bytes, int]]] = {}
        for row in rows:
            if row.state == "run":
                runs.setdefault(row.lease, []).append((row.id, row.data, row.seq))
        for members in runs.values():
            members.sort(key=lambda member: (member[2], member[0]))
        claimed = [(row.id, row.available_at, row.data) for row in rows if row.state == "consumed"]
        return claimed, runs

    def step(
        self, conn: Connection, acks: list[int], members: list[tuple[int, str, int]], worker: str
    ) -> set[int]:
        """Delete the acked heads ``acks``; make ``members`` (``(id, key, seq)``) heads.

        One transaction on the consumer's connection ``conn`` (autocommit
        mode), sent in one round trip.  Returns the ids of the members taken
        for ``worker``: a member that is no longer its key's next waiting row
        is left alone (``_handon.step_sql``), and its key is for the caller
        to release.
        """
        assert self._step is not None
        params = {
            "acks": acks,
            "ids": [row_id for row_id, _, _ in members],
            "keys": [key for _, key, _ in members],
            "seqs": [seq for _, _, seq in members],
            "worker": worker,
        }
        return {row.id for row in run_pipelined(conn, self._step, [], params)}

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
