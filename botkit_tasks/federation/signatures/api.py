"""The public entry points: sign an outgoing request, verify an incoming one (either scheme).

Re-exported by :mod:`botkit_tasks.federation.signatures`, which describes the rules.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa

from . import cavage, rfc9421
from .base import (
    DEFAULT_MAX_SKEW,
    PRECHECK,
    Headers,
    Scheme,
    SignatureError,
    VerifiedSignature,
    digest_header,
    header_map,
    header_pairs,
    http_date,
    split_url,
)

__all__ = ["precheck_request", "sign_request", "signature_key_id", "verify_request"]


def sign_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    private_key: rsa.RSAPrivateKey,
    key_id: str,
    scheme: Scheme = "draft-cavage",
    now: float | None = None,
) -> dict[str, str]:
    """Sign an outgoing request.

    Call it when sending (every attempt), never when enqueueing: the ``Date``
    and ``created`` it writes are only accepted for an hour.

    Args:
        method: The HTTP method, e.g. ``"POST"``.
        url: The absolute URL the request goes to.
        headers: Headers to send and sign (``Content-Type``, ``Accept`` …).
            Any ``Host``, ``Date``, digest or signature header in it is replaced.
        body: The exact body bytes, or ``None`` for a request without a body.
        private_key: The signer's RSA private key.
        key_id: The public key's URL, e.g. ``https://bot.example/users/bot#main-key``.
        scheme: ``"draft-cavage"`` (what every fediverse server accepts) or ``"rfc9421"``.
        now: The signing time as POSIX seconds (tests); defaults to the clock.

    Returns:
        All headers to send: the given ones plus ``Host``, ``Date``, ``Digest``
        (draft-cavage) or ``Content-Digest`` (RFC 9421) when there is a body,
        ``Signature`` and, for RFC 9421, ``Signature-Input``.

    Raises:
        SignatureError: The URL is not an absolute http(s) URL, or the headers
            cannot be signed.
    """
    if scheme not in ("draft-cavage", "rfc9421"):
        raise ValueError(f"unknown signature scheme {scheme!r}")
    when = time.time() if now is None else now
    # Sign what goes on the wire: httpx sends IDNA hosts, percent-encoded
    # paths and no default port, and the receiver verifies against those.
    try:
        url = str(httpx.URL(url))
    except (httpx.InvalidURL, TypeError) as exc:
        raise SignatureError(f"invalid URL {url!r}: {exc}") from exc
    authority, _, _ = split_url(url)
    replaced = {"host", "date", "digest", "content-digest", "signature", "signature-input"}
    out = {name: value for name, value in headers.items() if name.lower() not in replaced}
    out["Host"] = authority
    out["Date"] = http_date(when)
    if scheme == "draft-cavage":
        if body is not None:
            out["Digest"] = digest_header(body)
        cavage.sign(method, url, out, body, private_key, key_id)
    else:
        rfc9421.sign(method, url, out, body, private_key, key_id, when)
    return out


def signature_key_id(headers: Headers) -> str | None:
    """Return the key id a request claims to be signed with, without verifying.

    Reads ``Signature-Input`` (RFC 9421) when present, else the draft-cavage
    ``Signature`` header.

    Returns:
        The key id, or ``None`` when the request is unsigned or the header is
        malformed (never raises on hostile input).
    """
    try:
        combined = header_map(headers)
        if "signature-input" in combined:
            _, _, params = rfc9421.signature_input(combined)
            key_id = params.get("keyid")
        elif "signature" in combined:
            key_id = cavage.parse_signature_header(combined["signature"]).get("keyId")
        else:
            return None
    except SignatureError:
        return None
    return key_id if isinstance(key_id, str) and key_id else None


def verify_request(
    method: str,
    url: str,
    headers: Headers,
    body: bytes | None,
    *,
    public_key: Any,
    now: float | None = None,
    max_skew: float = DEFAULT_MAX_SKEW,
) -> VerifiedSignature:
    """Verify a signed incoming request (draft-cavage or RFC 9421).

    Args:
        method: The request's HTTP method.
        url: The absolute URL the request was sent to (scheme, host as the client
            used it, path and query), as the signer saw it.
        headers: The request headers (a mapping, or pairs with repeated names).
        body: The raw body bytes (``None`` or ``b""`` when there is none).
        public_key: The signer's RSA public key (``RSAPublicKey``).
        now: The current time as POSIX seconds (tests); defaults to the clock.
        max_skew: How far ``Date``/``created`` may be from ``now``, in seconds.

    Returns:
        The key id and scheme of the valid signature.

    Raises:
        SignatureError: Unsigned, malformed, stale, tampered with, a body digest
            that does not match, or a signature that does not verify.
    """
    return _verify(method, url, headers, body, public_key, now, max_skew)


def precheck_request(
    method: str,
    url: str,
    headers: Headers,
    body: bytes | None,
    *,
    now: float | None = None,
    max_skew: float = DEFAULT_MAX_SKEW,
) -> str:
    """Run every check of :func:`verify_request` except the signature itself.

    Use it before fetching the signer's key, so that stale, unsigned or
    tampered-digest requests cost no network round trip.

    Returns:
        The key id the request claims.

    Raises:
        SignatureError: As :func:`verify_request`, for everything but the
            cryptographic check.
    """
    return _verify(method, url, headers, body, PRECHECK, now, max_skew).key_id


def _verify(
    method: str,
    url: str,
    headers: Headers,
    body: bytes | None,
    public_key: Any,
    now: float | None,
    max_skew: float,
) -> VerifiedSignature:
    when = time.time() if now is None else now
    try:
        if not isinstance(method, str) or not isinstance(url, str):
            raise SignatureError("the method and URL must be strings")
        if body is not None and not isinstance(body, bytes):
            raise SignatureError("the body must be bytes")
        pairs = header_pairs(headers)
        combined = header_map(pairs)
        if "signature-input" in combined:
            return rfc9421.verify(method, url, pairs, combined, body, public_key, when, max_skew)
        if "signature" in combined:
            return cavage.verify(method, url, combined, body, public_key, when, max_skew)
    except SignatureError:
        raise
    except Exception as exc:  # hostile input must never surface as anything else
        raise SignatureError(f"malformed signed request ({type(exc).__name__})") from exc
    raise SignatureError("the request is not signed")
