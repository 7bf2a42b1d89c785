"""Fan-out of a published activity to its recipients' inboxes (actor ``botkit_fanout``).

:func:`publish` stores the activity body **once** in the KV store under
``("botkit", username, "activities", id)`` and enqueues a single fan-out job
on ``botkit.fanout``.  The job walks the followers in key order, takes each
follower's shared inbox when it has one (its personal inbox otherwise),
de-duplicates the URLs, drops hosts marked unavailable, and enqueues one
``botkit_deliver`` message per inbox in batches -- with
``broker.enqueue_many`` when the broker has it (``SqlBroker``: one INSERT per
batch), through one Redis pipeline per batch on Dramatiq's ``RedisBroker``,
else one ``enqueue`` per message (``StubBroker`` and other brokers).
Each message carries only ``(username, activity_id, inbox_url)``.

A fan-out job that dies midway is retried by Dramatiq; a progress cursor
(the last follower id whose deliveries were enqueued, kept for a day under
``("botkit", username, "fanout-progress", id)`` and removed when the job
completes) lets the retry resume instead of starting over.  Inboxes shared with
followers before the cursor may then be delivered twice, which receivers
tolerate (they de-duplicate by activity id).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import dramatiq

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

__all__ = [
    "BATCH_SIZE",
    "FANOUT_ACTOR_NAME",
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

#: The Dramatiq queue of fan-out jobs.
FANOUT_QUEUE = "botkit.fanout"
#: The Dramatiq actor name of a fan-out job.
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


def _enqueue(broker: dramatiq.Broker, messages: Sequence[dramatiq.Message[Any]]) -> None:
    enqueue_many = getattr(broker, "enqueue_many", None)
    if callable(enqueue_many):
        enqueue_many(list(messages))
    elif _is_redis_broker(broker):
        _enqueue_redis_pipelined(broker, messages)
    else:
        for message in messages:
            broker.enqueue(message)


def _is_redis_broker(broker: dramatiq.Broker) -> bool:
    try:
        from dramatiq.brokers.redis import RedisBroker
    except ImportError:  # redis-py missing: it cannot be a RedisBroker
        return False
    return isinstance(broker, RedisBroker) and isinstance(getattr(broker, "scripts", None), dict)


def _enqueue_redis_pipelined(broker: Any, messages: Sequence[dramatiq.Message[Any]]) -> None:
    """``RedisBroker.enqueue`` for many messages in one round trip.

    Dramatiq's RedisBroker has no batch API and pays one Lua call round trip
    per message.  This sends the very same ``dispatch`` script calls (argument
    layout as documented in Dramatiq 2's ``dispatch.lua``; maintenance left to
    the consumers) through one non-transactional pipeline, with the same
    ``before_enqueue``/``after_enqueue`` hooks and per-enqueue message ids.
    """
    dispatch = broker.scripts["dispatch"]
    keys = [broker.namespace]
    pipe = broker.client.pipeline(transaction=False)
    stored = []
    for message in messages:
        # As RedisBroker.enqueue: every enqueue gets its own Redis-side id.
        message = message.copy(options={"redis_message_id": str(uuid.uuid4())})
        broker.emit_before("enqueue", message, None)
        args = [
            "enqueue",
            int(time.time() * 1000),
            message.queue_name,
            broker.broker_id,
            broker.heartbeat_timeout,
            broker.dead_message_ttl,
            0,
            broker._max_unpack_size(),
            message.options["redis_message_id"],
            message.encode(),
        ]
        dispatch(args=args, keys=keys, client=pipe)
        stored.append(message)
    pipe.execute()
    for message in stored:
        broker.emit_after("enqueue", message, None)


def fan_out(
    federation: FederationLike, activity_id: str, *, batch_size: int = BATCH_SIZE
) -> FanoutStats:
    """Enqueue one delivery of a stored activity per distinct follower inbox.

    Args:
        federation: The owning federation (its ``kv``, ``broker``,
            ``username`` and ``followers``).
        activity_id: The id the activity was stored under by :func:`publish`.
        batch_size: Messages per enqueue call.

    Returns:
        Counters of what was read, enqueued and skipped.
    """
    kv, username = federation.kv, federation.username
    deliver = federation.broker.get_actor(DELIVER_ACTOR_NAME)
    blocked = unavailable_hosts(kv)
    progress_key = _progress_key(username, activity_id)
    cursor = kv.get(progress_key)
    stats = FanoutStats()
    batch: list[dramatiq.Message[Any]] = []
    seen: set[str] = set()
    last_id: str | None = None

    def flush() -> None:
        if batch:
            _enqueue(federation.broker, batch)
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
        batch.append(deliver.message(username, activity_id, url))
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


def declare_fanout_actor(federation: FederationLike) -> dramatiq.Actor[[str, str], None]:
    """Declare ``botkit_fanout`` (queue ``botkit.fanout``) on ``federation.broker``.

    The actor takes ``(username, activity_id)``.  ``botkit_deliver`` must be
    declared on the same broker (:func:`declare_delivery_actors`).
    """
    broker = federation.broker
    wanted: dict[str, Any] = {
        "max_retries": 5,
        "min_backoff": 1000,
        "max_backoff": 300_000,
        "throws": (PermanentDeliveryError,),
    }
    actor_options = {k: v for k, v in wanted.items() if k in broker.actor_options}

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

    fanout_actor: dramatiq.Actor[[str, str], None] = dramatiq.actor(
        actor_name=FANOUT_ACTOR_NAME,
        queue_name=FANOUT_QUEUE,
        broker=broker,
        **actor_options,
    )(checked_arguments(botkit_fanout))
    return fanout_actor


def _activity_id(activity: Mapping[str, Any]) -> str:
    if not isinstance(activity, Mapping):
        raise TypeError(f"an activity must be a dict, not {activity!r:.100}")
    activity_id = activity.get("id")
    if not isinstance(activity_id, str) or not activity_id:
        raise ValueError("an activity needs a string 'id' to be delivered")
    return activity_id


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
    federation.broker.get_actor(FANOUT_ACTOR_NAME).send(federation.username, activity_id)
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
    deliver = federation.broker.get_actor(DELIVER_ACTOR_NAME)
    body = dict(activity)
    messages = [
        deliver.message(federation.username, activity_id, url, body)
        if inline
        else deliver.message(federation.username, activity_id, url, direct=True)
        for url in urls
    ]
    if messages:
        _enqueue(federation.broker, messages)
    return len(messages)
