"""A key-value store in one SQL table, on PostgreSQL or SQLite, through SQLAlchemy.

Schema (``table_name`` defaults to :data:`DEFAULT_TABLE_NAME`)::

    key        BYTEA / BLOB  PRIMARY KEY   -- packed key, see botkit_tasks.kv._codec
    value      TEXT          NOT NULL      -- canonical JSON
    expires_at BIGINT        NULL          -- epoch milliseconds, database clock
    INDEX {table_name}_expires_at ON (expires_at) WHERE expires_at IS NOT NULL

Why these types:

* Packed keys compare byte-wise exactly as Python compares the key tuples, on
  both databases and whatever the collation, so ``list(prefix)`` is a primary-key
  range scan (no ``LIKE``, nothing to escape) already in code point order.
* ``TEXT`` keeps the JSON exactly as written: ``jsonb`` would print ``1e300``
  back as an integer and reorder nothing we need.  ``cas`` compares the stored
  canonical text with the expected canonical text, which is structural JSON
  equality with types (``true`` is not ``1``).
* Expiry times come from the database clock (``statement_timestamp()`` on
  PostgreSQL, ``julianday('now')`` on SQLite), so application hosts with skewed
  clocks agree on what has expired.  Expired rows are invisible to every read;
  about one write in :data:`RECLAIM_EVERY` also deletes up to
  :data:`RECLAIM_BATCH` expired rows, which keeps a table that is written to
  from filling up without a sweeper process.

Every operation is a single atomic statement (``cas`` included: an upsert or
update guarded by the expected value).  Where it runs:

* **Inside** :func:`botkit_tasks.atomic` on the same engine (and for the first
  operation, which creates the table), on the block's connection through
  :func:`botkit_tasks._sql.transaction`, so it commits or rolls back with the
  block.
* **Outside**, in autocommit on a connection that the current thread keeps
  for this store (persistent connections, as in Django).  Taking a pooled
  connection costs a checkout, ``BEGIN``/``COMMIT``, a reset on return and, on
  PostgreSQL, a pre-ping round trip — several times the statement itself — and
  a single statement in autocommit is just as atomic.  These connections are
  not taken from the engine's pool (whose size is meant for transactions, not
  for one idle connection per thread of a 40-thread web server): they are
  opened the way the pool opens its own, so they carry the URL, the engine's
  ``connect_args``, its ``do_connect`` hooks and ``connect`` event listeners
  (SQLite pragmas, session settings such as ``search_path``), but the pool
  never counts, pings, resets or hands them out.  A thread's connection is
  closed when the thread ends, and all of them by :meth:`SqlKvStore.close`.
  A child process never uses (nor closes) a connection of its parent: it
  opens its own.  On PostgreSQL, a connection the server has closed (restart,
  ``pg_terminate_backend``, idle timeout) is noticed before use by a
  non-blocking poll of its socket and replaced; a disconnection detected while
  a statement runs is retried once on a new connection for ``get``, ``set``,
  ``delete``, ``list`` and the read-only ``cas(k, None, None)``, but not for a
  swapping ``cas``, whose outcome is then unknown (:class:`StoreError`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import select
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool.base import _ConnectionRecord

from .._sql import (
    ambient_connection,
    on_commit,
    prepare_sqlite_connection,
    resolve_engine,
    transaction,
)
from ..errors import ConfigurationError, StoreError
from ._codec import (
    decode_value,
    encode_value,
    list_bounds,
    normalize_ttl,
    pack_key,
)
from .base import JsonValue, KvKey, Ttl

# A private generator: jitter must not consume or reseed the application's
# global random state (tests and users may seed it).
_random = random.Random()

__all__ = ["DEFAULT_TABLE_NAME", "SqlKvStore"]

#: The table used when none is given.
DEFAULT_TABLE_NAME = "botkit_kv"

#: Rows fetched per round trip by :meth:`SqlKvStore.list`.
LIST_PAGE_SIZE = 500

#: One write in this many (on average) also deletes expired rows.
RECLAIM_EVERY = 32

#: At most this many expired rows are deleted at a time.
RECLAIM_BATCH = 200

# Postgres identifiers are at most 63 bytes, and the index name adds 11.
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,50}")

_NOW = {
    # statement_timestamp() is STABLE (clock_timestamp() is volatile), so the
    # planner can use it as an index bound on expires_at; and unlike now() it
    # keeps moving inside a long atomic() transaction.
    "postgresql": "(extract(epoch from statement_timestamp()) * 1000)::bigint",
    # 2440587.5 is the Julian day of the Unix epoch.
    "sqlite": "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
}

# Drivers whose parameter style the statements are written in.
_DRIVERS = {("postgresql", "psycopg"), ("postgresql", "psycopg2"), ("sqlite", "pysqlite")}

# Pools whose connections are not interchangeable (an in-memory SQLite database
# lives in its one connection): stores on them always use the pool.
_SHARED_CONNECTION_POOLS = (sa.pool.StaticPool, sa.pool.SingletonThreadPool, sa.pool.AssertionPool)

# What an operation reads back from its statement.
_NOTHING, _ROW, _ROWS, _ROWCOUNT = range(4)

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


def _run(cursor: Any, sql: str, params: dict[str, Any], result: int) -> Any:
    """Execute one statement on a driver cursor and read back ``result``."""
    cursor.execute(sql, params)
    if result == _ROW:
        return cursor.fetchone()
    if result == _ROWS:
        return cursor.fetchall()
    return cursor.rowcount if result == _ROWCOUNT else None


class _Slot:
    """A thread's own connection for one store, with its cached cursor."""

    __slots__ = ("__weakref__", "connection", "cursor", "generation", "poll", "release")

    def __init__(self, connection: Any, cursor: Any, poll: Any) -> None:
        self.connection = connection
        self.cursor = cursor
        #: ``select.poll`` on the socket (PostgreSQL), ``None`` for SQLite.
        self.poll = poll
        self.generation = _generation
        self.release: weakref.finalize[Any, Any] | None = None


