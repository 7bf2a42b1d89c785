"""Fan-out: shared inboxes, de-duplication, unavailable hosts, batches, body stored once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from _http_server import Reply, ScriptedServer
from dramatiq.brokers.stub import StubBroker

from botkit_tasks.federation import Federation
from botkit_tasks.federation.delivery import DeliveryOptions, host_of, record_host_failure
from botkit_tasks.federation.fanout import _host, expand_inboxes, fan_out
from botkit_tasks.kv.memory import MemoryKvStore

FAST = DeliveryOptions(max_retries=3, min_backoff=0.01, max_backoff=0.05, read_timeout=0.5)
ACTIVITY: dict[str, Any] = {
    "@context": "https://www.w3.org/ns/activitystreams",
    "id": "https://bot.example/activities/1",
    "type": "Create",
    "actor": "https://bot.example/users/bot",
    "object": {"type": "Note", "content": "x" * 2000},
}


class BatchingStubBroker(StubBroker):
    """A StubBroker with ``enqueue_many``, recording the batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def enqueue_many(self, messages: list[Any], *, delay: int | None = None) -> list[Any]:
        self.batches.append(len(messages))
        return [self.enqueue(m, delay=delay) for m in messages]


def federation(broker: Any = None, base_url: str = "https://bot.example") -> Federation:
    return Federation(
        kv=MemoryKvStore(),
        broker=broker if broker is not None else StubBroker(),
        base_url=base_url,
        username="bot",
        allow_private_addresses=base_url.startswith("http:"),
        delivery_options=FAST,
    )


def outbox(broker: StubBroker) -> list[Any]:
    return [dramatiq.Message.decode(m) for m in broker.queues["botkit.outbox"].queue]


def test_expand_prefers_shared_inboxes_and_deduplicates() -> None:
    followers = [
        {"id": "a", "inbox": "https://m.example/a/inbox", "sharedInbox": "https://m.example/inbox"},
        {"id": "b", "inbox": "https://m.example/b/inbox", "sharedInbox": "https://m.example/inbox"},
        {"id": "c", "inbox": "https://solo.example/c/inbox"},
        {"id": "d", "inbox": "https://solo.example/c/inbox"},
    ]
    assert list(expand_inboxes(followers)) == [
        "https://m.example/inbox",
        "https://solo.example/c/inbox",
    ]


def test_publish_stores_the_body_once_and_enqueues_one_fanout_job() -> None:
    # Given a federation with 3 followers
    fed = federation()
    for n in range(3):
        fed.followers.add({"id": f"https://r{n}.example/u", "inbox": f"https://r{n}.example/inbox"})
    # When an activity is published
    fed.publish(ACTIVITY)
    # Then it is stored once and exactly one fan-out job waits (no delivery yet)
    assert fed.kv.get(("botkit", "bot", "activities", ACTIVITY["id"])) == ACTIVITY
    broker: StubBroker = fed.broker  # type: ignore[assignment]
    jobs = [dramatiq.Message.decode(m) for m in broker.queues["botkit.fanout"].queue]
    assert [(j.actor_name, j.args) for j in jobs] == [("botkit_fanout", ("bot", ACTIVITY["id"]))]
    assert broker.queues["botkit.outbox"].qsize() == 0


def test_publish_needs_an_activity_id() -> None:
    with pytest.raises(ValueError, match="id"):
        federation().publish({"type": "Create"})


def test_fanout_enqueues_one_small_message_per_distinct_inbox_and_skips_unavailable_hosts() -> None:
    # Given followers on a shared inbox, personal inboxes, and a host marked unavailable
    fed = federation()
    for n in range(5):
        fed.followers.add(
            {
                "id": f"https://big.example/users/{n}",
                "inbox": f"https://big.example/users/{n}/inbox",
                "sharedInbox": "https://big.example/inbox",
            }
        )
    fed.followers.add({"id": "https://solo.example/me", "inbox": "https://solo.example/me/inbox"})
    fed.followers.add({"id": "https://down.example/x", "inbox": "https://down.example/x/inbox"})
    for day in range(3):
        record_host_failure(fed.kv, "down.example", now=1_700_000_000 + day * 86400)
    fed.kv.set(("botkit", "bot", "activities", ACTIVITY["id"]), ACTIVITY)
    # When the fan-out runs
    stats = fan_out(fed, ACTIVITY["id"])
    # Then one delivery per distinct reachable inbox, carrying no body
    messages = outbox(fed.broker)  # type: ignore[arg-type]
    assert sorted(m.args[2] for m in messages) == [
        "https://big.example/inbox",
        "https://solo.example/me/inbox",
    ]
    for m in messages:
        assert m.actor_name == "botkit_deliver"
        assert m.args[:2] == ("bot", ACTIVITY["id"]) and m.kwargs == {}
        assert len(m.encode()) < 400  # the 2 kB body is not copied into messages
    assert (stats.followers, stats.inboxes, stats.skipped) == (7, 2, 1)


