"""The inbox endpoint: verify the signature, de-duplicate by activity id, enqueue the job.

The order and the status codes are described in :mod:`botkit_tasks.federation.inbox`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import anyio.to_thread
import httpx

from ...errors import StoreError
from ...runners.base import Job
from ..activities import MalformedActivityError, first_id, has_type, require_actor_id
from ..delivery import host_of, reset_host
from ..keys import KeyResolver, verify_incoming
from ..signatures import SignatureError, signature_key_id
from .asgi import Receive, Reject, Scope, Send, lifespan, parse_activity, read_body, respond
from .job import INBOX_ACTOR_NAME
from .limits import InboxLimits, KeyFetchGate, KeyFetchThrottled, RateLimiter, retry_after_header

if TYPE_CHECKING:
    from ..base import InboxFederation

__all__ = ["SEEN_TTL", "InboxApp"]

# One logger for the whole package, under the name it has always had.
logger = logging.getLogger("botkit_tasks.federation.inbox")

#: How long (seconds) an activity id is remembered for de-duplication.
SEEN_TTL = 24 * 3600

#: Longest activity id kept verbatim in a de-duplication key; longer ones are hashed
#: so the key stays under the store's 1 KiB key limit.
_SEEN_KEY_VERBATIM = 512


def _origin(url: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(url)
        return (parts.hostname or "", parts.port)
    except ValueError:
        return None


def _sender_host(headers: Mapping[str, str]) -> str:
    """The host the signature's ``keyId`` names (``""`` when unsigned or unparsable)."""
    try:
        key_id = signature_key_id(headers)
        return host_of(key_id) if key_id else ""
    except Exception:
        return ""


