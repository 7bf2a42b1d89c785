"""A Dramatiq broker on SQLAlchemy: PostgreSQL (psycopg 3) and SQLite.

Schema (SQLAlchemy Core, created by :meth:`SqlBroker.create_tables`; times are
epoch milliseconds from the database clock):

``{prefix}messages`` — one row per delivery:
    ``id`` (BIGINT identity, the per-delivery row id), ``message_id``
    (indexed, not unique: retries re-enqueue the same id before the old copy
    is acked), ``queue_name`` (``X`` or ``X.DQ``), ``actor_name``, ``state``
    (``queued`` | ``consumed`` | ``dead``), ``available_at`` (when the row may
    be claimed; for ``.DQ`` rows the ETA, computed as the database's clock
    at insert plus the delay), ``enqueued_at``, ``worker_id``,
    ``consumed_at``, ``dead_at``, ``retries`` and ``last_error`` (copied from
    the options for monitoring), ``data`` (``message.encode()``, any encoder).
    Partial index ``(queue_name, available_at, id) WHERE state = 'queued'``.

``{prefix}workers`` — one row per live consumer (Dramatiq runs two per queue
in each worker process; ``queues`` holds that consumer's one queue name):
    ``worker_id`` (PK), ``hostname``, ``pid``, ``heartbeat_at``, ``queues``.

Life of a row: ``enqueue`` inserts it ``queued``; a consumer claims a batch
with ``FOR UPDATE SKIP LOCKED`` (``consumed``, stamped with its worker id);
``ack`` deletes it (deletes are grouped: they are flushed with the consumer's
next claim or within :data:`ACK_DELAY`); ``nack`` turns it into a ``dead``
letter kept for ``dead_message_ttl``.  A row leaves only when acked, so a
consumer that stops heartbeating for ``heartbeat_timeout`` has its rows handed
out again by another consumer's maintenance pass.

Durability: enqueues commit durably (and join an :func:`~botkit_tasks.atomic`
block).  On PostgreSQL, claims and ack deletes commit asynchronously
(``synchronous_commit = off`` on the consumers' own connections): losing one
in a server crash only makes a message run again, which at-least-once delivery
allows, and it removes an fsync from every batch.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import dramatiq
import sqlalchemy as sa
from dramatiq.broker import Consumer
from dramatiq.common import current_millis, dq_name, q_name
from dramatiq.errors import QueueJoinTimeout
from dramatiq.message import Message
from dramatiq.middleware import Middleware
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, Engine

from .._sql import (
    ambient_connection,
    create_engine,
    is_postgres,
    on_commit,
    resolve_engine,
    transaction,
)
from ..errors import ConfigurationError
from ._consumer import (
    ACK_DELAY,
    CONSUMED,
    DEAD,
    QUEUED,
    SqlConsumer,
    SqlMessageProxy,
    _chunks,
    _closed,
    _is_transient,
)
from ._ordering import WAITING, SqlOrdering, add_ordering_columns, ensure_ordering_schema
from ._pooler import pooler_engine_options, unprepare_connections
from ._wakeup import SqliteWakeups
from .ordering import check_ordering_key

# A private generator: jitter must not consume or reseed the application's
# global random state (tests and users may seed it).
_random = random.Random()

__all__ = ["ACK_DELAY", "SqlBroker", "SqlMessageProxy"]

#: Seconds between two polls of an idle queue (the safety net under NOTIFY).
DEFAULT_POLL_INTERVAL = 1.0
#: Seconds without a heartbeat before a consumer's in-flight rows are handed out again.
DEFAULT_HEARTBEAT_TIMEOUT = 60.0
#: Seconds a dead letter is kept.
DEFAULT_DEAD_MESSAGE_TTL = 7 * 86400
#: Attempts ``enqueue`` makes on a transient database error before raising.
ENQUEUE_ATTEMPTS = 6


_PREFIX_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


def _now_ms(engine: Engine) -> sa.ColumnElement[int]:
    if is_postgres(engine):
        # statement_timestamp(): unlike now() it does not stick to the start of
        # a long atomic() block, and unlike clock_timestamp() it is STABLE, so
        # the planner can use it as a bound of the ready-index scan.
        return sa.cast(
            sa.func.floor(sa.extract("epoch", sa.func.statement_timestamp()) * 1000),
            sa.BigInteger,
        )
    return sa.cast((sa.func.julianday("now") - 2440587.5) * 86400000.0, sa.BigInteger)


def _columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows of one batch as one array per column (they share one delay)."""
    names = ("message_id", "queue_name", "actor_name", "retries", "last_error", "data")
    params: dict[str, Any] = {name: [row[name] for row in rows] for name in names}
    params["delay_ms"] = rows[0]["delay_ms"]
    return params


