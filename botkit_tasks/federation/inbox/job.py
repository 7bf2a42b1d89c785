"""The ``botkit_inbox`` job: load the sender's actor document, run the handlers.

Runs on a worker with retries, for activities the endpoint accepted.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any

from ...runners.spec import JobSpec, RetryPolicy
from .._registry import lookup
from ..activities import MalformedActivityError, first_id, require_actor_id, types
from ..base import InboxContext
from ..net import UnsafeDestinationError

if TYPE_CHECKING:
    from ..base import InboxFederation

__all__ = [
    "ACTOR_CACHE_TTL",
    "INBOX_ACTOR_NAME",
    "INBOX_POLICY",
    "INBOX_QUEUE",
    "declare_inbox_actor",
    "load_actor",
    "process_inbox_job",
]

# One logger for the whole package, under the name it has always had.
logger = logging.getLogger("botkit_tasks.federation.inbox")

#: How long (seconds) a fetched remote actor document is cached in the key-value store.
ACTOR_CACHE_TTL = 3600
#: The job (actor / task) and queue that process accepted activities.
INBOX_ACTOR_NAME = "botkit_inbox"
INBOX_QUEUE = "botkit.inbox"
#: Retries of an inbox job (Mastodon retries inbox processing 8 times, ~80 minutes).
INBOX_MAX_RETRIES = 8
#: Backoff bounds of inbox job retries, in milliseconds.
INBOX_MIN_BACKOFF_MS = 5_000
INBOX_MAX_BACKOFF_MS = 3_600_000
#: The retry policy of inbox jobs; malformed activities are never retried.
INBOX_POLICY = RetryPolicy(
    max_retries=INBOX_MAX_RETRIES,
    min_backoff=INBOX_MIN_BACKOFF_MS / 1000,
    max_backoff=INBOX_MAX_BACKOFF_MS / 1000,
    permanent=(MalformedActivityError,),
)


def _inbox_job(username: str, activity: dict[str, Any], actor_id: str) -> None:
    """The arguments of a ``botkit_inbox`` job (a signature, never called)."""


_INBOX_JOB_SIGNATURE = inspect.signature(_inbox_job)


def declare_inbox_actor(federation: InboxFederation) -> Any:
    """Declare ``botkit_inbox`` (queue ``botkit.inbox``) on the federation's runner.

    One job serves every federation on the broker (or Celery app): it carries
    the username and finds its federation with
    :func:`~botkit_tasks.federation.get_federation`.  Declaring it again on
    the same runner keeps the existing one.  Returns the Dramatiq actor or
    the Celery task.
    """
    target = federation.runner.target

    def botkit_inbox(*args: Any, **kwargs: Any) -> None:
        # A message whose arguments do not fit can never succeed: do not retry it.
        try:
            username, activity, actor_id = _INBOX_JOB_SIGNATURE.bind(*args, **kwargs).args
        except TypeError as exc:
            raise MalformedActivityError(
                f"botkit_inbox: malformed job arguments {args!r:.200} {kwargs!r:.200}: {exc}"
            ) from None
        process_inbox_job(lookup(target, username), activity, actor_id)

    spec = JobSpec(
        name=INBOX_ACTOR_NAME,
        queue=INBOX_QUEUE,
        body=botkit_inbox,
        policy=INBOX_POLICY,
    )
    return federation.runner.declare(spec)


def process_inbox_job(federation: InboxFederation, activity: Any, actor_id: Any) -> None:
    """Run the handlers for one verified activity (the body of the ``botkit_inbox`` job).

    Raises:
        MalformedActivityError: the activity or the sender's actor document is
            unusable; the job is not retried.
        Exception: anything else (a failed fetch, a handler error) is retried.
    """
    if not isinstance(activity, dict) or not isinstance(actor_id, str):
        raise MalformedActivityError("inbox job arguments are not (activity object, actor id)")
    if require_actor_id(activity) != actor_id:
        raise MalformedActivityError(f"activity actor is not the verified signer {actor_id!r}")
    actor = load_actor(federation, actor_id)
    context = InboxContext(federation=federation, activity=activity, actor=actor, actor_id=actor_id)
    called: set[int] = set()
    activity_types = types(activity)
    for activity_type in activity_types:
        for handler in federation.handlers_for(activity_type):
            # An activity with two types must not run a handler registered for both twice.
            if id(handler) in called:
                continue
            called.add(id(handler))
            handler(context, activity)
    if not called:
        logger.debug("inbox: no handler for %s from %s", activity_types, actor_id)


def load_actor(federation: InboxFederation, actor_id: str) -> dict[str, Any]:
    """Return the actor document of ``actor_id``: from the cache, or fetched and cached.

    Raises:
        MalformedActivityError: the document cannot be had for good (refused
            destination, 4xx other than 401/408/429, not an object, wrong id).
    """
    cache_key = ("botkit", "remote-actors", actor_id)
    cached = _kv_get(federation, cache_key)
    if isinstance(cached, dict) and first_id(cached.get("id")) == actor_id:
        return cached
    try:
        document: Any = federation.fetcher.get_json(actor_id)
    except UnsafeDestinationError as exc:
        raise MalformedActivityError(f"actor {actor_id!r} is not fetchable: {exc}") from exc
    except Exception as exc:
        status = _status_of(exc)
        if status is not None and 400 <= status < 500 and status not in (401, 408, 429):
            raise MalformedActivityError(
                f"actor {actor_id!r} answered HTTP {status}; not retrying"
            ) from exc
        raise
    if not isinstance(document, dict) or first_id(document.get("id")) != actor_id:
        raise MalformedActivityError(f"document fetched from {actor_id!r} is not that actor")
    try:
        federation.kv.set(cache_key, document, ttl=ACTOR_CACHE_TTL)
    except (TypeError, ValueError):
        # A document the store cannot hold (odd characters, huge key) is used uncached.
        logger.debug("inbox: actor %s not cached", actor_id, exc_info=True)
    return document


def _kv_get(federation: InboxFederation, key: tuple[str, ...]) -> Any:
    try:
        return federation.kv.get(key)
    except (TypeError, ValueError):
        return None


def _status_of(exc: BaseException) -> int | None:
    """The HTTP status behind a fetch error, if it carries one."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None
