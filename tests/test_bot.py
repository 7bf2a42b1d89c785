"""The Bot: its handlers, its web app, and two bots talking over real loopback HTTP.

Unit tests run on ``MemoryKvStore`` and Dramatiq's ``StubBroker`` and call the
inbox job directly.  The end-to-end test runs two bots, each with its own web
server (uvicorn on a loopback port), store, broker and ``dramatiq.Worker``
threads, on SQLite, PostgreSQL and Redis: one follows the other (both
signatures verified by the receiving inbox), a published note arrives, a
direct mention arrives, and an unfollow is processed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import httpx
import pytest
from conftest import unique_name
from dramatiq.brokers.stub import StubBroker

from botkit_tasks import Bot
from botkit_tasks.bot import BotContext
from botkit_tasks.demo.servers import Server as _Server
from botkit_tasks.demo.servers import free_socket as _free_socket
from botkit_tasks.federation.delivery import DeliveryOptions
from botkit_tasks.federation.inbox import process_inbox_job
from botkit_tasks.federation.keys import remote_key_kv_key
from botkit_tasks.kv.memory import MemoryKvStore
from botkit_tasks.web import FOLLOWERS_PAGE_SIZE, negotiate

AS = "https://www.w3.org/ns/activitystreams"
BASE = "https://bot.example"
REMOTE = "https://remote.example/users/alice"


@pytest.fixture(autouse=True)
def _keep_global_broker() -> Iterator[None]:
    # Bot() sets Dramatiq's global broker; do not leak it into other tests.
    try:
        previous = dramatiq.get_broker()
    except Exception:  # pragma: no cover - get_broker creates a default when unset
        previous = None
    yield
    if previous is not None:
        dramatiq.set_broker(previous)


@pytest.fixture
def bot() -> Bot:
    return Bot(
        "greeter",
        base_url=BASE,
        name="Greeter <3",
        summary="Says hello.\n\nTwice & more.",
        kv=MemoryKvStore(),
        broker=StubBroker(),
    )


def _remote_actor(actor_id: str = REMOTE, **extra: Any) -> dict[str, Any]:
    return {
        "id": actor_id,
        "type": "Person",
        "preferredUsername": actor_id.rsplit("/", 1)[-1],
        "inbox": f"{actor_id}/inbox",
        "endpoints": {"sharedInbox": "https://remote.example/inbox"},
        **extra,
    }


def _deliver(bot: Bot, activity: dict[str, Any], actor: dict[str, Any] | None = None) -> None:
    """Run the inbox job as a worker would, with the sender's document already cached."""
    actor = actor or _remote_actor()
    bot.kv.set(("botkit", "remote-actors", actor["id"]), actor)
    process_inbox_job(bot.federation, activity, actor["id"])


def _queued(bot: Bot, queue: str) -> list[dramatiq.Message[Any]]:
    stub = bot.broker
    assert isinstance(stub, StubBroker)
    q = stub.queues.get(queue)
    if q is None:
        return []
    return [dramatiq.Message.decode(data) for data in list(q.queue)]


def _request(
    app: Any, method: str, url: str, *, headers: dict[str, str] | None = None
) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport) as client:
            return await client.request(method, url, headers=headers)

    return asyncio.run(go())


# --------------------------------------------------------------------------- handlers


def test_follow_stores_follower_and_sends_accept_embedding_the_follow(bot: Bot) -> None:
    seen: list[tuple[BotContext, dict[str, Any]]] = []
    bot.on_follow(lambda ctx, follow: seen.append((ctx, follow)))
    follow = {
        "@context": AS,
        "id": f"{REMOTE}/follows/1",
        "type": "Follow",
        "actor": REMOTE,
        "object": bot.actor_id,
    }
    # When a verified Follow of the bot is processed
    _deliver(bot, follow)
    # Then the follower is stored with its shared inbox
    record = bot.federation.followers.get(REMOTE)
    assert record is not None and record["sharedInbox"] == "https://remote.example/inbox"
    assert bot.federation.followers.count() == 1
    # And one Accept goes to the follower's own inbox, embedding the Follow with its id
    (message,) = _queued(bot, "botkit.outbox")
    username, activity_id, inbox, accept = message.args[:4]
    assert (username, inbox) == ("greeter", f"{REMOTE}/inbox")
    assert accept["type"] == "Accept" and accept["actor"] == bot.actor_id
    assert accept["id"] == activity_id
    assert accept["object"] == {
        "id": f"{REMOTE}/follows/1",
        "type": "Follow",
        "actor": REMOTE,
        "object": bot.actor_id,
    }
    # And the user's handler ran after that, with the bot and the sender
    ((ctx, got),) = seen
    assert got == follow and ctx.bot is bot and ctx.actor_id == REMOTE
    assert ctx.actor["inbox"] == f"{REMOTE}/inbox"


