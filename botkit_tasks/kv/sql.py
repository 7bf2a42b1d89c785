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

Every statement is a single atomic statement (``cas`` included: an upsert or
update guarded by the expected value) run through
:func:`botkit_tasks._sql.transaction`, so it joins an enclosing
:func:`botkit_tasks.atomic` block on the same engine.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

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
    normalize_ttl,
    pack_key,
    pack_prefix,
    prefix_upper_bound,
    unpack_key,
)
from .base import JsonValue, KvKey, Ttl

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

_T = TypeVar("_T")

# Drivers whose parameter style the statements are written in.
_DRIVERS = {("postgresql", "psycopg"), ("postgresql", "psycopg2"), ("sqlite", "pysqlite")}

# psycopg.pq.TransactionStatus.IDLE: connected, no transaction open.
_PG_IDLE = 0


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
        self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        # Only psycopg 3 is switched to autocommit for single statements (see _run).
        self._postgres = engine.dialect.driver == "psycopg"

    # -- plumbing ---------------------------------------------------------------

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

    def _run(self, body: Callable[[Any], _T], *, read_only: bool = False) -> _T:
        """Run ``body(cursor)`` in :func:`transaction`, converting driver errors.

        ``body`` gets a cursor of the driver itself: the statements are plain
        SQL text in the driver's parameter style, and skipping SQLAlchemy's
        per-statement execution machinery roughly halves the cost of an
        operation.  The transaction is still SQLAlchemy's, so ``atomic()``
        blocks are joined as usual.

        Outside an ``atomic()`` block on PostgreSQL, the statement runs in
        autocommit: each operation is one statement, atomic on its own, and
        this saves the ``BEGIN`` and ``COMMIT`` round trips (two of three).
        """
        if self._closed:
            raise StoreError("this SqlKvStore is closed")
        try:
            with transaction(self.engine, read_only=read_only and self._ready) as conn:
                if not self._ready:
                    with self._ready_lock:
                        self._prepare(conn)
                    autocommit = False
                else:
                    autocommit = self._postgres and ambient_connection(self.engine) is None
                dbapi: Any = conn.connection.driver_connection
                # Only on an idle connection: inside an open transaction the
                # statement must stay part of it.
                autocommit = autocommit and dbapi.info.transaction_status == _PG_IDLE
                if autocommit:
                    dbapi.autocommit = True
                cursor = dbapi.cursor()
                try:
                    return body(cursor)
                finally:
                    cursor.close()
                    if autocommit and not dbapi.closed:
                        dbapi.autocommit = False
        except (sa.exc.DBAPIError, self._driver_error) as exc:
            orig = getattr(exc, "orig", None) or exc
            raise StoreError(
                f"{self.engine.dialect.name} key-value table {self.table_name!r}: "
                f"{str(orig).strip()}"
            ) from exc

    def _reclaim(self, cursor: Any) -> None:
        if random.random() * RECLAIM_EVERY < 1:
            cursor.execute(self._sql["reclaim"], {"n": RECLAIM_BATCH})

    # -- KvStore ----------------------------------------------------------------

    def get(self, key: KvKey | Sequence[str]) -> JsonValue | None:
        """Return the value under ``key``, or ``None`` when it is missing or expired."""
        params = {"k": pack_key(key)}
        sql = self._sql["get"]

        def body(cursor: Any) -> Any:
            cursor.execute(sql, params)
            row = cursor.fetchone()
            return None if row is None else row[0]

        text = self._run(body, read_only=True)
        return None if text is None else decode_value(text)

    def set(self, key: KvKey | Sequence[str], value: JsonValue, *, ttl: Ttl = None) -> None:
        """Store ``value`` under ``key``; ``ttl`` (seconds or timedelta) restarts the clock."""
        packed = pack_key(key)
        text = encode_value(value)
        ttl_ms = normalize_ttl(ttl)
        params: dict[str, Any]
        if ttl_ms == 0:
            sql, params = self._sql["delete"], {"k": packed}
        else:
            sql, params = self._sql["set"], {"k": packed, "v": text, "ttl": ttl_ms}

        def body(cursor: Any) -> None:
            cursor.execute(sql, params)
            self._reclaim(cursor)

        self._run(body)

    def delete(self, key: KvKey | Sequence[str]) -> None:
        """Remove ``key``; a missing key is not an error."""
        params = {"k": pack_key(key)}
        sql = self._sql["delete"]

        def body(cursor: Any) -> None:
            cursor.execute(sql, params)
            self._reclaim(cursor)

        self._run(body)

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
            stmt, params = sql["get"], {"k": packed}
            absent = True
        elif expected_text is None:
            stmt, params = sql["cas_create"], {"k": packed, "v": new_text, "ttl": ttl_ms}
            absent = False
        elif new_text is None:
            stmt, params = sql["cas_delete"], {"k": packed, "e": expected_text}
            absent = False
        else:
            stmt = sql["cas_update"]
            params = {"k": packed, "e": expected_text, "v": new_text, "ttl": ttl_ms}
            absent = False

        def body(cursor: Any) -> bool:
            cursor.execute(stmt, params)
            if absent:
                return cursor.fetchone() is None
            swapped: bool = cursor.rowcount == 1
            self._reclaim(cursor)
            return swapped

        return self._run(body, read_only=absent)

    def list(self, prefix: KvKey | Sequence[str] = ()) -> Iterator[tuple[KvKey, JsonValue]]:
        """Yield live ``(key, value)`` pairs under ``prefix`` in key order.

        Rows are read in pages of :data:`LIST_PAGE_SIZE`, each a short read
        starting after the last key yielded (keyset pagination), so writes
        made while iterating never cause an entry that exists throughout to be
        skipped or repeated.
        """
        low = pack_prefix(prefix)  # validated now, not at the first next()
        return self._iter(low)

    def _iter(self, low: bytes) -> Iterator[tuple[KvKey, JsonValue]]:
        high = prefix_upper_bound(low)
        sql = self._sql["list"]
        while True:
            params = {"lo": low, "hi": high, "n": LIST_PAGE_SIZE}

            def body(cursor: Any, params: dict[str, Any] = params) -> list[Any]:
                cursor.execute(sql, params)
                return cursor.fetchall()  # type: ignore[no-any-return]

            page = self._run(body, read_only=True)
            for packed, text in page:
                yield unpack_key(bytes(packed)), decode_value(text)
            if len(page) < LIST_PAGE_SIZE:
                return
            # The smallest byte string after the last key.
            low = bytes(page[-1][0]) + b"\x00"

    def close(self) -> None:
        """Dispose of the engine if this store created it; idempotent.

        An engine passed in is left alone: its owner disposes of it.
        """
        if self._closed:
            return
        self._closed = True
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
