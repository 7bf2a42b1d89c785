"""Validation and encoding shared by every key-value backend.

Every backend stores the same two encodings, so they all give the same answers:

* **Keys** are *packed* into bytes: each part's UTF-8 bytes followed by a NUL
  terminator.  NUL is refused inside parts, and UTF-8 never produces a 0x00
  byte for any other code point, so the packing is reversible, and comparing
  packed keys byte by byte is exactly Python's tuple order with parts compared
  by code point (UTF-8 byte order is code point order).  A packed key prefix
  ``p`` selects exactly the keys that start with it element-wise, and those
  form the contiguous byte range ``[p, p[:-1] + b"\\x01")`` — an index range
  scan in SQL, a glob prefix in Redis, a bisection in memory.
* **Values** are *canonical JSON* text: keys sorted, no whitespace, non-ASCII
  kept as is.  Two values are structurally equal, JSON types included, exactly
  when their canonical texts are equal, which is what ``cas`` compares.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from .base import JsonValue, KvKey, Ttl

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_TTL_MS",
    "decode_value",
    "encode_value",
    "normalize_ttl",
    "pack_key",
    "pack_prefix",
    "prefix_upper_bound",
    "unpack_key",
]

#: Largest packed key, in bytes (parts' UTF-8 bytes plus one byte per part).
MAX_KEY_BYTES = 1024

#: Largest TTL in milliseconds (the span of ``timedelta.max``, ~2.7 million years).
MAX_TTL_MS = int(timedelta.max.total_seconds()) * 1000

#: Deepest nesting of lists and dicts accepted in a value.
MAX_DEPTH = 256

_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)

_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)

if _c_make_encoder is not None:
    # The C encoder that _encoder.encode() builds anew on every call, built
    # once: the same output for less than half the time.  No circular-reference
    # markers: _check_value has already refused anything nested deeper than
    # MAX_DEPTH, cycles included.
    _c_encode = _c_make_encoder(
        None,
        _encoder.default,
        json.encoder.encode_basestring,  # ensure_ascii=False
        None,  # no indent
        ":",
        ",",
        True,  # sort_keys
        False,  # skipkeys
        False,  # allow_nan
    )

    def _encode(value: object) -> str:
        return "".join(_c_encode(value, 0))

else:  # pragma: no cover - Python built without the _json accelerator

    def _encode(value: object) -> str:
        return _encoder.encode(value)


_raw_decode = json.JSONDecoder().raw_decode


def _pack(parts: Sequence[str], what: str) -> bytes:
    """Validate the parts of a non-empty key or prefix and pack them."""
    try:
        joined = "\x00".join(parts)
    except TypeError:
        for part in parts:
            if not isinstance(part, str):
                raise TypeError(
                    f"{what} parts must be str, got {type(part).__name__}: {part!r}"
                ) from None
        raise
    # Every NUL beyond the separators came from a part.
    if joined.count("\x00") != len(parts) - 1:
        raise ValueError(f"{what} parts must not contain NUL characters: {tuple(parts)!r}")
    try:
        packed = (joined + "\x00").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} parts must not contain lone surrogates: {tuple(parts)!r}"
        ) from exc
    if len(packed) > MAX_KEY_BYTES:
        raise ValueError(
            f"{what} is too long: {len(packed)} bytes encoded, the limit is {MAX_KEY_BYTES}"
        )
    return packed


def pack_key(key: KvKey | Sequence[str]) -> bytes:
    """Validate ``key`` and return its packed form.

    Raises:
        TypeError: ``key`` is not a tuple or list, or a part is not a ``str``.
        ValueError: ``key`` is empty, a part holds NUL or a lone surrogate, or
            the packed key is longer than :data:`MAX_KEY_BYTES`.
    """
    if type(key) is not tuple and not isinstance(key, (tuple, list)):
        raise TypeError(
            f"a key must be a tuple of str, got {type(key).__name__}: {key!r}"
            + (" (write (key,) for a one-part key)" if isinstance(key, str) else "")
        )
    if not key:
        raise ValueError("a key must have at least one part")
    return _pack(key, "key")


def pack_prefix(prefix: KvKey | Sequence[str]) -> bytes:
    """Like :func:`pack_key`, but the empty prefix is allowed (packs to ``b""``)."""
    if type(prefix) is not tuple and not isinstance(prefix, (tuple, list)):
        raise TypeError(f"a key prefix must be a tuple of str, got {type(prefix).__name__}")
    if not prefix:
        return b""
    return _pack(prefix, "key prefix")


def prefix_upper_bound(packed_prefix: bytes) -> bytes:
    """The smallest byte string above every packed key starting with ``packed_prefix``.

    For the empty prefix that is ``b"\\xff"``: no UTF-8 byte is 0xFF.
    """
    if not packed_prefix:
        return b"\xff"
    return packed_prefix[:-1] + b"\x01"


def list_bounds(
    prefix: KvKey | Sequence[str], start_after: KvKey | Sequence[str] | None
) -> tuple[bytes, bytes]:
    """Validate a ``list()`` call and return its packed range ``[low, high)``.

    ``start_after`` moves the low end just past that key (its descendants,
    which sort after it, stay in range): keyset pagination for callers.
    """
    low = pack_prefix(prefix)
    high = prefix_upper_bound(low)
    if start_after is not None:
        # A packed key ends in NUL, so key + NUL is the smallest packed string
        # above it (it would be the key with one more, empty, part).
        low = max(low, pack_key(start_after) + b"\x00")
    return low, high


def unpack_key(packed: bytes) -> KvKey:
    """Invert :func:`pack_key`."""
    return tuple(packed[:-1].decode("utf-8").split("\x00"))


# Leaves that need no check, by exact type (subclasses take the general path).
_PLAIN_LEAVES = frozenset({int, bool, type(None)})

_NUL_IN_STRING = "strings in values must not contain NUL characters"


def _check_value(value: object, depth: int) -> None:
    # Strings and plain leaves inside containers are checked inline: values are
    # mostly flat, and a call per leaf would cost more than the JSON encoding.
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(_NUL_IN_STRING)
    elif isinstance(value, (int, float)):  # bool is an int
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"JSON has no {value!r}: NaN and infinities cannot be stored")
    elif isinstance(value, dict):
        if depth >= MAX_DEPTH:
            raise ValueError(f"value nested deeper than {MAX_DEPTH} levels")
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"dict keys in values must be str (JSON objects), got {type(k).__name__}: {k!r}"
                )
            if "\x00" in k:
                raise ValueError("dict keys in values must not contain NUL characters")
            if type(v) is str:
                if "\x00" in v:
                    raise ValueError(_NUL_IN_STRING)
            elif type(v) not in _PLAIN_LEAVES:
                _check_value(v, depth + 1)
    elif isinstance(value, list):
        if depth >= MAX_DEPTH:
            raise ValueError(f"value nested deeper than {MAX_DEPTH} levels")
        for item in value:
            if type(item) is str:
                if "\x00" in item:
                    raise ValueError(_NUL_IN_STRING)
            elif type(item) not in _PLAIN_LEAVES:
                _check_value(item, depth + 1)
    else:
        raise TypeError(
            f"not a JSON value: {type(value).__name__} {value!r:.80} "
            "(use dict, list, str, int, float, bool; None only inside containers)"
        )


def encode_value(value: object) -> str:
    """Validate ``value`` and return its canonical JSON text.

    Raises:
        TypeError: something in ``value`` is not a JSON type (a tuple, a set,
            bytes, a dict with non-str keys, ...).
        ValueError: ``value`` is ``None`` at top level, holds NaN or an
            infinity, a NUL character or a lone surrogate, or an integer too
            large for Python's int/str conversion limit.
    """
    if value is None:
        raise ValueError("None cannot be stored: it means 'absent' (use delete())")
    _check_value(value, 0)
    text = _encode(value)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("strings in values must not contain lone surrogates") from exc
    return text


def decode_value(text: str | bytes) -> JsonValue:
    """Parse canonical JSON text (or its UTF-8 bytes) back into a value.

    Raises:
        ValueError: ``text`` is not one JSON value (``json.JSONDecodeError``).
    """
    if not isinstance(text, str):
        text = text.decode("utf-8")
    # raw_decode: canonical JSON has no whitespace around it to skip, and this
    # runs for every value read (every row of a list()).
    value: JsonValue
    value, end = _raw_decode(text)
    if end != len(text):
        raise json.JSONDecodeError("extra data after the JSON value", text, end)
    return value


def normalize_ttl(ttl: Ttl) -> int | None:
    """Validate ``ttl`` and return it in whole milliseconds (``None`` = no expiry).

    Raises:
        TypeError: ``ttl`` is not a number of seconds or a ``timedelta``
            (``bool`` and ``str`` are refused).
        ValueError: ``ttl`` is negative, NaN, or longer than ``timedelta.max``.
    """
    if ttl is None:
        return None
    seconds: float
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        seconds = ttl
    else:
        raise TypeError(f"ttl must be seconds (int or float) or a timedelta, got {ttl!r}")
    if seconds != seconds or seconds < 0:  # NaN compares unequal to itself
        raise ValueError(f"ttl must not be negative or NaN, got {ttl!r}")
    if seconds * 1000 > MAX_TTL_MS:
        raise ValueError(f"ttl {ttl!r} is too long (the limit is timedelta.max)")
    return round(seconds * 1000)