def _bigint_id() -> sa.Column[int]:
    # SQLite only auto-increments an INTEGER PRIMARY KEY; AUTOINCREMENT (set on
    # the table) keeps deleted ids from being reused by a later delivery.
    return sa.Column(
        "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(), primary_key=True
    )


def _define_tables(prefix: str) -> tuple[sa.MetaData, sa.Table, sa.Table]:
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
        sqlite_autoincrement=True,
    )
    add_ordering_columns(messages, prefix)
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


def _lock_key(name: str) -> int:
    # A stable signed 64-bit key for pg_advisory_*lock derived from the prefix.
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)


def _channel_name(prefix: str) -> str:
    channel = f"{prefix}messages"
    # Postgres truncates identifiers to 63 bytes, which would let two long
    # prefixes share a channel; hash them down instead.
    if len(channel.encode()) > 63:
        channel = f"{prefix[:40]}_{hashlib.sha1(prefix.encode()).hexdigest()[:16]}"
    return channel


class SqlBroker(dramatiq.Broker):
    """A Dramatiq broker storing messages in PostgreSQL or SQLite.

    Args:
        url_or_engine: A database URL (``postgresql://…`` or ``sqlite:///…``)
            or a SQLAlchemy ``Engine``.  Pass the engine you use with
            :func:`botkit_tasks.atomic` so that ``send()`` inside the block
            joins its transaction.  An engine you pass is never disposed;
            size its pool for one connection per consumer (Dramatiq runs two
            consumers per queue in each worker process) plus the worker
            threads.
        middleware: Dramatiq middleware; ``None`` means Dramatiq's defaults.
        table_prefix: Prefix of every table, index and notification channel
            the broker creates.
        poll_interval: Seconds between polls of an idle queue.  PostgreSQL
            wakes consumers with ``LISTEN/NOTIFY`` at once; this is the
            safety net there, and how SQLite consumers see messages sent by
            other processes.
        heartbeat_timeout: Seconds without a heartbeat after which a
            consumer's in-flight messages are handed out again.
        dead_message_ttl: Seconds a dead-lettered message is kept.
        create_tables: Create the tables (idempotently) in the constructor.
        listen: PostgreSQL only.  ``False`` keeps no session state on any
            connection, for transaction poolers such as PgBouncer in
            ``transaction`` mode: no ``LISTEN``/``NOTIFY``, no session
            settings or advisory locks, no server-side prepared statements.
            Consumers in other processes then see a new message within
            ``poll_interval`` (those of the enqueuing process at once).
    """

    def __init__(
        self,
        url_or_engine: str | URL | Engine,
        *,
        middleware: list[Middleware] | None = None,
        table_prefix: str = "botkit_",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        dead_message_ttl: float = DEFAULT_DEAD_MESSAGE_TTL,
        create_tables: bool = True,
        listen: bool = True,
    ) -> None:
        if not _PREFIX_RE.match(table_prefix):
            raise ConfigurationError(
                f"table_prefix must be a short SQL identifier (letters, digits, _), "
                f"got {table_prefix!r}"
            )
        if poll_interval <= 0 or heartbeat_timeout <= 0 or dead_message_ttl <= 0:
            raise ConfigurationError(
                "poll_interval, heartbeat_timeout and dead_message_ttl must be positive"
            )
        super().__init__(middleware=middleware)
        if isinstance(url_or_engine, (str, URL)):
            # Our own engine needs no pre-ping round trip per checkout: enqueue
            # retries on a dead connection and consumers restart on one.  Each
            # consumer holds a connection (two per queue per process), so the
            # overflow is unbounded lest many queues starve the worker threads.
            engine = create_engine(
                url_or_engine,
                pool_pre_ping=False,
                pool_size=10,
                max_overflow=-1,
                **pooler_engine_options(url_or_engine, listen),
            )
            self.engine, self._owns_engine = engine, True
        else:
            self.engine, self._owns_engine = resolve_engine(url_or_engine)
            if not listen:
                unprepare_connections(self.engine)
        if self.engine.dialect.name not in ("postgresql", "sqlite"):
            raise ConfigurationError(
                f"SqlBroker supports PostgreSQL and SQLite, not {self.engine.dialect.name}"
            )
        self.table_prefix = table_prefix
        self.poll_interval = poll_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.dead_message_ttl = dead_message_ttl
        self.queues: set[str] = set()
        self.metadata, self.messages, self.workers = _define_tables(table_prefix)
        self.channel = _channel_name(table_prefix)
        self.is_postgres = is_postgres(self.engine)
        #: Whether consumers hold session state (LISTEN, settings); see ``listen``.
        self.listen = listen or not self.is_postgres
        self._lock_key = _lock_key(table_prefix)
        self._lock = threading.Lock()
        self._waiters: dict[str, set[SqlConsumer]] = {}
        self._acks: list[int] = []
        self._orphans: dict[str, list[SqlConsumer]] = {}
        self._acks_since = 0.0
        self._next_maintenance = time.monotonic() + self._maintenance_interval() * _random.random()
        self._listener: Any = None
        self._vacuum: Any = None
        self._inherited: list[Any] = []
        self._wakeups = None if self.is_postgres else SqliteWakeups(self.engine, table_prefix)
        self._build_statements()
        self._ordering = SqlOrdering(self)
        if create_tables:
            self.create_tables()

    # -- schema --------------------------------------------------------------

    def create_tables(self) -> None:
        """Create the broker's tables and indexes if they do not exist.

        Safe to run concurrently from several processes (PostgreSQL takes an
        advisory lock; SQLite serializes writers).
        """
        with self.engine.begin() as conn:
            if self.is_postgres:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(self._lock_key)))
            self.metadata.create_all(conn, checkfirst=True)
            ensure_ordering_schema(conn, self.messages)

    def drop_tables(self) -> None:
        """Drop the broker's tables (tests and uninstall)."""
        with self.engine.begin() as conn:
            self.metadata.drop_all(conn, checkfirst=True)

    def _build_statements(self) -> None:
        m, w = self.messages, self.workers
        now = _now_ms(self.engine)
        self._now = now
        self._insert = m.insert().values(
            available_at=now + sa.bindparam("delay_ms", type_=sa.BigInteger),
            enqueued_at=now,
            state=QUEUED,
        )
        self._notify = sa.select(sa.func.pg_notify(self.channel, sa.bindparam("queue")))
        if self.is_postgres:
            table = self.engine.dialect.identifier_preparer.format_table(m)
            now_sql = "floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint"
            # WITH ORDINALITY + ORDER BY: ids follow the order of the batch (FIFO).
            self._insert_unnest = (
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
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        columns = ("message_id", "queue_name", "actor_name", "retries", "last_error", "data")
        inserted = (
            self._insert.values(
                {name: sa.bindparam(name, type_=m.c[name].type) for name in columns}
            )
            .returning(m.c.id)
            .cte("inserted")
        )
        self._insert_notify = sa.select(
            sa.func.pg_notify(self.channel, sa.bindparam("queue_name", type_=sa.String))
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
        if self.is_postgres:
            # A materialized CTE runs the locking SELECT exactly once.  With
            # "id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)" the planner may
            # re-run the subquery per row of a join, each run locking further
            # rows, and claim far more than n (seen on a bloated table).
            picked = pick.cte("picked").prefix_with("MATERIALIZED")
            target = m.c.id == picked.c.id
        else:
            target = m.c.id.in_(pick.scalar_subquery())
        self._claim = (
            m.update()
            .where(target)
            .values(state=CONSUMED, worker_id=sa.bindparam("worker"), consumed_at=now)
            .returning(m.c.id, m.c.available_at, m.c.data)
        )
        if self.is_postgres:
            # The pending acks ride along with the claim: one statement, one
            # round trip, one commit per batch.
            acked = (
                m.delete()
                .where(
                    m.c.id == sa.any_(sa.bindparam("acks", type_=pg_dialect.ARRAY(sa.BigInteger)))
                )
                .cte("acked")
            )
            self._ack_and_claim = self._claim.add_cte(acked)
        self._next_due = sa.select(sa.func.min(m.c.available_at) - now).where(
            m.c.queue_name == sa.bindparam("queue"),
            m.c.state == QUEUED,
            m.c.available_at > now,
        )
        self._delete = m.delete().where(m.c.id.in_(sa.bindparam("ids", expanding=True)))
        insert = pg_dialect.insert if self.is_postgres else sqlite_dialect.insert
        upsert = insert(w).values(
            worker_id=sa.bindparam("worker"),
            hostname=socket.gethostname()[:255],
            pid=sa.bindparam("pid"),
            heartbeat_at=now,
            queues=sa.bindparam("queues"),
        )
        self._heartbeat = upsert.on_conflict_do_update(
            index_elements=[w.c.worker_id],
            set_={"heartbeat_at": upsert.excluded.heartbeat_at, "pid": upsert.excluded.pid},
        )

    # -- Dramatiq's broker contract --------------------------------------------

    def close(self) -> None:
        """Stop the LISTEN thread and dispose of the engine if the broker made it."""
        listener, self._listener = self._listener, None
        vacuum, self._vacuum = self._vacuum, None
        if vacuum is not None and vacuum.pid == os.getpid():
            vacuum.stop()
        if listener is not None and listener.pid == os.getpid():
            listener._stop.set()
            try:  # an empty notification ends the listener's wait at once
                with self.engine.begin() as conn:
                    conn.execute(self._notify, {"queue": ""})
            except sa.exc.DBAPIError:
                pass
            listener.stop()
        if self._wakeups is not None:
            self._wakeups.close()
        if self._owns_engine:
            self.engine.dispose()

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> Consumer:
        """Return a consumer of ``queue_name``.

        Args:
            queue_name: The queue (``X`` or ``X.DQ``) to consume.
            prefetch: Most messages the consumer holds unacked at once.
            timeout: Milliseconds ``__next__`` waits before returning ``None``.
        """
        if self.is_postgres:
            self._ensure_listener()
        elif self._wakeups is not None:
            self._wakeups.ensure_receiving(self._wake_one)
        return SqlConsumer(self, queue_name, prefetch, timeout)

    def declare_queue(self, queue_name: str) -> None:
        """Declare ``queue_name`` and its delay queue (idempotent; emits the hooks)."""
        if queue_name not in self.queues:
            self.emit_before("declare_queue", queue_name)
            self.queues.add(queue_name)
            self.emit_after("declare_queue", queue_name)
            delayed = dq_name(queue_name)
            self.delay_queues.add(delayed)
            self.emit_after("declare_delay_queue", delayed)

    def get_declared_queues(self) -> set[str]:
        return self.queues.copy()

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Store ``message`` so that a worker runs it.

        Args:
            message: The message.
            delay: Milliseconds to wait before the message may run; the
                message then goes to the ``X.DQ`` queue with an ``eta``.

        Returns:
            The message as stored (the ``.DQ`` copy when delayed).

        Raises:
            dramatiq.errors.ConnectionClosed: The database stayed unreachable
                through :data:`ENQUEUE_ATTEMPTS` attempts.
        """
        return self.enqueue_many([message], delay=delay)[0]

    def enqueue_many(
        self, messages: Iterable[Message[Any]], *, delay: int | None = None
    ) -> list[Message[Any]]:
        """Store many messages in one transaction with one wake-up per queue.

        Runs the ``before_enqueue`` hooks for every message and encodes them
        all before writing anything, so an invalid message (or a middleware
        that refuses one) means none is stored.  ``after_enqueue`` runs per
        message once they are written.

        Args:
            messages: The messages.
            delay: Milliseconds to delay every message by (see :meth:`enqueue`).

        Returns:
            The messages as stored, in order.
        """
        stored: list[Message[Any]] = []
        rows: list[dict[str, Any]] = []
        for message in messages:
            if delay is not None:
                message = message.copy(
                    queue_name=dq_name(message.queue_name),
                    options={"eta": current_millis() + delay},
                )
            self.emit_before("enqueue", message, delay)
            stored.append(message)
        for message in stored:
            options = message.options
            retries = options.get("retries", 0)
            traceback = options.get("traceback")
            rows.append(
                {
                    "message_id": message.message_id,
                    "queue_name": message.queue_name,
                    "actor_name": message.actor_name,
                    "retries": retries if isinstance(retries, int) else 0,
                    "last_error": traceback if isinstance(traceback, str) else None,
                    "data": message.encode(),
                    "delay_ms": max(int(delay or 0), 0),
                    "ordering_key": check_ordering_key(options.get("ordering_key")),
                }
            )
        if rows:
            self._write_with_retry(rows)
        for message in stored:
            self.emit_after("enqueue", message, delay)
        return stored

    def _write_with_retry(self, rows: list[dict[str, Any]]) -> None:
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
                single = len(plain) == 1 and not keyed
                if self.is_postgres and single and ambient_connection(self.engine) is None:
                    # One message outside atomic(): one autocommitted statement
                    # that inserts and notifies, a single round trip.
                    with self._autocommit.connect() as conn:
                        conn.execute(self._insert_notify if self.listen else self._insert, plain[0])
                        conn.commit()
                    self._wake(queues)
                    return
                with transaction(self.engine) as conn:
                    if self.is_postgres and len(plain) > 1:
                        # One statement over arrays: the server builds the rows,
                        # instead of one pipelined INSERT per message.
                        conn.exec_driver_sql(self._insert_unnest, _columns(plain))
                    elif plain:
                        conn.execute(self._insert, plain)
                    if keyed:
                        self._ordering.insert(conn, keyed)
                    self._notify_on(conn, queues)
                return
            except sa.exc.DBAPIError as exc:
                attempt += 1
                transient = _is_transient(self.engine, exc)
                if not transient:
                    raise
                # Inside atomic() the caller's transaction is gone; only they can retry.
                if ambient_connection(self.engine) is not None or attempt >= ENQUEUE_ATTEMPTS:
                    raise _closed(exc) from exc
                self.logger.warning("enqueue failed (%s), retrying (attempt %d)", exc, attempt)
                time.sleep(min(0.1 * 2**attempt, 3.0) * _random.uniform(0.5, 1.0))

    def _notify_on(self, conn: Connection, queues: Sequence[str], *, local: bool = True) -> None:
        """Wake consumers of ``queues`` once the transaction on ``conn`` commits.

        ``local=False`` is for transactions not opened by :func:`transaction`,
        whose commit hooks never run; the caller then wakes this process itself.
        """
        if self.is_postgres and self.listen:
            # Postgres folds identical notifications of one transaction into one,
            # but each pg_notify() is still a round trip: skip repeats.
            # Per savepoint: a rolled-back savepoint discards its NOTIFY, so
            # the enclosing transaction must not count it as sent.
            txn = conn.get_nested_transaction() or conn.get_transaction()
            seen: tuple[Any, set[str]] | None = conn.info.get("botkit_notified")
            if seen is None or seen[0] is not txn:
                seen = (txn, set())
                conn.info["botkit_notified"] = seen
            for queue in queues:
                if queue not in seen[1]:
                    conn.execute(self._notify, {"queue": queue})
                    seen[1].add(queue)
        if local:
            on_commit(conn, lambda: self._announce(queues))

    def flush(self, queue_name: str) -> None:
        """Delete every message of ``queue_name`` and its delay queue, dead ones included."""
        names = [q_name(queue_name), dq_name(queue_name)]
        with transaction(self.engine) as conn:
            conn.execute(self.messages.delete().where(self.messages.c.queue_name.in_(names)))

    def flush_all(self) -> None:
        """Delete every message of every declared queue."""
        for queue_name in self.get_declared_queues():
            self.flush(queue_name)

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Wait until ``queue_name`` and its delay queue hold no queued or unacked message.

        Dead letters do not count.  Meant for tests.

        Args:
            queue_name: The queue.
            timeout: Milliseconds to wait at most; ``None`` waits forever.

        Raises:
            QueueJoinTimeout: The timeout elapsed first.
        """
        m = self.messages
        names = [q_name(queue_name), dq_name(queue_name)]
        count = (
            sa.select(sa.func.count())
            .select_from(m)
            .where(m.c.queue_name.in_(names), m.c.state.in_((QUEUED, CONSUMED, WAITING)))
        )
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            try:
                if self._acks and ambient_connection(self.engine) is None:
                    # Acks of this process that no consumer has flushed yet
                    # (one that stopped iterating) must not hold join up.
                    self._flush_acks_now()
                with transaction(self.engine, read_only=True) as conn:
                    pending = conn.execute(count).scalar_one()
            except sa.exc.DBAPIError as exc:
                # A connection lost under us is replaced on the next try.
                if not _is_transient(self.engine, exc) or ambient_connection(self.engine):
                    raise
                pending = -1
            if pending == 0:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)  # type: ignore[no-untyped-call]
            time.sleep(0.02)

    # -- dead letters --------------------------------------------------------

    def dead_letters(self, queue_name: str) -> list[Message[Any]]:
        """The decodable dead letters of ``queue_name`` (and its delay queue), oldest first.

        Their ``options`` carry the final ``traceback`` and ``retries``.
        """
        m = self.messages
        names = [q_name(queue_name), dq_name(queue_name)]
        query = (
            sa.select(m.c.data)
            .where(m.c.queue_name.in_(names), m.c.state == DEAD)
            .order_by(m.c.dead_at, m.c.id)
        )
        result = []
        with transaction(self.engine, read_only=True) as conn:
            for (data,) in conn.execute(query):
                try:
                    result.append(Message.decode(bytes(data)))
                except dramatiq.errors.DecodeError:
                    continue
        return result

    def requeue_dead(self, queue_name: str, *, message_ids: Iterable[str] | None = None) -> int:
        """Move dead letters of ``queue_name`` back to the queue with retries reset.

        Args:
            queue_name: The queue whose dead letters (including those of its
                delay queue) are requeued.
            message_ids: Only these messages; ``None`` means all.

        Returns:
            How many messages were requeued.  Undecodable rows stay dead.
        """
        m = self.messages
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
                available_at=self._now,
                dead_at=None,
                worker_id=None,
                retries=0,
                last_error=None,
                data=sa.bindparam("new_data"),
            )
        )
        with transaction(self.engine) as conn:
            params = []
            for row_id, data in conn.execute(query).all():
                try:
                    message = Message.decode(bytes(data))
                except dramatiq.errors.DecodeError:
                    continue
                options = {
                    k: v for k, v in message.options.items() if k not in ("eta", "traceback")
                }
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
                self._notify_on(conn, [canonical])
                promoted = self._ordering.requeued(conn, [p["row_id"] for p in params])
                if promoted:
                    on_commit(conn, lambda: self._announce(promoted))
        return len(params)

    # -- wake-ups ----------------------------------------------------------------

    def _ensure_listener(self) -> None:
        from ._listen import PgListener, PgVacuum

        with self._lock:
            helpers = [h for h in (self._listener, self._vacuum) if h is not None]
            if any(helper.pid != os.getpid() for helper in helpers):
                # Inherited across fork(): the threads are gone and the sockets
                # are the parent's.  Keep references so they are never closed here.
                self._inherited.extend(helpers)
                self._listener = self._vacuum = None
            if self._vacuum is None:
                if self.listen:
                    self._listener = PgListener(
                        self.engine, self.channel, self._wake_one, self._wake_all
                    )
                    self._listener.start()
                self._vacuum = PgVacuum(
                    self.engine,
                    self.messages.name,
                    _lock_key(f"{self.table_prefix}:vacuum"),
                    session_lock=self.listen,
                )
                self._vacuum.start()

    def _subscribe(self, consumer: SqlConsumer) -> None:
        with self._lock:
            self._waiters.setdefault(consumer.queue_name, set()).add(consumer)

    def _unsubscribe(self, consumer: SqlConsumer) -> None:
        with self._lock:
            self._waiters.get(consumer.queue_name, set()).discard(consumer)

    def _add_orphan(self, consumer: SqlConsumer) -> None:
        with self._lock:
            self._orphans.setdefault(consumer.queue_name, []).append(consumer)

    def _take_orphans(self, queue_name: str) -> list[SqlConsumer]:
        with self._lock:
            orphans = self._orphans.pop(queue_name, [])
        return [old for old in orphans if old._pid == os.getpid()]

    def _wake(self, queues: Iterable[str]) -> None:
        for queue in queues:
            self._wake_one(queue)

    def _announce(self, queues: Iterable[str]) -> None:
        """Wake consumers of committed rows: here, and (SQLite) in other processes."""
        queues = list(queues)
        self._wake(queues)
        if self._wakeups is not None:
            self._wakeups.announce(queues)

    def _wake_one(self, queue: str) -> None:
        with self._lock:
            consumers = list(self._waiters.get(queue, ()))
        for consumer in consumers:
            consumer.wake()

    def _wake_all(self) -> None:
        with self._lock:
            queues = list(self._waiters)
        for queue in queues:
            self._wake_one(queue)

    # -- grouped acks ---------------------------------------------------------------

    def _add_ack(self, row_id: int) -> None:
        with self._lock:
            if not self._acks:
                self._acks_since = time.monotonic()
            self._acks.append(row_id)
            orphan = not any(self._waiters.values())
        if orphan:
            # No consumer left to flush it (e.g. an ack after shutdown began).
            try:
                self._flush_acks_now()
            except sa.exc.DBAPIError as exc:
                if _is_transient(self.engine, exc):
                    raise _closed(exc) from exc
                raise

    def _flush_acks_now(self) -> None:
        """DELETE the pending acks in a transaction of their own."""
        restore: Callable[[], None] | None = None
        try:
            with self.engine.begin() as conn:
                restore = self._flush_acks(conn)
        except BaseException:
            if restore is not None:  # the commit failed: nothing was deleted
                restore()
            raise

    def _acks_due(self, now: float) -> bool:
        return bool(self._acks) and now - self._acks_since >= ACK_DELAY

    def _take_acks(self) -> tuple[list[int], Callable[[], None]]:
        """Take the pending acks; call the returned function to put them back
        if the statement deleting them fails, so that no ack is lost."""
        with self._lock:
            ids, self._acks = self._acks, []

        def restore() -> None:
            with self._lock:
                if not self._acks:
                    self._acks_since = time.monotonic()
                self._acks.extend(ids)

        return ids, restore

    def _flush_acks(self, conn: Connection) -> Callable[[], None]:
        """DELETE the pending acks on ``conn``; returns the restore function."""
        ids, restore = self._take_acks()
        try:
            for chunk in _chunks(ids):
                conn.execute(self._delete, {"ids": chunk})
        except BaseException:
            restore()
            raise
        return restore

    # -- maintenance ---------------------------------------------------------------

    def _maintenance_interval(self) -> float:
        return self.heartbeat_timeout / 4

    def _maintenance_due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self._next_maintenance:
                return False
            jitter = _random.uniform(0.75, 1.25)
            self._next_maintenance = now + self._maintenance_interval() * jitter
            return True

    def _maintain(self, conn: Connection) -> None:
        """Hand back rows of consumers whose heartbeat lapsed; purge old dead letters.

        ``conn`` is the calling consumer's connection; on PostgreSQL it is in
        autocommit mode, so a pooled connection runs the transaction instead
        (the advisory lock must last until it commits).
        """
        if self.is_postgres:
            with self.engine.connect() as pooled:
                self._maintain_in(pooled)
        else:
            self._maintain_in(conn)

    def _maintain_in(self, conn: Connection) -> None:
        m, w = self.messages, self.workers
        with conn.begin():
            if self.is_postgres:
                locked = conn.execute(
                    sa.select(sa.func.pg_try_advisory_xact_lock(self._lock_key))
                ).scalar()
                if not locked:
                    return
            cutoff = self._now - int(self.heartbeat_timeout * 1000)
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
            released = self._ordering.sweep(conn)
            conn.execute(
                m.delete().where(
                    m.c.state == DEAD,
                    m.c.dead_at < self._now - int(self.dead_message_ttl * 1000),
                )
            )
            if requeued:
                self.logger.warning(
                    "Handed %d message(s) of unresponsive workers back to their queues.",
                    len(requeued),
                )
                self._notify_on(conn, sorted(set(requeued)), local=False)
        if requeued or released:
            self._announce(set(requeued) | set(released))