class _ThreadSlots(threading.local):
    slot: _Slot | None = None


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


class SqlKvStore:
    """A key-value store in one table of a PostgreSQL or SQLite database.

    Args:
        url_or_engine: A database URL (``postgresql://…``, ``sqlite:///path``),
            for which the store creates (and on :meth:`close` disposes) its own
            engine, or an existing :class:`~sqlalchemy.engine.Engine`, which is
            shared and never disposed here.  Pass the same engine to
            :func:`botkit_tasks.atomic` to make writes part of a transaction.
        table_name: The table holding the data: letters, digits and
            underscores, at most 51 characters.
        create_table: Create the table (and its index) at first use if it
            does not exist.  Safe when several processes do it at once.  With
            ``False`` a missing table is a :class:`StoreError` at first use.

    Outside an :func:`~botkit_tasks.atomic` block each thread that uses the
    store keeps one database connection of its own, opened like the engine's
    pooled ones but outside the pool, closed when the thread ends or the store
    is closed (see the module documentation).

    Raises:
        ConfigurationError: a malformed URL, an unsupported database, or an
            invalid ``table_name``.
    """

    def __init__(
        self,
        url_or_engine: str | URL | Engine,
        *,
        table_name: str = DEFAULT_TABLE_NAME,
        create_table: bool = True,
    ) -> None:
        if not isinstance(table_name, str) or not _TABLE_NAME.fullmatch(table_name):
            raise ConfigurationError(
                f"table_name must be letters, digits and underscores (at most 51), "
                f"not starting with a digit: {table_name!r}"
            )
        if isinstance(url_or_engine, (str, URL)) and _is_sqlite_memory(url_or_engine):
            # Every pooled connection would get a database of its own.
            raise ConfigurationError(
                "an in-memory SQLite URL gives each connection its own database: "
                "use a file (sqlite:///bot.sqlite3) or MemoryKvStore"
            )
        engine, self._owns_engine = resolve_engine(url_or_engine)
        if (engine.dialect.name, engine.dialect.driver) not in _DRIVERS:
            raise ConfigurationError(
                "SqlKvStore supports PostgreSQL through psycopg (3 or 2) and SQLite "
                f"through sqlite3, not {engine.dialect.name}+{engine.dialect.driver}"
            )
        self.engine: Engine = engine
        self.table_name: str = table_name
        self._create_table = create_table
        self._ready = False
        self._ready_lock = threading.Lock()
        self._closed = False
        self._sql = _statements(engine, table_name)
        self._reclaim_params = {"n": RECLAIM_BATCH}
        self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._sqlite = engine.dialect.name == "sqlite"
        # Own per-thread connections, unless the pool's connections are not
        # interchangeable (an in-memory SQLite database given as an engine).
        self._own_connections = not isinstance(engine.pool, _SHARED_CONNECTION_POOLS) and not (
            self._sqlite and _is_sqlite_memory(engine.url)
        )
        self._threads = _ThreadSlots()
        # Release callbacks of the open per-thread connections, by a serial number.
        self._slots: dict[int, weakref.finalize[Any, Any]] = {}
        self._slots_lock = threading.Lock()
        self._serial = itertools.count()

    # -- plumbing ---------------------------------------------------------------

    def _execute(
        self,
        sql: str,
        params: dict[str, Any],
        result: int,
        *,
        write: bool = False,
        idempotent: bool = True,
    ) -> Any:
        """Run one operation's statement and return what ``result`` asks for.

        ``write`` operations first reclaim expired rows now and then.
        ``idempotent`` operations are run again, once, on a new connection
        when the connection turns out to be lost while they run.
        """
        if self._closed:
            raise StoreError("this SqlKvStore is closed")
        if (
            not self._ready
            or not self._own_connections
            or ambient_connection(self.engine) is not None
        ):
            return self._execute_in_transaction(sql, params, result, write)
        slot = self._threads.slot
        if slot is None or slot.generation != _generation or (slot.poll and slot.poll.poll(0)):
            # No connection yet in this thread, one inherited from the parent
            # process, or one the server has closed or written to unasked
            # (PostgreSQL sends a FATAL message before closing a session).
            slot = self._connect(slot)
        sent = False
        try:
            if write:
                self._maybe_reclaim(slot.cursor)
            sent = True
            return _run(slot.cursor, sql, params, result)
        except self._driver_error as exc:
            wrapped = self._wrap(exc, sql, params)
            if not self._is_disconnect(exc, slot):
                raise self._error(wrapped) from wrapped
            self._drop(slot)
            if sent and not idempotent:
                # The server may or may not have run it: a second swap could
                # report failure for a swap that happened.
                note = "connection lost; whether it swapped is unknown"
                raise self._error(wrapped, note) from wrapped
        except BaseException:
            # Interrupted (KeyboardInterrupt, ...) mid-statement: the connection
            # may be in any state, so it is not used again.
            self._drop(slot)
            raise
        # Lost before anything was sent, or harmless to do twice: once more.
        slot = self._connect(None)
        try:
            return _run(slot.cursor, sql, params, result)
        except self._driver_error as exc:
            if self._is_disconnect(exc, slot):
                self._drop(slot)
            wrapped = self._wrap(exc, sql, params)
            raise self._error(wrapped) from wrapped
        except BaseException:
            self._drop(slot)
            raise

    def _execute_in_transaction(
        self, sql: str, params: dict[str, Any], result: int, write: bool
    ) -> Any:
        """Run the statement through :func:`transaction` (the ambient one, if any)."""
        try:
            with transaction(self.engine, read_only=not write and self._ready) as conn:
                if not self._ready:
                    with self._ready_lock:
                        self._prepare(conn)
                # The driver's own cursor: the statements are plain SQL in its
                # parameter style, and SQLAlchemy's per-statement machinery
                # would cost more than the statement.
                cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                try:
                    if write:
                        self._maybe_reclaim(cursor)
                    return _run(cursor, sql, params, result)
                finally:
                    cursor.close()
        except (sa.exc.DBAPIError, self._driver_error) as exc:
            wrapped = self._wrap(exc, sql, params)
            raise self._error(wrapped) from wrapped

    def _maybe_reclaim(self, cursor: Any) -> None:
        if _random.random() * RECLAIM_EVERY < 1:
            cursor.execute(self._sql["reclaim"], self._reclaim_params)

    def _is_disconnect(self, exc: Exception, slot: _Slot) -> bool:
        dialect = self.engine.dialect
        return dialect.is_disconnect(exc, slot.connection, slot.cursor)  # type: ignore[arg-type]

    def _wrap(self, exc: Exception, sql: str, params: dict[str, Any]) -> sa.exc.DBAPIError:
        """SQLAlchemy's wrapper of a driver error, as the pooled path raises it.

        So that every path gives the same chain: :class:`StoreError` <-
        ``sqlalchemy.exc.DBAPIError`` (``OperationalError``, ...) <- the
        driver's exception.
        """
        if isinstance(exc, sa.exc.DBAPIError):
            return exc
        wrapped = sa.exc.DBAPIError.instance(
            sql, params, exc, self._driver_error, hide_parameters=True, dialect=self.engine.dialect
        )
        wrapped.__cause__ = exc
        return cast("sa.exc.DBAPIError", wrapped)

    def _error(self, exc: sa.exc.DBAPIError, note: str = "") -> StoreError:
        return StoreError(
            f"{self.engine.dialect.name} key-value table {self.table_name!r}: "
            f"{str(exc.orig).strip()}" + (f" ({note})" if note else "")
        )

    def _connect(self, stale: _Slot | None) -> _Slot:
        """Replace the current thread's connection (``stale``, if any) with a new one."""
        if stale is not None:
            self._drop(stale)
        # The pool's own way of opening a connection (creator, connect_args,
        # do_connect and connect events), without the pool's bookkeeping: the
        # pool neither counts nor ever sees it.
        try:
            record = _ConnectionRecord(self.engine.pool)
        except (sa.exc.DBAPIError, self._driver_error) as exc:
            wrapped = self._wrap(exc, "connect", {})
            raise self._error(wrapped) from wrapped
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
            slot = _Slot(connection, connection.cursor(), poll)
        except BaseException as exc:
            record.close()
            if isinstance(exc, self._driver_error):
                wrapped = self._wrap(exc, "connect", {})
                raise self._error(wrapped) from wrapped
            raise
        key = next(self._serial)
        release = weakref.finalize(slot, _release, record, os.getpid(), self._slots, key)
        slot.release = release
        with self._slots_lock:
            closed = self._closed
            if not closed:
                self._slots[key] = release
        if closed:
            release()
            raise StoreError("this SqlKvStore is closed")
        self._threads.slot = slot
        return slot

    def _drop(self, slot: _Slot) -> None:
        """Close the current thread's connection ``slot`` (abandon it after a fork)."""
        if self._threads.slot is slot:
            self._threads.slot = None
        if slot.release is not None:
            slot.release()

    def _prepare(self, conn: Connection) -> None:
        """Create or check the table once, in the transaction ``conn`` is in."""
        sql = self._sql
        if self._create_table:
            for statement in sql["ddl"]:
                conn.exec_driver_sql(statement)
        elif not sa.inspect(conn).has_table(self.table_name):
            raise StoreError(
                f"table {self.table_name!r} does not exist (create_table=False): "
                f"create it, or construct SqlKvStore with create_table=True"
            )

        def ready() -> None:
            self._ready = True

        # Only once committed: inside an atomic() block that rolls back, the
        # table is gone again.
        on_commit(conn, ready)

    # -- KvStore ----------------------------------------------------------------

    def get(self, key: KvKey | Sequence[str]) -> JsonValue | None:
        """Return the value under ``key``, or ``None`` when it is missing or expired."""
        row = self._execute(self._sql["get"], {"k": pack_key(key)}, _ROW)
        return None if row is None else decode_value(row[0])

    def set(self, key: KvKey | Sequence[str], value: JsonValue, *, ttl: Ttl = None) -> None:
        """Store ``value`` under ``key``; ``ttl`` (seconds or timedelta) restarts the clock."""
        packed = pack_key(key)
        text = encode_value(value)
        ttl_ms = normalize_ttl(ttl)
        if ttl_ms == 0:
            self._execute(self._sql["delete"], {"k": packed}, _NOTHING, write=True)
        else:
            params = {"k": packed, "v": text, "ttl": ttl_ms}
            self._execute(self._sql["set"], params, _NOTHING, write=True)

    def delete(self, key: KvKey | Sequence[str]) -> None:
        """Remove ``key``; a missing key is not an error."""
        self._execute(self._sql["delete"], {"k": pack_key(key)}, _NOTHING, write=True)

    def cas(
        self,
        key: KvKey | Sequence[str],
        expected: JsonValue | None,
        new: JsonValue | None,
        *,
        ttl: Ttl = None,
    ) -> bool:
        """Replace the value with ``new`` if it equals ``expected``; return whether it did.

        One statement does the comparison and the write, so concurrent callers
        in any number of processes see exactly one winner.

        Raises:
            StoreError: among other database failures, when the connection was
                lost while the statement ran, so whether it swapped is unknown.
        """
        packed = pack_key(key)
        expected_text = None if expected is None else encode_value(expected)
        new_text = None if new is None else encode_value(new)
        ttl_ms = normalize_ttl(ttl)
        if ttl_ms == 0:
            new_text = None  # swap, then leave nothing
        sql = self._sql
        params: dict[str, Any]
        if expected_text is None and new_text is None:
            # Nothing to write: succeed exactly when there is no live value.
            return self._execute(sql["get"], {"k": packed}, _ROW) is None
        if expected_text is None:
            stmt, params = sql["cas_create"], {"k": packed, "v": new_text, "ttl": ttl_ms}
        elif new_text is None:
            stmt, params = sql["cas_delete"], {"k": packed, "e": expected_text}
        else:
            stmt = sql["cas_update"]
            params = {"k": packed, "e": expected_text, "v": new_text, "ttl": ttl_ms}
        count = self._execute(stmt, params, _ROWCOUNT, write=True, idempotent=False)
        return bool(count == 1)

    def list(
        self,
        prefix: KvKey | Sequence[str] = (),
        *,
        start_after: KvKey | Sequence[str] | None = None,
    ) -> Iterator[tuple[KvKey, JsonValue]]:
        """Yield live ``(key, value)`` pairs under ``prefix`` in key order.

        Rows are read in pages of :data:`LIST_PAGE_SIZE`, each a short read
        starting after the last key yielded (keyset pagination), so writes
        made while iterating never cause an entry that exists throughout to be
        skipped or repeated.
        """
        low, high = list_bounds(prefix, start_after)  # validated now, not at next()
        return self._iter(low, high)

    def _iter(self, low: bytes, high: bytes) -> Iterator[tuple[KvKey, JsonValue]]:
        sql = self._sql["list"]
        while True:
            page = self._execute(sql, {"lo": low, "hi": high, "n": LIST_PAGE_SIZE}, _ROWS)
            for packed, text in page:
                # unpack_key, inlined: this loop is most of a list()'s cost.
                yield tuple(bytes(packed)[:-1].decode().split("\x00")), decode_value(text)
            if len(page) < LIST_PAGE_SIZE:
                return
            # The smallest byte string after the last key.
            low = bytes(page[-1][0]) + b"\x00"

    def close(self) -> None:
        """Close this store's connections and, if it created it, dispose of the engine.

        Idempotent.  An engine passed in is left alone: its owner disposes of
        it.  Threads still using the store get :class:`StoreError` afterwards.
        """
        with self._slots_lock:
            if self._closed:
                return
            self._closed = True
            releases = list(self._slots.values())
        for release in releases:
            release()
        if self._owns_engine:
            self.engine.dispose()

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"SqlKvStore({url!r}, table_name={self.table_name!r})"


