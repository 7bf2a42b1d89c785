"""The ``botkit_deliver`` actor, and one delivery with its side effects.

Also the argument checks every federation job shares (the fan-out uses them too).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec

import httpx

from botkit_tasks.federation._registry import lookup
from botkit_tasks.federation.base import FederationLike
from botkit_tasks.kv.base import KvKey
from botkit_tasks.runners.spec import CHECKED, JobSpec, RetryLater, RetryPolicy

from .. import stats
from .attempt import DEFAULT_USER_AGENT, deliver_once, new_client
from .hosts import host_of, is_host_available, record_host_failure, record_host_success
from .options import DeliveryOptions
from .outcome import DeliveryResult, Outcome, PermanentDeliveryError

__all__ = [
    "DELIVER_ACTOR_NAME",
    "OUTBOX_QUEUE",
    "activity_key",
    "checked_arguments",
    "declare_delivery_actors",
    "delivery_policy",
    "perform_delivery",
    "require_argument",
    "resolve_federation",
]

# One logger for the whole package, under the name it has always had.
logger = logging.getLogger("botkit_tasks.federation.delivery")

#: The queue of delivery jobs.
OUTBOX_QUEUE = "botkit.outbox"
#: The job (actor / task) name of a delivery.
DELIVER_ACTOR_NAME = "botkit_deliver"


def activity_key(username: str, activity_id: str) -> KvKey:
    """The KV key under which the fan-out stores an activity body once."""
    return ("botkit", username, "activities", activity_id)


def _options(federation: FederationLike) -> DeliveryOptions:
    return federation.delivery_options or DeliveryOptions()


def perform_delivery(
    federation: FederationLike,
    inbox_url: str,
    body: bytes,
    *,
    client: httpx.Client | None = None,
) -> DeliveryResult:
    """One delivery attempt with its side effects, outside any runner.

    Sends with :func:`deliver_once`, counts the outcome in the delivery
    statistics (:mod:`botkit_tasks.federation.stats`), then clears the host's
    failure record on success, records a failure day on ``RETRY``, and on
    ``GONE`` drops the followers behind the inbox and calls
    ``DeliveryOptions.on_gone``.
    ``PERMANENT`` leaves the tracker alone (the host answered; Mastodon does
    the same).  ``client`` is reused when given (the actor passes its pooled
    one); otherwise a short-lived client is used.
    """
    opts = _options(federation)
    result = deliver_once(
        inbox_url,
        body,
        key_id=federation.key_id,
        private_key=federation.private_key,
        kv=federation.kv,
        options=opts,
        allow_private_addresses=federation.allow_private_addresses,
        client=client,
        user_agent=getattr(federation, "user_agent", None) or DEFAULT_USER_AGENT,
    )
    host = host_of(inbox_url)
    stats.record(federation.kv, host, result.outcome.value)
    if result.outcome is Outcome.DELIVERED:
        record_host_success(federation.kv, host)
    elif result.outcome is Outcome.RETRY:
        record_host_failure(
            federation.kv,
            host,
            now=opts.clock(),
            unavailable_after_days=opts.unavailable_after_days,
        )
    elif result.outcome is Outcome.GONE:
        dropped = federation.followers.drop_inbox(inbox_url)
        logger.info(
            "Inbox %s is gone (HTTP %s): dropped %d followers", inbox_url, result.status, dropped
        )
        if opts.on_gone is not None:
            try:
                opts.on_gone(inbox_url, result.status or 0)
            except Exception:
                # The delivery itself is settled; a failing user hook must not
                # turn it into a retry that would post to a gone inbox again.
                logger.exception("on_gone hook failed for %s", inbox_url)
    return result


def _load_body(
    federation: FederationLike, activity_id: str, activity: Mapping[str, Any] | None
) -> bytes:
    if activity is None:
        stored = federation.kv.get(activity_key(federation.username, activity_id))
        if not isinstance(stored, dict):
            raise PermanentDeliveryError(f"activity {activity_id!r} is no longer stored")
        activity = stored
    return json.dumps(activity, ensure_ascii=False, separators=(",", ":")).encode()


_P = ParamSpec("_P")


def checked_arguments(fn: Callable[_P, None]) -> Callable[_P, None]:
    """``fn`` as an actor function that fails permanently on a call its signature refuses.

    A message with missing or unknown arguments can never succeed: retrying it
    would only delay its dead letter by hours.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise PermanentDeliveryError(
                f"{fn.__name__}: malformed job arguments {args!r:.200} {kwargs!r:.200}: {exc}"
            ) from None
        fn(*args, **kwargs)

    setattr(checked, CHECKED, True)
    return checked


