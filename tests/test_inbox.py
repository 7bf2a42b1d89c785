"""The inbox: the ASGI endpoint (verify, de-duplicate, enqueue) and the ``botkit_inbox`` job.

Requests are signed for real with :func:`signatures.sign_request`; remote actor
documents (and their keys) are served by a real HTTP server on loopback, so the
key fetches, caching and rotation refetches below are the production code paths.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import httpx
import pytest
import uvicorn
from _http_server import Reply, Request, ScriptedServer
from conftest import unique_name
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from dramatiq.brokers.stub import StubBroker

from botkit_tasks.federation import Federation, InboxContext, MalformedActivityError
from botkit_tasks.federation.activities import (
    PUBLIC,
    as_list,
    embedded,
    first_id,
    has_type,
    ids,
    is_http_url,
    is_public,
    mentions,
    recipients,
    require_actor_id,
    types,
)
from botkit_tasks.federation.delivery import host_of, is_host_available, record_host_failure
from botkit_tasks.federation.inbox import INBOX_ACTOR_NAME, INBOX_QUEUE, MAX_BODY_BYTES
from botkit_tasks.federation.keys import generate_private_key, public_key_pem, remote_key_kv_key
from botkit_tasks.federation.signatures import Scheme, sign_request
from botkit_tasks.kv.memory import MemoryKvStore

BASE_URL = "http://bot.test"
USERNAME = "bot"
INBOX_PATH = f"/users/{USERNAME}/inbox"
INBOX_URL = f"{BASE_URL}{INBOX_PATH}"
SHARED_INBOX_URL = f"{BASE_URL}/inbox"

# Generating RSA keys is the slow part of these tests: reuse a few.
_KEYS: list[RSAPrivateKey] = [generate_private_key() for _ in range(3)]


# --------------------------------------------------------------------------- remote side


@dataclass
class RemoteActor:
    """An actor on the loopback "remote server"; its document serves ``public_key_pem``."""

    id: str
    private_key: RSAPrivateKey
    document_status: int = 200
    #: Statuses answered (in order) before the document is served again.
    failures: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key_id(self) -> str:
        return f"{self.id}#main-key"

    @property
    def inbox(self) -> str:
        return f"{self.id}/inbox"

    def document(self) -> dict[str, Any]:
        return {
            "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/v1"],
            "id": self.id,
            "type": "Person",
            "preferredUsername": self.id.rsplit("/", 1)[-1],
            "inbox": self.inbox,
            "publicKey": {
                "id": self.key_id,
                "owner": self.id,
                "publicKeyPem": public_key_pem(self.private_key),
            },
            **self.extra,
        }


class RemoteServer:
    """Remote actors served by a real HTTP server; the documents follow key changes."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.actors: dict[str, RemoteActor] = {}

    def add_actor(self, name: str, key: RSAPrivateKey | None = None) -> RemoteActor:
        path = f"/users/{name}"
        actor = RemoteActor(self.server.url(path), key or _KEYS[len(self.actors) % len(_KEYS)])
        self.actors[path] = actor

        def serve(request: Request) -> Reply:
            if actor.failures:
                return Reply(actor.failures.pop(0))
            if actor.document_status != 200:
                return Reply(actor.document_status)
            body = json.dumps(actor.document()).encode()
            return Reply(200, headers={"Content-Type": "application/activity+json"}, body=body)

        self.server.handle(path, serve)
        return actor

    def fetches(self) -> list[str]:
        return [r.path for r in self.server.requests()]


@pytest.fixture
def remote() -> Iterator[RemoteServer]:
    with ScriptedServer() as server:
        yield RemoteServer(server)


def make_federation(base_url: str = BASE_URL, username: str = USERNAME) -> Federation:
    return Federation(
        kv=MemoryKvStore(),
        broker=StubBroker(),
        base_url=base_url,
        username=username,
        allow_private_addresses=True,
    )


@pytest.fixture
def federation() -> Iterator[Federation]:
    fed = make_federation()
    yield fed
    fed.close()
    fed.broker.close()


# --------------------------------------------------------------------------- requests


def new_activity(sender: RemoteActor, type_: Any = "Follow", **extra: Any) -> dict[str, Any]:
    activity: dict[str, Any] = {
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": f"{sender.id}/activities/{uuid.uuid4()}",
        "type": type_,
        "actor": sender.id,
        "object": f"{BASE_URL}/users/{USERNAME}",
    }
    activity.update(extra)
    return activity


