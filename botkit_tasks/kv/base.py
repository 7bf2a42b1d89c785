"""The key-value store contract shared by every backend."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Protocol, Union, runtime_checkable

__all__ = ["JsonValue", "KvKey", "KvStore", "Ttl"]

#: A key: a non-empty tuple of strings (lists are accepted and normalised).
KvKey = tuple[str, ...]

#: A JSON value as stored: ``None`` only inside containers, never at top level.
JsonValue = Union[dict[str, "JsonValue"], list["JsonValue"], str, int, float, bool, None]  # noqa: UP007 (evaluated at runtime on 3.10)

#: A time to live: seconds, or a ``timedelta``; ``None`` means no expiry.
Ttl = Union[float, int, timedelta, None]  # noqa: UP007


@runtime_checkable
class KvStore(Protocol):
    """A key-value store with TTLs, compare-and-swap and ordered prefix listing.

    Every backend gives the same answers; see ``docs/kv.md`` for the semantics.
    """

    def get(self, key: KvKey | Sequence[str]) -> JsonValue | None:
        """Return the value under ``key``, or ``None`` when missing or expired."""
        ...

    def set(self, key: KvKey | Sequence[str], value: JsonValue, *, ttl: Ttl = None) -> None:
        """Store ``value`` under ``key``; ``ttl`` (seconds or timedelta) restarts the clock."""
        ...

    def delete(self, key: KvKey | Sequence[str]) -> None:
        """Remove ``key``; deleting a missing key is not an error."""
        ...

    def cas(
        self,
        key: KvKey | Sequence[str],
        expected: JsonValue | None,
        new: JsonValue | None,
        *,
        ttl: Ttl = None,
    ) -> bool:
        """Atomically replace the value if it equals ``expected``; return whether it did.

        ``expected=None`` means "absent or expired"; ``new=None`` deletes.
        """
        ...

    def list(self, prefix: KvKey | Sequence[str] = ()) -> Iterator[tuple[KvKey, JsonValue]]:
        """Yield ``(key, value)`` for keys starting element-wise with ``prefix``, in key order."""
        ...

    def close(self) -> None:
        """Release resources this store created; idempotent."""
        ...
