"""The inbox: an ASGI endpoint that verifies and enqueues, and the job that dispatches.

The HTTP side does only what must happen before answering (Mastodon's order):
read the raw body under a size cap, parse it, verify the HTTP signature with the
sender's (cached) key, check that the key belongs to ``activity.actor``,
de-duplicate by activity id for 24 hours, enqueue one ``botkit_inbox`` job and
answer ``202 Accepted``.  Everything slow or fallible that the sender cannot fix
(fetching the actor document, running the bot's handlers) happens in the job,
on a worker, with retries.

Status codes: 202 accepted (also for duplicates and for a self-``Delete`` of an
actor we do not know, which is ignored without fetching anything); 400 a body
that is not a JSON object or an activity without a usable actor; 401 a missing
or bad signature, a digest mismatch, or a key whose owner is not the actor;
404 another path; 405 another method; 413 a body over 1 MiB; 503 when the
key-value store or the broker fails (the sender retries).  Hostile input never
produces a 5xx.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import anyio.to_thread
import dramatiq
import httpx

from ..errors import StoreError
from .activities import (
    MalformedActivityError,
    first_id,
    has_type,
    is_http_url,
    require_actor_id,
    types,
)

if TYPE_CHECKING:
    from . import Federation

__all__ = [
    "ACTOR_CACHE_TTL",
    "INBOX_ACTOR_NAME",
    "INBOX_QUEUE",
    "MAX_BODY_BYTES",
    "SEEN_TTL",
    "InboxApp",
    "InboxContext",
    "declare_inbox_actor",
    "load_actor",
    "process_inbox_job",
]

logger = logging.getLogger(__name__)

#: Largest request body (bytes) the inbox reads; larger requests get 413.
MAX_BODY_BYTES = 1 << 20
#: How long (seconds) an activity id is remembered for de-duplication.
SEEN_TTL = 24 * 3600
#: How long (seconds) a fetched remote actor document is cached in the key-value store.
ACTOR_CACHE_TTL = 3600
#: The Dramatiq actor and queue that process accepted activities.
INBOX_ACTOR_NAME = "botkit_inbox"
INBOX_QUEUE = "botkit.inbox"
#: Retries of an inbox job (Mastodon retries inbox processing 8 times, ~80 minutes).
INBOX_MAX_RETRIES = 8
#: Backoff bounds of inbox job retries, in milliseconds (Dramatiq's unit).
INBOX_MIN_BACKOFF_MS = 5_000
INBOX_MAX_BACKOFF_MS = 3_600_000

#: Longest activity id kept verbatim in a de-duplication key; longer ones are hashed
#: so the key stays under the store's 1 KiB key limit.
_SEEN_KEY_VERBATIM = 512

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class InboxContext:
    """What a handler gets besides the activity.

    Attributes:
        federation: the receiving :class:`~botkit_tasks.federation.Federation`.
        activity: the verified activity, as received.
        actor: the sender's actor document (fetched, cached for an hour).
        actor_id: the sender's id; the HTTP signature was made with its key.
    """

    federation: Federation
    activity: dict[str, Any]
    actor: dict[str, Any]
    actor_id: str

    @property
    def actor_inbox(self) -> str | None:
        """The sender's personal inbox URL, or ``None`` when its document has none."""
        inbox = self.actor.get("inbox")
        return inbox if is_http_url(inbox) else None


