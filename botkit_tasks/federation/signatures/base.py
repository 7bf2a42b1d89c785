"""What both signature schemes share: the result and error types, header and URL helpers.

Internal to :mod:`botkit_tasks.federation.signatures`; import the public names
from there.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import rsa

from ...errors import BotkitError

__all__ = [
    "DEFAULT_MAX_SKEW",
    "MAX_SIGNATURE_HEADER",
    "METHODS_WITH_BODY",
    "PRECHECK",
    "Headers",
    "Scheme",
    "SignatureError",
    "VerifiedSignature",
    "b64decode",
    "check_time",
    "digest_header",
    "header_map",
    "header_pairs",
    "http_date",
    "require_rsa",
    "split_url",
]

#: The signature scheme of a request.
Scheme = Literal["draft-cavage", "rfc9421"]

#: Accepted distance between a signature's ``Date``/``created`` and now, in seconds
#: (Mastodon and Fedify both accept one hour either way).
DEFAULT_MAX_SKEW = 3600.0

#: A header collection: a mapping, or ``(name, value)`` pairs (repeated names joined by ", ").
Headers = Mapping[str, str] | Iterable[tuple[str, str]]

#: Passed as the public key by precheck_request(): run every check but the cryptography.
PRECHECK: Any = object()

#: Methods whose requests always carry content, so a signed digest is mandatory
#: even for an empty body (Mastodon: "a POST must sign digest").
METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
#: Hostile headers are rejected before any parsing work is spent on them.
MAX_SIGNATURE_HEADER = 8192


class SignatureError(BotkitError):
    """A request is unsigned, or its signature is malformed, stale or does not verify.

    The message names the reason (it is safe to show to the remote sender).
    """


@dataclass(frozen=True)
class VerifiedSignature:
    """The outcome of a successful verification.

    Attributes:
        key_id: The ``keyId``/``keyid`` that signed the request.
        scheme: ``"draft-cavage"`` or ``"rfc9421"``.
        components: What the signature covered, lower-case, in signed order
            (header names and ``(request-target)`` for draft-cavage; component
            identifiers such as ``@method`` for RFC 9421).
        created: When the request was signed (``Date`` or ``created``), POSIX seconds.
    """

    key_id: str
    scheme: Scheme
    components: tuple[str, ...] = field(default=(), compare=False)
    created: float | None = field(default=None, compare=False)


def header_pairs(headers: Headers) -> list[tuple[str, str]]:
    """The headers as ``(name, value)`` pairs, checked to be strings."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    pairs: list[tuple[str, str]] = []
    for name, value in items:
        if not isinstance(name, str) or not isinstance(value, str):
            raise SignatureError("header names and values must be strings")
        pairs.append((name, value))
    return pairs


def header_map(headers: Headers) -> dict[str, str]:
    """Lower-cased names; repeated fields joined with ", " (RFC 9110 §5.3)."""
    combined: dict[str, str] = {}
    for name, value in header_pairs(headers):
        key = name.strip().lower()
        value = value.strip(" \t")
        combined[key] = f"{combined[key]}, {value}" if key in combined else value
    return combined


def split_url(url: str) -> tuple[str, str, str]:
    """Return ``(authority, path, query)`` of an absolute http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port  # validates the port
        host = parts.hostname
    except ValueError as exc:
        raise SignatureError(f"invalid URL {url!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise SignatureError(f"invalid URL {url!r}: expected an absolute http(s) URL")
    # The Host header carries the authority without userinfo, with the port only
    # when it is not the scheme's default (what HTTP clients send).
    authority = parts.netloc.rpartition("@")[2]
    if port is not None and port == {"http": 80, "https": 443}[parts.scheme]:
        authority = authority.rsplit(":", 1)[0]
    return authority, parts.path or "/", parts.query


def digest_header(body: bytes) -> str:
    """The draft-cavage ``Digest`` value of ``body`` (``SHA-256=`` base64)."""
    return "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def http_date(now: float) -> str:
    """``now`` as an HTTP date (the ``Date`` header)."""
    return email.utils.formatdate(now, usegmt=True)


def b64decode(value: str, what: str) -> bytes:
    """Strict base64 decoding; ``what`` names the value in the error."""
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise SignatureError(f"{what} is not valid base64") from exc


def check_time(when: float, now: float, max_skew: float, what: str) -> None:
    """Raise :class:`SignatureError` unless ``when`` is within ``max_skew`` of ``now``."""
    if when > now + max_skew:
        raise SignatureError(f"{what} is {when - now:.0f} s in the future (limit {max_skew:.0f} s)")
    if when < now - max_skew:
        raise SignatureError(f"{what} is {now - when:.0f} s old (limit {max_skew:.0f} s)")


def require_rsa(public_key: Any) -> rsa.RSAPublicKey:
    """``public_key``, if it is an RSA public key (the only kind either scheme accepts)."""
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise SignatureError("the signer's key is not an RSA public key")
    return public_key
