"""A simulated remote fediverse on loopback: real HTTP, real signatures, scripted inboxes.

:class:`RemoteFediverse` is a plain ASGI application served on several
loopback sockets at once, one per simulated *instance* (the port tells them
apart, as host names would on the real network).  Each instance hosts actors
with an actor document, a public key and a personal inbox; instance ``b``
also has a shared inbox, as Mastodon servers do.

Every POST to an inbox is verified like a real server verifies it: the
signer's key is fetched from the ``keyId`` (the bot's actor document), the
HTTP signature and digest are checked with
:func:`botkit_tasks.federation.signatures.verify_request`, and the key's owner
must be the activity's actor; otherwise the answer is 401 and the failure is
counted.  An ``Accept`` must embed the very ``Follow`` the actor sent.

Deliveries of the bot's ``Create`` are answered as scripted per inbox:

========== =====================================================================
normal     202
flaky      500 for the first 1-3 attempts, then 202
limited    429 with ``Retry-After: 1`` once, then 202
gone       410 Gone, always (the bot drops that follower)
hanging    never answers within the bot's read timeout (retried until dead)
========== =====================================================================
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..federation.keys import generate_private_key, load_public_key_pem, public_key_pem
from ..federation.signatures import SignatureError, sign_request, verify_request

__all__ = ["Behaviour", "RemoteActor", "RemoteFediverse"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

AS_CONTEXT = "https://www.w3.org/ns/activitystreams"

#: How an inbox answers deliveries of the bot's posts.
Behaviour = str  # "normal" | "flaky" | "limited" | "gone" | "hanging"


@dataclass
class RemoteActor:
    """One simulated remote account and what happened to it."""

    name: str
    instance: str
    base: str
    behaviour: Behaviour = "normal"
    fail_times: int = 0
    follow_id: str | None = None
    accepted: bool = False
    create_statuses: list[int] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.base}/users/{self.name}"

    @property
    def inbox(self) -> str:
        return f"{self.id}/inbox"


@dataclass
class _Instance:
    name: str
    port: int
    shared_inbox: bool
    base: str = ""
    private_key: Any = None
    public_pem: str = ""
    shared_statuses: list[int] = field(default_factory=list)


class RemoteFediverse:
    """The simulated remote servers (an ASGI app) and their scoreboard.

    Args:
        ports: ``{instance name: port}``; instance ``"b"`` gets a shared inbox.
        hang_seconds: How long a hanging inbox waits before answering (longer
            than the bot's read timeout).
    """

    def __init__(self, ports: dict[str, int], *, hang_seconds: float = 3.0) -> None:
        self.instances: dict[str, _Instance] = {}
        self._by_port: dict[int, _Instance] = {}
        for name, port in ports.items():
            key = generate_private_key()
            inst = _Instance(
                name=name,
                port=port,
                shared_inbox=(name == "b"),
                base=f"http://127.0.0.1:{port}",
                private_key=key,
                public_pem=public_key_pem(key),
            )
            self.instances[name] = inst
            self._by_port[port] = inst
        self.actors: dict[str, RemoteActor] = {}
        self.hang_seconds = hang_seconds
        #: Set when the demo shuts down: hanging requests end at once.
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.events: deque[str] = deque(maxlen=6)
        self.verified_posts = 0
        self.signature_failures: list[str] = []
        self.bad_accepts: list[str] = []
        self.actor_fetches = 0
        self._keys: dict[str, Any] = {}
        self._http: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------ population

    def add_actor(
        self, name: str, instance: str, behaviour: Behaviour = "normal", fails: int = 0
    ) -> RemoteActor:
        inst = self.instances[instance]
        actor = RemoteActor(
            name=name, instance=instance, base=inst.base, behaviour=behaviour, fail_times=fails
        )
        self.actors[actor.id] = actor
        return actor

    def shared_inbox(self, instance: str) -> str | None:
        inst = self.instances[instance]
        return f"{inst.base}/inbox" if inst.shared_inbox else None

    def actor_document(self, actor: RemoteActor) -> dict[str, Any]:
        inst = self.instances[actor.instance]
        doc: dict[str, Any] = {
            "@context": [AS_CONTEXT, "https://w3id.org/security/v1"],
            "id": actor.id,
            "type": "Person",
            "preferredUsername": actor.name,
            "name": actor.name.replace("-", " ").title(),
            "inbox": actor.inbox,
            "outbox": f"{actor.id}/outbox",
            "followers": f"{actor.id}/followers",
            "publicKey": {
                "id": f"{actor.id}#main-key",
                "owner": actor.id,
                "publicKeyPem": inst.public_pem,
            },
        }
        if inst.shared_inbox:
            doc["endpoints"] = {"sharedInbox": f"{inst.base}/inbox"}
        return doc

    # ------------------------------------------------------------------ outgoing follows

    def signed_follow(
        self, actor: RemoteActor, target_id: str, target_inbox: str
    ) -> tuple[dict[str, str], bytes]:
        """Headers and body of ``actor``'s signed ``Follow`` of ``target_id``."""
        actor.follow_id = f"{actor.id}/follows/{uuid.uuid4().hex}"
        body = json.dumps(
            {
                "@context": AS_CONTEXT,
                "id": actor.follow_id,
                "type": "Follow",
                "actor": actor.id,
                "object": target_id,
            }
        ).encode()
        headers = sign_request(
            "POST",
            target_inbox,
            {"Content-Type": "application/activity+json", "Accept": "application/activity+json"},
            body,
            private_key=self.instances[actor.instance].private_key,
            key_id=f"{actor.id}#main-key",
        )
        return headers, body

    # ------------------------------------------------------------------ scoreboard

    def note(self, text: str) -> None:
        with self.lock:
            self.events.append(f"{time.strftime('%H:%M:%S')} {text}")

    def accepted_count(self) -> int:
        with self.lock:
            return sum(1 for a in self.actors.values() if a.accepted)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._http is not None:
                        await self._http.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        port = (scope.get("server") or ("", 0))[1]
        inst = self._by_port.get(port)
        path: str = scope.get("path", "/")
        method: str = scope.get("method", "GET")
        if inst is None:
            await _respond(send, 404)
            return
        if method == "GET":
            actor = self.actors.get(f"{inst.base}{path}")
            if actor is None:
                await _respond(send, 404)
                return
            with self.lock:
                self.actor_fetches += 1
            body = json.dumps(self.actor_document(actor)).encode()
            await _respond(send, 200, body, "application/activity+json")
            return
        if method != "POST":
            await _respond(send, 405)
            return
        body = await _read(receive)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        url = f"{inst.base}{path}"
        if path == "/inbox" and inst.shared_inbox:
            owner = None
        else:
            owner = self.actors.get(url.removesuffix("/inbox")) if path.endswith("/inbox") else None
            if owner is None:
                await _respond(send, 404)
                return
        try:
            activity = json.loads(body)
            if not isinstance(activity, dict):
                raise ValueError("not an object")
        except ValueError:
            await _respond(send, 400)
            return
        if not await self._verify(url, headers, body, activity):
            await _respond(send, 401)
            return
        kind = activity.get("type")
        if kind == "Accept":
            await _respond(send, self._accept(owner, activity))
            return
        if kind == "Create":
            status = await self._create(inst, owner, url)
            await _respond(send, status, headers=[(b"retry-after", b"1")] if status == 429 else [])
            return
        await _respond(send, 202)

    async def _verify(
        self, url: str, headers: list[tuple[str, str]], body: bytes, activity: dict[str, Any]
    ) -> bool:
        from ..federation.signatures import signature_key_id

        key_id = signature_key_id(headers)
        try:
            if not key_id:
                raise SignatureError("unsigned")
            public_key, owner = await self._key(key_id)
            verify_request("POST", url, headers, body, public_key=public_key)
            if owner != activity.get("actor"):
                raise SignatureError("key owner is not the activity's actor")
        except (SignatureError, httpx.HTTPError, KeyError, ValueError, TypeError) as exc:
            with self.lock:
                self.signature_failures.append(f"{url}: {exc}")
            self.note(f"401 signature rejected at {url}: {exc}")
            return False
        with self.lock:
            self.verified_posts += 1
        return True

    async def _key(self, key_id: str) -> tuple[Any, str]:
        cached = self._keys.get(key_id)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=5.0)
        response = await self._http.get(
            key_id.split("#")[0], headers={"Accept": "application/activity+json"}
        )
        response.raise_for_status()
        document = response.json()
        key = document["publicKey"]
        if key["id"] != key_id:
            raise ValueError(f"key {key_id} not in its document")
        result = (load_public_key_pem(key["publicKeyPem"]), key["owner"])
        self._keys[key_id] = result
        return result

    def _accept(self, owner: RemoteActor | None, accept: dict[str, Any]) -> int:
        follow = accept.get("object")
        ok = (
            owner is not None
            and isinstance(follow, dict)
            and follow.get("type") == "Follow"
            and follow.get("id") == owner.follow_id
            and follow.get("actor") == owner.id
        )
        with self.lock:
            if ok and owner is not None:
                owner.accepted = True
            else:
                self.bad_accepts.append(json.dumps(accept)[:200])
        return 202 if ok else 400

    async def _create(self, inst: _Instance, owner: RemoteActor | None, url: str) -> int:
        if owner is None:
            with self.lock:
                inst.shared_statuses.append(202)
            return 202
        with self.lock:
            attempt = len(owner.create_statuses) + 1
            behaviour = owner.behaviour
        short = url.split("/users/")[-1]
        if behaviour == "hanging":
            self.note(f"{short}: attempt {attempt} hangs (the bot times out and retries)")
            with self.lock:
                owner.create_statuses.append(0)
            deadline = time.monotonic() + self.hang_seconds
            while time.monotonic() < deadline and not self.stopping.is_set():
                await asyncio.sleep(0.05)
            return 202  # far too late: the bot gave up on this attempt
        if behaviour == "gone":
            status = 410
            self.note(f"{short}: 410 Gone (the bot drops this follower, no retry)")
        elif behaviour == "flaky" and attempt <= owner.fail_times:
            status = 500
            self.note(f"{short}: 500 on attempt {attempt} (retried with backoff)")
        elif behaviour == "limited" and attempt == 1:
            status = 429
            self.note(f"{short}: 429 Retry-After: 1 (retried after it)")
        else:
            status = 202
            if attempt > 1:
                self.note(f"{short}: 202 on attempt {attempt}")
        with self.lock:
            owner.create_statuses.append(status)
        return status


async def _read(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _respond(
    send: Send,
    status: int,
    body: bytes = b"",
    ctype: str = "text/plain",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", ctype.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
