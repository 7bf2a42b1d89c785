"""An in-process key-value store, for tests and single-process tools."""

from __future__ import annotations

import bisect
import heapq
import threading
import time
from collections.abc import Iterator, Sequence

from ._codec import (
    decode_value,
    encode_value,
    list_bounds,
    normalize_ttl,
    pack_key,
    unpack_key,
)
from .base import JsonValue, KvKey, Ttl

__all__ = ["MemoryKvStore"]

#: How many entries :meth:`MemoryKvStore.list` copies out per lock acquisition.
LIST_PAGE_SIZE = 500


class MemoryKvStore:
    """A thread-safe key-value store held in this process's memory.

    Same semantics as the persistent backends (see :class:`~botkit_tasks.kv.KvStore`):
    values are kept as canonical JSON text, so they are copied in and out and
    compared structurally by ``cas``.  TTLs run on the monotonic clock, so
    changing the wall clock does not expire or revive anything.  Expired entries
    are dropped as later writes come by.  Nothing is shared between processes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # packed key -> (canonical JSON, monotonic expiry in seconds or None)
        self._data: dict[bytes, tuple[str, float | None]] = {}
        # Packed keys in byte order, which is the keys' tuple order.
        self._keys: list[bytes] = []
        # (expiry, packed key) of entries written with a TTL; may hold stale pairs.
        self._expiries: list[tuple[float, bytes]] = []

    def _live(self, packed: bytes, now: float) -> str | None:
        entry = self._data.get(packed)
        if entry is None:
            return None
        text, expires = entry
        if expires is not None and expires <= now:
            return None
        return text

    def _put(self, packed: bytes, text: str, ttl_ms: int | None, now: float) -> None:
        if ttl_ms == 0:
            self._remove(packed)
            return
        expires = None if ttl_ms is None else now + ttl_ms / 1000
        if packed not in self._data:
            bisect.insort(self._keys, packed)
        self._data[packed] = (text, expires)
        if expires is not None:
            heapq.heappush(self._expiries, (expires, packed))
            # Re-setting keys leaves stale pairs behind; keep the heap near the data's size.
            if len(self._expiries) > 2 * len(self._data) + 64:
                self._expiries = [(exp, k) for k, (_, exp) in self._data.items() if exp is not None]
                heapq.heapify(self._expiries)

    def _remove(self, packed: bytes) -> None:
        if self._data.pop(packed, None) is not None:
            del self._keys[bisect.bisect_left(self._keys, packed)]

    def _reclaim(self, now: float) -> None:
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires, packed = heapq.heappop(heap)
            entry = self._data.get(packed)
            # A later set() may have moved or removed the expiry.
            if entry is not None and entry[1] == expires:
                self._remove(packed)

    def get(self, key: KvKey | Sequence[str]) -> JsonValue | None:
        """Return the value under ``key``, or ``None`` when it is missing or expired."""
        packed = pack_key(key)
        with self._lock:
            text = self._live(packed, time.monotonic())
        return None if text is None else decode_value(text)

    def set(self, key: KvKey | Sequence[str], value: JsonValue, *, ttl: Ttl = None) -> None:
        """Store ``value`` under ``key``; ``ttl`` (seconds or timedelta) restarts the clock."""
        packed = pack_key(key)
        text = encode_value(value)
        ttl_ms = normalize_ttl(ttl)
        with self._lock:
            now = time.monotonic()
            self._reclaim(now)
            self._put(packed, text, ttl_ms, now)

    def delete(self, key: KvKey | Sequence[str]) -> None:
        """Remove ``key``; a missing key is not an error."""
        packed = pack_key(key)
        with self._lock:
            self._reclaim(time.monotonic())
            self._remove(packed)

    def cas(
        self,
        key: KvKey | Sequence[str],
        expected: JsonValue | None,
        new: JsonValue | None,
        *,
        ttl: Ttl = None,
    ) -> bool:
        """Replace the value with ``new`` if it equals ``expected``; return whether it did."""
        packed = pack_key(key)
        expected_text = None if expected is None else encode_value(expected)
        new_text = None if new is None else encode_value(new)
        ttl_ms = normalize_ttl(ttl)
        with self._lock:
            now = time.monotonic()
            self._reclaim(now)
            if self._live(packed, now) != expected_text:
                return False
            if new_text is None:
                self._remove(packed)
            else:
                self._put(packed, new_text, ttl_ms, now)
            return True

    def list(
        self,
        prefix: KvKey | Sequence[str] = (),
        *,
        start_after: KvKey | Sequence[str] | None = None,
    ) -> Iterator[tuple[KvKey, JsonValue]]:
        """Yield live ``(key, value)`` pairs under ``prefix`` in key order.

        Entries are read in pages past the last key yielded, so writes made
        while iterating never cause an entry that exists throughout to be
        skipped or repeated.
        """
        low, high = list_bounds(prefix, start_after)  # validated now, not at next()
        return self._iter(low, high)

    def _iter(self, low: bytes, high: bytes) -> Iterator[tuple[KvKey, JsonValue]]:
        inclusive = True
        while True:
            with self._lock:
                now = time.monotonic()
                keys = self._keys
                start = (bisect.bisect_left if inclusive else bisect.bisect_right)(keys, low)
                end = bisect.bisect_left(keys, high, start, min(len(keys), start + LIST_PAGE_SIZE))
                page = [(k, self._live(k, now)) for k in keys[start:end]]
            for packed, text in page:
                if text is not None:
                    yield unpack_key(packed), decode_value(text)
            if end - start < LIST_PAGE_SIZE:
                return
            low, inclusive = page[-1][0], False

    def close(self) -> None:
        """Do nothing: the data lives as long as this object (idempotent)."""
