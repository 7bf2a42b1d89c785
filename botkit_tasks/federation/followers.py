"""A bot's followers, one key-value entry per follower.

Each follower is stored under ``("botkit", username, "followers", actor_id)``
as ``{"id", "inbox", "sharedInbox" (when the actor announces one),
"followedAt"}``.  One entry per follower (never a growing array) keeps every
write O(1) and lets 100,000 followers be listed page by page in key order.

A counter under ``("botkit", username, "followers-count")`` answers
``count()`` without scanning; it is maintained with compare-and-swap next to
each add/remove.  Should a process die between the two writes the counter can
drift by one; ``recount()`` repairs it.

An index by inbox, one entry ``("botkit", username, "follower-inboxes",
inbox_url, actor_id)`` per inbox and shared inbox of each follower, lets
``drop_inbox()`` (a 404/410 from an inbox) read only the followers behind that
inbox, not all of them.  Index entries are written before the record and
removed after it, so every record is reachable from its inboxes; an entry
whose record is gone or has moved (a process died in between) is skipped and
deleted by the next ``drop_inbox()`` of that inbox.  Followers stored before
the index existed are indexed by ``reindex()``, which the first
``drop_inbox()`` runs once when the marker ``("botkit", username,
"follower-inboxes-built")`` is absent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from itertools import islice
from typing import Any

from botkit_tasks.kv.base import JsonValue, KvKey, KvStore

__all__ = ["Follower", "Followers"]

#: A stored follower record: ``{"id", "inbox", "sharedInbox"?, "followedAt"}``.
Follower = dict[str, JsonValue]

_MAX_CAS_ATTEMPTS = 100


class Followers:
    """The followers of one local actor, kept in a key-value store.

    Args:
        kv: Any :class:`~botkit_tasks.kv.KvStore`.
        username: The local actor's username (part of every key).
    """

    def __init__(self, kv: KvStore, username: str) -> None:
        self.kv = kv
        self.username = username
        self._prefix: KvKey = ("botkit", username, "followers")
        self._count_key: KvKey = ("botkit", username, "followers-count")
        self._index: KvKey = ("botkit", username, "follower-inboxes")
        self._indexed_key: KvKey = ("botkit", username, "follower-inboxes-built")

    def _key(self, actor_id: str) -> KvKey:
        return (*self._prefix, actor_id)

    def _index_keys(self, record: Mapping[str, Any]) -> list[KvKey]:
        return [(*self._index, inbox, str(record["id"])) for inbox in sorted(_inboxes(record))]

    def _write_index(self, record: Mapping[str, Any]) -> None:
        written: list[KvKey] = []
        try:
            for key in self._index_keys(record):
                self.kv.set(key, True)
                written.append(key)
        except (TypeError, ValueError):
            # An inbox URL too long for a key: leave nothing half-written.
            for key in written:
                self.kv.delete(key)
            raise

    def _unindex(self, record: Mapping[str, Any], keep: Mapping[str, Any] | None = None) -> None:
        kept = set(self._index_keys(keep)) if keep is not None else set()
        for key in self._index_keys(record):
            if key not in kept:
                self.kv.delete(key)

    def add(self, actor: Mapping[str, Any]) -> Follower:
        """Add or refresh a follower and return the stored record.

        Args:
            actor: Either a remote actor document (``id``, ``inbox`` and
                optionally ``endpoints.sharedInbox``) or a stored record
                (``id``, ``inbox``, optionally ``sharedInbox``/``followedAt``).

        Returns:
            The record as stored.  Re-adding an existing follower keeps its
            original ``followedAt`` and updates its inbox URLs.

        Raises:
            ValueError: ``id`` or ``inbox`` is missing or not an http(s) URL.
        """
        record = _record_from(actor)
        key = self._key(str(record["id"]))
        # The index first: a record is never stored unreachable from its inboxes.
        self._write_index(record)
        # A new follower is the common case: one round trip when it is.
        if self.kv.cas(key, None, record):
            self._bump(1)
            return record
        for _ in range(_MAX_CAS_ATTEMPTS):
            current = self.kv.get(key)
            if isinstance(current, dict) and "followedAt" in current:
                record["followedAt"] = current["followedAt"]
            if self.kv.cas(key, current, record):
                if current is None:
                    self._bump(1)
                elif isinstance(current, dict):
                    self._unindex(current, keep=record)  # the inboxes it moved away from
                return record
        raise RuntimeError(f"could not store follower {record['id']!r}: too much contention")

    def remove(self, actor_id: str) -> bool:
        """Remove a follower; return whether it was one."""
        return self._remove(actor_id, self.kv.get(self._key(actor_id)))

    def _remove(self, actor_id: str, current: JsonValue | None) -> bool:
        key = self._key(actor_id)
        for _ in range(_MAX_CAS_ATTEMPTS):
            if current is None:
                return False
            if self.kv.cas(key, current, None):
                self._bump(-1)
                if isinstance(current, dict):
                    self._unindex(current)
                return True
            current = self.kv.get(key)
        raise RuntimeError(f"could not remove follower {actor_id!r}: too much contention")

    def get(self, actor_id: str) -> Follower | None:
        """The stored record of ``actor_id``, or ``None`` when it does not follow."""
        value = self.kv.get(self._key(actor_id))
        return value if isinstance(value, dict) else None

    def __contains__(self, actor_id: object) -> bool:
        return isinstance(actor_id, str) and self.get(actor_id) is not None

    def count(self) -> int:
        """The number of followers (from the maintained counter, O(1))."""
        value = self.kv.get(self._count_key)
        return max(int(value), 0) if isinstance(value, int) else 0

    def recount(self) -> int:
        """Count the followers by scanning them, store that as the counter and return it."""
        total = sum(1 for _ in self.iter())
        self.kv.set(self._count_key, total)
        return total

    def iter(self) -> Iterator[Follower]:
        """Every follower record, in actor-id order (streamed from ``kv.list``)."""
        for _key, value in self.kv.list(self._prefix):
            if isinstance(value, dict):
                yield value

    def page(self, after: str | None = None, limit: int = 40) -> tuple[list[Follower], str | None]:
        """One page of followers in actor-id order (keyset pagination).

        Args:
            after: The last actor id of the previous page, or ``None`` for the
                first page.
            limit: The maximum number of records in the page (at least 1).

        Returns:
            ``(records, next_after)`` where ``next_after`` is the cursor for the
            next page, or ``None`` when this page is the last one.
        """
        limit = max(1, limit)
        items: list[Follower] = []
        # Keyset pagination: the store seeks to the cursor, so a deep page costs
        # the same as the first, and followers added meanwhile never shift pages.
        start = None if after is None else (*self._prefix, after)
        for _key, value in self.kv.list(self._prefix, start_after=start):
            if not isinstance(value, dict):
                continue
            if len(items) == limit:
                return items, str(items[-1]["id"])
            items.append(value)
        return items, None

    def drop_inbox(self, inbox_url: str) -> int:
        """Remove every follower whose ``inbox`` or ``sharedInbox`` is ``inbox_url``.

        Called when a delivery to that URL answers 404/410: the actors behind it
        are gone.  Reads only the index entries of that inbox and their records
        (O(followers behind it)).  Returns the number of followers removed.
        """
        if self.kv.get(self._indexed_key) is None:
            self.reindex()
        removed = 0
        for key, _ in self.kv.list((*self._index, inbox_url)):
            actor_id = key[-1]
            current = self.kv.get(self._key(actor_id))
            if isinstance(current, dict) and inbox_url in _inboxes(current):
                removed += self._remove(actor_id, current)
            else:
                self.kv.delete(key)  # left by a process that died mid-write
        return removed

    def reindex(self) -> int:
        """Write the inbox index entries of every follower (O(followers)); return how many.

        Needed once for followers stored before the index existed;
        :meth:`drop_inbox` calls it by itself when the index was never built.
        """
        total = 0
        for record in self.iter():
            self._write_index(record)
            total += 1
        self.kv.set(self._indexed_key, True)
        return total

    def _bump(self, delta: int) -> None:
        for _ in range(_MAX_CAS_ATTEMPTS):
            current = self.kv.get(self._count_key)
            value = current if isinstance(current, int) else 0
            if current is None and delta > 0:
                self._mark_indexed_if_first()
            if self.kv.cas(self._count_key, current, max(value + delta, 0)):
                return
        raise RuntimeError("could not update the followers counter: too much contention")

    def _mark_indexed_if_first(self) -> None:
        # No counter yet: if the follower just added is the only one, every
        # follower of this actor is indexed from the start and no reindex is
        # due.  Older data (records without a counter) keeps the marker unset.
        if len(list(islice(self.kv.list(self._prefix), 2))) <= 1:
            self.kv.set(self._indexed_key, True)


def _inboxes(record: Mapping[str, Any]) -> set[str]:
    return {url for url in (record.get("inbox"), record.get("sharedInbox")) if isinstance(url, str)}


def _record_from(actor: Mapping[str, Any]) -> Follower:
    actor_id = actor.get("id")
    inbox = actor.get("inbox")
    shared = actor.get("sharedInbox")
    endpoints = actor.get("endpoints")
    if shared is None and isinstance(endpoints, Mapping):
        shared = endpoints.get("sharedInbox")
    if not _is_http_url(actor_id):
        raise ValueError(f"follower id must be an http(s) URL, got {actor_id!r}")
    if not _is_http_url(inbox):
        raise ValueError(f"follower inbox must be an http(s) URL, got {inbox!r}")
    record: Follower = {"id": actor_id, "inbox": inbox}
    if _is_http_url(shared):
        record["sharedInbox"] = shared
    followed_at = actor.get("followedAt")
    record["followedAt"] = (
        followed_at
        if isinstance(followed_at, str)
        else dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    )
    return record


def _is_http_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))
