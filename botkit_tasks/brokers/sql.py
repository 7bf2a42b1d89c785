"""A Dramatiq broker on SQLAlchemy: PostgreSQL (psycopg 3) and SQLite.

Schema (SQLAlchemy Core, created by :meth:`SqlBroker.create_tables`; times are
epoch milliseconds from the database clock):

``{prefix}messages`` — one row per delivery:
    ``id`` (BIGINT identity, the per-delivery row id), ``message_id``
    (indexed, not unique: retries re-enqueue the same id before the old copy
    is acked), ``queue_name`` (``X`` or ``X.DQ``), ``actor_name``, ``state``
    (``queued`` | ``consumed`` | ``dead`` | ``waiting``), ``available_at`` (when the row may
    be claimed; for ``.DQ`` rows the ETA, computed as the database's clock
    at insert plus the delay), ``enqueued_at``, ``worker_id``,
    ``consumed_at``, ``dead_at``, ``retries`` and ``last_error`` (copied from
    the options for monitoring), ``data`` (``message.encode()``, any encoder),
    ``ordering_key`` and ``ordering_seq`` (see ``_ordering.py``).
    Partial index ``(queue_name, available_at, id) WHERE state = 'queued'``.

``{prefix}workers`` — one row per live consumer (Dramatiq runs two per queue
in each worker process; ``queues`` holds that consumer's one queue name):
    ``worker_id`` (PK), ``hostname``, ``pid``, ``heartbeat_at``, ``queues``.

Life of a row: ``enqueue`` inserts it ``queued``; a consumer claims a batch
with ``FOR UPDATE SKIP LOCKED`` (``consumed``, stamped with its worker id);
``ack`` deletes it (deletes are grouped: they are flushed with the consumer's
next claim or within :data:`ACK_DELAY`; on PostgreSQL that claim also hands
the acked messages' ordering keys on); ``nack`` turns it into a ``dead``
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

import os
import time
from collections.abc import Iterable
from typing import Any

import dramatiq
import sqlalchemy as sa
from dramatiq.broker import Consumer
from dramatiq.common import current_millis, dq_name, q_name
from dramatiq.errors import QueueJoinTimeout
from dramatiq.message import Message
from dramatiq.middleware import Middleware
from sqlalchemy.engine import URL, Engine

from .._sql import ambient_connection, create_engine, is_postgres, resolve_engine, transaction
from ..errors import ConfigurationError
from . import _deadletters
from ._consumer import SqlConsumer, SqlMessageProxy
from ._dberrors import is_transient
from ._hub import ACK_DELAY, Hub
from ._maintenance import Maintenance
from ._ordering import SqlOrdering, ensure_ordering_schema
from ._pooler import pooler_engine_options, unprepare_connections
from ._schema import (
    CONSUMED,
    PREFIX_RE,
    QUEUED,
    WAITING,
    Statements,
    channel_name,
    define_tables,
    lock_key,
    message_row,
)
from ._wakeup import SqliteWakeups
from ._writer import write_rows

__all__ = ["ACK_DELAY", "SqlBroker", "SqlMessageProxy"]

#: Seconds between two polls of an idle queue (the safety net under NOTIFY).
DEFAULT_POLL_INTERVAL = 1.0
#: Seconds without a heartbeat before a consumer's in-flight rows are handed out again.
DEFAULT_HEARTBEAT_TIMEOUT = 60.0
#: Seconds a dead letter is kept.
DEFAULT_DEAD_MESSAGE_TTL = 7 * 86400


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
        if not PREFIX_RE.match(table_prefix):
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
        self.metadata, self.messages, self.workers = define_tables(table_prefix)
        self.channel = channel_name(table_prefix)
        self.is_postgres = is_postgres(self.engine)
        #: Whether consumers hold session state (LISTEN, settings); see ``listen``.
        self.listen = listen or not self.is_postgres
        self._lock_key = lock_key(table_prefix)
        self.statements = Statements(self.engine, self.messages, self.workers, self.channel)
        self.hub: Hub[SqlConsumer] = Hub(
            self.engine,
            self.statements,
            postgres=self.is_postgres,
            notify=self.is_postgres and self.listen,
            wakeups=None if self.is_postgres else SqliteWakeups(self.engine, table_prefix),
        )
        #: Ordering keys (``send_with_options(ordering_key=…)``); see ``_ordering.py``.
        self.ordering = SqlOrdering(
            self.engine, self.messages, self.statements, self.hub, table_prefix, self.channel
        )
        self.maintenance = Maintenance(
            engine=self.engine,
            messages=self.messages,
            workers=self.workers,
            statements=self.statements,
            hub=self.hub,
            ordering=self.ordering,
            lock_key=self._lock_key,
            heartbeat_timeout=heartbeat_timeout,
            dead_message_ttl=dead_message_ttl,
            logger=self.logger,
        )
        self._listener: Any = None
        self._vacuum: Any = None
        self._inherited: list[Any] = []
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
                    conn.execute(self.statements.notify, {"queue": ""})
            except sa.exc.DBAPIError:
                pass
            listener.stop()
        self.hub.close()
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
        else:
            self.hub.receive_wakeups()
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
        for message in messages:
            if delay is not None:
                message = message.copy(
                    queue_name=dq_name(message.queue_name),
                    options={"eta": current_millis() + delay},
                )
            self.emit_before("enqueue", message, delay)
            stored.append(message)
        rows = [message_row(message, delay) for message in stored]
        if rows:
            write_rows(
                rows,
                engine=self.engine,
                statements=self.statements,
                hub=self.hub,
                ordering=self.ordering,
                listen=self.listen,
                logger=self.logger,
            )
        for message in stored:
            self.emit_after("enqueue", message, delay)
        return stored

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
                if self.hub.acks_pending and ambient_connection(self.engine) is None:
                    # Acks of this process that no consumer has flushed yet
                    # (one that stopped iterating) must not hold join up.
                    self.hub.flush_acks_now()
                with transaction(self.engine, read_only=True) as conn:
                    pending = conn.execute(count).scalar_one()
            except sa.exc.DBAPIError as exc:
                # A connection lost under us is replaced on the next try.
                if not is_transient(self.engine, exc) or ambient_connection(self.engine):
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
        return _deadletters.dead_letters(self.engine, self.messages, queue_name)

    def requeue_dead(self, queue_name: str, *, message_ids: Iterable[str] | None = None) -> int:
        """Move dead letters of ``queue_name`` back to the queue with retries reset.

        Args:
            queue_name: The queue whose dead letters (including those of its
                delay queue) are requeued.
            message_ids: Only these messages; ``None`` means all.

        Returns:
            How many messages were requeued.  Undecodable rows stay dead.
        """
        return _deadletters.requeue_dead(
            self.engine,
            self.messages,
            self.statements,
            self.hub,
            queue_name,
            message_ids,
            ordering=self.ordering,
        )

    # -- wake-ups ----------------------------------------------------------------

    def _ensure_listener(self) -> None:
        from ._listen import PgListener, PgVacuum

        with self.hub.lock:
            helpers = [h for h in (self._listener, self._vacuum) if h is not None]
            if any(helper.pid != os.getpid() for helper in helpers):
                # Inherited across fork(): the threads are gone and the sockets
                # are the parent's.  Keep references so they are never closed here.
                self._inherited.extend(helpers)
                self._listener = self._vacuum = None
            if self._vacuum is None:
                if self.listen:
                    self._listener = PgListener(
                        self.engine, self.channel, self.hub.wake_one, self.hub.wake_all
                    )
                    self._listener.start()
                self._vacuum = PgVacuum(
                    self.engine,
                    self.messages.name,
                    lock_key(f"{self.table_prefix}:vacuum"),
                    session_lock=self.listen,
                )
                self._vacuum.start()
