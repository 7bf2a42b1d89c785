"""Which database errors the broker retries, and how it reports a lost connection."""

from __future__ import annotations

import sqlalchemy as sa
from dramatiq.errors import ConnectionClosed
from sqlalchemy.engine import Engine

from .._sql import is_postgres

__all__ = ["closed", "is_transient"]


def is_transient(engine: Engine, exc: BaseException) -> bool:
    """Whether ``exc`` is a lost connection or (SQLite) a busy database."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if is_postgres(engine):
        return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError))
    text = str(exc.orig).lower()
    return isinstance(exc, sa.exc.OperationalError) and ("locked" in text or "busy" in text)


def closed(exc: BaseException) -> ConnectionClosed:
    """Dramatiq's ``ConnectionClosed`` for a database error (workers restart the consumer)."""
    return ConnectionClosed(exc)  # type: ignore[no-untyped-call]
