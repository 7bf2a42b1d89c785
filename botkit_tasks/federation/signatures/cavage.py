"""draft-cavage-12 HTTP signatures, as Mastodon sends and checks them.

Internal to :mod:`botkit_tasks.federation.signatures` (which describes the
rules); :func:`cavage_signing_string` is re-exported there.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .base import (
    MAX_SIGNATURE_HEADER,
    METHODS_WITH_BODY,
    PRECHECK,
    SignatureError,
    VerifiedSignature,
    b64decode,
    check_time,
    require_rsa,
    split_url,
)

__all__ = ["cavage_signing_string", "parse_signature_header", "sign", "verify"]

_CAVAGE_ALGORITHMS = frozenset({"rsa-sha256", "hs2019"})
# created/expires: POSIX seconds; 15 digits is far beyond any plausible time.
_INTEGER = re.compile(r"[0-9]{1,15}")
_CAVAGE_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"([^"\\]*)"|([0-9]+))\s*')


def cavage_signing_string(
    method: str,
    path_and_query: str,
    headers: Mapping[str, str],
    signed: Iterable[str],
    *,
    created: str | None = None,
    expires: str | None = None,
) -> str:
    """Build the draft-cavage signing string.

    Args:
        method: The HTTP method (lower-cased in ``(request-target)``).
        path_and_query: The request target, e.g. ``/users/a/inbox?x=1``.
        headers: Header values keyed by lower-case name.
        signed: The names listed in the ``headers`` parameter, in order.
        created: The ``created`` parameter, for a signed ``(created)``.
        expires: The ``expires`` parameter, for a signed ``(expires)``.

    Returns:
        ``name: value`` lines joined by ``\\n``, without a trailing newline.

    Raises:
        SignatureError: A listed header or pseudo-header is missing.
    """
    lines = []
    for name in signed:
        if name == "(request-target)":
            value = f"{method.lower()} {path_and_query}"
        elif name == "(created)":
            if created is None:
                raise SignatureError('"(created)" is signed but the created parameter is missing')
            value = created
        elif name == "(expires)":
            if expires is None:
                raise SignatureError('"(expires)" is signed but the expires parameter is missing')
            value = expires
        elif name in headers:
            value = headers[name]
        else:
            raise SignatureError(
                f"header {name!r} is in the signed list but missing from the request"
            )
        lines.append(f"{name}: {value}")
    return "\n".join(lines)


def parse_signature_header(value: str) -> dict[str, str]:
    """Parse a draft-cavage ``Signature`` header into its parameters."""
    if len(value) > MAX_SIGNATURE_HEADER:
        raise SignatureError("the Signature header is too long")
    text = value.strip()
    # Some implementations send the Authorization-header form "Signature keyId=…".
    if text[:10].lower() == "signature ":
        text = text[10:]
    params: dict[str, str] = {}
    pos = 0
    while True:
        match = _CAVAGE_PARAM.match(text, pos)
        if match is None:
            raise SignatureError(f"malformed Signature header near position {pos}")
        name = match.group(1)
        if name in params:
            raise SignatureError(f"duplicate {name!r} parameter in the Signature header")
        params[name] = match.group(2) if match.group(2) is not None else match.group(3)
        pos = match.end()
        if pos == len(text):
            return params
        if text[pos] != ",":
            raise SignatureError(f"malformed Signature header near position {pos}")
        pos += 1


def sign(
    method: str,
    url: str,
    out: dict[str, str],
    body: bytes | None,
    private_key: rsa.RSAPrivateKey,
    key_id: str,
) -> None:
    """Add the ``Signature`` header to ``out``, which already holds Host, Date and Digest."""
    _, path, query = split_url(url)
    lowered = {name.lower(): value for name, value in out.items()}
    signed = ["(request-target)", "host", "date"]
    if body is not None:
        signed.append("digest")
    # Mastodon signs every header it sets except User-Agent and Accept-Encoding;
    # of those, Content-Type (deliveries) and Accept (fetches) are the usual ones.
    signed += [name for name in ("content-type", "accept") if name in lowered]
    target = path + (f"?{query}" if query else "")
    string = cavage_signing_string(method, target, lowered, signed)
    signature = private_key.sign(string.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    out["Signature"] = (
        f'keyId="{key_id}",algorithm="rsa-sha256",headers="{" ".join(signed)}",'
        f'signature="{base64.b64encode(signature).decode("ascii")}"'
    )


def _verify_digest(headers: Mapping[str, str], body: bytes) -> None:
    value = headers.get("digest", "")
    for entry in value.split(","):
        algorithm, sep, encoded = entry.strip().partition("=")
        if sep and algorithm.strip().lower() == "sha-256":
            digest = b64decode(encoded.strip(), "the SHA-256 Digest")
            if len(digest) != 32:
                raise SignatureError("the SHA-256 Digest does not have 32 bytes")
            if not hmac.compare_digest(digest, hashlib.sha256(body).digest()):
                raise SignatureError("the Digest does not match the body")
            return
    raise SignatureError("the Digest header has no SHA-256 value")


def verify(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    public_key: Any,
    now: float,
    max_skew: float,
) -> VerifiedSignature:
    """Check a draft-cavage signed request; ``headers`` are lower-cased (:func:`header_map`).

    With :data:`PRECHECK` as ``public_key``, every check but the cryptographic one.
    """
    params = parse_signature_header(headers["signature"])
    key_id = params.get("keyId")
    if not key_id:
        raise SignatureError("the Signature header has no keyId")
    if "signature" not in params:
        raise SignatureError("the Signature header has no signature")
    algorithm = params.get("algorithm", "hs2019")
    if algorithm.lower() not in _CAVAGE_ALGORITHMS:
        raise SignatureError(f"unsupported signature algorithm {algorithm!r}")
    hs2019 = algorithm.lower() == "hs2019"
    signed = params.get("headers", "(created)" if hs2019 else "date").lower().split()
    if not signed:
        raise SignatureError("the Signature header lists no signed headers")
    if len(set(signed)) != len(signed):
        raise SignatureError("a header is listed twice in the signed headers")
    if not hs2019 and ("(created)" in signed or "(expires)" in signed):
        raise SignatureError("(created) and (expires) are only allowed with algorithm hs2019")
    for required in ("(request-target)", "host"):
        if required not in signed:
            raise SignatureError(f"{required!r} must be signed")
    if "date" not in signed and "(created)" not in signed:
        raise SignatureError("'date' or '(created)' must be signed")
    has_body = bool(body) or method.upper() in METHODS_WITH_BODY
    if has_body and "digest" not in signed:
        raise SignatureError("'digest' must be signed for a request with a body")

    # Time window: the Date header and/or the (created)/(expires) parameters.
    created_at: float | None = None
    if "date" in signed:
        try:
            parsed = email.utils.parsedate_to_datetime(headers["date"])
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise SignatureError("the Date header is missing or not an HTTP date") from exc
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.timezone.utc)
        created_at = parsed.timestamp()
        check_time(created_at, now, max_skew, "the Date header")
    for name in ("created", "expires"):
        if name in params and not _INTEGER.fullmatch(params[name]):
            raise SignatureError(f"the {name} parameter is not an integer")
    if "(created)" in signed:
        if "created" not in params:
            raise SignatureError('"(created)" is signed but the created parameter is missing')
        created_at = float(int(params["created"]))
        check_time(created_at, now, max_skew, "the created parameter")
    if "expires" in params and int(params["expires"]) + max_skew < now:
        raise SignatureError("the signature has expired")

    if "digest" in signed:
        _verify_digest(headers, body or b"")

    signature = b64decode(params["signature"], "the signature")
    if public_key is PRECHECK:
        return VerifiedSignature(key_id, "draft-cavage", tuple(signed), created_at)
    key = require_rsa(public_key)
    _, path, query = split_url(url)
    # Mastodon verifies with the query first, then without it: older senders
    # (Mastodon < 4.2 among them) left the query out of (request-target).
    targets = [f"{path}?{query}", path] if query else [path]
    for target in targets:
        string = cavage_signing_string(
            method,
            target,
            headers,
            signed,
            created=params.get("created"),
            expires=params.get("expires"),
        )
        try:
            key.verify(signature, string.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
        except (_CryptoInvalidSignature, ValueError):
            continue
        return VerifiedSignature(key_id, "draft-cavage", tuple(signed), created_at)
    raise SignatureError("the signature does not verify with the signer's key")