def signed(
    actor: RemoteActor,
    activity: dict[str, Any] | bytes,
    *,
    scheme: Scheme = "draft-cavage",
    url: str = INBOX_URL,
    key: RSAPrivateKey | None = None,
    key_id: str | None = None,
) -> tuple[dict[str, str], bytes]:
    body = activity if isinstance(activity, bytes) else json.dumps(activity).encode()
    headers = sign_request(
        "POST",
        url,
        {"Content-Type": "application/activity+json"},
        body,
        private_key=key or actor.private_key,
        key_id=key_id or actor.key_id,
        scheme=scheme,
    )
    return headers, body


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def asgi_call(
    app: Any,
    *,
    method: str = "POST",
    path: str = INBOX_PATH,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    body: bytes = b"",
    chunks: list[bytes] | None = None,
    query: bytes = b"",
) -> Response:
    """Call an ASGI app as a server would; ``chunks`` streams the body in pieces.

    ``headers`` may be a list of pairs to send a name more than once.
    """
    pieces = list(chunks) if chunks is not None else [body]
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or ())
    raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": raw_headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received < len(pieces):
            received += 1
            return {
                "type": "http.request",
                "body": pieces[received - 1],
                "more_body": received < len(pieces),
            }
        await asyncio.sleep(3600)  # a real server only sends disconnect at the end
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    out_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
    return Response(start["status"], out_headers, body_out)


def post(federation: Federation, headers: dict[str, str], body: bytes, **kw: Any) -> Response:
    return asyncio.run(asgi_call(federation.inbox_app, headers=headers, body=body, **kw))


def queued(broker: dramatiq.Broker) -> list[dramatiq.Message[Any]]:
    """The messages waiting on ``botkit.inbox`` of a StubBroker, oldest first."""
    queue = broker.queues.get(INBOX_QUEUE)
    return [] if queue is None else [dramatiq.Message.decode(m) for m in list(queue.queue)]


# --------------------------------------------------------------------------- the endpoint


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
def test_valid_signed_activity_is_enqueued_once(
    federation: Federation, remote: RemoteServer, scheme: Scheme
) -> None:
    # Given a remote actor whose key is served by its server
    alice = remote.add_actor("alice")
    activity = new_activity(alice)
    headers, body = signed(alice, activity, scheme=scheme)
    # When it posts a signed activity to the bot's inbox
    response = post(federation, headers, body)
    # Then the inbox answers 202 and enqueues exactly one job with the verified activity
    assert response.status == 202
    messages = queued(federation.broker)
    assert len(messages) == 1
    assert messages[0].actor_name == INBOX_ACTOR_NAME
    assert messages[0].args == (USERNAME, activity, alice.id)
    # And the key was fetched once from the actor's document (the fragment stripped)
    assert remote.fetches() == ["/users/alice"]


def test_verified_request_makes_its_host_available_again(
    federation: Federation, remote: RemoteServer
) -> None:
    # Given the sender's host was marked unavailable for deliveries
    alice = remote.add_actor("alice")
    host = host_of(alice.id)
    for day in range(5):
        record_host_failure(federation.kv, host, now=time.time() - day * 86400)
    assert not is_host_available(federation.kv, host)
    # When it sends us a verified activity, deliveries to it resume
    headers, body = signed(alice, new_activity(alice))
    assert post(federation, headers, body).status == 202
    assert is_host_available(federation.kv, host)


def test_unverified_request_leaves_host_unavailable(
    federation: Federation, remote: RemoteServer
) -> None:
    alice = remote.add_actor("alice", key=_KEYS[0])
    host = host_of(alice.id)
    for day in range(5):
        record_host_failure(federation.kv, host, now=time.time() - day * 86400)
    headers, body = signed(alice, new_activity(alice), key=_KEYS[1])
    assert post(federation, headers, body).status == 401
    assert not is_host_available(federation.kv, host)


def test_shared_inbox_accepts_too(federation: Federation, remote: RemoteServer) -> None:
    alice = remote.add_actor("alice")
    headers, body = signed(alice, new_activity(alice), url=SHARED_INBOX_URL)
    response = post(federation, headers, body, path="/inbox")
    assert response.status == 202
    assert len(queued(federation.broker)) == 1


def test_cached_key_is_not_fetched_again(federation: Federation, remote: RemoteServer) -> None:
    alice = remote.add_actor("alice")
    for _ in range(3):
        headers, body = signed(alice, new_activity(alice))
        assert post(federation, headers, body).status == 202
    assert remote.fetches() == ["/users/alice"]
    assert len(queued(federation.broker)) == 3


def test_missing_signature_is_401(federation: Federation, remote: RemoteServer) -> None:
    alice = remote.add_actor("alice")
    body = json.dumps(new_activity(alice)).encode()
    response = post(federation, {"Content-Type": "application/activity+json"}, body)
    assert response.status == 401
    assert response.headers["content-type"] == "application/json"
    assert "not signed" in response.json()["error"]
    assert queued(federation.broker) == []
    assert remote.fetches() == []


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
def test_bad_signature_is_401(federation: Federation, remote: RemoteServer, scheme: Scheme) -> None:
    # Given a request signed with a key that is not the one alice's document serves
    alice = remote.add_actor("alice", key=_KEYS[0])
    headers, body = signed(alice, new_activity(alice), scheme=scheme, key=_KEYS[1])
    response = post(federation, headers, body)
    assert response.status == 401
    assert queued(federation.broker) == []


