"""HTTP Signatures: draft-cavage-12 as Mastodon sends it, and RFC 9421.

Outgoing requests are signed with :func:`sign_request` at send time (a fresh
``Date`` on every attempt).  Incoming requests are checked with
:func:`verify_request`, which accepts both schemes:

- **draft-cavage** (``Signature: keyId=…,algorithm=…,headers=…,signature=…``):
  ``algorithm`` ``rsa-sha256`` or ``hs2019`` (both verified as RSASSA-PKCS1-v1_5
  with SHA-256, as Mastodon does); the signed headers must include
  ``(request-target)``, ``host``, ``date`` or ``(created)``, and ``digest``
  whenever the request has a body; the ``Digest`` must be ``SHA-256=`` of the
  exact body bytes; ``Date``/``(created)`` within ``max_skew`` of now.
  ``(request-target)`` is checked with the query, then without it: Mastodon
  and the draft include the query, older Mastodon and Fedify leave it out
  (such a signature does not authenticate the query, as in Mastodon).
  (So Fedify rejects our cavage signatures of URLs *with* a query; RFC 9421,
  the double knock's second scheme, has no such ambiguity.)
- **RFC 9421** (``Signature-Input`` + ``Signature``, detected by the presence of
  ``Signature-Input``): exactly one signature, ``created`` required and within
  ``max_skew``, ``@method`` and ``@target-uri`` covered, ``content-digest``
  covered and matching whenever the request has a body, ``alg`` absent or
  ``rsa-v1_5-sha256``.

Every failure raises :class:`SignatureError` whose message says why; hostile
input never raises anything else.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import http_sf
import httpx
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from http_message_signatures import (
    ContentDigest,
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    algorithms,
)
from http_message_signatures.exceptions import HTTPMessageSignaturesException

from ..errors import BotkitError

__all__ = [
    "DEFAULT_MAX_SKEW",
    "RFC9421_LABEL",
    "Scheme",
    "SignatureError",
    "VerifiedSignature",
    "cavage_signing_string",
    "precheck_request",
    "sign_request",
    "signature_key_id",
    "verify_request",
]

#: The signature scheme of a request.
Scheme = Literal["draft-cavage", "rfc9421"]

#: Accepted distance between a signature's ``Date``/``created`` and now, in seconds
#: (Mastodon and Fedify both accept one hour either way).
DEFAULT_MAX_SKEW = 3600.0

#: The dictionary label of the RFC 9421 signatures we send.
RFC9421_LABEL = "sig1"

#: A header collection: a mapping, or ``(name, value)`` pairs (repeated names joined by ", ").
Headers = Mapping[str, str] | Iterable[tuple[str, str]]

# Passed as the public key by precheck_request(): run every check but the cryptography.
_PRECHECK: Any = object()

_CAVAGE_ALGORITHMS = frozenset({"rsa-sha256", "hs2019"})
_RFC9421_ALG = algorithms.RSA_V1_5_SHA256.algorithm_id  # "rsa-v1_5-sha256"
# Methods whose requests always carry content, so a signed digest is mandatory
# even for an empty body (Mastodon: "a POST must sign digest").
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
# Hostile headers are rejected before any parsing work is spent on them.
_MAX_SIGNATURE_HEADER = 8192
# created/expires: POSIX seconds; 15 digits is far beyond any plausible time.
_INTEGER = re.compile(r"[0-9]{1,15}")
_CAVAGE_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"([^"\\]*)"|([0-9]+))\s*')


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


# --------------------------------------------------------------------- helpers


def _header_pairs(headers: Headers) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    pairs: list[tuple[str, str]] = []
    for name, value in items:
        if not isinstance(name, str) or not isinstance(value, str):
            raise SignatureError("header names and values must be strings")
        pairs.append((name, value))
    return pairs


def _header_map(headers: Headers) -> dict[str, str]:
    """Lower-cased names; repeated fields joined with ", " (RFC 9110 §5.3)."""
    combined: dict[str, str] = {}
    for name, value in _header_pairs(headers):
        key = name.strip().lower()
        value = value.strip(" \t")
        combined[key] = f"{combined[key]}, {value}" if key in combined else value
    return combined


def _split_url(url: str) -> tuple[str, str, str]:
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


def _digest_header(body: bytes) -> str:
    return "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def _http_date(now: float) -> str:
    return email.utils.formatdate(now, usegmt=True)


def _b64decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise SignatureError(f"{what} is not valid base64") from exc


def _check_time(when: float, now: float, max_skew: float, what: str) -> None:
    if when > now + max_skew:
        raise SignatureError(f"{what} is {when - now:.0f} s in the future (limit {max_skew:.0f} s)")
    if when < now - max_skew:
        raise SignatureError(f"{what} is {now - when:.0f} s old (limit {max_skew:.0f} s)")


def _require_rsa(public_key: Any) -> rsa.RSAPublicKey:
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise SignatureError("the signer's key is not an RSA public key")
    return public_key


# ---------------------------------------------------------------- draft-cavage


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


def _parse_cavage(value: str) -> dict[str, str]:
    """Parse a draft-cavage ``Signature`` header into its parameters."""
    if len(value) > _MAX_SIGNATURE_HEADER:
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


def _sign_cavage(
    method: str,
    url: str,
    out: dict[str, str],
    body: bytes | None,
    private_key: rsa.RSAPrivateKey,
    key_id: str,
) -> None:
    _, path, query = _split_url(url)
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


def _verify_cavage_digest(headers: Mapping[str, str], body: bytes) -> None:
    value = headers.get("digest", "")
    for entry in value.split(","):
        algorithm, sep, encoded = entry.strip().partition("=")
        if sep and algorithm.strip().lower() == "sha-256":
            digest = _b64decode(encoded.strip(), "the SHA-256 Digest")
            if len(digest) != 32:
                raise SignatureError("the SHA-256 Digest does not have 32 bytes")
            if not hmac.compare_digest(digest, hashlib.sha256(body).digest()):
                raise SignatureError("the Digest does not match the body")
            return
    raise SignatureError("the Digest header has no SHA-256 value")


def _verify_cavage(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    public_key: Any,
    now: float,
    max_skew: float,
) -> VerifiedSignature:
    params = _parse_cavage(headers["signature"])
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
    has_body = bool(body) or method.upper() in _METHODS_WITH_BODY
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
        _check_time(created_at, now, max_skew, "the Date header")
    for name in ("created", "expires"):
        if name in params and not _INTEGER.fullmatch(params[name]):
            raise SignatureError(f"the {name} parameter is not an integer")
    if "(created)" in signed:
        if "created" not in params:
            raise SignatureError('"(created)" is signed but the created parameter is missing')
        created_at = float(int(params["created"]))
        _check_time(created_at, now, max_skew, "the created parameter")
    if "expires" in params and int(params["expires"]) + max_skew < now:
        raise SignatureError("the signature has expired")

    if "digest" in signed:
        _verify_cavage_digest(headers, body or b"")

    signature = _b64decode(params["signature"], "the signature")
    if public_key is _PRECHECK:
        return VerifiedSignature(key_id, "draft-cavage", tuple(signed), created_at)
    key = _require_rsa(public_key)
    _, path, query = _split_url(url)
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


# -------------------------------------------------------------------- RFC 9421


class _HeaderList:
    """The header view http-message-signatures reads and writes."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def items(self) -> list[tuple[str, str]]:
        return list(self.pairs)

    def __iter__(self) -> Any:
        return iter(dict.fromkeys(name for name, _ in self.pairs))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(n.lower() == name.lower() for n, _ in self.pairs)

    def __setitem__(self, name: str, value: str) -> None:
        self.__delitem__(name)
        self.pairs.append((name, value))

    def __delitem__(self, name: str) -> None:
        self.pairs = [(n, v) for n, v in self.pairs if n.lower() != name.lower()]