def test_fanout_uses_enqueue_many_in_batches() -> None:
    broker = BatchingStubBroker()
    fed = federation(broker)
    for n in range(2500):
        fed.followers.add(
            {"id": f"https://h{n:05d}.example/u", "inbox": f"https://h{n:05d}.example/i"}
        )
    stats = fan_out(fed, ACTIVITY["id"])
    assert broker.batches == [1000, 1000, 500]
    assert stats.inboxes == 2500 and broker.queues["botkit.outbox"].qsize() == 2500


def test_a_retried_fanout_resumes_after_the_progress_cursor() -> None:
    broker = BatchingStubBroker()
    fed = federation(broker)
    for n in range(10):
        fed.followers.add({"id": f"https://h{n}.example/u", "inbox": f"https://h{n}.example/i"})
    # Given a first run that got through the followers up to h5
    fed.kv.set(("botkit", "bot", "fanout-progress", ACTIVITY["id"]), "https://h5.example/u")
    # When the job runs again
    stats = fan_out(fed, ACTIVITY["id"])
    # Then only the remaining followers are enqueued
    assert [m.args[2] for m in outbox(broker)] == [f"https://h{n}.example/i" for n in range(6, 10)]
    assert stats.followers == 4
    # And a completed fan-out leaves no cursor behind
    assert fed.kv.get(("botkit", "bot", "fanout-progress", ACTIVITY["id"])) is None


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        yield srv


def test_publish_delivers_to_every_inbox_end_to_end(server: ScriptedServer) -> None:
    # Given followers behind a shared inbox and two personal inboxes on a real server
    for path in ("/shared", "/a", "/b"):
        server.script(path, Reply(202))
    fed = federation(base_url="http://127.0.0.1:1")
    for n in range(3):
        fed.followers.add(
            {
                "id": f"http://s/{n}",
                "inbox": server.url(f"/s{n}"),
                "sharedInbox": server.url("/shared"),
            }
        )
    fed.followers.add({"id": "http://a/", "inbox": server.url("/a")})
    fed.followers.add({"id": "http://b/", "inbox": server.url("/b")})
    broker: StubBroker = fed.broker  # type: ignore[assignment]
    worker = dramatiq.Worker(broker, worker_timeout=20)
    worker.start()
    try:
        # When an activity is published and the workers drain the queues
        fed.publish(ACTIVITY)
        broker.join("botkit.fanout", timeout=20_000)
        broker.join("botkit.outbox", timeout=20_000)
    finally:
        worker.stop()
    # Then each distinct inbox received the stored activity exactly once
    assert sorted(r.path for r in server.requests()) == ["/a", "/b", "/shared"]
    assert all(json.loads(r.body) == ACTIVITY for r in server.requests())


def test_fanout_on_sql_broker_sqlite_uses_enqueue_many(sqlite_url: str) -> None:
    sql = pytest.importorskip("botkit_tasks.brokers.sql")
    broker = sql.SqlBroker(sqlite_url)
    try:
        fed = federation(broker)
        for n in range(1500):
            fed.followers.add(
                {"id": f"https://h{n:05d}.example/u", "inbox": f"https://h{n:05d}.example/i"}
            )
        stats = fan_out(fed, ACTIVITY["id"])
        assert stats.batches == 2 and stats.inboxes == 1500
        import sqlalchemy as sa

        with broker.engine.connect() as conn:
            count = conn.execute(
                sa.select(sa.func.count())
                .select_from(broker.messages)
                .where(broker.messages.c.queue_name == "botkit.outbox")
            ).scalar_one()
        assert count == 1500
    finally:
        broker.close()