def test_follow_of_someone_else_is_ignored(bot: Bot) -> None:
    _deliver(bot, {"id": "x:1", "type": "Follow", "actor": REMOTE, "object": f"{BASE}/users/other"})
    assert bot.federation.followers.count() == 0
    assert _queued(bot, "botkit.outbox") == []


def test_follow_retry_sends_the_same_accept(bot: Bot) -> None:
    follow = {
        "id": f"{REMOTE}/follows/2",
        "type": "Follow",
        "actor": REMOTE,
        "object": bot.actor_id,
    }
    _deliver(bot, follow)
    _deliver(bot, follow)
    first, second = _queued(bot, "botkit.outbox")
    assert first.args[1] == second.args[1]
    assert bot.federation.followers.count() == 1


@pytest.mark.parametrize("embedded", [True, False])
def test_undo_follow_removes_follower(bot: Bot, embedded: bool) -> None:
    gone: list[dict[str, Any]] = []
    bot.on_unfollow(lambda ctx, undo: gone.append(undo))
    follow = {
        "id": f"{REMOTE}/follows/3",
        "type": "Follow",
        "actor": REMOTE,
        "object": bot.actor_id,
    }
    _deliver(bot, follow)
    undo = {
        "id": f"{REMOTE}/undo/3",
        "type": "Undo",
        "actor": REMOTE,
        # Mastodon embeds the Follow; some servers send only its id.
        "object": follow if embedded else follow["id"],
    }
    _deliver(bot, undo)
    assert bot.federation.followers.get(REMOTE) is None
    assert bot.federation.followers.count() == 0
    assert gone == [undo]


def test_undo_of_another_actors_follow_is_ignored(bot: Bot) -> None:
    follow = {
        "id": f"{REMOTE}/follows/4",
        "type": "Follow",
        "actor": REMOTE,
        "object": bot.actor_id,
    }
    _deliver(bot, follow)
    mallory = _remote_actor("https://evil.example/users/mallory")
    # An embedded Follow by someone else, and a bare id of someone else's Follow
    _deliver(
        bot,
        {
            "id": "https://evil.example/u/1",
            "type": "Undo",
            "actor": mallory["id"],
            "object": follow,
        },
        mallory,
    )
    _deliver(
        bot,
        {
            "id": "https://evil.example/u/2",
            "type": "Undo",
            "actor": mallory["id"],
            "object": follow["id"],
        },
        mallory,
    )
    assert bot.federation.followers.get(REMOTE) is not None


def test_follower_deleting_or_updating_itself(bot: Bot) -> None:
    follow = {
        "id": f"{REMOTE}/follows/5",
        "type": "Follow",
        "actor": REMOTE,
        "object": bot.actor_id,
    }
    _deliver(bot, follow)
    # An Update of its own actor moves its inboxes
    moved = _remote_actor(inbox=f"{REMOTE}/new-inbox", endpoints={})
    _deliver(bot, {"id": "u:1", "type": "Update", "actor": REMOTE, "object": moved})
    record = bot.federation.followers.get(REMOTE)
    assert record is not None and record["inbox"] == f"{REMOTE}/new-inbox"
    assert "sharedInbox" not in record
    # An Update of someone else is ignored
    other = _remote_actor("https://remote.example/users/bob")
    _deliver(bot, {"id": "u:2", "type": "Update", "actor": REMOTE, "object": other})
    assert bot.federation.followers.get(other["id"]) is None
    # A Delete of its own account removes it
    _deliver(bot, {"id": "d:1", "type": "Delete", "actor": REMOTE, "object": REMOTE})
    assert bot.federation.followers.get(REMOTE) is None