@dataclass
class _Message:
    method: str
    url: str
    headers: _HeaderList


class _OneKey(HTTPSignatureKeyResolver):
    def __init__(self, key: Any) -> None:
        self.key = key

    def resolve_public_key(self, key_id: str) -> Any:
        return self.key

    def resolve_private_key(self, key_id: str) -> Any:
        return self.key


class _Verifier(HTTPMessageVerifier):
    """Checks ``created``/``expires`` against the caller's clock and skew."""

    def __init__(self, key: Any, now: float, max_skew: float) -> None:
        super().__init__(signature_algorithm=algorithms.RSA_V1_5_SHA256, key_resolver=_OneKey(key))
        self.now = now
        self.max_skew = max_skew

    def validate_created_and_expires(self, sig_input: Any, max_age: Any = None) -> None:
        self.check_times(sig_input.params, self.now, self.max_skew)

    @staticmethod
    def check_times(params: Mapping[str, Any], now: float, max_skew: float) -> None:
        created = params.get("created")
        if type(created) is not int:
            raise SignatureError("the created parameter is missing or not an integer")
        _check_time(float(created), now, max_skew, "the created parameter")
        expires = params.get("expires")
        if expires is not None:
            if type(expires) is not int:
                raise SignatureError("the expires parameter is not an integer")
            if expires + max_skew < now:
                raise SignatureError("the signature has expired")


def _rfc9421_inputs(headers: Mapping[str, str]) -> tuple[str, list[str], dict[str, Any]]:
    """Return ``(label, components, params)`` of the single Signature-Input member."""
    value = headers["signature-input"]
    if len(value) > _MAX_SIGNATURE_HEADER:
        raise SignatureError("the Signature-Input header is too long")

    def reject_duplicate(key: str, context: str) -> None:
        raise SignatureError(f"duplicate {key!r} in the Signature-Input header")

    try:
        parsed: Any = http_sf.parse(
            value.encode("ascii"), tltype="dictionary", on_duplicate_key=reject_duplicate
        )
    except SignatureError:
        raise
    except Exception as exc:
        raise SignatureError("malformed Signature-Input header") from exc
    if not isinstance(parsed, dict) or len(parsed) != 1:
        raise SignatureError("exactly one signature is expected in Signature-Input")
    label, (members, params) = next(iter(parsed.items()))
    if not isinstance(members, list) or not all(
        isinstance(item, tuple) and isinstance(item[0], str) for item in members
    ):
        raise SignatureError("the Signature-Input member is not a list of components")
    return label, [item[0] for item in members], dict(params)


