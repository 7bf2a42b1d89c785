"""The Federation facade: configuration, actors on the broker, publish/send and handlers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import dramatiq
import pytest
from _http_server import ScriptedServer
from dramatiq.brokers.stub import StubBroker
from test_inbox import RemoteServer, new_activity, post, signed

from botkit_tasks.errors import ConfigurationError
from botkit_tasks.federation import Federation, InboxContext, get_federation
from botkit_tasks.federation.delivery import DeliveryOptions
from botkit_tasks.federation.inbox import INBOX_QUEUE
from botkit_tasks.federation.keys import keypair_kv_key, public_key_pem
from botkit_tasks.kv.memory import MemoryKvStore


@pytest.fixture
def broker() -> Iterator[StubBroker]:
    broker = StubBroker()
    yield broker
    broker.close()


@pytest.fixture
def remote() -> Iterator[RemoteServer]:
    with ScriptedServer() as server:
        yield RemoteServer(server)


def make(broker: dramatiq.Broker, **kw: Any) -> Federation:
    options: dict[str, Any] = {
        "kv": MemoryKvStore(),
        "broker": broker,
        "base_url": "https://bot.example",
        "username": "greetbot",
    }
    options.update(kw)
    return Federation(**options)


def messages(broker: StubBroker, queue: str) -> list[dramatiq.Message[Any]]:
    q = broker.queues.get(queue)
    return [] if q is None else [dramatiq.Message.decode(m) for m in list(q.queue)]


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("https://bot.example", "https://bot.example"),
        ("https://bot.example/", "https://bot.example"),
        ("https://bot.example:8443", "https://bot.example:8443"),
        ("https://bot.example/sub/", "https://bot.example/sub"),
    ],
)
def test_urls(broker: StubBroker, base_url: str, expected: str) -> None:
    fed = make(broker, base_url=base_url)
    assert fed.base_url == expected
    assert fed.actor_id == f"{expected}/users/greetbot"
    assert fed.key_id == f"{expected}/users/greetbot#main-key"
    assert fed.inbox_url == f"{expected}/users/greetbot/inbox"
    assert fed.shared_inbox_url == f"{expected}/inbox"
    prefix = urlsplit(expected).path
    assert fed.inbox_app.paths == {f"{prefix}/users/greetbot/inbox", f"{prefix}/inbox"}
    fed.close()


@pytest.mark.parametrize(
    "base_url",
    [
        "bot.example",
        "/relative",
        "ftp://bot.example",
        "https://",
        "https://user:pw@bot.example",
        "https://bot.example?x=1",
        "https://bot.example#frag",
        "https://bot.example:99999",
        42,
    ],
)
def test_bad_base_url_is_a_configuration_error(broker: StubBroker, base_url: Any) -> None:
    with pytest.raises(ConfigurationError):
        make(broker, base_url=base_url)


def test_plain_http_needs_allow_private_addresses(broker: StubBroker) -> None:
    with pytest.raises(ConfigurationError, match="allow_private_addresses"):
        make(broker, base_url="http://127.0.0.1:8000")
    fed = make(broker, base_url="http://127.0.0.1:8000", allow_private_addresses=True)
    assert fed.actor_id == "http://127.0.0.1:8000/users/greetbot"
    assert fed.fetcher.allow_private_addresses is True


@pytest.mark.parametrize(
    "username", ["", "has space", "slash/y", "-dash", "dot.", "ü", "a" * 65, None, 7]
)
def test_bad_username_is_a_configuration_error(broker: StubBroker, username: Any) -> None:
    with pytest.raises(ConfigurationError):
        make(broker, username=username)


@pytest.mark.parametrize("username", ["a", "greet_bot", "Greet.Bot-2", "_x", "a" * 64])
def test_good_usernames(broker: StubBroker, username: str) -> None:
    assert make(broker, username=username).actor_id.endswith(f"/users/{username}")


def test_actors_are_declared_on_their_queues(broker: StubBroker) -> None:
    fed = make(broker, delivery_options=DeliveryOptions(max_retries=3))
    queues = {name: broker.get_actor(name).queue_name for name in broker.actors}
    assert queues == {
        "botkit_fanout": "botkit.fanout",
        "botkit_deliver": "botkit.outbox",
        "botkit_inbox": "botkit.inbox",
    }
    assert broker.get_actor("botkit_deliver").options["max_retries"] == 3
    inbox = broker.get_actor("botkit_inbox")
    assert inbox.options["max_retries"] == 8
    assert fed.delivery_options.max_retries == 3


def test_private_key_is_created_lazily_once_and_shared(broker: StubBroker) -> None:
    kv = MemoryKvStore()
    fed = make(broker, kv=kv)
    # Constructing the facade does not generate a key (importing a bot module is cheap)
    assert kv.get(keypair_kv_key("greetbot")) is None
    key = fed.private_key
    assert fed.private_key is key
    stored = kv.get(keypair_kv_key("greetbot"))
    assert isinstance(stored, dict)
    assert stored["public"] == public_key_pem(key)
    # Another process (another facade on the same store) uses the same key
    other = make(StubBroker(), kv=kv)
    assert public_key_pem(other.private_key) == public_key_pem(key)


# --------------------------------------------------------------------------- registry


def test_get_federation_finds_each_federation_on_a_broker(broker: StubBroker) -> None:
    a = make(broker, username="alpha")
    b = make(broker, username="beta")
    assert get_federation(broker, "alpha") is a
    assert get_federation(broker, "beta") is b
    with pytest.raises(LookupError, match="gamma"):
        get_federation(broker, "gamma")
    with pytest.raises(LookupError):
        get_federation(StubBroker(), "alpha")


def test_inbox_jobs_reach_their_own_federation(broker: StubBroker, remote: RemoteServer) -> None:
    # Given two bots on one broker (one botkit_inbox actor serves both)
    one = make(broker, username="one", base_url="http://bot.test", allow_private_addresses=True)
    two = make(broker, username="two", base_url="http://bot.test", allow_private_addresses=True)
    got: list[tuple[str, str]] = []
    one.on("Follow", lambda ctx, act: got.append(("one", ctx.federation.username)))
    two.on("Follow", lambda ctx, act: got.append(("two", ctx.federation.username)))
    alice = remote.add_actor("alice")
    # When alice follows both
    for fed in (one, two):
        activity = new_activity(alice, object=fed.actor_id)
        headers, body = signed(alice, activity, url=fed.inbox_url)
        assert post(fed, headers, body, path=f"/users/{fed.username}/inbox").status == 202
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        broker.join(INBOX_QUEUE, timeout=30_000, fail_fast=False)
    finally:
        worker.stop()
    # Then each job ran the handlers of its own bot
    assert sorted(got) == [("one", "one"), ("two", "two")]
    one.close()
    two.close()


# --------------------------------------------------------------------------- publish / send


def test_publish_stores_once_and_enqueues_one_fanout_job(broker: StubBroker) -> None:
    fed = make(broker)
    activity = {"id": f"{fed.actor_id}/notes/1/create", "type": "Create", "actor": fed.actor_id}
    assert fed.publish(activity) is None
    [job] = messages(broker, "botkit.fanout")
    assert job.actor_name == "botkit_fanout"
    assert job.args == ("greetbot", activity["id"])
    assert fed.kv.get(("botkit", "greetbot", "activities", activity["id"])) == activity
    assert messages(broker, "botkit.outbox") == []


def test_send_enqueues_one_delivery_per_distinct_inbox(broker: StubBroker) -> None:
    fed = make(broker)
    accept = {"id": f"{fed.actor_id}#accepts/1", "type": "Accept", "actor": fed.actor_id}
    fed.send(
        accept, ["https://a.example/inbox", "https://b.example/inbox", "https://a.example/inbox"]
    )
    jobs = messages(broker, "botkit.outbox")
    assert [j.args[2] for j in jobs] == ["https://a.example/inbox", "https://b.example/inbox"]
    assert all(j.actor_name == "botkit_deliver" and j.args[0] == "greetbot" for j in jobs)
    assert all(j.args[1] == accept["id"] for j in jobs)
    assert messages(broker, "botkit.fanout") == []


def test_send_rejects_bad_arguments(broker: StubBroker) -> None:
    fed = make(broker)
    with pytest.raises(TypeError):
        fed.send({"id": "https://bot.example/a"}, "https://a.example/inbox")
    with pytest.raises(ValueError):
        fed.send({"type": "Accept"}, ["https://a.example/inbox"])
    with pytest.raises(ValueError):
        fed.send({"id": "https://bot.example/a"}, [""])
    assert messages(broker, "botkit.outbox") == []


# --------------------------------------------------------------------------- handlers


def test_on_registers_handlers_in_order(broker: StubBroker) -> None:
    fed = make(broker)

    def first(ctx: InboxContext, act: dict[str, Any]) -> None: ...

    def second(ctx: InboxContext, act: dict[str, Any]) -> None: ...

    assert fed.on("Follow", first) is first
    decorated = fed.on("Follow")(second)
    assert decorated is second
    assert fed.handlers_for("Follow") == [first, second]
    assert fed.handlers_for("Undo") == []
    with pytest.raises(ConfigurationError):
        fed.on("", first)
    with pytest.raises(ConfigurationError):
        fed.on("Follow", "not callable")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fetches


def test_key_fetches_are_signed_by_the_bot(broker: StubBroker, remote: RemoteServer) -> None:
    fed = make(
        broker,
        base_url="http://bot.test",
        allow_private_addresses=True,
        user_agent="greetbot-test/1.0",
    )
    alice = remote.add_actor("alice")
    headers, body = signed(alice, new_activity(alice), url="http://bot.test/users/greetbot/inbox")
    assert post(fed, headers, body, path="/users/greetbot/inbox").status == 202
    [fetch] = remote.server.requests()
    assert fetch.method == "GET"
    assert f'keyId="{fed.key_id}"' in fetch.headers["Signature"]
    assert "activity+json" in fetch.headers["Accept"]
    assert fetch.headers["User-Agent"] == "greetbot-test/1.0"
    fed.close()
    fed.close()  # idempotent


def test_inbox_app_is_reachable_from_json(broker: StubBroker) -> None:
    # The enqueued job arguments are plain JSON (any Dramatiq encoder can carry them)
    fed = make(broker)
    message = broker.get_actor("botkit_inbox").message("greetbot", {"type": "Follow"}, "x")
    assert json.loads(message.encode())["args"] == ["greetbot", {"type": "Follow"}, "x"]
    fed.close()


@pytest.mark.parametrize(
    "base_url",
    [
        "https://bot.example/a\nb",  # urlsplit silently drops the newline
        "https://bot.example/a b",
        "https://bot.example\\evil",
        " https://bot.example",
        "https://bot.example/\x00",
        'https://bot.example/"x"',
    ],
)
def test_base_url_with_characters_no_url_may_hold_is_refused(
    broker: StubBroker, base_url: str
) -> None:
    with pytest.raises(ConfigurationError, match="base_url"):
        make(broker, base_url=base_url)


def test_base_url_with_credentials_does_not_echo_the_password(broker: StubBroker) -> None:
    with pytest.raises(ConfigurationError, match="credentials") as info:
        make(broker, base_url="https://user:s3cretpw@bot.example")
    assert "s3cretpw" not in str(info.value)


@pytest.mark.parametrize(
    ("activity", "error"),
    [
        (None, TypeError),
        ("https://bot.example/a", TypeError),
        ([{"id": "https://bot.example/a"}], TypeError),
        ({"id": "https://bot.example/a", "n": float("nan")}, ValueError),  # would POST NaN
        ({"id": "https://bot.example/a", 5: "x"}, TypeError),  # would become "5" silently
        ({"id": "https://bot.example/a", "s": "\x00"}, ValueError),
    ],
)
def test_publish_and_send_refuse_activities_that_are_not_json_objects(
    broker: StubBroker, activity: Any, error: type[Exception]
) -> None:
    fed = make(broker)
    with pytest.raises(error):
        fed.send(activity, ["https://a.example/inbox"])
    with pytest.raises(error):
        fed.publish(activity)
    assert messages(broker, "botkit.outbox") == [] and messages(broker, "botkit.fanout") == []
    assert list(fed.kv.list(("botkit", "greetbot", "activities"))) == []


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("allow_private_addresses", "no"),  # bool("no") is True: SSRF protection off
        ("allow_private_addresses", "false"),
        ("allow_private_addresses", 1),
        ("delivery_options", {"max_retries": 3}),
        ("broker", None),
    ],
)
def test_options_of_the_wrong_type_are_refused(option: str, value: Any) -> None:
    broker = StubBroker()
    with pytest.raises(TypeError, match=option):
        make(broker, **{option: value})
    assert not broker.actors  # nothing declared


def test_base_url_with_a_percent_encoded_path_is_refused(broker: StubBroker) -> None:
    # ASGI servers decode the path: "/sub%20dir/users/x" arrives as "/sub dir/users/x",
    # so no request would ever reach the actor, its inbox or its followers.
    with pytest.raises(ConfigurationError, match="percent"):
        make(broker, base_url="https://bot.example/sub%20dir")