def test_mentions_and_messages(bot: Bot) -> None:
    mentions: list[str] = []
    messages: list[str] = []
    bot.on_mention(lambda ctx, note: mentions.append(note["id"]))
    bot.on_message(lambda ctx, note: messages.append(note["id"]))

    def create(note_id: str, **note: Any) -> dict[str, Any]:
        return {
            "id": f"{note_id}/activity",
            "type": "Create",
            "actor": REMOTE,
            "object": {
                "id": note_id,
                "type": "Note",
                "attributedTo": REMOTE,
                "content": "hi",
                **note,
            },
        }

    # A note tagging the bot (tag may be a single object, not an array)
    _deliver(bot, create("n:1", tag={"type": "Mention", "href": bot.actor_id}, to=[AS + "#Public"]))
    # A direct note addressed to the bot
    _deliver(bot, create("n:2", to=bot.actor_id))
    # A followers-only post of someone the bot follows: a message, not a mention
    _deliver(bot, create("n:3", to=[f"{REMOTE}/followers"]))
    # A note by someone else forwarded by this actor: ignored
    _deliver(bot, create("n:4", attributedTo="https://other.example/u", to=bot.actor_id))
    assert mentions == ["n:1", "n:2"]
    assert messages == ["n:1", "n:2", "n:3"]


def test_reply_from_a_mention_handler(bot: Bot) -> None:
    replies: list[str] = []
    bot.on_mention(lambda ctx, note: replies.append(ctx.reply("Hello yourself!")))
    _deliver(
        bot,
        {
            "id": "n:5/activity",
            "type": "Create",
            "actor": REMOTE,
            "object": {
                "id": "n:5",
                "type": "Note",
                "attributedTo": REMOTE,
                "to": [bot.actor_id],
                "content": "hey",
            },
        },
    )
    (activity_id,) = replies
    (message,) = _queued(bot, "botkit.outbox")
    assert message.args[2] == f"{REMOTE}/inbox"
    create = message.args[3]
    assert create["id"] == activity_id
    note = create["object"]
    assert note["to"] == [REMOTE] and note["cc"] == []
    assert note["inReplyTo"] == "n:5"
    assert note["tag"] == [{"type": "Mention", "href": REMOTE, "name": "@alice@remote.example"}]
    assert "Hello yourself!" in note["content"] and "@<span>alice</span>" in note["content"]


def test_publish_stores_note_and_enqueues_one_fanout(bot: Bot) -> None:
    activity_id = bot.publish("Hello <world> & you")
    # One fan-out job, nothing delivered directly
    (job,) = _queued(bot, "botkit.fanout")
    assert job.actor_name == "botkit_fanout" and activity_id in job.args
    assert _queued(bot, "botkit.outbox") == []
    # The note is stored under its id, public, addressed to the followers
    key = activity_id.split("/notes/")[1].split("/")[0]
    record = bot.get_note(key)
    assert record is not None
    note = record["note"]
    assert note["id"] == activity_id.removesuffix("/activity")
    assert note["to"] == [AS + "#Public"] and note["cc"] == [bot.followers_url]
    assert note["content"] == "<p>Hello &lt;world&gt; &amp; you</p>"
    assert record["activity"]["object"] == note
    assert bot.note_count() == 1


def test_job_decorator_declares_actors_on_the_bots_broker(bot: Bot) -> None:
    @bot.job
    def plain() -> None: ...

    @bot.job(max_retries=3, queue_name="digests")
    def digest(n: int) -> int:
        return n

    assert plain.broker is bot.broker and plain.queue_name == "default"
    assert digest.queue_name == "digests" and digest.options["max_retries"] == 3
    digest.send(1)
    assert _queued(bot, "digests")[0].args == (1,)
    # Creating the bot made its broker the global one (so `dramatiq mybot` works)
    assert dramatiq.get_broker() is bot.broker