def _verify_rfc9421(
    method: str,
    url: str,
    pairs: list[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes | None,
    public_key: Any,
    now: float,
    max_skew: float,
) -> VerifiedSignature:
    if "signature" not in headers:
        raise SignatureError("Signature-Input is present but the Signature header is missing")
    _, components, params = _rfc9421_inputs(headers)
    key_id = params.get("keyid")
    if not isinstance(key_id, str) or not key_id:
        raise SignatureError("the signature has no keyid")
    alg = params.get("alg", _RFC9421_ALG)
    if alg != _RFC9421_ALG:
        raise SignatureError(f"unsupported signature algorithm {alg!r}")
    for required in ("@method", "@target-uri"):
        if required not in components:
            raise SignatureError(f"{required!r} must be covered by the signature")
    has_body = bool(body) or method.upper() in _METHODS_WITH_BODY
    if has_body and "content-digest" not in components:
        raise SignatureError("'content-digest' must be covered for a request with a body")
    _Verifier.check_times(params, now, max_skew)
    created = float(params["created"])
    if public_key is _PRECHECK:
        if has_body:
            try:
                ContentDigest.verify(headers.get("content-digest", ""), body or b"")
            except HTTPMessageSignaturesException as exc:
                raise SignatureError(f"Content-Digest rejected: {exc}") from exc
        return VerifiedSignature(key_id, "rfc9421", tuple(components), created)
    key = _require_rsa(public_key)
    message = _Message(method.upper(), url, _HeaderList(pairs))
    verifier = _Verifier(key, now, max_skew)
    try:
        # With a body (or a method that always has one) the signed Content-Digest
        # must match the bytes; an empty GET needs no digest.
        checked_body = body if body is not None else (b"" if has_body else None)
        results = verifier.verify(message, max_age=None, body=checked_body)
    except SignatureError:
        raise
    except HTTPMessageSignaturesException as exc:
        raise SignatureError(f"RFC 9421 signature rejected: {exc}") from exc
    except Exception as exc:  # the library must not turn hostile input into a 500
        raise SignatureError(f"RFC 9421 signature rejected: {type(exc).__name__}") from exc
    if len(results) != 1:
        raise SignatureError("exactly one signature is expected")
    return VerifiedSignature(key_id, "rfc9421", tuple(components), created)


def _sign_rfc9421(
    method: str,
    url: str,
    out: dict[str, str],
    body: bytes | None,
    private_key: rsa.RSAPrivateKey,
    key_id: str,
    now: float,
) -> None:
    pairs = list(out.items())
    message = _Message(method.upper(), url, _HeaderList(pairs))
    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.RSA_V1_5_SHA256, key_resolver=_OneKey(private_key)
    )
    created = datetime.datetime.fromtimestamp(int(now), tz=datetime.timezone.utc)
    try:
        signer.sign(
            message,
            key_id=key_id,
            created=created,
            label=RFC9421_LABEL,
            covered_component_ids=("@method", "@target-uri", "@authority"),
            # With a body the library adds Content-Digest and covers it.
            body=body,
        )
    except HTTPMessageSignaturesException as exc:
        raise SignatureError(f"cannot sign {url!r}: {exc}") from exc
    out.clear()
    out.update(message.headers.pairs)


# ----------------------------------------------------------------- public API


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
    authority, _, _ = _split_url(url)
    replaced = {"host", "date", "digest", "content-digest", "signature", "signature-input"}
    out = {name: value for name, value in headers.items() if name.lower() not in replaced}
    out["Host"] = authority
    out["Date"] = _http_date(when)
    if scheme == "draft-cavage":
        if body is not None:
            out["Digest"] = _digest_header(body)
        _sign_cavage(method, url, out, body, private_key, key_id)
    else:
        _sign_rfc9421(method, url, out, body, private_key, key_id, when)
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
        combined = _header_map(headers)
        if "signature-input" in combined:
            _, _, params = _rfc9421_inputs(combined)
            key_id = params.get("keyid")
        elif "signature" in combined:
            key_id = _parse_cavage(combined["signature"]).get("keyId")
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
    return _verify(method, url, headers, body, _PRECHECK, now, max_skew).key_id


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
        pairs = _header_pairs(headers)
        combined = _header_map(pairs)
        if "signature-input" in combined:
            return _verify_rfc9421(method, url, pairs, combined, body, public_key, when, max_skew)
        if "signature" in combined:
            return _verify_cavage(method, url, combined, body, public_key, when, max_skew)
    except SignatureError:
        raise
    except Exception as exc:  # hostile input must never surface as anything else
        raise SignatureError(f"malformed signed request ({type(exc).__name__})") from exc
    raise SignatureError("the request is not signed")
