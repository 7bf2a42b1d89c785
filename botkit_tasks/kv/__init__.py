"""Key-value stores: one contract, three backends with identical semantics.

* :class:`MemoryKvStore` — in this process only; for tests and tools.
* :class:`SqlKvStore` — one table in SQLite (the embedded default) or
  PostgreSQL, through SQLAlchemy; joins :func:`botkit_tasks.atomic` blocks.
* :class:`RedisKvStore` — Redis or Valkey, through redis-py.

See ``docs/kv.md`` for configuration, semantics, and each backend's limits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import JsonValue, KvKey, KvStore, Ttl
from .memory import MemoryKvStore

if TYPE_CHECKING:
    from .redis import RedisKvStore
    from .sql import SqlKvStore

__all__ = [
    "JsonValue",
    "KvKey",
    "KvStore",
    "MemoryKvStore",
    "RedisKvStore",
    "SqlKvStore",
    "Ttl",
]


def __getattr__(name: str) -> Any:
    # SQLAlchemy and redis-py are imported only by the backend that needs them.
    if name == "SqlKvStore":
        from .sql import SqlKvStore

        return SqlKvStore
    if name == "RedisKvStore":
        from .redis import RedisKvStore

        return RedisKvStore
    raise AttributeError(f"module 'botkit_tasks.kv' has no attribute {name!r}")