def test_set_global_broker_false_leaves_global_broker_alone() -> None:
    before = StubBroker()
    dramatiq.set_broker(before)
    Bot("quiet", base_url=BASE, kv=MemoryKvStore(), broker=StubBroker(), set_global_broker=False)
    assert dramatiq.get_broker() is before


# --------------------------------------------------------------------------- web app


def test_webfinger(bot: Bot) -> None:
    app = bot.asgi_app()
    r = _request(app, "GET", f"{BASE}/.well-known/webfinger?resource=acct:greeter@bot.example")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/jrd+json")
    doc = r.json()
    assert doc["subject"] == "acct:greeter@bot.example"
    assert {"rel": "self", "type": "application/activity+json", "href": bot.actor_id} in doc[
        "links"
    ]
    # The actor URL works as a resource too
    by_url = _request(app, "GET", f"{BASE}/.well-known/webfinger?resource={bot.actor_id}")
    assert by_url.json()["subject"] == "acct:greeter@bot.example"
    for resource in ("acct:nobody@bot.example", "acct:greeter@other.example", "acct:greeter"):
        r = _request(app, "GET", f"{BASE}/.well-known/webfinger?resource={resource}")
        assert r.status_code == 404, resource
    assert _request(app, "GET", f"{BASE}/.well-known/webfinger").status_code == 400


def test_webfinger_host_includes_port() -> None:
    bot = Bot(
        "p",
        base_url="http://127.0.0.1:8123",
        kv=MemoryKvStore(),
        broker=StubBroker(),
        allow_private_addresses=True,
    )
    app = bot.asgi_app()
    ok = _request(
        app, "GET", "http://127.0.0.1:8123/.well-known/webfinger?resource=acct:p@127.0.0.1:8123"
    )
    assert ok.status_code == 200 and ok.json()["links"][0]["href"] == bot.actor_id
    no_port = _request(
        app, "GET", "http://127.0.0.1:8123/.well-known/webfinger?resource=acct:p@127.0.0.1"
    )
    assert no_port.status_code == 404
    assert bot.handle == "@p@127.0.0.1:8123"