@pytest.mark.parametrize(
    ("scheme", "digest_header"), [("draft-cavage", "Digest"), ("rfc9421", "Content-Digest")]
)
def test_digest_mismatch_is_401(
    federation: Federation, remote: RemoteServer, scheme: Scheme, digest_header: str
) -> None:
    # Given a validly signed request whose body is swapped afterwards
    alice = remote.add_actor("alice")
    headers, _ = signed(alice, new_activity(alice), scheme=scheme)
    assert digest_header in headers
    tampered = json.dumps(new_activity(alice, "Create")).encode()
    response = post(federation, headers, tampered)
    assert response.status == 401
    assert queued(federation.broker) == []
    # The digest is checked before any key is fetched
    assert remote.fetches() == []


def test_signature_for_another_url_is_401(federation: Federation, remote: RemoteServer) -> None:
    alice = remote.add_actor("alice")
    headers, body = signed(alice, new_activity(alice), url=f"{BASE_URL}/users/other/inbox")
    assert post(federation, headers, body).status == 401
    assert queued(federation.broker) == []


def test_key_owner_not_actor_is_401(federation: Federation, remote: RemoteServer) -> None:
    # Given alice signs an activity that claims bob (same server) as its actor
    alice = remote.add_actor("alice")
    bob = remote.add_actor("bob")
    headers, body = signed(alice, new_activity(bob))
    response = post(federation, headers, body)
    assert response.status == 401
    assert "actor" in response.json()["error"]
    assert queued(federation.broker) == []


def test_key_on_another_host_than_actor_is_401(
    federation: Federation, remote: RemoteServer
) -> None:
    alice = remote.add_actor("alice")
    activity = new_activity(alice, actor="http://elsewhere.test/users/alice")
    headers, body = signed(alice, activity)
    assert post(federation, headers, body).status == 401
    assert remote.fetches() == []
    assert queued(federation.broker) == []


def test_body_over_limit_with_content_length_is_413(federation: Federation) -> None:
    # The declared length alone is enough: nothing is read
    response = post(
        federation,
        {"Content-Length": str(MAX_BODY_BYTES + 1), "Signature": 'keyId="x"'},
        b"",
        chunks=[],
    )
    assert response.status == 413
    assert queued(federation.broker) == []


def test_body_over_limit_while_streaming_is_413(federation: Federation) -> None:
    # No Content-Length (chunked): the cap applies while reading
    chunk = b"x" * (64 * 1024)
    chunks = [chunk] * (MAX_BODY_BYTES // len(chunk)) + [b"y"]
    response = post(federation, {}, b"", chunks=chunks)
    assert response.status == 413


def test_body_at_limit_is_read(federation: Federation) -> None:
    # Exactly 1 MiB is allowed (it then fails for being unsigned, not for its size)
    body = json.dumps({"pad": "x" * (MAX_BODY_BYTES - 20)}).encode()
    body = body + b" " * (MAX_BODY_BYTES - len(body))
    assert len(body) == MAX_BODY_BYTES
    response = post(federation, {"Content-Length": str(len(body))}, body)
    assert response.status == 401


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"",
        b"[1, 2]",
        b'"a string"',
        b"null",
        b'{"a": NaN}',
        b"[" * 100_000,
        b'{"id": "\\ud800"}',
    ],
)
def test_non_object_body_is_400(federation: Federation, remote: RemoteServer, body: bytes) -> None:
    alice = remote.add_actor("alice")
    # Signed, so that the 400 is about the body and nothing else
    headers, body = signed(alice, body)
    response = post(federation, headers, body)
    assert response.status == 400
    assert queued(federation.broker) == []


@pytest.mark.parametrize(
    "actor", [None, 42, "", "not a url", "ftp://remote.test/alice", {"type": "Person"}]
)
def test_activity_without_usable_actor_is_400(
    federation: Federation, remote: RemoteServer, actor: Any
) -> None:
    alice = remote.add_actor("alice")
    activity = new_activity(alice, actor=actor)
    headers, body = signed(alice, activity)
    assert post(federation, headers, body).status == 400
    assert queued(federation.broker) == []


def test_embedded_actor_object_is_accepted(federation: Federation, remote: RemoteServer) -> None:
    # Compacted JSON-LD: the actor may be embedded, or given in an array
    alice = remote.add_actor("alice")
    for actor in ({"id": alice.id, "type": "Person"}, [alice.id]):
        headers, body = signed(alice, new_activity(alice, actor=actor))
        assert post(federation, headers, body).status == 202
    assert [m.args[2] for m in queued(federation.broker)] == [alice.id, alice.id]


