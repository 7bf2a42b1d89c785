"""The consumers of one broker in one process: wake-ups and grouped acks.

Consumers register here per queue.  A commit that adds messages wakes the
consumers of its queues at once (in this process directly; in other
processes through ``NOTIFY``, which the listener turns back into
:meth:`Hub.wake_one`).  Acks are grouped: a consumer's ack only records the
row id, and the next claim (or a flush after :data:`ACK_DELAY`) deletes them
all in one statement.  Acks of messages with an ordering key are kept per
queue: a claim of that queue deletes them and hands their keys on (see
``_ordering.py``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .._sql import on_commit
from ._dberrors import closed, is_transient
from ._schema import Statements

if TYPE_CHECKING:
    from ._wakeup import SqliteWakeups

__all__ = ["ACK_DELAY", "KEYED_ACK_DELAY", "Hub", "Waiter", "chunks"]

#: Longest time (s) an ack waits to be grouped with others into one DELETE.
ACK_DELAY = 0.005
#: Seconds after which any consumer flushes keyed acks left by another queue's.
KEYED_ACK_STALE = 0.05
#: Seconds a consumer waits to flush its queue's keyed acks: none, where an
#: unkeyed ack waits :data:`ACK_DELAY`, because each holds its key's next
#: message back (the flush is the claim that hands the key on), so a wait
#: would be paid once per message of a busy key.  Under load they group
#: anyway: the acks made while a claim runs go with the next one.
KEYED_ACK_DELAY = 0.0
#: Most ids in one ``IN (...)`` list (SQLite caps bound parameters).
_CHUNK = 5000


def chunks(ids: Sequence[int]) -> Iterable[list[int]]:
    """``ids`` in lists short enough for one ``IN (...)``."""
    for start in range(0, len(ids), _CHUNK):
        yield list(ids[start : start + _CHUNK])


class Waiter(Protocol):
    """A consumer as the hub sees it."""

    queue_name: str
    pid: int

    def wake(self) -> None:
        """Stop waiting and look for messages now."""


W = TypeVar("W", bound=Waiter)


class Hub(Generic[W]):
    """Wake-ups and grouped acks of one broker's consumers in this process."""

    def __init__(
        self,
        engine: Engine,
        statements: Statements,
        *,
        postgres: bool,
        notify: bool,
        wakeups: SqliteWakeups | None = None,
    ) -> None:
        self.engine = engine
        self.statements = statements
        self.postgres = postgres
        #: Send ``NOTIFY`` on commit (PostgreSQL, unless ``listen=False``).
        self.notify = notify
        #: Loopback datagrams to consumers in other processes (SQLite).
        self.wakeups = wakeups
        self.lock = threading.Lock()
        self._waiters: dict[str, set[W]] = {}
        self._orphans: dict[str, list[W]] = {}
        self._acks: list[int] = []
        self._acks_since = 0.0
        # Keyed acks by the queue of the consumer they came through.
        self._keyed: dict[str, list[tuple[int, str]]] = {}
        self._keyed_since: dict[str, float] = {}
        #: Deletes acked rows and hands their keys on, in a transaction of its
        #: own: ``release_keyed(row_ids, keys)``.  Set by ``SqlOrdering``.
        self.release_keyed: Callable[[list[int], list[str]], None] | None = None

    # -- consumers -------------------------------------------------------------

    def subscribe(self, consumer: W) -> None:
        """Wake ``consumer`` when its queue gets messages."""
        with self.lock:
            self._waiters.setdefault(consumer.queue_name, set()).add(consumer)

    def unsubscribe(self, consumer: W) -> None:
        """Stop waking ``consumer``."""
        with self.lock:
            self._waiters.get(consumer.queue_name, set()).discard(consumer)

    def add_orphan(self, consumer: W) -> None:
        """Keep a closed consumer whose rows the next consumer of its queue adopts."""
        with self.lock:
            self._orphans.setdefault(consumer.queue_name, []).append(consumer)

    def take_orphans(self, queue_name: str) -> list[W]:
        """The orphans of ``queue_name`` made by this process (not inherited by fork)."""
        with self.lock:
            orphans = self._orphans.pop(queue_name, [])
        return [old for old in orphans if old.pid == os.getpid()]

    # -- wake-ups --------------------------------------------------------------

    def wake(self, queues: Iterable[str]) -> None:
        """Wake the consumers of ``queues`` in this process."""
        for queue in queues:
            self.wake_one(queue)

    def wake_one(self, queue: str) -> None:
        """Wake the consumers of ``queue`` in this process."""
        with self.lock:
            consumers = list(self._waiters.get(queue, ()))
        for consumer in consumers:
            consumer.wake()

    def wake_all(self) -> None:
        """Wake every consumer in this process (a lost listener connection came back)."""
        with self.lock:
            queues = list(self._waiters)
        for queue in queues:
            self.wake_one(queue)

    def announce(self, queues: Iterable[str]) -> None:
        """Wake consumers of committed rows: here, and (SQLite) in other processes."""
        queues = list(queues)
        self.wake(queues)
        if self.wakeups is not None:
            self.wakeups.announce(queues)

    def receive_wakeups(self) -> None:
        """Start taking wake-ups from other processes (SQLite; idempotent)."""
        if self.wakeups is not None:
            self.wakeups.ensure_receiving(self.wake_one)

    def close(self) -> None:
        """Stop taking and sending cross-process wake-ups."""
        if self.wakeups is not None:
            self.wakeups.close()

    def notify_on(self, conn: Connection, queues: Sequence[str], *, local: bool = True) -> None:
        """Wake consumers of ``queues`` once the transaction on ``conn`` commits.

        ``local=False`` is for transactions not opened by :func:`transaction`,
        whose commit hooks never run; the caller then wakes this process itself.
        """
        if self.notify:
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
                    conn.execute(self.statements.notify, {"queue": queue})
                    seen[1].add(queue)
        if local:
            on_commit(conn, lambda: self.announce(queues))

    # -- grouped acks ----------------------------------------------------------

    def add_ack(self, row_id: int, key: str | None = None, queue: str = "") -> bool:
        """Record the ack of ``row_id``; deleted with the next claim or flush.

        A keyed ack (``key``, acked through a consumer of ``queue``) is kept
        for that queue's consumers, whose next claim hands the key on (see
        :attr:`release_keyed`).  Returns whether it is the first keyed ack
        pending for ``queue``: the consumer should then wake up to flush it.
        """
        first = False
        with self.lock:
            now = time.monotonic()
            if key is None:
                if not self._acks:
                    self._acks_since = now
                self._acks.append(row_id)
            else:
                pending = self._keyed.setdefault(queue, [])
                if not pending:
                    self._keyed_since[queue] = now
                    first = True
                pending.append((row_id, key))
            orphan = not any(self._waiters.values())
        if orphan:
            # No consumer left to flush it (e.g. an ack after shutdown began).
            try:
                self.flush_acks_now()
            except sa.exc.DBAPIError as exc:
                if is_transient(self.engine, exc):
                    raise closed(exc) from exc
                raise
        return first

    @property
    def acks_pending(self) -> bool:
        """Whether acks wait to be deleted."""
        return bool(self._acks or self._keyed)

    def _mine(self, queue: str | None, now: float) -> list[str]:
        """Queues whose keyed acks a consumer of ``queue`` flushes (``None``:
        every queue): its own, those of queues without a consumer here, and
        those left for :data:`KEYED_ACK_STALE` (their consumer is not
        iterating, e.g. one made for a single ``basic_get``).  Locked."""
        return [
            q
            for q in self._keyed
            if queue is None
            or q == queue
            or not self._waiters.get(q)
            or now - self._keyed_since[q] >= KEYED_ACK_STALE
        ]

    def keyed_pending(self, queue: str) -> bool:
        """Whether keyed acks wait for a consumer of ``queue`` to hand their keys on."""
        with self.lock:
            return bool(self._mine(queue, time.monotonic()))

    def flush_at(self, queue: str | None = None) -> float | None:
        """``time.monotonic()`` by which a consumer of ``queue`` must flush its
        pending acks (within :data:`ACK_DELAY` of the oldest, its own queue's
        keyed acks within :data:`KEYED_ACK_DELAY`, other queues' after
        :data:`KEYED_ACK_STALE`), or ``None``."""
        with self.lock:
            mine = set(self._mine(queue, time.monotonic()))
            due = [
                self._keyed_since[q] + (KEYED_ACK_DELAY if q in mine else KEYED_ACK_STALE)
                for q in self._keyed
            ]
            if self._acks:
                due.append(self._acks_since + ACK_DELAY)
        return min(due) if due else None

    def flush_acks_now(self) -> None:
        """DELETE the pending acks in a transaction of their own."""
        restore: Callable[[], None] | None = None
        try:
            with self.engine.begin() as conn:
                restore = self.flush_acks(conn)
        except BaseException:
            if restore is not None:  # the commit failed: nothing was deleted
                restore()
            raise

    def take_acks(
        self, queue: str | None = None
    ) -> tuple[list[int], list[str], Callable[[], None]]:
        """Take the pending acks a consumer of ``queue`` flushes (``None``: all).

        Returns the row ids (keyed ones included), the keys of the keyed ones
        (sorted, unique) and a function that puts them back if the statement
        deleting them fails, so that no ack is lost.
        """
        with self.lock:
            ids, self._acks = self._acks, []
            keyed = {q: self._keyed.pop(q) for q in self._mine(queue, time.monotonic())}
            since = {q: self._keyed_since.pop(q) for q in keyed}
        keys = sorted({key for pairs in keyed.values() for _, key in pairs})
        all_ids = ids + [row_id for pairs in keyed.values() for row_id, _ in pairs]

        def restore() -> None:
            with self.lock:
                if ids:
                    if not self._acks:
                        self._acks_since = time.monotonic()
                    self._acks.extend(ids)
                for q, pairs in keyed.items():
                    pending = self._keyed.setdefault(q, [])
                    if not pending:
                        self._keyed_since[q] = since[q]
                    pending[:0] = pairs

        return all_ids, keys, restore

    def flush_acks(self, conn: Connection, queue: str | None = None) -> Callable[[], None]:
        """DELETE the pending acks (those of a consumer of ``queue``) on ``conn``.

        Keyed acks are flushed with :attr:`release_keyed` in a transaction of
        its own, which then deletes the unkeyed ones too; otherwise the
        statements run on ``conn``.  Returns the restore function (for a
        commit of ``conn`` that fails).
        """
        ids, keys, restore = self.take_acks(queue)
        try:
            if keys:
                assert self.release_keyed is not None
                self.release_keyed(ids, keys)
                return lambda: None  # committed already
            for chunk in chunks(ids):
                conn.execute(self.statements.delete, {"ids": chunk})
        except BaseException:
            restore()
            raise
        return restore