def test_actor_document(bot: Bot) -> None:
    r = _request(
        bot.asgi_app(), "GET", bot.actor_id, headers={"Accept": "application/activity+json"}
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/activity+json")
    assert r.headers["vary"] == "Accept"
    doc = r.json()
    assert doc["@context"] == [AS, "https://w3id.org/security/v1"]
    assert doc["type"] == "Service" and doc["preferredUsername"] == "greeter"
    assert doc["name"] == "Greeter <3"
    assert doc["summary"] == "<p>Says hello.</p><p>Twice &amp; more.</p>"
    assert doc["inbox"] == f"{bot.actor_id}/inbox"
    assert doc["followers"] == f"{bot.actor_id}/followers"
    assert doc["endpoints"] == {"sharedInbox": f"{BASE}/inbox"}
    key = doc["publicKey"]
    assert key["id"] == f"{bot.actor_id}#main-key" and key["owner"] == bot.actor_id
    assert key["publicKeyPem"].startswith("-----BEGIN PUBLIC KEY-----")


@pytest.mark.parametrize(
    ("accept", "status", "ctype"),
    [
        ("application/activity+json", 200, "application/activity+json"),
        (
            'application/ld+json; profile="https://www.w3.org/ns/activitystreams"',
            200,
            "application/ld+json",
        ),
        # What Mastodon sends
        (
            'application/activity+json, application/ld+json; profile="https://www.w3.org/ns/activitystreams"',
            200,
            "application/activity+json",
        ),
        (None, 200, "application/activity+json"),
        ("*/*", 200, "application/activity+json"),
        ("application/json", 200, "application/activity+json"),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", 200, "text/html"),
        ("image/png", 406, "text/plain"),
        ("application/activity+json;q=0, text/html;q=0", 406, "text/plain"),
    ],
)
def test_content_negotiation(bot: Bot, accept: str | None, status: int, ctype: str) -> None:
    headers = {"Accept": accept} if accept is not None else {}
    r = _request(bot.asgi_app(), "GET", bot.actor_id, headers=headers)
    assert r.status_code == status
    assert r.headers["content-type"].startswith(ctype)
    if ctype == "text/html":
        assert "Greeter &lt;3" in r.text and "@greeter@bot.example" in r.text


def test_negotiate_directly() -> None:
    assert negotiate("text/html;q=0.5, application/json", ("json", "ld", "html")) == "json"
    assert negotiate("text/*", ("json", "ld", "html")) == "html"
    assert negotiate("text/html", ("json", "ld")) is None
    assert negotiate("application/*;q=0.1, text/html;q=0", ("json", "ld", "html")) == "json"


def test_followers_collection_is_paged(bot: Bot) -> None:
    # Given more followers than fit on two pages
    n = 2 * FOLLOWERS_PAGE_SIZE + 7
    for i in range(n):
        bot.federation.followers.add(_remote_actor(f"https://r{i:03d}.example/users/u"))
    app = bot.asgi_app()
    # The collection (read without a signature) says how many and where the first page is
    top = _request(app, "GET", bot.followers_url).json()
    assert top["type"] == "OrderedCollection" and top["totalItems"] == n
    # Following "next" visits every follower exactly once, in order
    url: str | None = top["first"]
    seen: list[str] = []
    pages = 0
    while url is not None:
        page = _request(app, "GET", url).json()
        assert page["type"] == "OrderedCollectionPage" and page["partOf"] == bot.followers_url
        seen += page["orderedItems"]
        url = page.get("next")
        pages += 1
    assert pages == 3
    assert seen == sorted(f"https://r{i:03d}.example/users/u" for i in range(n))
    assert _request(app, "GET", f"{bot.followers_url}?page=%%%").status_code == 400


def test_notes_dereference_and_direct_messages_do_not(bot: Bot) -> None:
    app = bot.asgi_app()
    public_id = bot.publish("Public post")
    note_id = public_id.removesuffix("/activity")
    note = _request(app, "GET", note_id).json()
    assert note["id"] == note_id and note["type"] == "Note" and note["@context"] == AS
    create = _request(app, "GET", public_id).json()
    assert create["type"] == "Create" and create["object"]["id"] == note_id
    html = _request(app, "GET", note_id, headers={"Accept": "text/html"})
    assert html.headers["content-type"].startswith("text/html") and "Public post" in html.text
    direct_id = bot.publish("psst", to=[_remote_actor()])
    assert _request(app, "GET", direct_id.removesuffix("/activity")).status_code == 404
    assert _request(app, "GET", f"{bot.actor_id}/notes/nope").status_code == 404
    outbox = _request(app, "GET", f"{bot.actor_id}/outbox").json()
    assert outbox["totalItems"] == 1


def test_store_failure_is_503() -> None:
    from botkit_tasks.errors import StoreError

    class Down(MemoryKvStore):
        def get(self, key: Any) -> Any:
            raise StoreError("database is down")

    broken = Bot("b", base_url=BASE, kv=Down(), broker=StubBroker(), set_global_broker=False)
    r = _request(broken.asgi_app(), "GET", broken.followers_url)
    assert r.status_code == 503 and b"Traceback" not in r.content


def test_methods_and_unknown_paths(bot: Bot) -> None:
    app = bot.asgi_app()
    assert _request(app, "POST", bot.actor_id).status_code == 405
    head = _request(app, "HEAD", bot.actor_id)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) > 0
    assert _request(app, "GET", f"{BASE}/nothing").status_code == 404
    assert _request(app, "GET", f"{BASE}/users/someone-else").status_code == 404
    # Inbox POSTs go to the federation's inbox, which wants a signature
    assert _request(app, "POST", f"{bot.actor_id}/inbox").status_code in (400, 401)
    assert _request(app, "POST", f"{BASE}/inbox").status_code in (400, 401)


# --------------------------------------------------------------------------- end to end