def test_duplicate_activity_id_is_accepted_but_not_enqueued_twice(
    federation: Federation, remote: RemoteServer
) -> None:
    alice = remote.add_actor("alice")
    activity = new_activity(alice)
    for scheme in ("draft-cavage", "rfc9421", "draft-cavage"):
        headers, body = signed(alice, activity, scheme=scheme)  # type: ignore[arg-type]
        assert post(federation, headers, body).status == 202
    assert len(queued(federation.broker)) == 1
    assert federation.kv.get(("botkit", USERNAME, "seen", activity["id"])) == 1


def test_very_long_activity_id_is_deduplicated(
    federation: Federation, remote: RemoteServer
) -> None:
    alice = remote.add_actor("alice")
    activity = new_activity(alice, id=f"{alice.id}/activities/{'x' * 5000}")
    for _ in range(2):
        headers, body = signed(alice, activity)
        assert post(federation, headers, body).status == 202
    assert len(queued(federation.broker)) == 1


def test_delete_of_unknown_actor_is_202_without_fetch(
    federation: Federation, remote: RemoteServer
) -> None:
    # Given an actor we never heard of, whose account is gone (its document answers 410)
    gone = remote.add_actor("gone")
    gone.document_status = 410
    delete = new_activity(gone, "Delete", object=gone.id)
    headers, body = signed(gone, delete)
    # When it sends Delete(itself)
    response = post(federation, headers, body)
    # Then we answer 202 without fetching anything and without enqueueing
    assert response.status == 202
    assert remote.server.requests() == []
    assert queued(federation.broker) == []


def test_delete_of_unknown_actor_with_embedded_object(
    federation: Federation, remote: RemoteServer
) -> None:
    gone = remote.add_actor("gone")
    delete = new_activity(gone, "Delete", object={"id": gone.id, "type": "Tombstone"})
    headers, body = signed(gone, delete, scheme="rfc9421")
    assert post(federation, headers, body).status == 202
    assert remote.server.requests() == []
    assert queued(federation.broker) == []


def test_delete_of_known_actor_is_verified_and_enqueued(
    federation: Federation, remote: RemoteServer
) -> None:
    # Given alice is known (her key is cached from an earlier activity)
    alice = remote.add_actor("alice")
    headers, body = signed(alice, new_activity(alice))
    assert post(federation, headers, body).status == 202
    # When she deletes herself, the Delete is verified and processed
    headers, body = signed(alice, new_activity(alice, "Delete", object=alice.id))
    assert post(federation, headers, body).status == 202
    assert [m.args[1]["type"] for m in queued(federation.broker)] == ["Follow", "Delete"]


def test_delete_of_follower_is_verified_and_enqueued(
    federation: Federation, remote: RemoteServer
) -> None:
    # Given alice follows the bot but her key is no longer cached
    alice = remote.add_actor("alice")
    federation.followers.add(alice.document())
    # When she deletes herself, the key is fetched, the Delete verified and enqueued
    headers, body = signed(alice, new_activity(alice, "Delete", object=alice.id))
    assert post(federation, headers, body).status == 202
    assert remote.fetches() == ["/users/alice"]
    assert [m.args[1]["type"] for m in queued(federation.broker)] == ["Delete"]


def test_delete_of_follower_whose_key_is_gone_is_202_but_not_enqueued(
    federation: Federation, remote: RemoteServer
) -> None:
    # Given a follower whose account (and key) is already gone
    alice = remote.add_actor("alice")
    federation.followers.add(alice.document())
    alice.document_status = 410
    headers, body = signed(alice, new_activity(alice, "Delete", object=alice.id))
    # Then the sender is not made to retry, but nothing unverified is enqueued
    assert post(federation, headers, body).status == 202
    assert remote.fetches() == ["/users/alice"]
    assert queued(federation.broker) == []
    # While any other activity whose key cannot be fetched is refused
    headers, body = signed(alice, new_activity(alice, "Undo"))
    assert post(federation, headers, body).status == 401


def test_forged_delete_of_known_actor_is_401(federation: Federation, remote: RemoteServer) -> None:
    alice = remote.add_actor("alice", key=_KEYS[0])
    headers, body = signed(alice, new_activity(alice))
    assert post(federation, headers, body).status == 202
    forged = new_activity(alice, "Delete", object=alice.id)
    headers, body = signed(alice, forged, key=_KEYS[1])
    assert post(federation, headers, body).status == 401
    assert len(queued(federation.broker)) == 1


