"""The SQL text of :class:`~botkit_tasks.kv.sql.SqlKvStore`, per dialect and driver."""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

__all__ = ["NOW_MS", "is_sqlite_memory", "statements"]

#: The database clock in epoch milliseconds, as SQL, per dialect.
NOW_MS = {
    # statement_timestamp() is STABLE (clock_timestamp() is volatile), so the
    # planner can use it as an index bound on expires_at; and unlike now() it
    # keeps moving inside a long atomic() transaction.
    "postgresql": "(extract(epoch from statement_timestamp()) * 1000)::bigint",
    # 2440587.5 is the Julian day of the Unix epoch.
    "sqlite": "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
}


def is_sqlite_memory(url: str | URL) -> bool:
    """Whether ``url`` names an in-memory SQLite database (one per connection)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return False  # resolve_engine reports malformed URLs
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def statements(engine: Engine, table_name: str) -> dict[str, Any]:
    """The SQL text of every operation, in the driver's own parameter style."""
    dialect = engine.dialect.name
    quote = engine.dialect.identifier_preparer.quote
    t = quote(table_name)
    index = quote(f"{table_name}_expires_at")
    now = NOW_MS[dialect]
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
