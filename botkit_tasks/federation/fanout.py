"""Fan-out of a published activity to its recipients' inboxes (actor ``botkit_fanout``).

:func:`publish` stores the activity body **once** in the KV store under
``("botkit", username, "activities", id)`` and enqueues a single fan-out job
on ``botkit.fanout``.  The job walks the followers in key order, takes each
follower's shared inbox when it has one (its personal inbox otherwise),
de-duplicates the URLs, drops hosts marked unavailable, and enqueues one
``botkit_deliver`` job per inbox in batches through the federation's runner
(:meth:`~botkit_tasks.runners.base.Runner.enqueue_many`: one INSERT per batch
on ``SqlBroker``, one Redis pipeline on Dramatiq's ``RedisBroker``, one
producer on Celery).
Each message carries only ``(username, activity_id, inbox_url)``.

A fan-out job that dies midway is retried by its runner; a progress cursor
(the last follower id whose deliveries were enqueued, kept for a day under
``("botkit", username, "fanout-progress", id)`` and removed when the job
completes) lets the retry resume instead of starting over.  Inboxes shared with
followers before the cursor may then be delivered twice, which receivers
tolerate (they de-duplicate by activity id).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from botkit_tasks.federation.base import FederationLike
from botkit_tasks.federation.delivery import (
    DELIVER_ACTOR_NAME,
    DeliveryOptions,
    PermanentDeliveryError,
    activity_key,
    host_of,
)
from botkit_tasks.federation.delivery.actor import (
    checked_arguments,
    require_argument,
    resolve_federation,
)
from botkit_tasks.kv._codec import encode_value
from botkit_tasks.kv.base import JsonValue, KvStore
from botkit_tasks.runners.base import Job
from botkit_tasks.runners.spec import JobSpec, RetryPolicy

__all__ = [
    "BATCH_SIZE",
    "FANOUT_ACTOR_NAME",
    "FANOUT_POLICY",
    "FANOUT_QUEUE",
    "INLINE_LIMIT",
    "FanoutStats",
    "declare_fanout_actor",
    "enqueue_fanout",
    "expand_inboxes",
    "fan_out",
    "publish",
    "send",
    "unavailable_hosts",
]

logger = logging.getLogger(__name__)

#: The queue of fan-out jobs.
FANOUT_QUEUE = "botkit.fanout"
#: The job (actor / task) name of a fan-out.
FANOUT_ACTOR_NAME = "botkit_fanout"
#: Delivery messages enqueued per ``enqueue_many`` call.
BATCH_SIZE = 1000
#: Direct sends carry bodies up to this many bytes inline; larger ones are stored.
INLINE_LIMIT = 16 * 1024


@dataclasses.dataclass
class FanoutStats:
    """What one fan-out did.

    Attributes:
        followers: Follower records read.
        inboxes: Distinct inbox URLs enqueued.
        skipped: Distinct inbox URLs skipped because their host is unavailable.
        batches: Enqueue calls made.
    """

    followers: int = 0
    inboxes: int = 0
    skipped: int = 0
    batches: int = 0


def expand_inboxes(followers: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """Yield each distinct delivery URL once: a shared inbox if present, else the inbox."""
    seen: set[str] = set()
    for record in followers:
        url = record.get("sharedInbox") or record.get("inbox")
        if isinstance(url, str) and url not in seen:
            seen.add(url)
            yield url


def unavailable_hosts(kv: KvStore) -> set[str]:
    """The hosts currently marked unavailable (one prefix scan of the small hosts table)."""
    return {
        key[-1]
        for key, value in kv.list(("botkit", "hosts"))
        if isinstance(value, dict) and value.get("unavailable")
    }


def _host(url: str) -> str:
    """:func:`host_of` without ``urlsplit`` for plain ``scheme://host[:port]/...`` URLs."""
    parts = url.split("/", 3)
    if len(parts) >= 3 and parts[0] in ("https:", "http:") and not parts[1]:
        netloc = parts[2]
        if netloc and not netloc.endswith(":") and not any(c in netloc for c in "@[?#"):
            return netloc.lower()
    return host_of(url)


def _progress_key(username: str, activity_id: str) -> tuple[str, ...]:
    return ("botkit", username, "fanout-progress", activity_id)


def fan_out(
    federation: FederationLike, activity_id: str, *, batch_size: int = BATCH_SIZE
) -> FanoutStats:
    """Enqueue one delivery of a stored activity per distinct follower inbox.

    Args:
        federation: The owning federation (its ``kv``, ``runner``,
            ``username`` and ``followers``).
        activity_id: The id the activity was stored under by :func:`publish`.
        batch_size: Messages per enqueue call.

    Returns:
        Counters of what was read, enqueued and skipped.
    """
    kv, username = federation.kv, federation.username
    runner = federation.runner
    blocked = unavailable_hosts(kv)
    progress_key = _progress_key(username, activity_id)
    cursor = kv.get(progress_key)
    stored = kv.get(activity_key(username, activity_id))
    object_id = _object_id(stored) if isinstance(stored, dict) else activity_id
    stats = FanoutStats()
    batch: list[Job] = []
    seen: set[str] = set()
    last_id: str | None = None

    def flush() -> None:
        if batch:
            runner.enqueue_many(batch)
            stats.batches += 1
            batch.clear()
        if last_id is not None:
            kv.set(progress_key, last_id, ttl=86400)

    for record in federation.followers.iter():
        follower_id = str(record.get("id"))
        if isinstance(cursor, str) and follower_id <= cursor:
            continue
        stats.followers += 1
        last_id = follower_id
        url = record.get("sharedInbox") or record.get("inbox")
        if not isinstance(url, str) or url in seen:
            continue
        seen.add(url)
        if blocked and _host(url) in blocked:
            stats.skipped += 1
            continue
        batch.append(
            Job(
                DELIVER_ACTOR_NAME,
                (username, activity_id, url),
                ordering_key=ordering_key(object_id, url),
            )
        )
        stats.inboxes += 1
        if len(batch) >= batch_size:
            flush()
    flush()
    # Done: a later publish of the same id must start from the beginning again.
    kv.delete(progress_key)
    logger.info(
        "Fan-out of %s: %d followers, %d inboxes enqueued, %d skipped (unavailable hosts)",
        activity_id,
        stats.followers,
        stats.inboxes,
        stats.skipped,
    )
    return stats