Backend = Callable[[str], tuple[Any, dramatiq.Broker]]


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    """A factory of isolated (kv, broker) pairs on one backend, cleaned up afterwards."""
    cleanups: list[Callable[[], None]] = []

    if request.param in ("sqlite", "postgres"):
        from botkit_tasks._sql import create_engine
        from botkit_tasks.brokers.sql import SqlBroker
        from botkit_tasks.kv.sql import SqlKvStore

        url = (
            f"sqlite:///{tmp_path}/bots.sqlite3"
            if request.param == "sqlite"
            else request.getfixturevalue("database_url")
        )
        engine = create_engine(url)

        def make(name: str) -> tuple[Any, dramatiq.Broker]:
            prefix = unique_name(f"{name}_")
            kv = SqlKvStore(engine, table_name=f"{prefix}_kv")
            broker = SqlBroker(engine, table_prefix=f"{prefix}_", poll_interval=0.1)

            def drop() -> None:
                import sqlalchemy as sa

                broker.close()
                broker.drop_tables()  # type: ignore[attr-defined]
                with engine.begin() as conn:
                    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{prefix}_kv"'))

            cleanups.append(drop)
            return kv, broker

        yield make
        for cleanup in cleanups:
            cleanup()
        engine.dispose()
        return

    import redis
    from dramatiq.brokers.redis import RedisBroker

    from botkit_tasks.kv.redis import RedisKvStore

    url = request.getfixturevalue("redis_url")
    client = redis.Redis.from_url(url)

    def make_redis(name: str) -> tuple[Any, dramatiq.Broker]:
        prefix = unique_name(f"{name}-")
        kv = RedisKvStore(client, key_prefix=f"{prefix}:")
        broker = RedisBroker(client=client, namespace=f"{prefix}-dq")

        def drop() -> None:
            for pattern in (f"{prefix}:*", f"{prefix}-dq:*"):
                keys = list(client.scan_iter(match=pattern, count=1000))
                if keys:
                    client.delete(*keys)

        cleanups.append(drop)
        return kv, broker

    yield make_redis
    for cleanup in cleanups:
        cleanup()
    client.close()


class _Running:
    """A bot served on a loopback port with its own Dramatiq worker threads."""

    def __init__(self, username: str, backend: Backend, *, worker: bool = True) -> None:
        kv, broker = backend(username)
        sock = _free_socket()
        self.bot = Bot(
            username,
            base_url=f"http://127.0.0.1:{sock.getsockname()[1]}",
            name=username.title(),
            kv=kv,
            broker=broker,
            allow_private_addresses=True,
            delivery_options=DeliveryOptions(min_backoff=0.1, max_backoff=1.0, max_retries=3),
            set_global_broker=False,
        )
        self.server = _Server(self.bot.asgi_app(), [sock], username)
        self.worker = (
            dramatiq.Worker(broker, worker_threads=4, worker_timeout=100) if worker else None
        )

    def start(self) -> None:
        self.server.start()
        if self.worker is not None:
            self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=10_000)
        self.server.stop()
        self.bot.close()


