"""Connection settings for PostgreSQL behind a transaction pooler (``SqlBroker(listen=False)``).

A transaction pooler such as PgBouncer in ``transaction`` mode hands each
transaction whichever server connection is free, so nothing may outlive a
transaction: no ``LISTEN``, no ``SET``, no session advisory lock, and no
server-side prepared statement (psycopg prepares a statement after it has run
it five times; the next transaction may land on a server that never saw the
``PREPARE``).  :class:`~botkit_tasks.brokers.sql.SqlBroker` avoids the first
three itself; this module turns psycopg's automatic preparation off.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine

from .._sql import is_postgres, normalize_url


def pooler_engine_options(url: str | URL, listen: bool) -> dict[str, Any]:
    """Extra ``create_engine`` arguments for an engine the broker creates itself."""
    if listen or normalize_url(url).get_backend_name() != "postgresql":
        return {}
    return {"connect_args": {"prepare_threshold": None}}


def _no_prepare(dbapi_connection: Any, *_: Any) -> None:
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if hasattr(driver, "prepare_threshold"):
        driver.prepare_threshold = None


def unprepare_connections(engine: Engine) -> None:
    """Turn psycopg's statement preparation off on every connection of ``engine``.

    For an engine the caller made: its pool may already hold connections, so
    the setting is applied at each checkout (an attribute assignment, no round
    trip) rather than only when a connection is opened.
    """
    if is_postgres(engine) and not event.contains(engine, "checkout", _no_prepare):
        event.listen(engine, "checkout", _no_prepare)