def require_argument(value: object, kind: type | tuple[type, ...], name: str, job: str) -> None:
    """Raise :class:`PermanentDeliveryError` unless the job argument ``name`` is a ``kind``."""
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        wanted = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
        raise PermanentDeliveryError(f"{job}: {name} must be {wanted}, not {value!r:.100}")


def resolve_federation(owner: FederationLike, username: str) -> FederationLike:
    """The federation a job belongs to: several may share one broker (and one actor)."""
    if username == owner.username:
        return owner
    try:
        return lookup(owner.runner.target, username)
    except LookupError as exc:
        raise PermanentDeliveryError(str(exc)) from None


def delivery_policy(options: DeliveryOptions) -> RetryPolicy:
    """The retry policy of delivery jobs: ``options``' retries and backoff, permanent errors."""
    return RetryPolicy(
        max_retries=options.max_retries,
        min_backoff=options.min_backoff,
        max_backoff=options.max_backoff,
        permanent=(PermanentDeliveryError,),
    )


def declare_delivery_actors(federation: FederationLike) -> Any:
    """Declare the ``botkit_deliver`` job (queue ``botkit.outbox``) on ``federation.runner``.

    The job takes ``(username, activity_id, inbox_url, activity=None,
    direct=False)``: the body is read from the KV store unless ``activity`` is
    given inline.  Fan-out deliveries (neither inline nor ``direct``) are
    dropped when their host has meanwhile been marked unavailable.
    Returns the Dramatiq actor (also ``broker.get_actor("botkit_deliver")``)
    or the Celery task.
    """
    owner = federation
    opts = _options(owner)
    # One pooled client per declared job, shared by the worker threads
    # (httpx.Client is thread-safe) so keep-alive connections are reused.
    clients: dict[bool, httpx.Client] = {}
    clients_lock = threading.Lock()

    def client(allow_private_addresses: bool) -> httpx.Client:
        with clients_lock:
            if allow_private_addresses not in clients:
                clients[allow_private_addresses] = new_client(
                    opts, allow_private_addresses=allow_private_addresses
                )
            return clients[allow_private_addresses]

    def botkit_deliver(
        username: str,
        activity_id: str,
        inbox_url: str,
        activity: dict[str, Any] | None = None,
        direct: bool = False,
    ) -> None:
        require_argument(username, str, "username", "botkit_deliver")
        require_argument(activity_id, str, "activity_id", "botkit_deliver")
        require_argument(inbox_url, str, "inbox_url", "botkit_deliver")
        require_argument(activity, (dict, type(None)), "activity", "botkit_deliver")
        federation = resolve_federation(owner, username)
        # Fan-out deliveries skip hosts marked unavailable since they were
        # enqueued; direct sends usually answer a request the host just made.
        if (
            activity is None
            and not direct
            and not is_host_available(federation.kv, host_of(inbox_url))
        ):
            logger.info("Skipping delivery to unavailable host of %s", inbox_url)
            return
        body = _load_body(federation, activity_id, activity)
        result = perform_delivery(
            federation, inbox_url, body, client=client(federation.allow_private_addresses)
        )
        if result.outcome is Outcome.RETRY:
            logger.info(
                "Delivery of %s to %s will be retried: %s", activity_id, inbox_url, result.reason
            )
            raise RetryLater(f"{inbox_url}: {result.reason}", delay=result.retry_after)
        if result.outcome is Outcome.PERMANENT:
            logger.warning(
                "Delivery of %s to %s failed permanently: %s", activity_id, inbox_url, result.reason
            )
            raise PermanentDeliveryError(f"{inbox_url}: {result.reason}")

    spec = JobSpec(
        name=DELIVER_ACTOR_NAME,
        queue=OUTBOX_QUEUE,
        body=checked_arguments(botkit_deliver),
        policy=delivery_policy(opts),
        # Two signed requests (double knock) each bounded by the total timeout.
        time_limit=2 * opts.total_timeout + 2 * opts.connect_timeout + 30,
    )
    declared = owner.runner.declare(spec)
    # The pool lives as long as the job; closing it then (or at exit) shuts
    # its keep-alive sockets cleanly instead of leaving them to the GC.
    weakref.finalize(declared, _close_all, clients)
    return declared


def _close_all(clients: dict[bool, httpx.Client]) -> None:
    for client in clients.values():
        client.close()
    clients.clear()
