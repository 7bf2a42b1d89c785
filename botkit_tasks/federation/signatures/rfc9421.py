"""RFC 9421 HTTP message signatures, on top of http-message-signatures.

Internal to :mod:`botkit_tasks.federation.signatures` (which describes the
rules); :data:`RFC9421_LABEL` is re-exported there.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import http_sf
from cryptography.hazmat.primitives.asymmetric import rsa
from http_message_signatures import (
    ContentDigest,
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    algorithms,
)
from http_message_signatures.exceptions import HTTPMessageSignaturesException

from .base import (
    MAX_SIGNATURE_HEADER,
    METHODS_WITH_BODY,
    PRECHECK,
    SignatureError,
    VerifiedSignature,
    check_time,
    require_rsa,
)

__all__ = ["RFC9421_LABEL", "sign", "signature_input", "verify"]

#: The dictionary label of the RFC 9421 signatures we send.
RFC9421_LABEL = "sig1"

_RFC9421_ALG = algorithms.RSA_V1_5_SHA256.algorithm_id  # "rsa-v1_5-sha256"


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
        check_time(float(created), now, max_skew, "the created parameter")
        expires = params.get("expires")
        if expires is not None:
            if type(expires) is not int:
                raise SignatureError("the expires parameter is not an integer")
            if expires + max_skew < now:
                raise SignatureError("the signature has expired")


def signature_input(headers: Mapping[str, str]) -> tuple[str, list[str], dict[str, Any]]:
    """Return ``(label, components, params)`` of the single Signature-Input member."""
    value = headers["signature-input"]
    if len(value) > MAX_SIGNATURE_HEADER:
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


def verify(
    method: str,
    url: str,
    pairs: list[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes | None,
    public_key: Any,
    now: float,
    max_skew: float,
) -> VerifiedSignature:
    """Check an RFC 9421 signed request (``pairs`` as received, ``headers`` lower-cased).

    With :data:`PRECHECK` as ``public_key``, every check but the cryptographic one.
    """
    if "signature" not in headers:
        raise SignatureError("Signature-Input is present but the Signature header is missing")
    _, components, params = signature_input(headers)
    key_id = params.get("keyid")
    if not isinstance(key_id, str) or not key_id:
        raise SignatureError("the signature has no keyid")
    alg = params.get("alg", _RFC9421_ALG)
    if alg != _RFC9421_ALG:
        raise SignatureError(f"unsupported signature algorithm {alg!r}")
    for required in ("@method", "@target-uri"):
        if required not in components:
            raise SignatureError(f"{required!r} must be covered by the signature")
    has_body = bool(body) or method.upper() in METHODS_WITH_BODY
    if has_body and "content-digest" not in components:
        raise SignatureError("'content-digest' must be covered for a request with a body")
    _Verifier.check_times(params, now, max_skew)
    created = float(params["created"])
    if public_key is PRECHECK:
        if has_body:
            try:
                ContentDigest.verify(headers.get("content-digest", ""), body or b"")
            except HTTPMessageSignaturesException as exc:
                raise SignatureError(f"Content-Digest rejected: {exc}") from exc
        return VerifiedSignature(key_id, "rfc9421", tuple(components), created)
    key = require_rsa(public_key)
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


def sign(
    method: str,
    url: str,
    out: dict[str, str],
    body: bytes | None,
    private_key: rsa.RSAPrivateKey,
    key_id: str,
    now: float,
) -> None:
    """Sign into ``out``: add Signature-Input, Signature and, with a body, Content-Digest."""
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
