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

    Every backend gives the same answers (``docs/kv.md`` has the details):

    * **Keys** are non-empty tuples (or lists) of strings; any string is a
      legal part except one holding NUL or a lone surrogate, and a key may be
      at most 1 KiB encoded.  A bare string, a non-str part or an empty key
      raises ``TypeError``/``ValueError``.
    * **Values** are strict JSON: ``dict`` with ``str`` keys, ``list``,
      ``str``, ``int``, ``float`` (finite), ``bool``, and ``None`` only inside
      containers.  They round-trip with their JSON types and are copied in and
      out.  Anything else raises ``TypeError`` (wrong type) or ``ValueError``
      (NaN, NUL, a top-level ``None``), and nothing is written.
    * **TTLs** are seconds (``int``/``float``) or a ``timedelta``, rounded to
      the millisecond; ``0`` expires at once, ``None`` never.  Re-setting a key
      restarts its clock; setting it without a TTL removes the expiry.
      Expired entries are invisible to every method.

    Implementations are thread-safe.  Failures of the underlying database or
    server raise :class:`botkit_tasks.StoreError` with the cause chained.
    """

    def get(self, key: KvKey | Sequence[str]) -> JsonValue | None:
        """Return the value under ``key``.

        Returns:
            A fresh copy of the stored value, or ``None`` when the key is
            missing or has expired.
        """
        ...

    def set(self, key: KvKey | Sequence[str], value: JsonValue, *, ttl: Ttl = None) -> None:
        """Store ``value`` under ``key``, replacing any earlier value and expiry.

        Args:
            key: The key.
            value: A JSON value; ``None`` is refused (use :meth:`delete`).
            ttl: Time to live in seconds or as a ``timedelta``, counted from
                now; ``0`` leaves nothing stored; ``None`` (the default)
                means the entry never expires.

        Raises:
            TypeError: a key, value or ttl of the wrong type.
            ValueError: an empty key, ``None``/NaN/NUL in the value, a
                negative ttl.
        """
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
        """Atomically replace the value under ``key`` if it equals ``expected``.

        Equality is structural JSON equality with JSON types: dict key order is
        irrelevant, list order matters, ``True`` is not ``1`` and ``1`` is not
        ``1.0``.  Atomic across threads and processes: of several concurrent
        calls that expect the same value, exactly one succeeds.

        Args:
            key: The key.
            expected: The value the key must hold, or ``None`` for "absent or
                expired" (create-if-absent).
            new: The value to store, or ``None`` to delete the key.
            ttl: As for :meth:`set`, applied to ``new``; with ``0`` the swap
                succeeds but leaves nothing stored.

        Returns:
            Whether the swap happened.  ``cas(key, None, None)`` returns
            whether the key is absent.
        """
        ...

    def list(
        self,
        prefix: KvKey | Sequence[str] = (),
        *,
        start_after: KvKey | Sequence[str] | None = None,
    ) -> Iterator[tuple[KvKey, JsonValue]]:
        """Iterate over ``(key, value)`` pairs whose key starts with ``prefix``.

        Matching is element-wise (``("a",)`` matches ``("a", "b")`` but not
        ``("ab",)``), the exact key ``prefix`` is included once, ``()`` lists
        everything, and expired entries are skipped.  Pairs come in key order,
        parts compared by Unicode code point (Python's tuple order).  The
        caller may write and delete while iterating: every entry that exists
        throughout the iteration is yielded exactly once.

        ``start_after`` resumes a listing: only keys greater than it (in the
        same order) are yielded, so a page cursor is the last key of the
        previous page.  SQL and memory stores seek to it through their index.

        Raises:
            TypeError, ValueError: a malformed prefix (raised by the call
                itself, not at the first ``next()``).
        """
        ...

    def close(self) -> None:
        """Release what this store created (an engine, a client); idempotent.

        Engines and clients passed in by the caller are left open.
        """
        ...
