"""RSA keys: the bot's own key pair, and remote actors' public keys.

The bot's key pair is generated once and kept in the key-value store under
``("botkit", username, "keypair")`` as ``{"private": PEM, "public": PEM}``.
Remote public keys are fetched from their ``keyId`` URL and cached under
``("botkit", "remote-keys", key_id)`` as ``{"owner", "publicKeyPem",
"fetchedAt"}`` for ``ttl`` seconds; a failed fetch is cached as ``{"error",
"fetchedAt"}`` for ``failure_ttl`` seconds so that a flood of requests naming
a dead key does not turn into a flood of fetches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..errors import BotkitError
from ..kv.base import JsonValue, KvKey, KvStore
from .signatures import (
    DEFAULT_MAX_SKEW,
    Headers,
    SignatureError,
    VerifiedSignature,
    precheck_request,
    verify_request,
)

__all__ = [
    "DEFAULT_FAILURE_TTL",
    "DEFAULT_KEY_TTL",
    "KEY_SIZE",
    "JsonFetcher",
    "KeyResolver",
    "RemoteKey",
    "generate_private_key",
    "keypair_kv_key",
    "load_or_create_keypair",
    "load_private_key_pem",
    "load_public_key_pem",
    "private_key_pem",
    "public_key_pem",
    "remote_key_kv_key",
    "verify_incoming",
]

logger = logging.getLogger(__name__)

#: RSA modulus size of generated keys, in bits (what Mastodon uses).
KEY_SIZE = 2048
#: How long a fetched remote key is trusted before it is fetched again, in seconds.
DEFAULT_KEY_TTL = 3600.0
#: How long a failed key fetch is remembered, in seconds.
DEFAULT_FAILURE_TTL = 300.0
#: A cached key is not refetched (on a verification failure) more often than this, in seconds.
DEFAULT_MIN_REFRESH_INTERVAL = 60.0
# Bound on the per-process memory of recent refetch attempts (cleared when full).
_MAX_TRACKED_REFRESHES = 10_000
# Longer key ids cannot be KV keys (1 KiB limit) and are not real-world key ids.
_MAX_KEY_ID_LENGTH = 512


# ------------------------------------------------------------------ own keys


def keypair_kv_key(username: str) -> KvKey:
    """The KV key holding ``username``'s key pair."""
    return ("botkit", username, "keypair")


