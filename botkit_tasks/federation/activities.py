"""Tolerant readers for incoming ActivityStreams JSON.

Remote servers send compacted JSON-LD, and compaction is loose: a property may
hold a single value or an array, an object may be embedded or referenced by its
id, and ``type`` may be a string or a list.  These helpers read such documents
without pyld and without trusting their shape; none of them raises on odd input
except the ``require_*`` helpers, which raise :class:`MalformedActivityError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..errors import BotkitError

__all__ = [
    "MAX_ID_LENGTH",
    "PUBLIC",
    "MalformedActivityError",
    "as_list",
    "embedded",
    "first_id",
    "has_type",
    "ids",
    "is_http_url",
    "is_public",
    "mentions",
    "recipients",
    "require_actor_id",
    "types",
]

#: The public collection; compacted forms ``as:Public`` and ``Public`` mean the same.
PUBLIC = "https://www.w3.org/ns/activitystreams#Public"
_PUBLIC_ALIASES = frozenset({PUBLIC, "as:Public", "Public"})

#: Longest id (characters) we accept for an actor or activity; real ids are far shorter,
#: and the key-value store limits encoded keys to 1 KiB.
MAX_ID_LENGTH = 900

_ADDRESSING = ("to", "cc", "bto", "bcc", "audience")


class MalformedActivityError(BotkitError, ValueError):
    """An activity is structurally unusable; retrying it cannot help."""


def as_list(value: Any) -> list[Any]:
    """Return ``value`` as a list: ``None`` → ``[]``, a list as is, anything else → ``[value]``."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]


def first_id(value: Any) -> str | None:
    """Return the first id in ``value``: a string, an object's ``id`` (or a Link's ``href``).

    Arrays are searched in order; ``None`` when nothing usable is found.
    """
    for item in as_list(value):
        if isinstance(item, str):
            return item
        if isinstance(item, Mapping):
            found = item.get("id")
            if found is None:
                found = item.get("href")
            if isinstance(found, str):
                return found
    return None


def ids(value: Any) -> list[str]:
    """Return every id in ``value`` (strings and objects' ids), in order, without repeats."""
    seen: dict[str, None] = {}
    for item in as_list(value):
        found = first_id(item)
        if found is not None:
            seen.setdefault(found, None)
    return list(seen)


def embedded(value: Any) -> dict[str, Any] | None:
    """Return the first embedded object (a JSON object) in ``value``, or ``None``."""
    for item in as_list(value):
        if isinstance(item, dict):
            return item
    return None


def types(obj: Any) -> list[str]:
    """Return the ``type`` of an object as a list of strings (empty when absent or odd)."""
    if not isinstance(obj, Mapping):
        return []
    return [t for t in as_list(obj.get("type")) if isinstance(t, str)]


def has_type(obj: Any, name: str) -> bool:
    """Whether ``obj`` has ``name`` among its types."""
    return name in types(obj)


def recipients(obj: Any) -> set[str]:
    """Return the ids in ``to``, ``cc``, ``bto``, ``bcc`` and ``audience`` of ``obj``."""
    if not isinstance(obj, Mapping):
        return set()
    found: set[str] = set()
    for field in _ADDRESSING:
        found.update(ids(obj.get(field)))
    return found


def is_public(obj: Any) -> bool:
    """Whether ``obj`` is addressed to the public collection (any compacted spelling)."""
    return not _PUBLIC_ALIASES.isdisjoint(recipients(obj))


def mentions(obj: Any) -> list[str]:
    """Return the ``href`` of every ``Mention`` in the ``tag`` of ``obj``."""
    if not isinstance(obj, Mapping):
        return []
    found: list[str] = []
    for tag in as_list(obj.get("tag")):
        if has_type(tag, "Mention"):
            href = tag.get("href")
            if isinstance(href, str):
                found.append(href)
    return found


def is_http_url(value: Any) -> bool:
    """Whether ``value`` is an absolute ``http(s)`` URL no longer than :data:`MAX_ID_LENGTH`."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def require_actor_id(activity: Mapping[str, Any]) -> str:
    """Return the id of ``activity.actor``, which must be an ``http(s)`` URL.

    Raises:
        MalformedActivityError: when the actor is absent or not a usable URL.
    """
    actor_id = first_id(activity.get("actor"))
    if not is_http_url(actor_id):
        raise MalformedActivityError(f"activity has no usable actor id: {actor_id!r:.200}")
    assert actor_id is not None
    return actor_id