def test_rotated_key_is_refetched_once(federation: Federation, remote: RemoteServer) -> None:
    # Given alice's old key, cached two hours ago
    alice = remote.add_actor("alice", key=_KEYS[0])
    federation.kv.set(
        remote_key_kv_key(alice.key_id),
        {
            "owner": alice.id,
            "publicKeyPem": public_key_pem(_KEYS[0]),
            "fetchedAt": time.time() - 7200,
        },
        ttl=3600,
    )
    # And alice has since rotated her key
    alice.private_key = _KEYS[1]
    headers, body = signed(alice, new_activity(alice))
    # When she signs with the new key, the cached key fails, the key is refetched once
    response = post(federation, headers, body)
    assert response.status == 202
    assert remote.fetches() == ["/users/alice"]
    assert len(queued(federation.broker)) == 1
    # And the new key is cached for the next request
    headers, body = signed(alice, new_activity(alice))
    assert post(federation, headers, body).status == 202
    assert remote.fetches() == ["/users/alice"]


def test_unreachable_key_is_401(federation: Federation, remote: RemoteServer) -> None:
    alice = remote.add_actor("alice")
    alice.document_status = 404
    headers, body = signed(alice, new_activity(alice))
    response = post(federation, headers, body)
    assert response.status == 401
    assert "cannot be fetched" in response.json()["error"]
    assert queued(federation.broker) == []


def test_wrong_method_and_path(federation: Federation) -> None:
    response = asyncio.run(asgi_call(federation.inbox_app, method="GET"))
    assert response.status == 405
    assert response.headers["allow"] == "POST"
    response = asyncio.run(asgi_call(federation.inbox_app, path="/users/someone-else/inbox"))
    assert response.status == 404