def generate_private_key() -> rsa.RSAPrivateKey:
    """Generate a new RSA-2048 private key (public exponent 65537)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)


def private_key_pem(private_key: rsa.RSAPrivateKey) -> str:
    """Serialise a private key as unencrypted PKCS#8 PEM."""
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def public_key_pem(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> str:
    """Serialise the public half of ``key`` as SubjectPublicKeyInfo PEM (``publicKeyPem``)."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_private_key_pem(pem: str) -> rsa.RSAPrivateKey:
    """Load an unencrypted RSA private key from PEM.

    Raises:
        ValueError: Not a PEM RSA private key.
    """
    try:
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"not a PEM private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the private key is not an RSA key")
    return key


def load_public_key_pem(pem: str) -> rsa.RSAPublicKey:
    """Load an RSA public key from PEM (SubjectPublicKeyInfo or PKCS#1).

    Raises:
        ValueError: Not a PEM RSA public key.
    """
    try:
        key = serialization.load_pem_public_key(pem.strip().encode("ascii"))
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the public key is not an RSA key")
    return key


def load_or_create_keypair(kv: KvStore, username: str) -> rsa.RSAPrivateKey:
    """Return ``username``'s private key, generating and storing it the first time.

    Racing processes agree on one key: each generates a candidate, but only the
    first ``cas(key, None, …)`` stores it and everyone returns the stored key.

    Raises:
        BotkitError: The stored record is not a key pair.
    """
    kv_key = keypair_kv_key(username)
    record = kv.get(kv_key)
    if record is None:
        candidate = generate_private_key()
        new: JsonValue = {
            "private": private_key_pem(candidate),
            "public": public_key_pem(candidate),
        }
        if kv.cas(kv_key, None, new):
            return candidate
        record = kv.get(kv_key)
    if not isinstance(record, dict) or not isinstance(record.get("private"), str):
        raise BotkitError(f"the key pair stored under {kv_key!r} is missing or malformed")
    try:
        return load_private_key_pem(str(record["private"]))
    except ValueError as exc:
        raise BotkitError(f"the key pair stored under {kv_key!r} is unreadable: {exc}") from exc


# --------------------------------------------------------------- remote keys


class JsonFetcher(Protocol):
    """What :class:`KeyResolver` needs to fetch documents (see :class:`.net.Fetcher`)."""

    def get_json(self, url: str) -> dict[str, Any]:
        """Fetch ``url`` and return its JSON object; raise :class:`BotkitError` on failure."""
        ...


@dataclass(frozen=True)
class RemoteKey:
    """A remote actor's public key.

    Attributes:
        key_id: The key's id (the ``keyId`` of signatures made with it).
        owner: The id of the actor the key belongs to.
        public_key: The RSA public key.
        from_cache: Whether it came from the KV cache rather than a fetch just now.
    """

    key_id: str
    owner: str
    public_key: rsa.RSAPublicKey
    from_cache: bool = field(default=False, compare=False)


def remote_key_kv_key(key_id: str) -> KvKey:
    """The KV key caching the remote key ``key_id``."""
    return ("botkit", "remote-keys", key_id)


def _origin(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return f"{parts.scheme}://{parts.hostname}:{port or {'http': 80, 'https': 443}[parts.scheme]}"


def _key_from_document(key_id: str, document: Mapping[str, Any]) -> tuple[str, str]:
    """Find ``key_id`` in a fetched actor or key document; return ``(owner, pem)``.

    Raises:
        ValueError: The document does not hold that key, or names an owner the
            key's origin cannot speak for.
    """
    doc_id = document.get("id")
    if document.get("publicKeyPem") is not None and doc_id == key_id:
        # A standalone key object: {"id", "owner", "publicKeyPem"}.
        entry: Mapping[str, Any] = document
        owner = document.get("owner")
    else:
        candidates = document.get("publicKey")
        if not isinstance(candidates, list):
            candidates = [candidates]
        matching = [c for c in candidates if isinstance(c, dict) and c.get("id") == key_id]
        if not matching:
            raise ValueError(f"the document does not contain the key {key_id!r}")
        entry = matching[0]
        owner = entry.get("owner", doc_id)
        # Mastodon's rule: an actor's key must name that actor as its owner.
        if owner != doc_id:
            raise ValueError(f"the key's owner {owner!r} is not the document {doc_id!r}")
    if not isinstance(owner, str) or not owner:
        raise ValueError("the key has no owner")
    # A server speaks only for its own actors: a document that claims a key or
    # an owner on another origin could be an impersonation attempt.
    origin = _origin(key_id)
    if origin is None or _origin(owner) != origin or _origin(str(doc_id)) != origin:
        raise ValueError("the key, its document and its owner are not on the same origin")
    pem = entry.get("publicKeyPem")
    if not isinstance(pem, str):
        raise ValueError("the key has no publicKeyPem")
    return owner, pem


class KeyResolver:
    """Fetches remote public keys and caches them in the key-value store.

    Args:
        kv: Where keys (and recent failures) are cached.
        fetcher: Fetches documents; a :class:`.net.Fetcher` (signed GETs, SSRF-checked).
        ttl: How long a fetched key is cached, in seconds.
        failure_ttl: How long a failed fetch is remembered, in seconds.
        min_refresh_interval: A forced refresh of a key fetched less than this
            many seconds ago returns the cached key instead (so that forged
            signatures naming a real key cannot make us hammer its server).
    """

    def __init__(
        self,
        kv: KvStore,
        fetcher: JsonFetcher,
        *,
        ttl: float = DEFAULT_KEY_TTL,
        failure_ttl: float = DEFAULT_FAILURE_TTL,
        min_refresh_interval: float = DEFAULT_MIN_REFRESH_INTERVAL,
    ) -> None:
        self.kv = kv
        self.fetcher = fetcher
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.min_refresh_interval = min_refresh_interval
        self._lock = threading.Lock()
        self._refresh_attempts: dict[str, float] = {}

    def resolve(self, key_id: str, *, refresh: bool = False) -> RemoteKey | None:
        """Return the public key ``key_id``, from the cache or fetched.

        Args:
            key_id: The key's URL (a fragment is allowed, e.g. ``…/users/a#main-key``).
            refresh: Fetch again even when cached (key rotation), unless the
                key was fetched, or a refetch tried, less than
                ``min_refresh_interval`` seconds ago (then the cached key is
                returned).

        Returns:
            The key, or ``None`` when it cannot be fetched or the document does
            not hold it.  A failed first fetch is cached for ``failure_ttl``
            seconds; a failed refetch leaves the cached key in place.
        """
        if not isinstance(key_id, str) or len(key_id) > _MAX_KEY_ID_LENGTH:
            return None
        if _origin(key_id) is None:
            return None  # e.g. an acct: key id; only URLs are supported
        kv_key = remote_key_kv_key(key_id)
        try:
            cached = self.kv.get(kv_key)
        except (TypeError, ValueError):
            return None  # a key id no store can hold (NUL, lone surrogates) is not a URL
        record = cached if isinstance(cached, dict) else {}
        current = self._from_record(key_id, record)
        if not refresh:
            if "error" in record:
                return None
            return current if current is not None else self._fetch(key_id, kv_key, None)
        if current is not None and self._recently_fetched(key_id, record):
            return current
        return self._fetch(key_id, kv_key, current)

    def _recently_fetched(self, key_id: str, record: Mapping[str, Any]) -> bool:
        # Two throttles: the record's fetchedAt (shared by every process) and
        # this process's last attempt (which also counts failed refetches, as
        # those leave the cached record untouched).
        now = time.time()
        fetched_at = record.get("fetchedAt")
        if isinstance(fetched_at, (int, float)) and now - fetched_at < self.min_refresh_interval:
            return True
        with self._lock:
            last = self._refresh_attempts.get(key_id)
            if last is not None and now - last < self.min_refresh_interval:
                return True
            if len(self._refresh_attempts) >= _MAX_TRACKED_REFRESHES:
                self._refresh_attempts.clear()
            self._refresh_attempts[key_id] = now
        return False

    def _from_record(self, key_id: str, record: Mapping[str, Any]) -> RemoteKey | None:
        owner, pem = record.get("owner"), record.get("publicKeyPem")
        if not isinstance(owner, str) or not isinstance(pem, str):
            return None
        try:
            return RemoteKey(key_id, owner, load_public_key_pem(pem), from_cache=True)
        except ValueError:
            return None

    def _fetch(self, key_id: str, kv_key: KvKey, current: RemoteKey | None) -> RemoteKey | None:
        url = key_id.partition("#")[0]
        try:
            document = self.fetcher.get_json(url)
            owner, pem = _key_from_document(key_id, document)
            public_key = load_public_key_pem(pem)
        except (BotkitError, ValueError) as exc:
            logger.info("cannot fetch the key %s: %s", key_id, exc)
            if current is not None:
                # A failed refetch must not evict a good key: the server may
                # just be down, and the refetch may have been provoked by a forgery.
                return None
            self.kv.set(
                kv_key, {"error": str(exc)[:500], "fetchedAt": time.time()}, ttl=self.failure_ttl
            )
            return None
        record: JsonValue = {
            "owner": owner,
            "publicKeyPem": public_key_pem(public_key),
            "fetchedAt": time.time(),
        }
        self.kv.set(kv_key, record, ttl=self.ttl)
        return RemoteKey(key_id, owner, public_key)


def _same_key(a: rsa.RSAPublicKey, b: rsa.RSAPublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


def verify_incoming(
    method: str,
    url: str,
    headers: Headers,
    body: bytes | None,
    resolver: KeyResolver,
    *,
    now: float | None = None,
    max_skew: float = DEFAULT_MAX_SKEW,
) -> tuple[VerifiedSignature, RemoteKey]:
    """Verify an incoming request with its signer's key, fetched through ``resolver``.

    Cheap checks (structure, time window, body digest) run before any key is
    fetched.  When a *cached* key fails, the key is fetched again once and the
    signature re-checked: that is how a remote key rotation is picked up.

    Args:
        method: The request's HTTP method.
        url: The absolute URL the request was sent to.
        headers: The request headers.
        body: The raw body bytes.
        resolver: Fetches and caches public keys.
        now: The current time as POSIX seconds (tests); defaults to the clock.
        max_skew: How far ``Date``/``created`` may be from now, in seconds.

    Returns:
        The verified signature and the key (whose ``owner`` the caller must
        compare with the activity's actor).

    Raises:
        SignatureError: Unsigned, malformed, stale, tampered with, the key cannot
            be fetched, or the signature does not verify.
    """
    # Materialise once: an iterator of pairs would be exhausted by the first check.
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    key_id = precheck_request(method, url, pairs, body, now=now, max_skew=max_skew)
    remote = resolver.resolve(key_id)
    if remote is None:
        raise SignatureError(f"the key {key_id!r} cannot be fetched")
    try:
        verified = verify_request(
            method, url, pairs, body, public_key=remote.public_key, now=now, max_skew=max_skew
        )
    except SignatureError:
        if not remote.from_cache:
            raise
        fresh = resolver.resolve(key_id, refresh=True)
        if fresh is None or _same_key(fresh.public_key, remote.public_key):
            raise
        remote = fresh
        verified = verify_request(
            method, url, pairs, body, public_key=remote.public_key, now=now, max_skew=max_skew
        )
    return verified, remote