#: Retries of a fan-out job: 5 retries, 1 s doubling to at most 5 minutes.
FANOUT_POLICY = RetryPolicy(
    max_retries=5, min_backoff=1.0, max_backoff=300.0, permanent=(PermanentDeliveryError,)
)


def declare_fanout_actor(federation: FederationLike) -> Any:
    """Declare ``botkit_fanout`` (queue ``botkit.fanout``) on ``federation.runner``.

    The job takes ``(username, activity_id)``.  ``botkit_deliver`` must be
    declared on the same runner (:func:`declare_delivery_actors`).  Returns
    the Dramatiq actor or the Celery task.
    """
    owner = federation

    def botkit_fanout(username: str, activity_id: str) -> None:
        require_argument(username, str, "username", "botkit_fanout")
        require_argument(activity_id, str, "activity_id", "botkit_fanout")
        try:
            federation = resolve_federation(owner, username)
        except PermanentDeliveryError as exc:
            logger.error("Fan-out of %s dropped: %s", activity_id, exc)
            return
        if federation.kv.get(activity_key(username, activity_id)) is None:
            logger.warning("Fan-out of %s skipped: the activity is no longer stored", activity_id)
            return
        fan_out(federation, activity_id)

    spec = JobSpec(
        name=FANOUT_ACTOR_NAME,
        queue=FANOUT_QUEUE,
        body=checked_arguments(botkit_fanout),
        policy=FANOUT_POLICY,
    )
    return owner.runner.declare(spec)


def _activity_id(activity: Mapping[str, Any]) -> str:
    if not isinstance(activity, Mapping):
        raise TypeError(f"an activity must be a dict, not {activity!r:.100}")
    activity_id = activity.get("id")
    if not isinstance(activity_id, str) or not activity_id:
        raise ValueError("an activity needs a string 'id' to be delivered")
    return activity_id


def _object_id(activity: Mapping[str, Any]) -> str:
    """The id of what ``activity`` is about (its ``object``), else its own id."""
    obj = activity.get("object")
    if isinstance(obj, Mapping):
        obj = obj.get("id")
    return obj if isinstance(obj, str) and obj else str(activity.get("id"))


def ordering_key(*parts: str) -> str:
    """The ``ordering_key`` of the jobs about ``parts`` (e.g. an object id and an inbox).

    Create, Update and Delete of one note share their object id, so their
    fan-outs run in publish order and their deliveries reach each inbox in
    that order, even when the first one is retried (the broker holds the
    later ones back).  Hashed: ids and URLs can be longer than a key may be.
    """
    digest = hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()[:40]
    return f"botkit:{digest}"


def _store(federation: FederationLike, activity: Mapping[str, Any]) -> str:
    activity_id = _activity_id(activity)
    opts = federation.delivery_options or DeliveryOptions()
    value: dict[str, JsonValue] = dict(activity)
    federation.kv.set(activity_key(federation.username, activity_id), value, ttl=opts.activity_ttl)
    return activity_id


def enqueue_fanout(federation: FederationLike, activity: Mapping[str, Any]) -> str:
    """Store ``activity`` once and enqueue the one fan-out job that delivers it.

    Used by ``Federation.publish``.  Returns the activity id.

    Raises:
        ValueError: The activity has no string ``id``.
    """
    activity_id = _store(federation, activity)
    federation.runner.enqueue(
        Job(
            FANOUT_ACTOR_NAME,
            (federation.username, activity_id),
            ordering_key=ordering_key(_object_id(activity)),
        )
    )
    return activity_id


#: The same as :func:`enqueue_fanout`.
publish = enqueue_fanout


def send(federation: FederationLike, activity: Mapping[str, Any], inboxes: Iterable[str]) -> int:
    """Enqueue direct deliveries of ``activity`` to ``inboxes`` (e.g. an ``Accept``).

    Used by ``Federation.send``.  Small bodies travel inline in each message;
    bodies over :data:`INLINE_LIMIT` bytes are stored once instead.  Direct
    sends are not skipped for unavailable hosts.  Returns the number of
    deliveries enqueued (duplicates removed).
    """
    activity_id = _activity_id(activity)
    # What the KV store would refuse (NaN, non-str keys, NUL...) must not travel
    # inline either: json.dumps would send NaN or turn 5 into "5" silently.
    encode_value(dict(activity))
    urls = list(dict.fromkeys(inboxes))
    inline = len(json.dumps(activity, separators=(",", ":"))) <= INLINE_LIMIT
    if not inline:
        _store(federation, activity)
    body = dict(activity)
    object_id = _object_id(activity)
    jobs = [
        Job(
            DELIVER_ACTOR_NAME,
            (federation.username, activity_id, url, body)
            if inline
            else (federation.username, activity_id, url),
            kwargs=None if inline else {"direct": True},
            ordering_key=ordering_key(object_id, url),
        )
        for url in urls
    ]
    if jobs:
        federation.runner.enqueue_many(jobs)
    return len(jobs)