class InboxApp:
    """The ASGI application for ``{actor_id}/inbox`` and the shared ``{base_url}/inbox``.

    A plain ASGI callable: mount it in any ASGI server or framework.  Requests
    to other paths get 404.

    Args:
        federation: The receiving federation.
        limits: Flood limits (:class:`~.limits.InboxLimits`; its defaults when
            omitted).  Requests beyond them get ``429`` with ``Retry-After``.
    """

    def __init__(self, federation: InboxFederation, *, limits: InboxLimits | None = None) -> None:
        self.federation = federation
        self.limits = limits if limits is not None else InboxLimits()
        self.rate = RateLimiter(self.limits)
        self._gate: KeyFetchGate | None = None
        self._gated_keys: KeyResolver | None = None
        self._gated_from: KeyResolver | None = None
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
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path = scope.get("path") or "/"
        if path != "/" and path.endswith("/"):
            path = path.rstrip("/") or "/"
        if path not in self.paths:
            await respond(send, 404, "not found")
            return
        if scope.get("method") != "POST":
            await respond(send, 405, "use POST", extra=[(b"allow", b"POST")])
            return
        headers = httpx.Headers(list(scope.get("headers") or ()))
        # Limits first: a flood costs neither a body read nor a thread.
        wait = self.rate.admit(_sender_host(headers))
        if wait is not None:
            await respond(send, 429, "too many requests", extra=[retry_after_header(wait)])
            return
        try:
            try:
                body = await read_body(headers, receive)
            except Reject as exc:
                await respond(send, exc.status, exc.reason)
                return
            status, reason, retry_after = await anyio.to_thread.run_sync(
                self._handle_limited, self._target_url(scope), headers, body
            )
        finally:
            self.rate.done()
        extra = [retry_after_header(retry_after)] if retry_after is not None else None
        await respond(send, status, reason, extra=extra)

    def _keys(self) -> KeyResolver:
        """The federation's key resolver, its fetches bounded by the inbox's limits."""
        keys = self.federation.keys
        if self._gated_from is not keys or self._gated_keys is None:
            if self._gate is not None:
                self._gate.close()
            self._gate = KeyFetchGate(keys.fetcher, self.limits)
            self._gated_keys = KeyResolver(
                keys.kv,
                self._gate,
                ttl=keys.ttl,
                failure_ttl=keys.failure_ttl,
                min_refresh_interval=keys.min_refresh_interval,
            )
            self._gated_from = keys
        return self._gated_keys

    def _handle_limited(
        self, url: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, str, float | None]:
        keys = self._keys()
        assert self._gate is not None
        with self._gate.budget():
            try:
                status, reason = self.handle(url, headers, body, keys=keys)
            except KeyFetchThrottled as exc:
                return 429, str(exc), exc.retry_after
        return status, reason, None

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

    def handle(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        keys: KeyResolver | None = None,
    ) -> tuple[int, str]:
        """Process one inbox POST synchronously; return ``(status, reason)``.

        Runs in a worker thread (it may read the store and fetch keys).  Exposed
        for tests and for frameworks that already read the body; the rate limits
        apply only to requests through the ASGI interface.
        """
        try:
            return self._handle(url, headers, body, keys or self.federation.keys)
        except KeyFetchThrottled:
            raise
        except Reject as exc:
            return exc.status, exc.reason
        except StoreError:
            logger.exception("inbox: key-value store failed")
            return 503, "temporarily unavailable"
        except Exception:
            # Whatever else broke was reached by this request's content: the
            # sender gets a 4xx (it must not retry forever) and we get the log.
            logger.exception("inbox: request could not be processed")
            return 400, "request could not be processed"

    def _handle(
        self, url: str, headers: Mapping[str, str], body: bytes, keys: KeyResolver
    ) -> tuple[int, str]:
        federation = self.federation
        activity = parse_activity(body)
        try:
            key_id = signature_key_id(headers)
        except Exception:
            # A header too mangled to parse is as good as no signature.
            key_id = None
        if not key_id:
            raise Reject(401, "request is not signed")
        try:
            actor_id = require_actor_id(activity)
        except MalformedActivityError as exc:
            raise Reject(400, "activity has no usable actor") from exc
        activity_id = activity.get("id")
        if activity_id is not None and not (isinstance(activity_id, str) and activity_id):
            raise Reject(400, "activity id is not a string")

        if self._is_self_delete(activity, actor_id) and not self._knows_actor(actor_id, key_id):
            # Mastodon's shortcut: the actor is gone and was never known here, so
            # there is nothing to delete; fetching its key would only get a 410.
            return 202, "ignored"
        if _origin(key_id) != _origin(actor_id):
            raise Reject(401, "signing key and actor are on different hosts")

        try:
            _verified, remote_key = verify_incoming("POST", url, headers, body, keys)
        except SignatureError as exc:
            if self._is_self_delete(activity, actor_id) and self._key_unavailable(key_id, keys):
                # The deleted actor's key is gone too (404/410): nothing can be
                # verified, and the sender would retry for days. Nothing is queued.
                return 202, "ignored"
            raise Reject(401, f"signature verification failed: {exc}"[:300]) from exc
        except (StoreError, KeyFetchThrottled):
            raise
        except Exception as exc:
            logger.debug("inbox: verification error", exc_info=True)
            raise Reject(401, "signature could not be verified") from exc
        if remote_key.owner != actor_id:
            raise Reject(401, "signing key does not belong to the activity's actor")
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
                        raise Reject(400, "activity id cannot be stored") from exc
                    if not first_time:
                        return 202, "duplicate"
                federation.runner.enqueue(
                    Job(INBOX_ACTOR_NAME, (federation.username, activity, actor_id))
                )
        except (Reject, StoreError):
            raise
        except Exception:
            logger.exception("inbox: could not enqueue activity %s", activity_id)
            self._forget(seen_key)
            return 503, "temporarily unavailable"
        return 202, "accepted"

    def _transaction(self) -> AbstractContextManager[Any]:
        from sqlalchemy import Engine

        from ..._sql import atomic

        engine = getattr(self.federation.kv, "engine", None)
        shared = engine is not None and self.federation.runner.engine is engine
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

    def _key_unavailable(self, key_id: str, keys: KeyResolver) -> bool:
        try:
            return keys.resolve(key_id) is None
        except (StoreError, KeyFetchThrottled):
            raise
        except Exception:
            return True