def _eventually(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for: {what}")


@pytest.mark.timeout(120)
def test_two_bots_talk_over_loopback(backend: Backend) -> None:
    alice = _Running("alice", backend)
    bob = _Running("bob", backend)
    followed: list[str] = []
    unfollowed: list[str] = []
    received: list[dict[str, Any]] = []
    mentioned: list[dict[str, Any]] = []
    lock = threading.Lock()

    @bob.bot.on_follow
    def on_follow(ctx: BotContext, follow: dict[str, Any]) -> None:
        with lock:
            followed.append(ctx.actor_id)

    @bob.bot.on_unfollow
    def on_unfollow(ctx: BotContext, undo: dict[str, Any]) -> None:
        with lock:
            unfollowed.append(ctx.actor_id)

    @alice.bot.on_message
    def on_message(ctx: BotContext, note: dict[str, Any]) -> None:
        with lock:
            received.append(note)

    @bob.bot.on_mention
    def on_mention(ctx: BotContext, note: dict[str, Any]) -> None:
        with lock:
            mentioned.append(note)

    alice.start()
    bob.start()
    try:
        a, b = alice.bot, bob.bot
        # When alice follows bob (alice fetches bob's actor with a signed GET)
        a.follow(b.actor_id)
        # Then bob verified alice's signed Follow, stored her and ran its handler,
        # and alice verified bob's signed Accept
        _eventually(lambda: a.is_following(b.actor_id), "bob's Accept reaches alice")
        assert b.federation.followers.get(a.actor_id) is not None
        # (bob's handler runs after the Accept is enqueued, so it may finish later)
        _eventually(lambda: followed == [a.actor_id], "bob's on_follow handler")
        # Each side fetched and cached the other's public key to verify it
        assert b.kv.get(remote_key_kv_key(a.federation.key_id)) is not None
        assert a.kv.get(remote_key_kv_key(b.federation.key_id)) is not None

        # And bob's followers collection shows alice, unsigned, over HTTP
        followers = httpx.get(
            f"{b.followers_url}?page=true", headers={"Accept": "application/activity+json"}
        ).json()
        assert followers["orderedItems"] == [a.actor_id]

        # When bob publishes a note, it reaches alice (fan-out, signed delivery)
        activity_id = b.publish("Hello from bob")
        _eventually(lambda: len(received) == 1, "bob's note reaches alice")
        note = received[0]
        assert note["id"] == activity_id.removesuffix("/activity")
        assert "Hello from bob" in note["content"]
        # And the note's id dereferences on bob's server
        fetched = httpx.get(note["id"], headers={"Accept": "application/activity+json"})
        assert fetched.status_code == 200 and fetched.json()["content"] == note["content"]

        # When alice mentions bob directly, bob's mention handler runs
        a.publish("Hi bob!", to=[b.actor_id])
        _eventually(lambda: len(mentioned) == 1, "alice's mention reaches bob")
        assert "Hi bob!" in mentioned[0]["content"]

        # An unsigned request to an inbox is refused
        unsigned = httpx.post(b.federation.inbox_url, json={"type": "Follow", "actor": a.actor_id})
        assert unsigned.status_code == 401

        # When alice unfollows, bob removes her
        a.unfollow(b.actor_id)
        _eventually(lambda: unfollowed == [a.actor_id], "the Undo reaches bob")
        assert b.federation.followers.count() == 0
        assert not a.is_following(b.actor_id)
    finally:
        alice.stop()
        bob.stop()
    # Nothing was dead-lettered on either side
    from botkit_tasks.monitor import inspect

    for running in (alice, bob):
        dead = inspect(running.bot.broker).dead_letters()
        assert dead == [], [d.traceback for d in dead]


@pytest.mark.timeout(120)
def test_two_bots_share_one_store_and_broker(tmp_path: Any) -> None:
    # One deployment, two bots: one SQLite store, one SqlBroker, one worker pool.
    from botkit_tasks._sql import create_engine
    from botkit_tasks.brokers.sql import SqlBroker
    from botkit_tasks.kv.sql import SqlKvStore

    engine = create_engine(f"sqlite:///{tmp_path}/shared.sqlite3")
    kv = SqlKvStore(engine)
    broker = SqlBroker(engine, poll_interval=0.1)
    alice = _Running("alice", lambda name: (kv, broker), worker=False)
    bob = _Running("bob", lambda name: (kv, broker), worker=False)
    received: list[dict[str, Any]] = []
    alice.bot.on_message(lambda ctx, note: received.append(note))
    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
    alice.start()
    bob.start()
    worker.start()
    try:
        a, b = alice.bot, bob.bot
        a.follow(b.actor_id)
        _eventually(lambda: a.is_following(b.actor_id), "bob accepts alice")
        # Each bot keeps its own followers and keys in the shared store
        assert b.federation.followers.count() == 1 and a.federation.followers.count() == 0
        assert a.federation.private_key.public_key().public_numbers() != (
            b.federation.private_key.public_key().public_numbers()
        )
        b.publish("Shared infrastructure")
        _eventually(lambda: len(received) == 1, "bob's note reaches alice")
        assert "Shared infrastructure" in received[0]["content"]
    finally:
        worker.stop(timeout=10_000)
        alice.stop()
        bob.stop()
        broker.close()
        kv.close()
        engine.dispose()


def test_published_note_json_roundtrip(bot: Bot) -> None:
    # Stored values are plain JSON (they round-trip through every KV backend)
    activity_id = bot.publish("x", in_reply_to="https://remote.example/notes/1")
    key = activity_id.split("/notes/")[1].split("/")[0]
    record = bot.get_note(key)
    assert record is not None
    assert json.loads(json.dumps(record)) == record
    assert record["note"]["inReplyTo"] == "https://remote.example/notes/1"


@pytest.mark.parametrize(
    "cursor",
    [
        "AA",  # base64 of "\x00": not a legal key part
        "AA==",
        "A" * 4000,  # decodes to a key over the store's size limit
    ],
)
def test_followers_cursor_that_is_not_a_key_is_400(bot: Bot, cursor: str) -> None:
    r = _request(bot.asgi_app(), "GET", f"{bot.followers_url}?page={cursor}")
    assert r.status_code == 400 and r.json() == {"error": "invalid page cursor"}


@pytest.mark.parametrize("key", ["%00", "a" * 5000, "%ED%A0%80"])
def test_note_path_that_is_not_a_key_is_404(bot: Bot, key: str) -> None:
    r = _request(bot.asgi_app(), "GET", f"{bot.actor_id}/notes/{key}")
    assert r.status_code == 404
    r = _request(bot.asgi_app(), "GET", f"{bot.actor_id}/notes/{key}/activity")
    assert r.status_code == 404


@pytest.mark.parametrize("decorator", ["on_follow", "on_unfollow", "on_mention", "on_message"])
def test_handler_decorators_refuse_non_callables(bot: Bot, decorator: str) -> None:
    with pytest.raises(TypeError, match="callable"):
        getattr(bot, decorator)("not a function")
    with pytest.raises(TypeError, match="callable"):
        bot.job(42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="callable"):
        bot.job(max_retries=1)(None)  # type: ignore[arg-type]


def test_publish_refuses_malformed_recipients_and_reply_targets(bot: Bot) -> None:
    # A bare string would be taken letter by letter as actor ids
    with pytest.raises(TypeError, match="to="):
        bot.publish("hi", to=REMOTE)
    with pytest.raises(TypeError, match="in_reply_to"):
        bot.publish("hi", in_reply_to=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        bot.publish(" \n\n ")
    # Nothing was stored or enqueued
    assert list(bot.kv.list(("botkit", "greeter", "notes"))) == []
    assert _queued(bot, "botkit.fanout") == [] and _queued(bot, "botkit.outbox") == []


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("name", 5, TypeError),  # used to break every GET of the actor (500)
        ("summary", ["Says hello."], TypeError),
        ("user_agent", 5, TypeError),
        ("user_agent", "bot\r\nX-Injected: 1", ValueError),
    ],
)
def test_bot_options_of_the_wrong_type_are_refused(
    option: str, value: Any, error: type[Exception]
) -> None:
    broker = StubBroker()
    with pytest.raises(error, match=option):
        Bot(
            "greeter",
            base_url=BASE,
            kv=MemoryKvStore(),
            broker=broker,
            set_global_broker=False,
            **{option: value},
        )
    assert not broker.actors  # nothing declared