def test_lifespan_and_websocket_scopes(federation: Federation) -> None:
    async def run(scope_type: str, incoming: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return incoming.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await federation.inbox_app({"type": scope_type, "path": INBOX_PATH}, receive, send)
        return sent

    lifespan = asyncio.run(
        run("lifespan", [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    )
    assert [m["type"] for m in lifespan] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    websocket = asyncio.run(run("websocket", [{"type": "websocket.connect"}]))
    assert [m["type"] for m in websocket] == ["websocket.close"]


def test_invalid_content_length_is_400(federation: Federation) -> None:
    response = post(federation, {"Content-Length": "lots"}, b"{}")
    assert response.status == 400


def test_trailing_slash_and_query_are_accepted(
    federation: Federation, remote: RemoteServer
) -> None:
    alice = remote.add_actor("alice")
    headers, body = signed(alice, new_activity(alice), url=f"{INBOX_URL}?x=1")
    assert post(federation, headers, body, query=b"x=1").status == 202
    headers, body = signed(alice, new_activity(alice), url=f"{INBOX_URL}/")
    assert post(federation, headers, body, path=f"{INBOX_PATH}/").status == 202


def test_enqueue_failure_is_503_and_forgets_the_id(
    federation: Federation, remote: RemoteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a broker that is down
    alice = remote.add_actor("alice")
    activity = new_activity(alice)
    headers, body = signed(alice, activity)

    def down(*args: Any, **kwargs: Any) -> None:
        raise dramatiq.errors.ConnectionClosed(OSError("down"))

    monkeypatch.setattr(federation.broker, "enqueue", down)
    # Then the sender is told to retry, and the retry is not taken for a duplicate
    assert post(federation, headers, body).status == 503
    monkeypatch.undo()
    assert post(federation, headers, body).status == 202
    assert len(queued(federation.broker)) == 1


# --------------------------------------------------------------------------- real HTTP


@pytest.fixture
def served_federation() -> Iterator[Federation]:
    """A federation whose inbox app is served by uvicorn on a loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    fed = make_federation(base_url=f"http://127.0.0.1:{port}")
    config = uvicorn.Config(fed.inbox_app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield fed
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        fed.close()
        fed.broker.close()


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
def test_over_real_http(
    served_federation: Federation, remote: RemoteServer, scheme: Scheme
) -> None:
    fed = served_federation
    alice = remote.add_actor("alice")
    activity = new_activity(alice)
    headers, body = signed(alice, activity, scheme=scheme, url=fed.inbox_url)
    with httpx.Client(timeout=10) as client:
        # A valid request is accepted and enqueued
        response = client.post(fed.inbox_url, content=body, headers=headers)
        assert response.status_code == 202
        # Replayed: still 202, not enqueued again
        assert client.post(fed.inbox_url, content=body, headers=headers).status_code == 202
        # Unsigned
        response = client.post(fed.shared_inbox_url, content=body)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/json"
        # Too large, refused on its Content-Length
        response = client.post(fed.inbox_url, content=b"x" * (MAX_BODY_BYTES + 1))
        assert response.status_code == 413
    messages = queued(fed.broker)
    assert [m.args for m in messages] == [(USERNAME, activity, alice.id)]


# --------------------------------------------------------------------------- the job


@pytest.fixture
def worker(federation: Federation) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(federation.broker, worker_timeout=50, worker_threads=1)
    worker.start()
    yield worker
    worker.stop()


def run_jobs(federation: Federation) -> None:
    federation.broker.join(INBOX_QUEUE, timeout=30_000, fail_fast=False)


def test_job_dispatches_to_handlers_with_context(
    federation: Federation, remote: RemoteServer, worker: dramatiq.Worker
) -> None:
    # Given handlers for Follow (two of them) and for Create
    calls: list[tuple[str, InboxContext, dict[str, Any]]] = []
    federation.on("Follow", lambda ctx, act: calls.append(("follow-1", ctx, act)))

    @federation.on("Follow")
    def second(ctx: InboxContext, act: dict[str, Any]) -> None:
        calls.append(("follow-2", ctx, act))

    federation.on("Create", lambda ctx, act: calls.append(("create", ctx, act)))
    alice = remote.add_actor("alice", key=_KEYS[0])
    alice.extra = {"name": "Alice"}
    activity = new_activity(alice)
    headers, body = signed(alice, activity)
    # When a Follow arrives and the job runs
    assert post(federation, headers, body).status == 202
    run_jobs(federation)
    # Then both Follow handlers ran, in order, with the context; Create's did not
    assert [name for name, _, _ in calls] == ["follow-1", "follow-2"]
    ctx = calls[0][1]
    assert ctx.federation is federation
    assert ctx.activity == activity
    assert calls[0][2] == activity
    assert ctx.actor_id == alice.id
    assert ctx.actor["name"] == "Alice"
    assert ctx.actor_inbox == alice.inbox
    assert federation.broker.dead_letters == []


def test_actor_document_is_cached(
    federation: Federation, remote: RemoteServer, worker: dramatiq.Worker
) -> None:
    seen: list[str] = []
    federation.on("Like", lambda ctx, act: seen.append(ctx.actor["id"]))
    alice = remote.add_actor("alice")
    for _ in range(3):
        headers, body = signed(alice, new_activity(alice, "Like"))
        assert post(federation, headers, body).status == 202
    run_jobs(federation)
    assert seen == [alice.id] * 3
    # One fetch for the key (the HTTP side) and one for the actor (the job), then cached
    assert len(remote.fetches()) == 2


def test_activity_with_several_types_runs_a_handler_once(
    federation: Federation, remote: RemoteServer, worker: dramatiq.Worker
) -> None:
    seen: list[Any] = []

    def handler(ctx: InboxContext, act: dict[str, Any]) -> None:
        seen.append(act["type"])

    federation.on("Create", handler)
    federation.on("Update", handler)
    alice = remote.add_actor("alice")
    headers, body = signed(alice, new_activity(alice, ["Create", "Update"]))
    assert post(federation, headers, body).status == 202
    run_jobs(federation)
    assert seen == [["Create", "Update"]]


def _send_job(federation: Federation, activity: Any, actor_id: Any, **options: Any) -> None:
    federation.broker.get_actor(INBOX_ACTOR_NAME).send_with_options(
        args=(USERNAME, activity, actor_id), **options
    )


def test_malformed_activity_is_not_retried(
    federation: Federation, remote: RemoteServer, worker: dramatiq.Worker
) -> None:
    called: list[Any] = []
    federation.on("Follow", lambda ctx, act: called.append(act))
    alice = remote.add_actor("alice")
    # The activity's actor is not the verified signer
    _send_job(federation, new_activity(alice, actor="http://elsewhere.test/x"), alice.id)
    # Not an object at all
    _send_job(federation, ["Follow"], alice.id)
    run_jobs(federation)
    dead = federation.broker.dead_letters
    assert len(dead) == 2
    assert all(m.options.get("retries", 0) == 0 for m in dead)
    assert called == []


def test_actor_document_with_wrong_id_is_not_retried(
    federation: Federation, remote: RemoteServer, worker: dramatiq.Worker
) -> None:
    alice = remote.add_actor("alice")
    alice.extra = {"id": "http://elsewhere.test/users/alice"}
    _send_job(federation, new_activity(alice), alice.id)
    run_jobs(federation)
    [dead] = federation.broker.dead_letters
    assert dead.options.get("retries", 0) == 0
    assert remote.fetches() == ["/users/alice"]


def test_actor_gone_is_not_retried(
    federation: Federation, remote: RemoteServer, worker: dramatiq.Worker
) -> None:
    alice = remote.add_actor("alice")
    alice.document_status = 410
    _send_job(federation, new_activity(alice), alice.id, min_backoff=10, max_backoff=20)
    run_jobs(federation)
    [dead] = federation.broker.dead_letters
    assert dead.options.get("retries", 0) == 0
    assert remote.fetches() == ["/users/alice"]


def test_transient_actor_fetch_failure_is_retried(
    federation: Federation, remote: RemoteServer, worker: dramatiq.Worker
) -> None:
    # Given an actor server that fails twice before answering
    seen: list[str] = []
    federation.on("Follow", lambda ctx, act: seen.append(ctx.actor_id))
    alice = remote.add_actor("alice")
    alice.failures = [503, 500]
    # When the job runs (short backoff for the test)
    _send_job(federation, new_activity(alice), alice.id, min_backoff=10, max_backoff=50)
    run_jobs(federation)
    # Then it was retried until the fetch succeeded, and the handler ran once
    assert remote.fetches() == ["/users/alice"] * 3
    assert seen == [alice.id]
    assert federation.broker.dead_letters == []


def test_handler_error_is_retried_and_malformed_error_is_not(
    federation: Federation, remote: RemoteServer, worker: dramatiq.Worker
) -> None:
    alice = remote.add_actor("alice")
    runs = {"Like": 0, "Announce": 0}

    @federation.on("Like")
    def flaky(ctx: InboxContext, act: dict[str, Any]) -> None:
        runs["Like"] += 1
        if runs["Like"] == 1:
            raise RuntimeError("transient")

    @federation.on("Announce")
    def rejecting(ctx: InboxContext, act: dict[str, Any]) -> None:
        runs["Announce"] += 1
        raise MalformedActivityError("nothing to announce")

    _send_job(federation, new_activity(alice, "Like"), alice.id, min_backoff=10, max_backoff=20)
    _send_job(federation, new_activity(alice, "Announce"), alice.id)
    run_jobs(federation)
    assert runs == {"Like": 2, "Announce": 1}
    [dead] = federation.broker.dead_letters
    assert dead.args[1]["type"] == "Announce"


def test_activity_without_handler_is_a_no_op(
    federation: Federation, remote: RemoteServer, worker: dramatiq.Worker
) -> None:
    alice = remote.add_actor("alice")
    _send_job(federation, new_activity(alice, "Block"), alice.id)
    run_jobs(federation)
    assert federation.broker.dead_letters == []


# --------------------------------------------------------------------------- tolerant readers


def test_as_list_and_ids() -> None:
    assert as_list(None) == []
    assert as_list("a") == ["a"]
    assert as_list(["a", "b"]) == ["a", "b"]
    assert first_id("https://a.example/1") == "https://a.example/1"
    assert first_id({"id": "https://a.example/1", "type": "Note"}) == "https://a.example/1"
    assert first_id({"type": "Link", "href": "https://a.example/2"}) == "https://a.example/2"
    assert first_id([{"type": "Note"}, 7, "https://a.example/3"]) == "https://a.example/3"
    assert first_id([]) is None
    assert first_id({"id": 5}) is None
    assert ids(["x", {"id": "y"}, "x", None, {"id": 1}]) == ["x", "y"]
    assert embedded(["x", {"id": "y"}]) == {"id": "y"}
    assert embedded("x") is None


def test_types_and_addressing() -> None:
    note = {
        "type": ["Note", 3],
        "to": "as:Public",
        "cc": [{"id": "https://a.example/followers"}],
        "tag": [
            {"type": "Mention", "href": "https://bot.example/users/bot"},
            {"type": "Hashtag", "href": "https://a.example/tags/x"},
            "junk",
        ],
    }
    assert types(note) == ["Note"]
    assert has_type(note, "Note")
    assert not has_type("Note", "Note")
    assert is_public(note)
    assert is_public({"cc": PUBLIC})
    assert not is_public({"to": ["https://a.example/followers"]})
    assert recipients(note) == {"as:Public", "https://a.example/followers"}
    assert mentions(note) == ["https://bot.example/users/bot"]
    assert mentions(None) == []


@pytest.mark.parametrize(
    ("activity", "expected"),
    [
        ({"actor": "https://a.example/u/1"}, "https://a.example/u/1"),
        ({"actor": {"id": "https://a.example/u/1"}}, "https://a.example/u/1"),
        ({"actor": ["https://a.example/u/1", "https://b.example/u/2"]}, "https://a.example/u/1"),
    ],
)
def test_require_actor_id(activity: dict[str, Any], expected: str) -> None:
    assert require_actor_id(activity) == expected


@pytest.mark.parametrize(
    "actor", [None, "", "urn:x", "https://", "https://a.example/" + "x" * 1000, "http://[::1"]
)
def test_require_actor_id_rejects(actor: Any) -> None:
    with pytest.raises(MalformedActivityError):
        require_actor_id({"actor": actor})
    assert not is_http_url(actor)


# --------------------------------------------------------------------------- real backends


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def backend_federation(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Federation]:
    """A federation on a real key-value store and broker, removed afterwards."""
    prefix = unique_name("inbox_")
    if request.param in ("sqlite", "postgres"):
        import sqlalchemy as sa

        from botkit_tasks._sql import create_engine
        from botkit_tasks.brokers.sql import SqlBroker
        from botkit_tasks.kv.sql import SqlKvStore

        url = (
            f"sqlite:///{tmp_path}/inbox.sqlite3"
            if request.param == "sqlite"
            else request.getfixturevalue("database_url")
        )
        engine = create_engine(url)
        kv: Any = SqlKvStore(engine, table_name=f"{prefix}_kv")
        broker: dramatiq.Broker = SqlBroker(engine, table_prefix=f"{prefix}_", poll_interval=0.1)
        fed = Federation(
            kv=kv,
            broker=broker,
            base_url=BASE_URL,
            username=USERNAME,
            allow_private_addresses=True,
        )
        yield fed
        fed.close()
        broker.close()
        broker.drop_tables()  # type: ignore[attr-defined]
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{prefix}_kv"'))
        engine.dispose()
        return

    import redis
    from dramatiq.brokers.redis import RedisBroker

    from botkit_tasks.kv.redis import RedisKvStore

    client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    kv = RedisKvStore(client, key_prefix=f"{prefix}:")
    broker = RedisBroker(client=client, namespace=f"{prefix}-dq")
    fed = Federation(
        kv=kv, broker=broker, base_url=BASE_URL, username=USERNAME, allow_private_addresses=True
    )
    yield fed
    fed.close()
    broker.close()
    for pattern in (f"{prefix}:*", f"{prefix}-dq:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    client.close()


def test_concurrent_duplicates_on_real_backends(
    backend_federation: Federation, remote: RemoteServer
) -> None:
    # Given one signed activity delivered 8 times at once (a sender retrying eagerly)
    fed = backend_federation
    calls: list[str] = []
    fed.on("Follow", lambda ctx, act: calls.append(act["id"]))
    alice = remote.add_actor("alice")
    activity = new_activity(alice)
    requests = [signed(alice, activity) for _ in range(8)]
    barrier = threading.Barrier(len(requests))
    statuses: list[int] = []

    def deliver(headers: dict[str, str], body: bytes) -> None:
        barrier.wait()
        statuses.append(fed.inbox_app.handle(INBOX_URL, headers, body)[0])

    threads = [threading.Thread(target=deliver, args=r) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Then every copy is answered 202, and a worker runs the handler exactly once
    assert statuses == [202] * 8
    worker = dramatiq.Worker(fed.broker, worker_timeout=100, worker_threads=2)
    worker.start()
    try:
        fed.broker.join(INBOX_QUEUE, timeout=30_000)
        time.sleep(0.3)  # a second (wrongly enqueued) copy would have run by now
    finally:
        worker.stop()
    assert calls == [activity["id"]]
    assert fed.kv.get(("botkit", USERNAME, "seen", activity["id"])) == 1


@pytest.mark.parametrize("backend_federation", ["sqlite", "postgres"], indirect=True)
def test_seen_mark_and_job_commit_together_on_one_sql_engine(
    backend_federation: Federation, remote: RemoteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy as sa

    fed = backend_federation
    engine = fed.broker.engine  # type: ignore[attr-defined]

    alice = remote.add_actor("alice")
    activity = new_activity(alice)
    headers, body = signed(alice, activity)
    table = f"{fed.broker.table_prefix}messages"  # type: ignore[attr-defined]

    def count() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f'SELECT COUNT(*) FROM "{table}"')).scalar_one())

    # Given the process dies right after the job row is written (before commit)
    real_enqueue = fed.broker.enqueue

    def enqueue_then_crash(message: Any, *, delay: int | None = None) -> Any:
        real_enqueue(message, delay=delay)
        raise RuntimeError("crash after the insert")

    monkeypatch.setattr(fed.broker, "enqueue", enqueue_then_crash)
    assert fed.inbox_app.handle(INBOX_URL, headers, body)[0] == 503
    # Then neither the job nor the seen mark exists: the sender's retry is accepted
    assert count() == 0
    assert fed.kv.get(("botkit", USERNAME, "seen", activity["id"])) is None
    monkeypatch.undo()
    assert fed.inbox_app.handle(INBOX_URL, headers, body)[0] == 202
    assert count() == 1


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((USERNAME,), {}), ((1, 2, 3, 4), {}), ((USERNAME, {}, "x"), {"bogus": 1})],
)
def test_inbox_job_with_malformed_arguments_is_not_retried(
    federation: Federation, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    # A TypeError from the call itself used to be retried like a transient failure
    inbox_actor = federation.broker.get_actor(INBOX_ACTOR_NAME)
    with pytest.raises(MalformedActivityError, match="botkit_inbox"):
        inbox_actor(*args, **kwargs)
