"""One delivery attempt: sign at send time, POST, read a capped answer, classify it.

The double knock (a 401 retried at once with the other signature scheme, the
scheme that worked remembered per origin) happens here.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

from botkit_tasks.federation import net, signatures
from botkit_tasks.kv.base import KvStore

from .options import DeliveryOptions
from .outcome import DeliveryResult, Outcome, classify

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = ["ACTIVITY_CONTENT_TYPE", "DEFAULT_USER_AGENT", "deliver_once", "new_client"]

# One logger for the whole package, under the name it has always had.
logger = logging.getLogger("botkit_tasks.federation.delivery")

#: The media type of every delivered body.
ACTIVITY_CONTENT_TYPE = "application/activity+json"
#: Sent when the federation object does not define ``user_agent``.
DEFAULT_USER_AGENT = net.DEFAULT_USER_AGENT


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
    http = client or new_client(opts, allow_private_addresses=allow_private_addresses)
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
    return classify(status, retry_after_header, opts, scheme, read)


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


def new_client(opts: DeliveryOptions, *, allow_private_addresses: bool) -> httpx.Client:
    """An httpx client for deliveries: no redirects followed, destinations re-checked."""
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