class _Reject(Exception):
    """Ends request handling with an HTTP status and a short reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and which the
    # key-value store refuses; reject them as malformed input.
    raise ValueError(f"{name} is not valid JSON")


def _parse_activity(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and over-long integers;
        # RecursionError a deeply nested body.
        raise _Reject(400, "body is not valid JSON") from exc
    if not isinstance(value, dict):
        raise _Reject(400, "body is not a JSON object")
    try:
        # Lone surrogates (from "\ud800" escapes) cannot be stored or re-encoded.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError) as exc:
        raise _Reject(400, "body contains invalid characters") from exc
    return value


def _origin(url: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(url)
        return (parts.hostname or "", parts.port)
    except ValueError:
        return None


class InboxApp:
    """The ASGI application for ``{actor_id}/inbox`` and the shared ``{base_url}/inbox``.

    A plain ASGI callable: mount it in any ASGI server or framework.  Requests
    to other paths get 404.
    """

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self.paths = frozenset(
            {
                urlsplit(federation.inbox_url).path,
                urlsplit(federation.shared_inbox_url).path,
            }
        )
        base = urlsplit(federation.base_url)
        self._origin = f"{base.scheme}://{base.netloc}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path = scope.get("path") or "/"
        if path != "/" and path.endswith("/"):
            path = path.rstrip("/") or "/"
        if path not in self.paths:
            await _respond(send, 404, "not found")
            return
        if scope.get("method") != "POST":
            await _respond(send, 405, "use POST", extra=[(b"allow", b"POST")])
            return
        headers = httpx.Headers(list(scope.get("headers") or ()))
        try:
            body = await _read_body(headers, receive)
        except _Reject as exc:
            await _respond(send, exc.status, exc.reason)
            return
        status, reason = await anyio.to_thread.run_sync(
            self.handle, self._target_url(scope), headers, body
        )
        await _respond(send, status, reason)

    def _target_url(self, scope: Scope) -> str:
        # Verify against the URL the sender signed: our public origin (the
        # server may sit behind a TLS-terminating proxy) and the path exactly
        # as it was on the wire.
        raw_path = scope.get("raw_path")
        if isinstance(raw_path, bytes) and raw_path:
            path = raw_path.decode("latin-1")
        else:
            path = quote(scope.get("path") or "/", safe="/%:@!$&'()*+,;=-._~")
        query = scope.get("query_string") or b""
        if query:
            path = f"{path}?{query.decode('latin-1')}"
        return f"{self._origin}{path}"

    def handle(self, url: str, headers: Mapping[str, str], body: bytes) -> tuple[int, str]:
        """Process one inbox POST synchronously; return ``(status, reason)``.

        Runs in a worker thread (it may read the store and fetch keys).  Exposed
        for tests and for frameworks that already read the body.
        """
        try:
            return self._handle(url, headers, body)
        except _Reject as exc:
            return exc.status, exc.reason
        except StoreError:
            logger.exception("inbox: key-value store failed")
            return 503, "temporarily unavailable"
        except Exception:
            # Whatever else broke was reached by this request's content: the
            # sender gets a 4xx (it must not retry forever) and we get the log.
            logger.exception("inbox: request could not be processed")
            return 400, "request could not be processed"

    def _handle(self, url: str, headers: Mapping[str, str], body: bytes) -> tuple[int, str]:
        from .delivery import host_of, reset_host
        from .keys import verify_incoming
        from .signatures import SignatureError, signature_key_id

        federation = self.federation
        activity = _parse_activity(body)
        try:
            key_id = signature_key_id(headers)
        except Exception:
            # A header too mangled to parse is as good as no signature.
            key_id = None
        if not key_id:
            raise _Reject(401, "request is not signed")
        try:
            actor_id = require_actor_id(activity)
        except MalformedActivityError as exc:
            raise _Reject(400, "activity has no usable actor") from exc
        activity_id = activity.get("id")
        if activity_id is not None and not (isinstance(activity_id, str) and activity_id):
            raise _Reject(400, "activity id is not a string")

        if self._is_self_delete(activity, actor_id) and not self._knows_actor(actor_id, key_id):
            # Mastodon's shortcut: the actor is gone and was never known here, so
            # there is nothing to delete; fetching its key would only get a 410.
            return 202, "ignored"
        if _origin(key_id) != _origin(actor_id):
            raise _Reject(401, "signing key and actor are on different hosts")

        try:
            _verified, remote_key = verify_incoming("POST", url, headers, body, federation.keys)
        except SignatureError as exc:
            if self._is_self_delete(activity, actor_id) and self._key_unavailable(key_id):
                # The deleted actor's key is gone too (404/410): nothing can be
                # verified, and the sender would retry for days. Nothing is queued.
                return 202, "ignored"
            raise _Reject(401, f"signature verification failed: {exc}"[:300]) from exc
        except StoreError:
            raise
        except Exception as exc:
            logger.debug("inbox: verification error", exc_info=True)
            raise _Reject(401, "signature could not be verified") from exc
        if remote_key.owner != actor_id:
            raise _Reject(401, "signing key does not belong to the activity's actor")
        # A host that just sent us a verified request is up again (Mastodon resets
        # its delivery failure tracking the same way).
        reset_host(federation.kv, host_of(actor_id))

        seen_key = None if activity_id is None else self._seen_key(activity_id)
        try:
            with self._transaction():
                # Remember the id and enqueue together: in one SQL transaction when
                # the store and the broker share an engine, so a crash in between
                # cannot leave the id marked seen and the activity lost.
                if seen_key is not None:
                    try:
                        first_time = federation.kv.cas(seen_key, None, 1, ttl=SEEN_TTL)
                    except (TypeError, ValueError) as exc:
                        # The store refuses ids it cannot hold (e.g. NUL characters).
                        raise _Reject(400, "activity id cannot be stored") from exc
                    if not first_time:
                        return 202, "duplicate"
                federation.broker.get_actor(INBOX_ACTOR_NAME).send(
                    federation.username, activity, actor_id
                )
        except (_Reject, StoreError):
            raise
        except Exception:
            logger.exception("inbox: could not enqueue activity %s", activity_id)
            self._forget(seen_key)
            return 503, "temporarily unavailable"
        return 202, "accepted"

    def _transaction(self) -> AbstractContextManager[Any]:
        from sqlalchemy import Engine

        from .._sql import atomic

        engine = getattr(self.federation.kv, "engine", None)
        shared = engine is not None and getattr(self.federation.broker, "engine", None) is engine
        if shared and isinstance(engine, Engine):
            return atomic(engine)
        return nullcontext()

    def _forget(self, seen_key: tuple[str, ...] | None) -> None:
        # Unmark the id so that the sender's retry is not taken for a duplicate
        # (a no-op when the transaction was rolled back anyway).
        if seen_key is None:
            return
        try:
            self.federation.kv.delete(seen_key)
        except Exception:
            logger.exception("inbox: could not clear de-duplication mark %s", seen_key)

    def _seen_key(self, activity_id: str) -> tuple[str, ...]:
        if len(activity_id.encode("utf-8", "surrogatepass")) > _SEEN_KEY_VERBATIM:
            import hashlib

            digest = hashlib.sha256(activity_id.encode("utf-8", "surrogatepass")).hexdigest()
            activity_id = f"sha256:{digest}"
        return ("botkit", self.federation.username, "seen", activity_id)

    @staticmethod
    def _is_self_delete(activity: Mapping[str, Any], actor_id: str) -> bool:
        return has_type(activity, "Delete") and first_id(activity.get("object")) == actor_id

    def _knows_actor(self, actor_id: str, key_id: str) -> bool:
        """Whether we hold anything about ``actor_id``: its key cached, or it follows us."""
        try:
            cached = self.federation.kv.get(("botkit", "remote-keys", key_id))
            if isinstance(cached, dict) and cached.get("owner") == actor_id:
                return True
            return self.federation.followers.get(actor_id) is not None
        except (TypeError, ValueError):
            # Ids the store cannot even hold as keys were never stored.
            return False

    def _key_unavailable(self, key_id: str) -> bool:
        try:
            return self.federation.keys.resolve(key_id) is None
        except StoreError:
            raise
        except Exception:
            return True


async def _read_body(headers: httpx.Headers, receive: Receive) -> bytes:
    length = headers.get("content-length")
    if length is not None:
        try:
            declared = int(length.strip())
        except ValueError:
            raise _Reject(400, "invalid Content-Length") from None
        if declared < 0:
            raise _Reject(400, "invalid Content-Length")
        if declared > MAX_BODY_BYTES:
            # Refuse before reading a byte of it.
            raise _Reject(413, "body too large")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Reject(400, "client disconnected")
        chunk = message.get("body") or b""
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _Reject(413, "body too large")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(
    send: Send, status: int, reason: str, *, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    if status == 202:
        body = b""
        headers = [(b"content-length", b"0")]
    else:
        body = json.dumps({"error": reason}).encode("utf-8")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
    headers.extend(extra or ())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# --------------------------------------------------------------------------- the job


def _inbox_job(username: str, activity: dict[str, Any], actor_id: str) -> None:
    """The arguments of a ``botkit_inbox`` job (a signature, never called)."""


_INBOX_JOB_SIGNATURE = inspect.signature(_inbox_job)


def declare_inbox_actor(federation: Federation) -> dramatiq.Actor[..., None]:
    """Declare ``botkit_inbox`` (queue ``botkit.inbox``) on the federation's broker.

    One actor serves every federation on the broker: the job carries the
    username and finds its federation with :func:`~botkit_tasks.federation.get_federation`.
    Declaring it again on the same broker keeps the existing actor.
    """
    broker = federation.broker
    existing = broker.actors.get(INBOX_ACTOR_NAME)
    if existing is not None and getattr(existing.fn, "_botkit_broker", None) is broker:
        return existing

    def botkit_inbox(*args: Any, **kwargs: Any) -> None:
        from . import get_federation

        # A message whose arguments do not fit can never succeed: do not retry it.
        try:
            username, activity, actor_id = _INBOX_JOB_SIGNATURE.bind(*args, **kwargs).args
        except TypeError as exc:
            raise MalformedActivityError(
                f"botkit_inbox: malformed job arguments {args!r:.200} {kwargs!r:.200}: {exc}"
            ) from None
        process_inbox_job(get_federation(broker, username), activity, actor_id)

    # Marks the function as ours for this broker (see the check above).
    setattr(botkit_inbox, "_botkit_broker", broker)  # noqa: B010
    wanted: dict[str, Any] = {
        "max_retries": INBOX_MAX_RETRIES,
        "min_backoff": INBOX_MIN_BACKOFF_MS,
        "max_backoff": INBOX_MAX_BACKOFF_MS,
        "throws": (MalformedActivityError,),
    }
    # @actor refuses options that no middleware of this broker understands.
    options = {name: value for name, value in wanted.items() if name in broker.actor_options}
    inbox_actor: dramatiq.Actor[[str, dict[str, Any], str], None] = dramatiq.actor(
        actor_name=INBOX_ACTOR_NAME, queue_name=INBOX_QUEUE, broker=broker, **options
    )(botkit_inbox)
    return inbox_actor


def process_inbox_job(federation: Federation, activity: Any, actor_id: Any) -> None:
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


def load_actor(federation: Federation, actor_id: str) -> dict[str, Any]:
    """Return the actor document of ``actor_id``: from the cache, or fetched and cached.

    Raises:
        MalformedActivityError: the document cannot be had for good (refused
            destination, 4xx other than 401/408/429, not an object, wrong id).
    """
    from .net import UnsafeDestinationError

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


def _kv_get(federation: Federation, key: tuple[str, ...]) -> Any:
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
