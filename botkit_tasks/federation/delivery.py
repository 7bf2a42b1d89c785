"""Signed delivery of one activity to one inbox, as the Dramatiq actor ``botkit_deliver``.

One job per (activity, inbox) on the queue ``botkit.outbox``.  A job loads the
activity body (stored once by the fan-out under ``("botkit", username,
"activities", id)``, or passed inline for small direct sends such as an
``Accept``), refuses unsafe destinations (after DNS resolution), signs the
request *at send time* and POSTs it with httpx.  The answer is classified as
in DESIGN §3 (Mastodon's rules, with Fedify's gone hook):

==========================================  ==============================================
response                                    outcome
==========================================  ==============================================
2xx                                         ``DELIVERED``; the host's failure days cleared
404, 410                                    ``GONE``: no retry; followers behind the inbox
                                            dropped, ``DeliveryOptions.on_gone`` called
other 4xx except 401/408/429                ``PERMANENT``: no retry (dead-lettered)
unsafe destination (SSRF), bad message      ``PERMANENT``
401                                         double knock: resend at once with the other
                                            signature scheme; a 2xx remembers that scheme
                                            for the origin; otherwise ``RETRY`` (a 4xx to
                                            the unfamiliar scheme does not make it final)
408, 429, 5xx, timeouts, network errors     ``RETRY`` with exponential backoff and jitter,
                                            ``Retry-After`` honoured; a failure day
                                            recorded for the host
3xx                                         ``RETRY`` (see below)
==========================================  ==============================================

Redirects are never followed: following one would send a signed POST to a
URL nobody vetted.  Mastodon follows up to three hops and retries whatever it
ends on that is neither 2xx nor a 4xx, so a final 3xx is retried there; we
do the same (``RETRY``), which also records failure days so that a host that
keeps redirecting its inbox ends up marked unavailable.

Unlike Mastodon, a 501 is retried like every other 5xx, as DESIGN §3 says.

Timeouts: httpx enforces the connect timeout and a per-read/write timeout;
the total deadline is checked while the response body is read (reading stops
there, and the status already received decides).  A server trickling its
*headers* is bounded by the per-read timeout per chunk and, in the worker, by
the actor's Dramatiq ``time_limit``.

Retries use Dramatiq's own machinery: the actor's ``max_retries``,
``min_backoff`` and ``max_backoff`` options (``compute_backoff`` doubles the
delay per retry with jitter ``U(1, 2)``), ``dramatiq.Retry(delay=ms)`` for a
``Retry-After`` delay, and ``throws=(PermanentDeliveryError,)`` so permanent
failures are never retried.  ``max_retries`` counts retries after the first
attempt, as everywhere in Dramatiq.

Per-host failure tracking (``("botkit", "hosts", host)``) records the
distinct UTC days on which a delivery to the host failed in a retryable way;
after ``unavailable_after_days`` distinct days the host is unavailable and
the fan-out skips it, until a delivery to it succeeds (or
:func:`reset_host` is called, e.g. when the host sends us a signed request).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import enum
import functools
import inspect
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol
from urllib.parse import urlsplit

import dramatiq
import httpx

from botkit_tasks.errors import BotkitError
from botkit_tasks.federation import net, signatures, stats
from botkit_tasks.kv.base import JsonValue, KvKey, KvStore

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

    from botkit_tasks.federation.followers import Followers

__all__ = [
    "ACTIVITY_CONTENT_TYPE",
    "DEFAULT_USER_AGENT",
    "DELIVER_ACTOR_NAME",
    "OUTBOX_QUEUE",
    "DeliveryOptions",
    "DeliveryResult",
    "Outcome",
    "PermanentDeliveryError",
    "activity_key",
    "declare_delivery_actors",
    "deliver_once",
    "host_of",
    "is_host_available",
    "perform_delivery",
    "record_host_failure",
    "record_host_success",
    "reset_host",
]

logger = logging.getLogger(__name__)

#: The Dramatiq queue of delivery jobs.
OUTBOX_QUEUE = "botkit.outbox"
#: The Dramatiq actor name of a delivery job.
DELIVER_ACTOR_NAME = "botkit_deliver"
#: The media type of every delivered body.
ACTIVITY_CONTENT_TYPE = "application/activity+json"
#: Sent when the federation object does not define ``user_agent``.
DEFAULT_USER_AGENT = net.DEFAULT_USER_AGENT

_SCHEMES: tuple[signatures.Scheme, signatures.Scheme] = ("draft-cavage", "rfc9421")
_MAX_CAS_ATTEMPTS = 50
#: Failure days kept per host; more than any sensible ``unavailable_after_days``.
_MAX_FAILURE_DAYS = 31
#: Dramatiq refuses delays beyond 7 days (``Retries`` caps ``max_backoff`` there).
_DRAMATIQ_MAX_DELAY = 7 * 86400.0


@dataclasses.dataclass(frozen=True)
class DeliveryOptions:
    """Retry, timeout and size policy of deliveries.  Durations are in seconds.

    Attributes:
        max_retries: Retries after the first attempt before the job is dead;
            the default 9 makes 10 attempts in all (DESIGN §3).
        min_backoff: Delay before the first retry; doubled for each further
            retry, with jitter (each delay is drawn from ``[d, 2d)``).
        max_backoff: Cap on one retry delay, ``Retry-After`` included (12 h).
        connect_timeout: TCP + TLS connect timeout.
        read_timeout: Timeout of each read from the socket.
        total_timeout: Deadline for reading the whole response.
        max_response_bytes: At most this many response-body bytes are read
            (1 MiB); the rest is discarded unread.
        unavailable_after_days: A host is marked unavailable after failures
            on this many distinct UTC days with no success in between.
        activity_ttl: How long a stored activity body is kept for its
            deliveries (7 days, the longest delay Dramatiq allows); ``None``
            keeps it forever.
        on_gone: Called as ``on_gone(inbox_url, status)`` after a 404/410,
            once the followers behind the inbox have been dropped.
        clock: Returns the current time as a UNIX timestamp; injectable so
            tests can move between days.
    """

    max_retries: int = 9
    min_backoff: float = 1.0
    max_backoff: float = 12 * 3600.0
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    max_response_bytes: int = 1 << 20
    unavailable_after_days: int = 3
    activity_ttl: float | None = 7 * 86400.0
    on_gone: Callable[[str, int], None] | None = None
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        for name in ("max_retries", "unavailable_after_days", "max_response_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {value!r:.100}")
        if self.max_response_bytes < 0:
            raise ValueError(f"max_response_bytes must be >= 0: {self.max_response_bytes}")
        if self.activity_ttl is not None and not self.activity_ttl > 0:
            raise ValueError(f"activity_ttl must be positive or None: {self.activity_ttl!r}")
        if self.max_retries < 0 or self.unavailable_after_days < 1:
            raise ValueError("max_retries must be >= 0 and unavailable_after_days >= 1")
        if min(self.min_backoff, self.max_backoff) <= 0 or self.min_backoff > self.max_backoff:
            raise ValueError("need 0 < min_backoff <= max_backoff")
        if min(self.connect_timeout, self.read_timeout, self.total_timeout) <= 0:
            raise ValueError("timeouts must be positive")

    def timeout(self) -> httpx.Timeout:
        """The per-operation httpx timeout (writes share the read timeout)."""
        return httpx.Timeout(
            connect=self.connect_timeout,
            read=self.read_timeout,
            write=self.read_timeout,
            pool=self.connect_timeout,
        )


class Outcome(enum.Enum):
    """How a delivery attempt ended."""

    DELIVERED = "delivered"
    RETRY = "retry"
    PERMANENT = "permanent"
    GONE = "gone"


@dataclasses.dataclass(frozen=True)
class DeliveryResult:
    """The classified result of one delivery attempt (double knock included).

    Attributes:
        outcome: See :class:`Outcome`.
        status: The final HTTP status, ``None`` when no response came.
        retry_after: For ``RETRY``: the server's ``Retry-After`` in seconds
            (capped at ``max_backoff``), or ``None`` to use the backoff.
        reason: A short human-readable explanation.
        scheme: The signature scheme of the last request sent, if any.
        body_bytes: How many response-body bytes were read (capped).
    """

    outcome: Outcome
    status: int | None = None
    retry_after: float | None = None
    reason: str = ""
    scheme: signatures.Scheme | None = None
    body_bytes: int = 0


class PermanentDeliveryError(BotkitError):
    """A delivery that must not be retried (the actor's ``throws``)."""


class FederationLike(Protocol):
    """What the delivery and fan-out actors need from the ``Federation`` facade."""

    kv: KvStore
    broker: dramatiq.Broker
    username: str
    key_id: str
    allow_private_addresses: bool
    followers: Followers

    @property
    def delivery_options(self) -> DeliveryOptions | None: ...

    @property
    def private_key(self) -> RSAPrivateKey: ...


def activity_key(username: str, activity_id: str) -> KvKey:
    """The KV key under which the fan-out stores an activity body once."""
    return ("botkit", username, "activities", activity_id)


# --------------------------------------------------------------------------- one attempt


def deliver_once(
    inbox_url: str,
    body: bytes,
    *,
    key_id: str,
    private_key: RSAPrivateKey,
    kv: KvStore | None = None,
    options: DeliveryOptions | None = None,
    allow_private_addresses: bool = False,
    client: httpx.Client | None = None,
    user_agent: str = DEFAULT_USER_AGENT,
) -> DeliveryResult:
    """POST ``body`` to ``inbox_url`` once (twice with the double knock) and classify.

    No Dramatiq and no host tracking here: this is the pure "send and
    classify" step, usable directly in tests and scripts.

    Args:
        inbox_url: The destination inbox.
        body: The exact JSON bytes to send (the digest is computed over them).
        key_id: Our key id (``{actor}#main-key``).
        private_key: Our RSA private key.
        kv: Where the per-origin signature scheme is remembered; without one
            every delivery starts with draft-cavage.
        options: Timeouts, response cap and ``max_backoff``.
        allow_private_addresses: Permit loopback/private destinations and
            ``http://`` (tests and demos only).
        client: An httpx client to reuse (it must not follow redirects); a
            short-lived one is created when omitted.
        user_agent: The ``User-Agent`` header.

    Returns:
        The classified :class:`DeliveryResult`.
    """
    opts = options or DeliveryOptions()
    try:
        net.check_destination(inbox_url, allow_private_addresses=allow_private_addresses)
    except net.UnsafeDestinationError as exc:
        logger.warning("Refusing delivery to %s: %s", inbox_url, exc)
        return DeliveryResult(Outcome.PERMANENT, reason=f"unsafe destination: {exc}")
    except net.FetchError as exc:
        # The host name did not resolve: DNS trouble is temporary more often than not.
        return DeliveryResult(Outcome.RETRY, reason=f"DNS: {exc}")

    origin = _origin(inbox_url)
    remembered = kv.get(("botkit", "sig-scheme", origin)) if kv is not None else None
    first: signatures.Scheme = "rfc9421" if remembered == "rfc9421" else "draft-cavage"
    second: signatures.Scheme = "draft-cavage" if first == "rfc9421" else "rfc9421"

    owned = client is None
    http = client or _new_client(opts, allow_private_addresses=allow_private_addresses)
    try:
        result = _attempt(http, inbox_url, body, first, key_id, private_key, opts, user_agent)
        if result.status == 401:
            # Double knock: the receiver may only understand the other scheme.
            other = _attempt(http, inbox_url, body, second, key_id, private_key, opts, user_agent)
            if other.outcome is Outcome.DELIVERED and kv is not None:
                kv.set(("botkit", "sig-scheme", origin), second)
            # A server that cannot parse the other scheme may answer it with a
            # 400 or worse; that must not turn a retryable 401 into a drop.
            if other.outcome in (Outcome.DELIVERED, Outcome.RETRY):
                result = other
    finally:
        if owned:
            http.close()
    return result


def _attempt(
    http: httpx.Client,
    url: str,
    body: bytes,
    scheme: signatures.Scheme,
    key_id: str,
    private_key: RSAPrivateKey,
    opts: DeliveryOptions,
    user_agent: str,
) -> DeliveryResult:
    # Signed here, at send time: every attempt carries a fresh Date/created.
    headers = signatures.sign_request(
        "POST",
        url,
        {"Content-Type": ACTIVITY_CONTENT_TYPE},
        body,
        private_key=private_key,
        key_id=key_id,
        scheme=scheme,
    )
    # Not signed (as in Mastodon): identity encoding so that the byte cap
    # bounds memory, a compressed body could inflate far beyond it.
    headers = {**headers, "User-Agent": user_agent, "Accept-Encoding": "identity"}
    deadline = time.monotonic() + opts.total_timeout
    try:
        with http.stream("POST", url, headers=headers, content=body) as response:
            status = response.status_code
            retry_after_header = response.headers.get("Retry-After")
            read = _drain(response, opts.max_response_bytes, deadline)
    except net.UnsafeDestinationError as exc:
        # Raised by the guarded transport at connect time (DNS rebinding).
        logger.warning("Refusing delivery to %s: %s", url, exc)
        return DeliveryResult(Outcome.PERMANENT, reason=f"unsafe destination: {exc}")
    except httpx.TimeoutException as exc:
        return DeliveryResult(Outcome.RETRY, reason=f"timeout: {exc!r}", scheme=scheme)
    except httpx.TransportError as exc:
        return DeliveryResult(Outcome.RETRY, reason=f"network error: {exc!r}", scheme=scheme)
    return _classify(status, retry_after_header, opts, scheme, read)


def _drain(response: httpx.Response, limit: int, deadline: float) -> int:
    """Read at most ``limit`` body bytes before ``deadline``; return how many were read."""
    read = 0
    try:
        for chunk in response.iter_raw(chunk_size=64 * 1024):
            read += len(chunk)
            if read >= limit or time.monotonic() > deadline:
                # Closing the stream drops the connection instead of reading on.
                break
    except httpx.HTTPError:
        # The status line already arrived and decides the outcome; a body that
        # breaks off (or times out) midway does not change it.
        pass
    return min(read, limit)


def _classify(
    status: int,
    retry_after_header: str | None,
    opts: DeliveryOptions,
    scheme: signatures.Scheme,
    read: int,
) -> DeliveryResult:
    if 200 <= status < 300:
        return DeliveryResult(Outcome.DELIVERED, status, scheme=scheme, body_bytes=read)
    if status in (404, 410):
        return DeliveryResult(
            Outcome.GONE, status, reason=f"HTTP {status}", scheme=scheme, body_bytes=read
        )
    if 400 <= status < 500 and status not in (401, 408, 429):
        return DeliveryResult(
            Outcome.PERMANENT, status, reason=f"HTTP {status}", scheme=scheme, body_bytes=read
        )
    retry_after = parse_retry_after(retry_after_header, now=opts.clock())
    if retry_after is not None:
        retry_after = min(retry_after, opts.max_backoff, _DRAMATIQ_MAX_DELAY)
    kind = "redirect (not followed)" if 300 <= status < 400 else f"HTTP {status}"
    return DeliveryResult(
        Outcome.RETRY, status, retry_after, reason=kind, scheme=scheme, body_bytes=read
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header (delta seconds or an HTTP date) into seconds.

    Returns ``None`` when absent or unparseable; past dates give ``0.0``.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)


def _new_client(opts: DeliveryOptions, *, allow_private_addresses: bool) -> httpx.Client:
    # follow_redirects=False: a redirect is classified, never followed blindly.
    # The guarded transport re-checks the address it connects to (no DNS
    # rebinding after check_destination); trust_env=False keeps proxies from
    # the environment out, since the check would then apply to the proxy.
    return httpx.Client(
        timeout=opts.timeout(),
        follow_redirects=False,
        trust_env=False,
        transport=net.guarded_transport(allow_private_addresses=allow_private_addresses),
    )


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


# --------------------------------------------------------------------------- host tracking


def host_of(url: str) -> str:
    """The host an inbox URL belongs to, lower case, with its port when explicit."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return f"{host}:{parts.port}" if parts.port is not None else host


def _host_key(host: str) -> KvKey:
    return ("botkit", "hosts", host)


def _day(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y-%m-%d")


def record_host_failure(
    kv: KvStore, host: str, *, now: float | None = None, unavailable_after_days: int = 3
) -> bool:
    """Record a retryable delivery failure to ``host`` today; return whether it is unavailable.

    Only the distinct UTC day is stored, so the KV is written at most once per
    host and day however many deliveries fail.
    """
    today = _day(time.time() if now is None else now)
    key = _host_key(host)
    for _ in range(_MAX_CAS_ATTEMPTS):
        current = kv.get(key)
        record = current if isinstance(current, dict) else {}
        raw_days = record.get("days")
        days = [d for d in raw_days if isinstance(d, str)] if isinstance(raw_days, list) else []
        if today in days:
            return bool(record.get("unavailable"))
        days = sorted([*days, today])[-_MAX_FAILURE_DAYS:]
        unavailable = len(days) >= unavailable_after_days
        new: dict[str, JsonValue] = {"days": list(days), "unavailable": unavailable}
        if kv.cas(key, current, new):
            if unavailable and not record.get("unavailable"):
                logger.warning("Host %s marked unavailable after failures on %s", host, days)
            return unavailable
    raise RuntimeError(f"could not record a failure for {host!r}: too much contention")


def record_host_success(kv: KvStore, host: str) -> None:
    """Clear the failure record of ``host`` after a successful delivery."""
    key = _host_key(host)
    # Read first: a success is the common case and usually has nothing to clear.
    if kv.get(key) is not None:
        kv.delete(key)


#: Clearing the record on a verified inbound request re-enables delivery (Mastodon does so).
reset_host = record_host_success


def is_host_available(kv: KvStore, host: str) -> bool:
    """Whether deliveries to ``host`` should be attempted (not marked unavailable)."""
    record = kv.get(_host_key(host))
    return not (isinstance(record, dict) and record.get("unavailable"))


# --------------------------------------------------------------------------- the job


def _options(federation: FederationLike) -> DeliveryOptions:
    return federation.delivery_options or DeliveryOptions()


def perform_delivery(
    federation: FederationLike,
    inbox_url: str,
    body: bytes,
    *,
    client: httpx.Client | None = None,
) -> DeliveryResult:
    """One delivery attempt with its side effects, but without Dramatiq.

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


def _checked_arguments(fn: Callable[_P, None]) -> Callable[_P, None]:
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

    return checked


def _require(value: object, kind: type | tuple[type, ...], name: str, job: str) -> None:
    """Raise :class:`PermanentDeliveryError` unless the job argument ``name`` is a ``kind``."""
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        wanted = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
        raise PermanentDeliveryError(f"{job}: {name} must be {wanted}, not {value!r:.100}")


def _resolve(owner: FederationLike, username: str) -> FederationLike:
    """The federation a job belongs to: several may share one broker (and one actor)."""
    if username == owner.username:
        return owner
    from botkit_tasks.federation import get_federation

    try:
        return get_federation(owner.broker, username)
    except LookupError as exc:
        raise PermanentDeliveryError(str(exc)) from None


def declare_delivery_actors(federation: FederationLike) -> dramatiq.Actor[..., None]:
    """Declare the ``botkit_deliver`` actor (queue ``botkit.outbox``) on ``federation.broker``.

    The actor takes ``(username, activity_id, inbox_url, activity=None,
    direct=False)``: the body is read from the KV store unless ``activity`` is
    given inline.  Fan-out deliveries (neither inline nor ``direct``) are
    dropped when their host has meanwhile been marked unavailable.
    Returns the actor (also reachable as ``broker.get_actor("botkit_deliver")``).
    """
    owner = federation
    opts = _options(owner)
    broker = owner.broker
    wanted: dict[str, Any] = {
        "max_retries": opts.max_retries,
        "min_backoff": max(int(opts.min_backoff * 1000), 1),
        "max_backoff": max(int(opts.max_backoff * 1000), 1),
        "throws": (PermanentDeliveryError,),
        # Two signed requests (double knock) each bounded by the total timeout.
        "time_limit": int((2 * opts.total_timeout + 2 * opts.connect_timeout + 30) * 1000),
    }
    # @actor rejects options no installed middleware understands.
    actor_options = {k: v for k, v in wanted.items() if k in broker.actor_options}
    if "max_retries" not in actor_options:
        logger.warning("Broker has no Retries middleware: deliveries will not be retried")
    # One pooled client per declared actor, shared by the worker threads
    # (httpx.Client is thread-safe) so keep-alive connections are reused.
    clients: dict[bool, httpx.Client] = {}
    clients_lock = threading.Lock()

    def client(allow_private_addresses: bool) -> httpx.Client:
        with clients_lock:
            if allow_private_addresses not in clients:
                clients[allow_private_addresses] = _new_client(
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
        _require(username, str, "username", "botkit_deliver")
        _require(activity_id, str, "activity_id", "botkit_deliver")
        _require(inbox_url, str, "inbox_url", "botkit_deliver")
        _require(activity, (dict, type(None)), "activity", "botkit_deliver")
        federation = _resolve(owner, username)
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
            delay = None if result.retry_after is None else int(result.retry_after * 1000)
            raise dramatiq.Retry(f"{inbox_url}: {result.reason}", delay=delay)
        if result.outcome is Outcome.PERMANENT:
            logger.warning(
                "Delivery of %s to %s failed permanently: %s", activity_id, inbox_url, result.reason
            )
            raise PermanentDeliveryError(f"{inbox_url}: {result.reason}")

    deliver_actor: dramatiq.Actor[..., None] = dramatiq.actor(
        actor_name=DELIVER_ACTOR_NAME,
        queue_name=OUTBOX_QUEUE,
        broker=broker,
        **actor_options,
    )(_checked_arguments(botkit_deliver))
    # The pool lives as long as the actor; closing it then (or at exit) shuts
    # its keep-alive sockets cleanly instead of leaving them to the GC.
    weakref.finalize(deliver_actor, _close_all, clients)
    return deliver_actor


def _close_all(clients: dict[bool, httpx.Client]) -> None:
    for client in clients.values():
        client.close()
    clients.clear()