@pytest.mark.parametrize(
    "url",
    [
        "https://Mastodon.Social/inbox",
        "http://127.0.0.1:8080/inbox",
        "https://user@host.example/inbox",
        "https://[::1]:8443/inbox",
        "https://host.example?x=1",
        "https://host.example",
        "https://host.example:/inbox",
    ],
)
def test_fast_host_agrees_with_host_of(url: str) -> None:
    assert _host(url) == host_of(url)


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[Any, Any]]:
    """A KV store and a broker of the same technology, isolated and removed afterwards."""
    from conftest import unique_name

    name = unique_name("fo")
    if request.param == "redis":
        import redis
        from dramatiq.brokers.redis import RedisBroker

        from botkit_tasks.kv import RedisKvStore

        url = request.getfixturevalue("redis_url")
        kv = RedisKvStore(url, key_prefix=f"{name}-kv:")
        broker = RedisBroker(url=url, namespace=f"{name}-mq")  # type: ignore[no-untyped-call]
        yield kv, broker
        broker.flush_all()
        broker.close()
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=f"{name}-*"):
            client.delete(key)
        client.close()
        kv.close()
        return
    import sqlalchemy as sa

    from botkit_tasks.brokers.sql import SqlBroker
    from botkit_tasks.kv import SqlKvStore

    url = (
        request.getfixturevalue("database_url")
        if request.param == "postgres"
        else f"sqlite:///{tmp_path}/fanout.sqlite3"
    )
    sql_kv = SqlKvStore(url, table_name=f"{name}_kv")
    sql_broker = SqlBroker(url, table_prefix=f"{name}_")
    yield sql_kv, sql_broker
    sql_broker.drop_tables()
    sql_broker.close()
    with sql_kv.engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{sql_kv.table_name}"'))
    sql_kv.close()


def test_fanout_on_every_backend_enqueues_each_inbox_once(stores: tuple[Any, Any]) -> None:
    # Given 350 followers (50 behind one shared inbox) in a real store and broker
    kv, broker = stores
    fed = Federation(kv=kv, broker=broker, base_url="https://bot.example", username="bot")
    for n in range(300):
        fed.followers.add(
            {"id": f"https://h{n:04d}.example/u", "inbox": f"https://h{n:04d}.example/i"}
        )
    for n in range(50):
        fed.followers.add(
            {
                "id": f"https://big.example/u{n}",
                "inbox": f"https://big.example/u{n}/inbox",
                "sharedInbox": "https://big.example/inbox",
            }
        )
    # When the activity is published and the fan-out job runs
    fed.publish(ACTIVITY)
    fanout_consumer = broker.consume("botkit.fanout", timeout=200)
    job = next(fanout_consumer)
    while job is None:
        job = next(fanout_consumer)
    broker.get_actor("botkit_fanout")(*job.args)
    fanout_consumer.ack(job)
    fanout_consumer.close()
    # Then the outbox holds exactly one small message per distinct inbox
    consumer = broker.consume("botkit.outbox", timeout=200)
    inboxes: list[str] = []
    deadline = time.monotonic() + 60
    # Consumers may come back empty-handed on a busy machine: wait for the
    # expected count, then make sure nothing more is queued.
    while len(inboxes) < 301 and time.monotonic() < deadline:
        message = next(consumer)
        if message is None:
            continue
        assert message.args[:2] == ("bot", ACTIVITY["id"]) and not message.kwargs
        inboxes.append(message.args[2])
        consumer.ack(message)
    extra = [next(consumer) for _ in range(3)]
    consumer.close()
    assert extra == [None, None, None]
    assert len(inboxes) == 301
    assert set(inboxes) == {f"https://h{n:04d}.example/i" for n in range(300)} | {
        "https://big.example/inbox"
    }


