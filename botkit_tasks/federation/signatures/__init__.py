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

from .api import precheck_request, sign_request, signature_key_id, verify_request
from .base import DEFAULT_MAX_SKEW, Scheme, SignatureError, VerifiedSignature
from .base import Headers as Headers  # not in __all__, as before; keys imports it
from .cavage import cavage_signing_string
from .rfc9421 import RFC9421_LABEL

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
