"""Keys: the bot's own key pair, remote key resolution, caching and rotation.

Remote documents come from an in-memory fetcher here; ``test_net.py`` fetches
them from a real loopback HTTP server.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from botkit_tasks.errors import BotkitError
from botkit_tasks.federation.keys import (
    KeyResolver,
    generate_private_key,
    keypair_kv_key,
    load_or_create_keypair,
    load_private_key_pem,
    load_public_key_pem,
    private_key_pem,
    public_key_pem,
    remote_key_kv_key,
    verify_incoming,
)
from botkit_tasks.federation.net import FetchError
from botkit_tasks.federation.signatures import SignatureError, sign_request
from botkit_tasks.kv import KvStore, MemoryKvStore, SqlKvStore

ACTOR = "https://remote.example/users/alice"
KEY_ID = f"{ACTOR}#main-key"
INBOX = "https://bot.example/users/bot/inbox"
BODY = b'{"type":"Follow"}'


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return generate_private_key()


@pytest.fixture(scope="module")
def new_key() -> rsa.RSAPrivateKey:
    return generate_private_key()


def actor(key: rsa.RSAPrivateKey, **public_key: Any) -> dict[str, Any]:
    return {
        "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/v1"],
        "id": ACTOR,
        "type": "Person",
        "inbox": f"{ACTOR}/inbox",
        "publicKey": {
            "id": KEY_ID,
            "owner": ACTOR,
            "publicKeyPem": public_key_pem(key),
            **public_key,
        },
    }


class Documents:
    """A fetcher serving a mutable dict of documents and counting fetches."""

    def __init__(self, documents: dict[str, dict[str, Any]] | None = None) -> None:
        self.documents = documents or {}
        self.fetched: list[str] = []

    def get_json(self, url: str) -> dict[str, Any]:
        self.fetched.append(url)
        if url not in self.documents:
            raise FetchError(f"{url} answered HTTP 404", url=url, status_code=404)
        return self.documents[url]


def signed(key: rsa.RSAPrivateKey, **kwargs: Any) -> dict[str, str]:
    return sign_request(
        "POST",
        INBOX,
        {"Content-Type": "application/activity+json"},
        BODY,
        private_key=key,
        key_id=KEY_ID,
        **kwargs,
    )


# ------------------------------------------------------------------ own keys


def test_generated_keys_are_rsa_2048(key: rsa.RSAPrivateKey) -> None:
    assert key.key_size == 2048
    assert key.public_key().public_numbers().e == 65537


def test_pem_round_trip(key: rsa.RSAPrivateKey) -> None:
    private_pem = private_key_pem(key)
    public_pem = public_key_pem(key)
    assert private_pem.startswith("-----BEGIN PRIVATE KEY-----\n")
    assert public_pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert load_private_key_pem(private_pem).private_numbers() == key.private_numbers()
    assert load_public_key_pem(public_pem).public_numbers() == key.public_key().public_numbers()
    assert public_key_pem(key.public_key()) == public_pem


@pytest.mark.parametrize(
    "pem", ["", "garbage", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"]
)
def test_bad_public_pem_is_a_value_error(pem: str) -> None:
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key_pem(pem)


def test_non_rsa_public_key_is_refused() -> None:
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ValueError, match="not an RSA key"):
        load_public_key_pem(ec_pem)


def test_keypair_is_created_once_and_kept() -> None:
    kv = MemoryKvStore()
    first = load_or_create_keypair(kv, "bot")
    record = kv.get(keypair_kv_key("bot"))
    assert isinstance(record, dict)
    assert record["public"] == public_key_pem(first)
    assert load_private_key_pem(str(record["private"])).private_numbers() == first.private_numbers()
    again = load_or_create_keypair(kv, "bot")
    assert again.private_numbers() == first.private_numbers()
    # Another user gets another key
    other = load_or_create_keypair(kv, "other")
    assert other.private_numbers() != first.private_numbers()


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_racing_workers_agree_on_one_key(backend: str, sqlite_url: str) -> None:
    # Given one store shared by 8 workers that all start without a key
    kv: KvStore = MemoryKvStore() if backend == "memory" else SqlKvStore(sqlite_url)
    barrier = threading.Barrier(8)
    results: list[rsa.RSAPrivateKey] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            got = load_or_create_keypair(kv, "bot")
        except BaseException as exc:  # reported by the assertion below, with its cause
            with lock:
                errors.append(exc)
            return
        with lock:
            results.append(got)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # Then every worker returns the one stored key
    stored = kv.get(keypair_kv_key("bot"))
    assert isinstance(stored, dict)
    numbers = {r.public_key().public_numbers() for r in results}
    assert errors == []
    assert len(results) == 8
    assert numbers == {load_public_key_pem(str(stored["public"])).public_numbers()}
    kv.close()


def test_malformed_keypair_record_is_an_error() -> None:
    kv = MemoryKvStore()
    kv.set(keypair_kv_key("bot"), {"private": "not a key"})
    with pytest.raises(BotkitError, match="unreadable"):
        load_or_create_keypair(kv, "bot")
    kv.set(keypair_kv_key("bot"), "oops")
    with pytest.raises(BotkitError, match="malformed"):
        load_or_create_keypair(kv, "bot")


# --------------------------------------------------------------- resolution


def test_resolve_reads_the_actor_document_and_caches_it(key: rsa.RSAPrivateKey) -> None:
    kv = MemoryKvStore()
    fetcher = Documents({ACTOR: actor(key)})
    resolver = KeyResolver(kv, fetcher)

    # When the key is resolved twice
    first = resolver.resolve(KEY_ID)
    second = resolver.resolve(KEY_ID)

    # Then it was fetched once (without the fragment) and cached under its key id
    assert fetcher.fetched == [ACTOR]
    assert first is not None and second is not None
    assert (first.key_id, first.owner) == (KEY_ID, ACTOR)
    assert not first.from_cache and second.from_cache
    assert second.public_key.public_numbers() == key.public_key().public_numbers()
    record = kv.get(remote_key_kv_key(KEY_ID))
    assert isinstance(record, dict)
    assert record["owner"] == ACTOR
    assert record["publicKeyPem"] == public_key_pem(key)


def test_resolve_accepts_a_list_of_keys(key: rsa.RSAPrivateKey, new_key: rsa.RSAPrivateKey) -> None:
    document = actor(key)
    document["publicKey"] = [
        {"id": f"{ACTOR}#other", "owner": ACTOR, "publicKeyPem": public_key_pem(new_key)},
        document["publicKey"],
    ]
    resolved = KeyResolver(MemoryKvStore(), Documents({ACTOR: document})).resolve(KEY_ID)
    assert resolved is not None
    assert resolved.public_key.public_numbers() == key.public_key().public_numbers()


def test_resolve_accepts_a_standalone_key_document(key: rsa.RSAPrivateKey) -> None:
    key_id = "https://remote.example/keys/1"
    document = {"id": key_id, "type": "CryptographicKey", "owner": ACTOR}
    document["publicKeyPem"] = public_key_pem(key)
    resolved = KeyResolver(MemoryKvStore(), Documents({key_id: document})).resolve(key_id)
    assert resolved is not None
    assert (resolved.key_id, resolved.owner) == (key_id, ACTOR)


@pytest.mark.parametrize(
    "spoil",
    [
        {"id": f"{ACTOR}#other-key"},  # the document does not hold the key asked for
        {"owner": "https://remote.example/users/bob"},  # owner is not the actor
        {"owner": "https://evil.example/users/alice"},
        {"publicKeyPem": "not a pem"},
        {"publicKeyPem": None},
    ],
)
def test_resolve_refuses_documents_that_do_not_vouch_for_the_key(
    key: rsa.RSAPrivateKey, spoil: dict[str, Any]
) -> None:
    fetcher = Documents({ACTOR: actor(key, **spoil)})
    assert KeyResolver(MemoryKvStore(), fetcher).resolve(KEY_ID) is None


def test_resolve_refuses_a_document_from_another_origin(key: rsa.RSAPrivateKey) -> None:
    # A server answering for an actor on another host cannot vouch for its key
    document = actor(key)
    document["id"] = "https://evil.example/users/alice"
    document["publicKey"]["owner"] = document["id"]
    assert KeyResolver(MemoryKvStore(), Documents({ACTOR: document})).resolve(KEY_ID) is None


def test_failures_are_cached_briefly(key: rsa.RSAPrivateKey) -> None:
    # Given a key whose document cannot be fetched
    kv = MemoryKvStore()
    fetcher = Documents()
    resolver = KeyResolver(kv, fetcher, failure_ttl=0.2)

    # When it is resolved repeatedly
    assert resolver.resolve(KEY_ID) is None
    assert resolver.resolve(KEY_ID) is None

    # Then only the first attempt fetched; the failure is cached for failure_ttl
    assert fetcher.fetched == [ACTOR]
    record = kv.get(remote_key_kv_key(KEY_ID))
    assert isinstance(record, dict)
    assert "404" in str(record["error"])
    time.sleep(0.3)
    fetcher.documents[ACTOR] = actor(key)
    assert resolver.resolve(KEY_ID) is not None
    assert fetcher.fetched == [ACTOR, ACTOR]


def test_cached_keys_expire_after_ttl(key: rsa.RSAPrivateKey) -> None:
    fetcher = Documents({ACTOR: actor(key)})
    resolver = KeyResolver(MemoryKvStore(), fetcher, ttl=0.2)
    assert resolver.resolve(KEY_ID) is not None
    time.sleep(0.3)
    assert resolver.resolve(KEY_ID) is not None
    assert fetcher.fetched == [ACTOR, ACTOR]


def test_refresh_refetches_unless_just_fetched(key: rsa.RSAPrivateKey) -> None:
    fetcher = Documents({ACTOR: actor(key)})
    throttled = KeyResolver(MemoryKvStore(), fetcher, min_refresh_interval=3600)
    throttled.resolve(KEY_ID)
    refreshed = throttled.resolve(KEY_ID, refresh=True)
    assert refreshed is not None and refreshed.from_cache
    assert fetcher.fetched == [ACTOR]

    eager = KeyResolver(MemoryKvStore(), fetcher, min_refresh_interval=0)
    eager.resolve(KEY_ID)
    refreshed = eager.resolve(KEY_ID, refresh=True)
    assert refreshed is not None and not refreshed.from_cache
    assert fetcher.fetched == [ACTOR, ACTOR, ACTOR]


@pytest.mark.parametrize("key_id", ["acct:alice@remote.example", "https://x/" + "a" * 600, ""])
def test_unsupported_key_ids_are_not_fetched(key_id: str) -> None:
    fetcher = Documents()
    assert KeyResolver(MemoryKvStore(), fetcher).resolve(key_id) is None
    assert fetcher.fetched == []
    assert fetcher.fetched == []


# ------------------------------------------------------------ verify_incoming


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
def test_verify_incoming_resolves_the_signer(key: rsa.RSAPrivateKey, scheme: str) -> None:
    resolver = KeyResolver(MemoryKvStore(), Documents({ACTOR: actor(key)}))
    verified, remote = verify_incoming("POST", INBOX, signed(key, scheme=scheme), BODY, resolver)
    assert (verified.key_id, verified.scheme) == (KEY_ID, scheme)
    assert remote.owner == ACTOR


def test_rotated_key_is_refetched_once(key: rsa.RSAPrivateKey, new_key: rsa.RSAPrivateKey) -> None:
    # Given a cached key, and an actor that has since rotated to a new key
    fetcher = Documents({ACTOR: actor(key)})
    resolver = KeyResolver(MemoryKvStore(), fetcher, min_refresh_interval=0)
    verify_incoming("POST", INBOX, signed(key), BODY, resolver)
    fetcher.documents[ACTOR] = actor(new_key)

    # When a request signed with the new key arrives
    _, remote = verify_incoming("POST", INBOX, signed(new_key), BODY, resolver)

    # Then the key was fetched again once, and the new key is cached
    assert fetcher.fetched == [ACTOR, ACTOR]
    assert remote.public_key.public_numbers() == new_key.public_key().public_numbers()
    again = resolver.resolve(KEY_ID)
    assert again is not None and again.from_cache
    assert again.public_key.public_numbers() == new_key.public_key().public_numbers()


def test_forged_signatures_do_not_hammer_the_key_server(
    key: rsa.RSAPrivateKey, new_key: rsa.RSAPrivateKey
) -> None:
    # Given a cached key and requests forged with another key naming it
    fetcher = Documents({ACTOR: actor(key)})
    resolver = KeyResolver(MemoryKvStore(), fetcher, min_refresh_interval=3600)
    verify_incoming("POST", INBOX, signed(key), BODY, resolver)
    for _ in range(5):
        with pytest.raises(SignatureError, match="does not verify"):
            verify_incoming("POST", INBOX, signed(new_key), BODY, resolver)
    # Then the key was not fetched again within min_refresh_interval
    assert fetcher.fetched == [ACTOR]


def test_a_freshly_fetched_key_is_not_fetched_twice(
    new_key: rsa.RSAPrivateKey, key: rsa.RSAPrivateKey
) -> None:
    fetcher = Documents({ACTOR: actor(key)})
    resolver = KeyResolver(MemoryKvStore(), fetcher, min_refresh_interval=0)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_incoming("POST", INBOX, signed(new_key), BODY, resolver)
    assert fetcher.fetched == [ACTOR]


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [("unsigned", "not signed"), ("stale", "old"), ("body", "(?i)digest")],
)
def test_cheap_rejections_fetch_nothing(key: rsa.RSAPrivateKey, spoil: str, reason: str) -> None:
    fetcher = Documents({ACTOR: actor(key)})
    resolver = KeyResolver(MemoryKvStore(), fetcher)
    headers = signed(key, now=time.time() - 7200 if spoil == "stale" else None)
    if spoil == "unsigned":
        del headers["Signature"]
    body = b"{}" if spoil == "body" else BODY
    with pytest.raises(SignatureError, match=reason):
        verify_incoming("POST", INBOX, headers, body, resolver)
    assert fetcher.fetched == []


def test_unfetchable_key_is_a_signature_error(key: rsa.RSAPrivateKey) -> None:
    resolver = KeyResolver(MemoryKvStore(), Documents())
    with pytest.raises(SignatureError, match="cannot be fetched"):
        verify_incoming("POST", INBOX, signed(key), BODY, resolver)


def test_verify_incoming_accepts_an_iterator_of_pairs(key: rsa.RSAPrivateKey) -> None:
    resolver = KeyResolver(MemoryKvStore(), Documents({ACTOR: actor(key)}))
    pairs = iter(signed(key).items())
    verified, _ = verify_incoming("POST", INBOX, pairs, BODY, resolver)
    assert verified.key_id == KEY_ID


def test_failed_refetch_keeps_the_cached_key(key: rsa.RSAPrivateKey) -> None:
    # Given a cached key whose server then goes away
    fetcher = Documents({ACTOR: actor(key)})
    resolver = KeyResolver(MemoryKvStore(), fetcher, min_refresh_interval=0.2)
    assert resolver.resolve(KEY_ID) is not None
    del fetcher.documents[ACTOR]
    time.sleep(0.3)

    # When a refresh is tried (and fails), then tried again at once
    assert resolver.resolve(KEY_ID, refresh=True) is None
    again = resolver.resolve(KEY_ID, refresh=True)

    # Then the failed attempt throttles the next one, and the good key stays cached
    assert fetcher.fetched == [ACTOR, ACTOR]
    assert again is not None and again.from_cache
    assert resolver.resolve(KEY_ID) is not None


@pytest.mark.parametrize(
    "key_id", ["https://remote.example/a\x00#k", "https://remote.example/\ud800"]
)
def test_key_ids_no_store_can_hold_resolve_to_none(key_id: str) -> None:
    fetcher = Documents()
    assert KeyResolver(MemoryKvStore(), fetcher).resolve(key_id) is None
    assert fetcher.fetched == []