def test_pipelined_redis_fanout_is_delivered_by_a_real_worker(
    redis_url: str, server: ScriptedServer
) -> None:
    # Given followers in Redis and deliveries queued in Dramatiq's RedisBroker
    import redis
    from conftest import unique_name
    from dramatiq.brokers.redis import RedisBroker

    from botkit_tasks.kv import RedisKvStore

    name = unique_name("fo")
    kv = RedisKvStore(redis_url, key_prefix=f"{name}-kv:")
    broker = RedisBroker(url=redis_url, namespace=f"{name}-mq")  # type: ignore[no-untyped-call]
    for path in ("/shared", "/a"):
        server.script(path, Reply(202))
    try:
        fed = Federation(
            kv=kv,
            broker=broker,
            base_url="http://127.0.0.1:1",
            username="bot",
            allow_private_addresses=True,
            delivery_options=FAST,
        )
        for n in range(3):
            fed.followers.add(
                {
                    "id": f"http://s/{n}",
                    "inbox": server.url("/s"),
                    "sharedInbox": server.url("/shared"),
                }
            )
        fed.followers.add({"id": "http://a/", "inbox": server.url("/a")})
        worker = dramatiq.Worker(broker, worker_timeout=50)
        worker.start()
        try:
            # When an activity is published and a worker drains both queues
            fed.publish(ACTIVITY)
            broker.join("botkit.fanout", timeout=20_000)
            broker.join("botkit.outbox", timeout=20_000)
        finally:
            worker.stop()
        # Then the pipelined messages were consumed and each inbox got the activity once
        assert sorted(r.path for r in server.requests()) == ["/a", "/shared"]
        assert all(json.loads(r.body) == ACTIVITY for r in server.requests())
    finally:
        broker.flush_all()
        broker.close()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{name}-*"):
            client.delete(key)
        client.close()
        kv.close()


def test_create_update_delete_of_one_note_reach_an_inbox_in_order(
    server: ScriptedServer, sqlite_url: str
) -> None:
    from botkit_tasks.brokers import SqlBroker

    # Given an inbox that fails the first delivery (503, retried) and accepts the rest
    server.script("/inbox", Reply(503), Reply(202))
    broker = SqlBroker(sqlite_url, table_prefix="fo_")
    fed = federation(broker=broker, base_url="http://127.0.0.1:1")
    fed.followers.add({"id": "http://f/1", "inbox": server.url("/inbox")})
    note = {"id": "http://127.0.0.1:1/notes/1", "type": "Note", "content": "hi"}
    worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=20)
    worker.start()
    try:
        # When Create, Update and Delete of one note are published back to back
        for n, kind in enumerate(("Create", "Update", "Delete")):
            activity = {**ACTIVITY, "id": f"http://127.0.0.1:1/a/{n}", "type": kind, "object": note}
            fed.publish(activity)
        broker.join("botkit.fanout", timeout=20_000)
        broker.join("botkit.outbox", timeout=20_000)
    finally:
        worker.stop()
        broker.drop_tables()
        broker.close()
    # Then the inbox saw them in publish order, the Create twice (its retry first)
    kinds = [json.loads(r.body)["type"] for r in server.requests("/inbox")]
    assert kinds == ["Create", "Create", "Update", "Delete"]


def test_create_update_delete_reach_an_inbox_in_order_on_redis_from_env(
    server: ScriptedServer, redis_url: str
) -> None:
    # The Redis backends of config.from_env() order deliveries too (the
    # OrderingKeys middleware on RedisBroker, records in the bot's KV store)
    from conftest import unique_name

    from botkit_tasks.config import from_env

    prefix = unique_name("fo")
    backends = from_env({"REDIS_URL": redis_url, "BOTKIT_PREFIX": prefix})
    server.script("/inbox", Reply(503), Reply(202))
    fed = Federation(
        kv=backends.kv,
        broker=backends.broker,
        base_url="http://127.0.0.1:1",
        username="bot",
        allow_private_addresses=True,
        delivery_options=FAST,
    )
    fed.followers.add({"id": "http://f/1", "inbox": server.url("/inbox")})
    note = {"id": "http://127.0.0.1:1/notes/1", "type": "Note", "content": "hi"}
    worker = dramatiq.Worker(backends.broker, worker_threads=8, worker_timeout=20)
    worker.start()
    try:
        for n, kind in enumerate(("Create", "Update", "Delete")):
            activity = {**ACTIVITY, "id": f"http://127.0.0.1:1/a/{n}", "type": kind, "object": note}
            fed.publish(activity)
        deadline = time.monotonic() + 30
        while len(server.requests("/inbox")) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything out of order would have arrived by now
    finally:
        worker.stop()
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()
        fed.close()
        backends.close()
    kinds = [json.loads(r.body)["type"] for r in server.requests("/inbox")]
    assert kinds == ["Create", "Create", "Update", "Delete"]
