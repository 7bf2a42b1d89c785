"""The per-thread connections :class:`~botkit_tasks.kv.sql.SqlKvStore` uses outside transactions.

Outside an :func:`~botkit_tasks.atomic` block each thread keeps one
connection per store, in autocommit (persistent connections, as in Django):
taking a pooled connection would cost a checkout, ``BEGIN``/``COMMIT``, a
reset on return and, on PostgreSQL, a pre-ping round trip — several times the
statement itself.  The connections are opened the way the engine's pool opens
its own (URL, ``connect_args``, ``do_connect`` hooks, ``connect`` listeners),
but the pool never counts, pings, resets or hands them out.  A thread's
connection is closed when the thread ends, and all of them by
:meth:`ThreadConnections.close`.  A child process never uses (nor closes) a
connection of its parent: after ``fork()`` the generation changes and it opens
its own.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import threading
import weakref
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool.base import _ConnectionRecord

from .._sql import prepare_sqlite_connection
from ..errors import StoreError

__all__ = ["NOTHING", "ROW", "ROWCOUNT", "ROWS", "Slot", "ThreadConnections", "run_statement"]

#: What an operation reads back from its statement.
NOTHING, ROW, ROWS, ROWCOUNT = range(4)

# Bumped in a child process after fork(): connections opened before belong to
# the parent, and a thread's connection records the generation it was made in.
_generation = 0

# Connections inherited across fork(), kept referenced and never closed: closing
# (or garbage-collecting) one in the child would end the parent's session
# (PostgreSQL) or run SQLite's close-time checkpoint on the parent's database.
_inherited: list[Any] = []


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def run_statement(cursor: Any, sql: str, params: dict[str, Any], result: int) -> Any:
    """Execute one statement on a driver cursor and read back ``result``."""
    cursor.execute(sql, params)
    if result == ROW:
        return cursor.fetchone()
    if result == ROWS:
        return cursor.fetchall()
    return cursor.rowcount if result == ROWCOUNT else None


class Slot:
    """A thread's own connection for one store, with its cached cursor."""

    __slots__ = ("__weakref__", "connection", "cursor", "generation", "poll", "release")

    def __init__(self, connection: Any, cursor: Any, poll: Any) -> None:
        self.connection = connection
        self.cursor = cursor
        #: ``select.poll`` on the socket (PostgreSQL), ``None`` for SQLite.
        self.poll = poll
        self.generation = _generation
        self.release: weakref.finalize[Any, Any] | None = None

    @property
    def usable(self) -> bool:
        """Made in this process, and the server has not closed it or written to it unasked."""
        # PostgreSQL sends a FATAL message before closing a session.
        return self.generation == _generation and not (self.poll and self.poll.poll(0))


class _ThreadSlots(threading.local):
    slot: Slot | None = None


def _release(record: Any, pid: int, registry: dict[int, Any], key: int) -> None:
    # Runs once per connection: when its thread ends (the thread-local slot is
    # freed), when the store is closed or collected, or at interpreter exit.
    # Raising here would only print an "exception ignored" warning.
    registry.pop(key, None)
    if pid != os.getpid():
        _inherited.append(record)
        return
    # An already broken connection must not fail to be released.
    with contextlib.suppress(Exception):
        record.close()


class ThreadConnections:
    """One connection per thread for one store, outside the engine's pool.

    Args:
        engine: The store's engine.
        connect_error: Turns a driver error raised while connecting into the
            :class:`StoreError` to raise (its cause is kept).
    """

    def __init__(self, engine: Engine, connect_error: Callable[[Exception], StoreError]) -> None:
        self.engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._connect_error = connect_error
        #: The current thread's connection, in ``threads.slot``.
        self.threads = _ThreadSlots()
        # Release callbacks of the open per-thread connections, by a serial number.
        self.slots: dict[int, weakref.finalize[Any, Any]] = {}
        self._lock = threading.Lock()
        self._serial = itertools.count()
        self.closed = False

    def current(self) -> Slot:
        """The current thread's usable connection, opened (or replaced) if needed."""
        slot = self.threads.slot
        if slot is None or not slot.usable:
            slot = self.connect(slot)
        return slot

    def connect(self, stale: Slot | None) -> Slot:
        """Replace the current thread's connection (``stale``, if any) with a new one."""
        if stale is not None:
            self.drop(stale)
        # The pool's own way of opening a connection (creator, connect_args,
        # do_connect and connect events), without the pool's bookkeeping: the
        # pool neither counts nor ever sees it.
        try:
            record = _ConnectionRecord(self.engine.pool)
        except (sa.exc.DBAPIError, self._driver_error) as exc:
            error = self._connect_error(exc)
            raise error from error.__cause__
        try:
            connection: Any = record.driver_connection
            poll = None
            if self._sqlite:
                prepare_sqlite_connection(connection)
            else:
                connection.rollback()  # a connect listener may have left a transaction open
                connection.autocommit = True
                if hasattr(select, "poll"):
                    poll = select.poll()
                    poll.register(connection.fileno(), select.POLLIN)
            slot = Slot(connection, connection.cursor(), poll)
        except BaseException as exc:
            record.close()
            if isinstance(exc, self._driver_error):
                error = self._connect_error(exc)
                raise error from error.__cause__
            raise
        key = next(self._serial)
        release = weakref.finalize(slot, _release, record, os.getpid(), self.slots, key)
        slot.release = release
        with self._lock:
            closed = self.closed
            if not closed:
                self.slots[key] = release
        if closed:
            release()
            raise StoreError("this SqlKvStore is closed")
        self.threads.slot = slot
        return slot

    def drop(self, slot: Slot) -> None:
        """Close the current thread's connection ``slot`` (abandon it after a fork)."""
        if self.threads.slot is slot:
            self.threads.slot = None
        if slot.release is not None:
            slot.release()

    def close(self) -> bool:
        """Close every thread's connection; ``False`` if already closed."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            releases = list(self.slots.values())
        for release in releases:
            release()
        return True