def test_direct_message_to_a_document_with_an_empty_inbox_loads_the_actor(bot: Bot) -> None:
    # An empty inbox used to pass as "has an inbox": the note was stored, then
    # Federation.send refused "" and the message was never enqueued.
    bot.kv.set(("botkit", "remote-actors", REMOTE), _remote_actor())
    bot.publish("psst", to=[{"id": REMOTE, "inbox": ""}])
    [job] = _queued(bot, "botkit.outbox")
    assert job.args[2] == f"{REMOTE}/inbox"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_retries": "3"}, TypeError),  # Dramatiq accepts it and fails in the worker
        ({"max_retries": True}, TypeError),
        ({"min_backoff": 1.5e3j}, TypeError),
        ({"max_retries": -1}, ValueError),
        ({"time_limit": -5}, ValueError),
    ],
)
def test_job_refuses_malformed_retry_options(
    bot: Bot, options: dict[str, Any], error: type[Exception]
) -> None:
    name = next(iter(options))
    with pytest.raises(error, match=name):
        bot.job(**options)(lambda: None)


def test_negotiate_treats_a_nan_quality_as_zero() -> None:
    # float("nan") passed the 0..1 clamp as 1.0
    assert negotiate("text/html;q=nan", ("json", "ld", "html")) is None
    assert negotiate("text/html;q=nan, */*;q=0.1", ("json", "ld", "html")) == "json"