def _is_sqlite_memory(url: str | URL) -> bool:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return False  # resolve_engine reports malformed URLs
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def _statements(engine: Engine, table_name: str) -> dict[str, Any]:
    """The SQL text of every operation, in the driver's own parameter style."""
    dialect = engine.dialect.name
    quote = engine.dialect.identifier_preparer.quote
    t = quote(table_name)
    index = quote(f"{table_name}_expires_at")
    now = _NOW[dialect]
    live = f"(expires_at IS NULL OR expires_at > {now})"
    if dialect == "postgresql":
        ddl = [
            # Serialise concurrent creators: CREATE ... IF NOT EXISTS alone can
            # still fail with a unique violation in the system catalogs.
            f"SELECT pg_advisory_xact_lock(hashtext('botkit_tasks.kv:' || '{table_name}'))",
            f"CREATE TABLE IF NOT EXISTS {t} ("
            "key bytea PRIMARY KEY, value text NOT NULL, expires_at bigint)",
        ]
        skip_locked = " FOR UPDATE SKIP LOCKED"
    else:
        ddl = [
            f"CREATE TABLE IF NOT EXISTS {t} ("
            "key BLOB PRIMARY KEY NOT NULL, value TEXT NOT NULL, expires_at INTEGER) "
            "WITHOUT ROWID",
        ]
        skip_locked = ""
    ddl.append(
        f"CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at) WHERE expires_at IS NOT NULL"
    )
    upsert = (
        f"INSERT INTO {t} (key, value, expires_at) VALUES (:k, :v, {now} + :ttl) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
    )
    statements = {
        "get": f"SELECT value FROM {t} WHERE key = :k AND {live}",
        "set": upsert,
        "delete": f"DELETE FROM {t} WHERE key = :k",
        # The conflict branch only overwrites a row that has expired, so this
        # inserts exactly when no live value exists, atomically.
        "cas_create": upsert + f" WHERE {t}.expires_at IS NOT NULL AND {t}.expires_at <= {now}",
        "cas_update": f"UPDATE {t} SET value = :v, expires_at = {now} + :ttl "
        f"WHERE key = :k AND value = :e AND {live}",
        "cas_delete": f"DELETE FROM {t} WHERE key = :k AND value = :e AND {live}",
        "list": f"SELECT key, value FROM {t} WHERE key >= :lo AND key < :hi AND {live} "
        "ORDER BY key LIMIT :n",
        "reclaim": f"DELETE FROM {t} WHERE key IN (SELECT key FROM {t} "
        f"WHERE expires_at <= {now} LIMIT :n{skip_locked})",
        "ddl": ddl,
    }
    if engine.dialect.paramstyle == "pyformat":
        named = re.compile(r"(?<!:):(\w+)")
        for name, text in statements.items():
            if isinstance(text, str):
                statements[name] = named.sub(r"%(\1)s", text)
    return statements
