"""Shared SQLAlchemy plumbing: engine creation, ambient transactions, ``atomic()``.

Every SQL-backed component (``SqlKvStore``, ``SqlBroker``, the monitor) runs its
statements through :func:`transaction`, which joins the ambient transaction that
:func:`atomic` opened on the same :class:`~sqlalchemy.engine.Engine` object, or
else opens a short one of its own.  That is what lets a key-value write and the
messages it implies commit together.
"""

from __future__ import annotations

import contextvars
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

from .errors import ConfigurationError

__all__ = [
    "ambient_connection",
    "atomic",
    "create_engine",
    "is_postgres",
    "is_sqlite",
    "normalize_url",
    "on_commit",
    "prepare_sqlite_connection",
    "resolve_engine",
    "transaction",
]

#: How long a SQLite connection waits for another writer before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000

_ambient: contextvars.ContextVar[dict[int, Connection] | None] = contextvars.ContextVar(
    "botkit_tasks_ambient_connections", default=None
)

_fork_lock = threading.Lock()
_engines_to_reset: weakref.WeakSet[Engine] = weakref.WeakSet()


def _reset_engines_after_fork() -> None:
    # A pooled connection inherited across fork() is shared with the parent; the
    # child must open its own (SQLAlchemy's documented "dispose(close=False)").
    for engine in list(_engines_to_reset):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_engines_after_fork)


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and pick psycopg 3 for PostgreSQL URLs without a driver."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # SQLAlchemy raises ArgumentError; keep the URL in the message
        shown = _hide_password(str(url))
        raise ConfigurationError(f"not a database URL: {shown!r} ({exc})") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ConfigurationError(
            f"unsupported database {parsed.get_backend_name()!r} in URL "
            f"{parsed.render_as_string(hide_password=True)!r}: use postgresql:// or sqlite://"
        )
    return parsed


def _hide_password(url: str) -> str:
    """``url`` with whatever may be a password (``user:…@``) replaced by ``***``.

    For URLs that SQLAlchemy cannot parse: errs on hiding too much.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


def create_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create an engine configured for botkit-tasks.

    PostgreSQL URLs use psycopg 3.  SQLite databases are put in WAL mode with a
    busy timeout, and every transaction starts with ``BEGIN IMMEDIATE`` so that
    concurrent writers in several processes queue up on the busy timeout instead
    of failing with "database is locked" when a reader upgrades to a writer.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        # check_same_thread: the pool hands a connection to one thread at a time.
        kwargs["connect_args"].setdefault("check_same_thread", False)
        engine = sa.create_engine(parsed, **kwargs)
        _configure_sqlite(engine)
    else:
        kwargs.setdefault("pool_pre_ping", True)
        engine = sa.create_engine(parsed, **kwargs)
    with _fork_lock:
        _engines_to_reset.add(engine)
    return engine


def prepare_sqlite_connection(dbapi_conn: Any, *, memory: bool = False) -> None:
    """Configure a raw ``sqlite3`` connection the way every botkit connection is.

    Autocommit at the driver level (transactions are begun explicitly), a busy
    timeout, WAL journal (persistent databases), ``synchronous=NORMAL``.
    """
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's implicit
    # transactions start too late and as DEFERRED).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        # The busy timeout first: switching to WAL needs a lock another new
        # connection may hold for a moment.
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if not memory:
            _ensure_wal(cur)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def _ensure_wal(cur: Any) -> None:
    # WAL is a property of the file: once set, it stays.  Setting it again is
    # skipped, and the first switch is retried because two connections opening
    # a brand-new file at once can see "database is locked" here, which the
    # busy handler does not always cover.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _configure_sqlite(engine: Engine) -> None:
    memory = engine.url.database in (None, "", ":memory:")

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        prepare_sqlite_connection(dbapi_conn, memory=memory)

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


def resolve_engine(url_or_engine: str | URL | Engine) -> tuple[Engine, bool]:
    """Return ``(engine, owned)``: a URL makes a new engine the caller owns."""
    if isinstance(url_or_engine, Engine):
        return url_or_engine, False
    if isinstance(url_or_engine, (str, URL)):
        return create_engine(url_or_engine), True
    raise TypeError(
        f"expected a database URL or a sqlalchemy Engine, got {type(url_or_engine).__name__}"
    )


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def ambient_connection(engine: Engine) -> Connection | None:
    """The connection of the innermost :func:`atomic` block on ``engine``, if any."""
    current = _ambient.get()
    if not current:
        return None
    return current.get(id(engine))


@contextmanager
def transaction(engine: Engine, *, read_only: bool = False) -> Iterator[Connection]:
    """Run statements in the ambient :func:`atomic` transaction, or in a new one.

    Inside ``atomic(engine)`` the ambient connection is yielded and nothing is
    committed here.  Outside, a short transaction is opened and committed on
    success (rolled back on error).  ``read_only`` lets SQLite start a deferred
    transaction so readers do not take the write lock.
    """
    conn = ambient_connection(engine)
    if conn is not None:
        yield conn
        return
    with engine.connect() as conn:
        if read_only and is_sqlite(engine):
            conn = conn.execution_options(sqlite_begin="DEFERRED")
        try:
            with conn.begin():
                yield conn
        except BaseException:
            conn.info.pop(_AFTER_COMMIT, None)
            raise
        _run_after_commit(conn)


@contextmanager
def atomic(engine: Engine) -> Iterator[Connection]:
    """Open one database transaction that SQL stores and brokers on ``engine`` join.

    ``SqlKvStore`` and ``SqlBroker`` built on this same ``Engine`` object run
    their statements on the yielded connection, so the key-value writes and the
    messages enqueued inside the block commit together, or, when the block
    raises, none of them exists.  Nested blocks use savepoints.  The transaction
    belongs to the current thread (or asyncio task); other threads are not
    affected.

    Example::

        with atomic(engine):
            kv.set(("posts", pid), post)
            deliver.send(pid)
    """
    if not isinstance(engine, Engine):
        raise TypeError(f"atomic() needs a sqlalchemy Engine, got {type(engine).__name__}")
    outer = ambient_connection(engine)
    if outer is not None:
        with outer.begin_nested():
            yield outer
        return
    current = dict(_ambient.get() or {})
    with engine.connect() as conn:
        current[id(engine)] = conn
        token = _ambient.set(current)
        try:
            with conn.begin():
                yield conn
        except BaseException:
            conn.info.pop(_AFTER_COMMIT, None)
            raise
        finally:
            _ambient.reset(token)
        _run_after_commit(conn)


_AFTER_COMMIT = "botkit_after_commit"


def on_commit(conn: Connection, callback: Callable[[], object]) -> None:
    """Run ``callback()`` once the transaction that ``conn`` is in has committed.

    Used for side effects that must only be seen for committed rows, such as
    waking consumers in this process after an enqueue.  Dropped on rollback.
    """
    conn.info.setdefault(_AFTER_COMMIT, []).append(callback)


def _run_after_commit(conn: Connection) -> None:
    for callback in conn.info.pop(_AFTER_COMMIT, []):
        callback()
