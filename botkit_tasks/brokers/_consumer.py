"""The consumer of :class:`~botkit_tasks.brokers.sql.SqlBroker`: batched claims, grouped acks.

A consumer claims up to ``prefetch`` rows of one queue at a time with
``FOR UPDATE SKIP LOCKED`` and hands them out one by one.  Acks only record
the row id; the ids are deleted in one statement together with the next claim
(or within :data:`ACK_DELAY`), which is where most of the throughput comes
from.  On PostgreSQL that holds for acks of keyed messages too: the claim
that deletes them also releases their keys and may take their successors
(``SqlOrdering.hand_on``), and the acks of keys whose next messages it
read ahead hand the key on in a lighter statement of their own (``_runs.py``,
``SqlOrdering.step``).  Each consumer holds its own connection,
heartbeats under its own worker id, and sleeps on an event that NOTIFY,
local commits and acks set.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.common import current_millis, q_name
from dramatiq.errors import ConnectionClosed
from dramatiq.logging import get_logger
from dramatiq.message import Message
from sqlalchemy.engine import Connection

from ._adoption import adopt_orphans, begun, dead_letter_rows, requeue_rows
from ._dberrors import closed, is_transient
from ._deadletters import mark_dead
from ._hub import ACK_DELAY
from ._runs import RUN_LENGTH, Run, drop_steps, end_run, held_for_step, start_run, step_runs

if TYPE_CHECKING:
    from ._host import ConsumerHost

#: Most rows one claim takes (the delay-queue consumer asks for thousands).
MAX_CLAIM = 500


class SqlMessageProxy(MessageProxy):
    """A claimed message; ``row_id`` is its delivery row in ``{prefix}messages``."""

    def __init__(self, message: Message[Any], row_id: int) -> None:
        super().__init__(message)
        self.row_id = row_id


class SqlConsumer(Consumer):
    """Claims batches of rows for one queue; see the module docstring."""

    def __init__(self, broker: ConsumerHost, queue_name: str, prefetch: int, timeout: int) -> None:
        self.logger = get_logger(__name__, type(self))  # type: ignore[no-untyped-call]
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = max(int(prefetch), 1)
        self.timeout = timeout
        self.worker_id = uuid.uuid4().hex
        self._refill = max(1, self.prefetch // 2)
        # Runs of keyed messages (PostgreSQL, not on a delay queue: ``_runs.py``),
        # and the acked heads whose run's next member is to be taken.
        self._run_length = RUN_LENGTH if q_name(queue_name) == queue_name else 0
        self._steps: list[tuple[int, Run]] = []
        self._cache: deque[SqlMessageProxy] = deque()
        self._unacked: set[int] = set()  # claimed rows not acked/nacked/requeued yet
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._notified = True  # poll once at start
        self._next_poll = 0.0
        self._coalesce_until: float | None = None
        self._drained = False
        self._hold_until: float | None = None
        self._need_due = False
        self._next_heartbeat = 0.0
        self._registered = False
        self._closed = False
        self._conn: Connection | None = None
        self.pid = os.getpid()
        # Set when a closed consumer's in-flight rows were adopted by a
        # restarted consumer of the same queue: releases are forwarded to it.
        self._abandoned: set[int] = set()
        self._adopter: SqlConsumer | None = None
        broker.hub.subscribe(self)

    # Called from the listener thread, enqueuing threads and worker threads.
    def wake(self) -> None:
        self._notified = True
        self._event.set()

    def _connection(self) -> Connection:
        # One connection per consumer, used only on the consumer thread: claims
        # never join an ambient atomic() block and skip the pool's pre-ping.
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # if connecting fails, nothing is left to close
            conn = self.broker.engine.connect()
            if self.broker.is_postgres:
                # Claims and acks need no durable commit: a claim or an ack lost
                # in a server crash only means the message runs again, which
                # at-least-once delivery allows.  Enqueues stay durable: they
                # use other (pooled) connections.  Autocommit makes each claim
                # one round trip; the connection is discarded on close so these
                # settings never reach the pool.
                try:
                    conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                    if self.broker.listen:  # a session setting: not behind a transaction pooler
                        conn.exec_driver_sql("SET synchronous_commit TO off")
                    conn.commit()  # ends SQLAlchemy's autobegun (no-op) transaction
                except BaseException:
                    conn.invalidate()  # (a pooled connection the server had closed)
                    conn.close()
                    raise
            self._conn = conn
        return self._conn

    def __next__(self) -> SqlMessageProxy | None:
        try:
            return self._next()
        except sa.exc.DBAPIError as exc:
            if is_transient(self.broker.engine, exc):
                raise closed(exc) from exc
            raise

    def _next(self) -> SqlMessageProxy | None:
        deadline = time.monotonic() + self.timeout / 1000
        while True:
            if self._cache:
                return self._hand_out(self._cache.popleft())
            if self._steps:
                # After the cache is handed out: the workers run it meanwhile.
                step_runs(self)
                continue
            now = time.monotonic()
            if self._hold_until is not None and now >= self._hold_until:
                # The worker releases delayed messages only after __next__
                # returns; return now so that a held one goes out on time.
                self._hold_until = None
                return None
            free = self.prefetch - len(self._unacked)
            if free > 0 and self._should_claim(free, now):
                if self._claim(min(free, MAX_CLAIM)):
                    continue
            elif now >= self._next_heartbeat or self._acks_due(now):
                self._flush()
            if self._need_due:
                self._schedule_poll(self._connection())
            if self.broker.maintenance.due():
                self.broker.maintenance.run(self._connection())
            now = time.monotonic()
            if now >= deadline:
                return None
            # Sleep until something can change the decision above; every
            # condition is re-read from state afterwards, so clearing the
            # event after the wait loses no wake-up.
            wake_at = min(deadline, self._next_heartbeat)
            if self.prefetch > len(self._unacked):
                wake_at = min(wake_at, self._next_poll)
                if self._coalesce_until is not None:
                    wake_at = min(wake_at, self._coalesce_until)
            if (flush_at := self._flush_at()) is not None:
                wake_at = min(wake_at, flush_at)
            if self._hold_until is not None:
                wake_at = min(wake_at, self._hold_until)
            if self._steps:
                continue  # an ack came while this loop ran (its wake-up may be cleared)
            self._event.wait(max(wake_at - now, 0.0))
            self._event.clear()

    def _hand_out(self, proxy: SqlMessageProxy) -> SqlMessageProxy:
        eta = proxy.options.get("eta")
        if isinstance(eta, (int, float)):
            # Due by the database clock but maybe not yet by this host's: the
            # worker holds it until its ETA, so wake up then.
            wait = (eta - current_millis()) / 1000
            if wait > 0:
                hold = time.monotonic() + wait + 0.001
                if self._hold_until is None or hold < self._hold_until:
                    self._hold_until = hold
        return proxy

    def _flush_at(self) -> float | None:
        """When the acks this consumer flushes are due (see ``Hub.flush_at``)."""
        return self.broker.hub.flush_at(self.queue_name)

    def _acks_due(self, now: float) -> bool:
        flush_at = self._flush_at()
        return flush_at is not None and now >= flush_at

    def _should_claim(self, free: int, now: float) -> bool:
        if self._notified or now >= self._next_poll:
            return True
        if self.broker.hub.keyed_pending(self.queue_name) and (
            free >= self._refill or self._acks_due(now)
        ):
            # Keys wait for this claim to hand them on, drained queue or not.
            return True
        if self._drained:
            return False  # nothing was left at the last claim; wait for a wake-up
        if free >= self._refill:
            return True
        if self._coalesce_until is None:
            # Only a few slots are free: wait briefly for more acks so that
            # claims stay batched instead of one row per transaction.
            self._coalesce_until = now + ACK_DELAY
            return False
        return now >= self._coalesce_until

    def _claim(self, limit: int) -> bool:
        """Delete pending acks, heartbeat if due, claim up to ``limit`` rows."""
        broker = self.broker
        self._notified = False
        self._event.clear()
        self._coalesce_until = None
        conn = self._connection()
        params = {"queue": self.queue_name, "limit": limit, "worker": self.worker_id}
        # On PostgreSQL the connection is in autocommit mode: begin() emits
        # nothing and each statement commits on its own.
        restore: Callable[[], None] | None = None
        rows: list[Any]
        runs: dict[int, list[tuple[int, bytes, int]]] = {}
        try:
            with conn.begin():
                self._heartbeat(conn, time.monotonic())
                self._adopt(conn)
                if broker.is_postgres:
                    acks, keys, restore = broker.hub.take_acks(self.queue_name)
                    if keys:
                        # Keyed acks: their keys are handed on in the same
                        # transaction that claims (one of its own, locked).
                        rows, runs = broker.ordering.hand_on(
                            conn,
                            acks,
                            keys,
                            queue=self.queue_name,
                            limit=limit,
                            worker=self.worker_id,
                            run=self._run_length,
                        )
                    else:
                        rows = list(
                            conn.execute(broker.statements.ack_and_claim, {**params, "acks": acks})
                        )
                else:
                    restore = broker.hub.flush_acks(conn)
                    rows = list(conn.execute(broker.statements.claim, params))
        except BaseException:
            # Up to the commit: a rolled-back transaction deleted nothing.
            if restore is not None:
                restore()
            raise
        self._drained = len(rows) < limit
        if self._drained:
            if rows:
                # Hand the rows out first; look up the next due time after.
                self._need_due = True
                self._next_poll = time.monotonic() + broker.poll_interval
            else:
                self._schedule_poll(conn)
        else:
            self._next_poll = time.monotonic() + broker.poll_interval
        if not rows:
            return False
        rows.sort(key=lambda row: (row[1], row[0]))
        bad: list[tuple[int, str]] = []
        with self._lock:
            for row_id, _available_at, data in rows:
                self._unacked.add(row_id)
                try:
                    message = Message.decode(bytes(data))
                except Exception as exc:
                    bad.append((row_id, f"could not decode message: {exc!r}"[:2000]))
                    continue
                proxy = SqlMessageProxy(message, row_id)
                if row_id in runs:
                    start_run(self, proxy, runs[row_id])
                self._cache.append(proxy)
        if bad:
            self._dead_letter_undecodable(bad)
        return True

    def _adopt(self, conn: Connection) -> None:
        adopt_orphans(self, conn)

    def _schedule_poll(self, conn: Connection) -> None:
        """Poll again at the next due time of a delayed row, or after poll_interval."""
        self._need_due = False
        with conn.begin():
            due_in = conn.execute(
                self.broker.statements.next_due, {"queue": self.queue_name}
            ).scalar()
        poll = self.broker.poll_interval
        if due_in is not None:
            poll = min(poll, max(due_in, 1) / 1000)
        self._next_poll = time.monotonic() + poll

    def _heartbeat(self, conn: Connection, now: float) -> None:
        if now < self._next_heartbeat:
            return
        conn.execute(
            self.broker.statements.heartbeat,
            {"worker": self.worker_id, "pid": os.getpid(), "queues": self.queue_name},
        )
        self._registered = True
        self._next_heartbeat = now + self.broker.heartbeat_timeout / 4

    def _flush(self) -> None:
        conn = self._connection()
        restore: Callable[[], None] | None = None
        try:
            with conn.begin():
                restore = self.broker.hub.flush_acks(conn, self.queue_name)
                self._heartbeat(conn, time.monotonic())
        except BaseException:
            if restore is not None:
                restore()
            raise

    def _dead_letter_undecodable(self, bad: list[tuple[int, str]]) -> None:
        self.logger.error("Dead-lettering %d undecodable message(s): %s", len(bad), bad[0][1])
        conn = self._connection()
        with conn.begin():
            dead_letter_rows(self.broker, conn, bad)
        with self._lock:
            self._unacked.difference_update(row_id for row_id, _ in bad)

    def _release(self, row_ids: Iterable[int]) -> None:
        row_ids = list(row_ids)
        with self._lock:
            before = self.prefetch - len(self._unacked)
            self._unacked.difference_update(row_ids)
            after = self.prefetch - len(self._unacked)
            adopter = self._adopter
        if before < self._refill <= after:
            self._event.set()
        if adopter is not None:
            adopter._release(row_ids)

    # Called from worker threads.
    def ack(self, message: MessageProxy) -> None:
        """Mark ``message`` done; its row is deleted with the next grouped flush.

        With an ordering key, that flush (this consumer's next claim) also
        hands the key to its next message; on SQLite it happens at once.
        """
        row_id = getattr(message, "row_id", None)
        if row_id is None or held_for_step(self, message, row_id):
            return
        self._release((row_id,))
        key = message.options.get("ordering_key")
        if self.broker.ordering.ack(row_id, key, self.queue_name):
            self._event.set()  # a key waits for this consumer's next claim
        if key is not None and self._closed and self.broker.is_postgres:
            # Closed while acking: no claim of this consumer will hand it on.
            self._flush_closed()

    def nack(self, message: MessageProxy) -> None:
        """Keep ``message`` as a dead letter, with its final options (traceback, retries)."""
        row_id = getattr(message, "row_id", None)
        if row_id is None:
            return
        end_run(self, message, row_id)  # its release below hands the key on
        options = message.options
        try:
            mark_dead(self.broker, row_id, message._message)
        except sa.exc.DBAPIError as exc:
            if is_transient(self.broker.engine, exc):
                raise closed(exc) from exc
            raise
        if (key := options.get("ordering_key")) is not None:
            self.broker.ordering.dead_lettered(key)  # no longer its key's head
        self._release((row_id,))

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        """Put claimed but unprocessed messages back at their place in the queue."""
        ids = []
        for message in messages:
            if (row_id := getattr(message, "row_id", None)) is not None:
                end_run(self, message, row_id)
                ids.append(row_id)
        if not ids:
            return
        requeue_rows(self, ids, self.broker.engine.begin)
        self._release(ids)
        self.broker.hub.announce([self.queue_name])

    def _flush_closed(self) -> None:
        try:
            self.broker.hub.flush_acks_now()
        except sa.exc.DBAPIError as exc:
            if is_transient(self.broker.engine, exc):
                raise closed(exc) from exc
            raise

    def close(self) -> None:
        """Flush acks, hand back messages claimed but never returned, release the connection.

        If the database is unreachable the remaining rows come back through
        heartbeat expiry, since this consumer's worker id stops heartbeating.
        """
        if self._closed:
            return
        self._closed = True
        self.broker.hub.unsubscribe(self)
        drop_steps(self)  # plain keyed acks now: the flush below releases their keys
        with self._lock:
            proxies = list(self._cache)
            cached = [proxy.row_id for proxy in proxies]
            self._cache.clear()
            self._abandoned = set(cached)
            in_flight = bool(self._unacked - self._abandoned)
        for proxy in proxies:
            end_run(self, proxy, proxy.row_id)
        # Rows handed out and not yet acked: a restarted consumer of this queue
        # takes them over.  Not for a delay queue, whose held messages Dramatiq
        # drops on a connection error: those come back through heartbeat expiry.
        if in_flight and q_name(self.queue_name) == self.queue_name:
            self.broker.hub.add_orphan(self)
        try:
            conn = self._connection()
            if cached:
                requeue_rows(self, cached, lambda: begun(conn))
                self._release(cached)
            self._flush()
            if not self._unacked and self._registered:
                w = self.broker.workers
                with conn.begin():
                    conn.execute(w.delete().where(w.c.worker_id == self.worker_id))
        except (sa.exc.DBAPIError, ConnectionClosed) as exc:
            self.logger.warning("Could not close consumer of %r cleanly: %s", self.queue_name, exc)
        except Exception:
            # Dramatiq closes a consumer from its consumer thread, which an
            # error here would end: the queue would have no consumer left.
            self.logger.exception("Could not close consumer of %r cleanly", self.queue_name)
        finally:
            if self._conn is not None:
                if self.broker.is_postgres and not (self._conn.invalidated or self._conn.closed):
                    self._conn.invalidate()
                self._conn.close()
                self._conn = None
