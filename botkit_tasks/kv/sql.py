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
  for this store, outside the engine's pool
  (:mod:`botkit_tasks.kv._thread_connections` says why and how).  On
  PostgreSQL, a connection the server has closed (restart,
  ``pg_terminate_backend``, idle timeout) is noticed before use by a
  non-blocking poll of its socket and replaced; a disconnection detected while
  a statement runs is retried once on a new connection for ``get``, ``set``,
  ``delete``, ``list`` and the read-only ``cas(k, None, None)``, but not for a
  swapping ``cas``, whose outcome is then unknown (:class:`StoreError`).
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from .._sql import (
    ambient_connection,
    on_commit,
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
from ._sql_statements import is_sqlite_memory, statements
from ._thread_connections import (
    NOTHING,
    ROW,
    ROWCOUNT,
    ROWS,
    Slot,
    ThreadConnections,
    run_statement,
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

# Drivers whose parameter style the statements are written in.
_DRIVERS = {("postgresql", "psycopg"), ("postgresql", "psycopg2"), ("sqlite", "pysqlite")}

# Pools whose connections are not interchangeable (an in-memory SQLite database
# lives in its one connection): stores on them always use the pool.
_SHARED_CONNECTION_POOLS = (sa.pool.StaticPool, sa.pool.SingletonThreadPool, sa.pool.AssertionPool)


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
        if isinstance(url_or_engine, (str, URL)) and is_sqlite_memory(url_or_engine):
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
        self._sql = statements(engine, table_name)
        self._reclaim_params = {"n": RECLAIM_BATCH}
        self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._sqlite = engine.dialect.name == "sqlite"
        # Own per-thread connections, unless the pool's connections are not
        # interchangeable (an in-memory SQLite database given as an engine).
        self._own_connections = not isinstance(engine.pool, _SHARED_CONNECTION_POOLS) and not (
            self._sqlite and is_sqlite_memory(engine.url)
        )
        self._connections = ThreadConnections(
            engine, lambda exc: self._error(self._wrap(exc, "connect", {}))
        )

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
        if self._connections.closed:
            raise StoreError("this SqlKvStore is closed")
        if (
            not self._ready
            or not self._own_connections
            or ambient_connection(self.engine) is not None
        ):
            return self._execute_in_transaction(sql, params, result, write)
        # No connection yet in this thread, one inherited from the parent
        # process, or one the server has closed: a new one.
        slot = self._connections.current()
        sent = False
        try:
            if write:
                self._maybe_reclaim(slot.cursor)
            sent = True
            return run_statement(slot.cursor, sql, params, result)
        except self._driver_error as exc:
            wrapped = self._wrap(exc, sql, params)
            if not self._is_disconnect(exc, slot):
                raise self._error(wrapped) from wrapped
            self._connections.drop(slot)
            if sent and not idempotent:
                # The server may or may not have run it: a second swap could
                # report failure for a swap that happened.
                note = "connection lost; whether it swapped is unknown"
                raise self._error(wrapped, note) from wrapped
        except BaseException:
            # Interrupted (KeyboardInterrupt, ...) mid-statement: the connection
            # may be in any state, so it is not used again.
            self._connections.drop(slot)
            raise
        # Lost before anything was sent, or harmless to do twice: once more.
        slot = self._connections.connect(None)
        try:
            return run_statement(slot.cursor, sql, params, result)
        except self._driver_error as exc:
            if self._is_disconnect(exc, slot):
                self._connections.drop(slot)
            wrapped = self._wrap(exc, sql, params)
            raise self._error(wrapped) from wrapped
        except BaseException:
            self._connections.drop(slot)
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
                    return run_statement(cursor, sql, params, result)
                finally:
                    cursor.close()
        except (sa.exc.DBAPIError, self._driver_error) as exc:
            wrapped = self._wrap(exc, sql, params)
            raise self._error(wrapped) from wrapped

    def _maybe_reclaim(self, cursor: Any) -> None:
        if _random.random() * RECLAIM_EVERY < 1:
            cursor.execute(self._sql["reclaim"], self._reclaim_params)

    def _is_disconnect(self, exc: Exception, slot: Slot) -> bool:
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
        row = self._execute(self._sql["get"], {"k": pack_key(key)}, ROW)
        return None if row is None else decode_value(row[0])

    def set(self, key: KvKey | Sequence[str], value: JsonValue, *, ttl: Ttl = None) -> None:
        """Store ``value`` under ``key``; ``ttl`` (seconds or timedelta) restarts the clock."""
        packed = pack_key(key)
        text = encode_value(value)
        ttl_ms = normalize_ttl(ttl)
        if ttl_ms == 0:
            self._execute(self._sql["delete"], {"k": packed}, NOTHING, write=True)
        else:
            params = {"k": packed, "v": text, "ttl": ttl_ms}
            self._execute(self._sql["set"], params, NOTHING, write=True)

    def delete(self, key: KvKey | Sequence[str]) -> None:
        """Remove ``key``; a missing key is not an error."""
        self._execute(self._sql["delete"], {"k": pack_key(key)}, NOTHING, write=True)

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
            return self._execute(sql["get"], {"k": packed}, ROW) is None
        if expected_text is None:
            stmt, params = sql["cas_create"], {"k": packed, "v": new_text, "ttl": ttl_ms}
        elif new_text is None:
            stmt, params = sql["cas_delete"], {"k": packed, "e": expected_text}
        else:
            stmt = sql["cas_update"]
            params = {"k": packed, "e": expected_text, "v": new_text, "ttl": ttl_ms}
        count = self._execute(stmt, params, ROWCOUNT, write=True, idempotent=False)
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
            page = self._execute(sql, {"lo": low, "hi": high, "n": LIST_PAGE_SIZE}, ROWS)
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
        if not self._connections.close():
            return
        if self._owns_engine:
            self.engine.dispose()

    # The per-thread connections' bookkeeping, as tests inspect it.
    @property
    def _threads(self) -> Any:
        return self._connections.threads

    @property
    def _slots(self) -> dict[int, Any]:
        return self._connections.slots

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"SqlKvStore({url!r}, table_name={self.table_name!r})"
