"""A key-value store on Redis or Valkey, through redis-py.

Layout: each entry is one Redis string, named ``key_prefix`` followed by the
packed key (every part's UTF-8 bytes, each followed by a NUL byte; see
:mod:`botkit_tasks.kv._codec`), holding the value's canonical JSON.  TTLs are
native millisecond expiries (``SET … PX``), so Redis itself makes expired
entries invisible and reclaims them.

``cas`` is a Lua script, so the comparison and the write happen atomically on
the server; ``list`` is ``SCAN … MATCH`` with the prefix glob-escaped, followed
by ``MGET`` in batches.  Only standard commands are used (``GET``, ``SET``,
``DEL``, ``MGET``, ``SCAN``, ``EVALSHA``/``EVAL``), so Valkey works as well.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import redis

from ..errors import StoreError
from ._codec import (
    decode_value,
    encode_value,
    list_bounds,
    normalize_ttl,
    pack_key,
    pack_prefix,
    unpack_key,
)
from .base import JsonValue, KvKey, Ttl

__all__ = ["DEFAULT_KEY_PREFIX", "RedisKvStore"]

#: The key prefix used when none is given.
DEFAULT_KEY_PREFIX = "botkit:"

#: ``COUNT`` hint of each ``SCAN`` call and size of each ``MGET`` batch.
LIST_BATCH_SIZE = 500

# KEYS[1]: the entry.  ARGV[1]: expected canonical JSON, "" for "absent".
# ARGV[2]: new canonical JSON, "" for "delete".  ARGV[3]: TTL in ms, "" for none.
# "" is never valid JSON, so it cannot be confused with a value.
_CAS_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if current then return 0 end
elseif current ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  if current then redis.call('DEL', KEYS[1]) end
elseif ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""

_GLOB_SPECIAL = frozenset(b"*?[]\\")


def _glob_escape(raw: bytes) -> bytes:
    """Escape Redis glob metacharacters so ``raw`` matches only itself."""
    if not _GLOB_SPECIAL.intersection(raw):
        return raw
    return b"".join(b"\\" + bytes((c,)) if c in _GLOB_SPECIAL else bytes((c,)) for c in raw)


class RedisKvStore:
    """A key-value store on a Redis or Valkey server.

    Args:
        url_or_client: A URL (``redis://``, ``rediss://`` for TLS,
            ``unix://``), for which the store creates (and on :meth:`close`
            closes) its own client, or an existing :class:`redis.Redis`
            client, with ``decode_responses`` either way, which is shared and
            never closed here.
        key_prefix: Prepended to every Redis key this store touches; the
            store reads, lists and writes nothing outside it.  Give each
            application (or test) its own.

    Raises:
        TypeError: ``url_or_client`` is neither a URL nor a Redis client, or
            ``key_prefix`` is not ``str`` or ``bytes``.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        *,
        key_prefix: str | bytes = DEFAULT_KEY_PREFIX,
    ) -> None:
        if isinstance(url_or_client, str):
            self.client: redis.Redis = redis.Redis.from_url(url_or_client)
            self._owns_client = True
        elif isinstance(url_or_client, redis.Redis):
            self.client = url_or_client
            self._owns_client = False
        else:
            raise TypeError(
                f"expected a Redis URL or a redis.Redis client, got {type(url_or_client).__name__}"
            )
        if isinstance(key_prefix, str):
            key_prefix = key_prefix.encode("utf-8")
        if not isinstance(key_prefix, bytes):
            raise TypeError(f"key_prefix must be str or bytes, got {type(key_prefix).__name__}")
        self.key_prefix: bytes = key_prefix
        self._cas = self.client.register_script(_CAS_SCRIPT)
        self._closed = False

    def _error(self, exc: Exception) -> StoreError:
        return StoreError(f"Redis key-value store (prefix {self.key_prefix!r}): {exc}")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("this RedisKvStore is closed")

    def get(self, key: KvKey | Sequence[str]) -> JsonValue | None:
        """Return the value under ``key``, or ``None`` when it is missing or expired."""
        name = self.key_prefix + pack_key(key)
        self._check_open()
        try:
            raw = self.client.get(name)
        except redis.RedisError as exc:
            raise self._error(exc) from exc
        return None if raw is None else decode_value(raw)

    def set(self, key: KvKey | Sequence[str], value: JsonValue, *, ttl: Ttl = None) -> None:
        """Store ``value`` under ``key``; ``ttl`` (seconds or timedelta) restarts the clock."""
        name = self.key_prefix + pack_key(key)
        data = encode_value(value).encode("utf-8")
        ttl_ms = normalize_ttl(ttl)
        self._check_open()
        try:
            if ttl_ms == 0:
                self.client.delete(name)
            else:
                # A plain SET also drops any earlier expiry, as it should.
                self.client.set(name, data, px=ttl_ms)
        except redis.RedisError as exc:
            raise self._error(exc) from exc

    def delete(self, key: KvKey | Sequence[str]) -> None:
        """Remove ``key``; a missing key is not an error."""
        name = self.key_prefix + pack_key(key)
        self._check_open()
        try:
            self.client.delete(name)
        except redis.RedisError as exc:
            raise self._error(exc) from exc

    def cas(
        self,
        key: KvKey | Sequence[str],
        expected: JsonValue | None,
        new: JsonValue | None,
        *,
        ttl: Ttl = None,
    ) -> bool:
        """Replace the value with ``new`` if it equals ``expected``; return whether it did.

        Runs as one Lua script on the server, so it is atomic against every
        other client.
        """
        name = self.key_prefix + pack_key(key)
        expected_data = b"" if expected is None else encode_value(expected).encode("utf-8")
        new_data = b"" if new is None else encode_value(new).encode("utf-8")
        ttl_ms = normalize_ttl(ttl)
        if ttl_ms == 0:
            new_data = b""  # swap, then leave nothing
        self._check_open()
        try:
            swapped = self._cas(
                keys=[name], args=[expected_data, new_data, b"" if ttl_ms is None else ttl_ms]
            )
        except redis.RedisError as exc:
            raise self._error(exc) from exc
        return bool(swapped)

    def list(
        self,
        prefix: KvKey | Sequence[str] = (),
        *,
        start_after: KvKey | Sequence[str] | None = None,
    ) -> Iterator[tuple[KvKey, JsonValue]]:
        """Yield live ``(key, value)`` pairs under ``prefix`` in key order.

        The matching names are collected with ``SCAN`` first (which returns
        every key that exists throughout the scan, possibly more than once),
        sorted, and their values fetched in ``MGET`` batches as the iterator
        advances; an entry deleted meanwhile is skipped.
        """
        low, _ = list_bounds(prefix, start_after)  # validated now, not at next()
        self._check_open()
        return self._iter(self.key_prefix + pack_prefix(prefix), self.key_prefix + low)

    def _iter(self, start: bytes, low: bytes) -> Iterator[tuple[KvKey, JsonValue]]:
        strip = len(self.key_prefix)
        names: set[bytes] = set()
        try:
            for name in self.client.scan_iter(
                match=_glob_escape(start) + b"*", count=LIST_BATCH_SIZE
            ):
                names.add(name.encode("utf-8") if isinstance(name, str) else name)
        except redis.RedisError as exc:
            raise self._error(exc) from exc
        # SCAN has no order, so resuming after a key still scans the prefix.
        ordered = sorted(name for name in names if name >= low)
        for i in range(0, len(ordered), LIST_BATCH_SIZE):
            batch = ordered[i : i + LIST_BATCH_SIZE]
            try:
                values: list[Any] = self.client.mget(batch)
            except redis.RedisError as exc:
                raise self._error(exc) from exc
            for name, raw in zip(batch, values, strict=True):
                if raw is not None:
                    yield unpack_key(name[strip:]), decode_value(raw)

    def close(self) -> None:
        """Close the client if this store created it; idempotent.

        A client passed in is left open: its owner closes it.
        """
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self.client.close()

    def __repr__(self) -> str:
        return f"RedisKvStore({self.client!r}, key_prefix={self.key_prefix!r})"
