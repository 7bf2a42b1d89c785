"""Delivery against a real local HTTP server: classification, retries, double knock, SSRF.

Every case talks to ``tests/_http_server.py`` over a real loopback socket.  The
end-to-end retry cases run through Dramatiq's ``StubBroker`` and a real
``Worker`` with millisecond backoffs; the signature on what the server
received is checked with the library's own verifier.
"""

from __future__ import annotations

import calendar
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from _http_server import Reply, Request, ScriptedServer, closed_port
from dramatiq.brokers.stub import StubBroker

from botkit_tasks.federation import Federation
from botkit_tasks.federation.delivery import (
    DeliveryOptions,
    Outcome,
    PermanentDeliveryError,
    deliver_once,
    host_of,
    is_host_available,
    parse_retry_after,
    perform_delivery,
    record_host_failure,
    record_host_success,
)
from botkit_tasks.federation.signatures import verify_request
from botkit_tasks.kv.memory import MemoryKvStore

#: Millisecond backoffs and sub-second timeouts keep the suite fast.
FAST = DeliveryOptions(
    max_retries=3, min_backoff=0.01, max_backoff=0.05, read_timeout=0.5, total_timeout=2.0
)

ACTIVITY: dict[str, Any] = {
    "@context": "https://www.w3.org/ns/activitystreams",
    "id": "http://127.0.0.1/activities/1",
    "type": "Create",
    "actor": "http://127.0.0.1/users/bot",
    "object": {"id": "http://127.0.0.1/notes/1", "type": "Note", "content": "héllo"},
}
BODY = b'{"type":"Create","id":"http://127.0.0.1/activities/1"}'


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        yield srv


def make_federation(
    options: DeliveryOptions = FAST, *, allow_private: bool = True, broker: Any = None
) -> Federation:
    return Federation(
        kv=MemoryKvStore(),
        broker=broker if broker is not None else StubBroker(),
        base_url="http://127.0.0.1:1" if allow_private else "https://bot.example",
        username="bot",
        allow_private_addresses=allow_private,
        delivery_options=options,
    )


def once(fed: Federation, url: str, **kwargs: Any) -> Any:
    return deliver_once(
        url,
        BODY,
        key_id=fed.key_id,
        private_key=fed.private_key,
        kv=fed.kv,
        options=fed.delivery_options,
        allow_private_addresses=fed.allow_private_addresses,
        **kwargs,
    )


def assert_signed_by(fed: Federation, server: ScriptedServer, request: Request) -> str:
    verified = verify_request(
        request.method,
        server.url(request.path),
        request.header_dict(),
        request.body,
        public_key=fed.private_key.public_key(),
    )
    assert verified.key_id == fed.key_id
    return verified.scheme


class Running:
    """A real Dramatiq worker on a StubBroker, recording the retry delays."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.broker: StubBroker = fed.broker  # type: ignore[assignment]
        self.delays: list[int | None] = []
        original = self.broker.enqueue

        def enqueue(message: Any, *, delay: int | None = None) -> Any:
            if message.options.get("retries") and delay is not None:
                self.delays.append(delay)
            return original(message, delay=delay)

        self.broker.enqueue = enqueue  # type: ignore[method-assign]
        self.worker = dramatiq.Worker(self.broker, worker_timeout=20, worker_threads=2)

    def __enter__(self) -> Running:
        self.worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()

    def join(self) -> None:
        self.broker.join("botkit.outbox", timeout=20_000)


# ----------------------------------------------------------------------------- outcomes


def test_202_is_delivered_and_the_request_is_signed(server: ScriptedServer) -> None:
    # Given an inbox answering 202
    server.script("/inbox", Reply(202))
    fed = make_federation()
    # When an activity is delivered once
    result = once(fed, server.url("/inbox"))
    # Then it is DELIVERED and the received request carries a valid draft-cavage signature
    assert result.outcome is Outcome.DELIVERED and result.status == 202
    (request,) = server.requests("/inbox")
    assert request.method == "POST" and request.body == BODY
    assert request.headers["Content-Type"] == "application/activity+json"
    assert request.headers["User-Agent"].startswith("botkit-tasks/")
    assert assert_signed_by(fed, server, request) == "draft-cavage"


def test_500_twice_then_202_is_retried_by_the_worker_and_delivered(
    server: ScriptedServer,
) -> None:
    # Given an inbox failing twice before accepting
    server.script("/inbox", Reply(500), Reply(500), Reply(202))
    fed = make_federation()
    with Running(fed) as running:
        # When the activity is sent through the delivery actor
        fed.send(ACTIVITY, [server.url("/inbox")])
        running.join()
    # Then it took three attempts, each freshly signed, two of them backoff retries
    requests = server.requests("/inbox")
    assert len(requests) == 3
    for request in requests:
        assert_signed_by(fed, server, request)
    assert len(running.delays) == 2
    assert all(d is not None and 10 <= d <= 100 for d in running.delays)
    # And the success cleared the failure day recorded for the host
    assert fed.kv.get(("botkit", "hosts", host_of(server.url()))) is None


def test_429_retry_after_delay_is_honoured(server: ScriptedServer) -> None:
    # Given an inbox rate-limiting once with Retry-After: 1
    server.script("/inbox", Reply(429, headers={"Retry-After": "1"}), Reply(202))
    fed = make_federation(DeliveryOptions(max_retries=3, min_backoff=0.01, max_backoff=5.0))
    assert once(fed, server.url("/inbox")).retry_after == 1.0
    server.script("/inbox", Reply(429, headers={"Retry-After": "1"}), Reply(202))
    with Running(fed) as running:
        started = time.monotonic()
        fed.send(ACTIVITY, [server.url("/inbox")])
        running.join()
        elapsed = time.monotonic() - started
    # Then the retry was scheduled exactly 1000 ms out (not the 10 ms backoff) and delivered
    assert running.delays == [1000]
    assert elapsed >= 1.0
    assert len(server.requests("/inbox")) == 3  # one direct probe above + two via the worker


def test_retry_after_is_capped_by_max_backoff(server: ScriptedServer) -> None:
    server.script("/inbox", Reply(503, headers={"Retry-After": "86400"}))
    result = once(make_federation(), server.url("/inbox"))
    assert result.outcome is Outcome.RETRY and result.retry_after == FAST.max_backoff


def test_parse_retry_after_seconds_and_http_dates() -> None:
    now = calendar.timegm((2026, 1, 1, 0, 0, 0))
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None) is None


def test_410_calls_the_gone_hook_drops_followers_and_is_not_retried(
    server: ScriptedServer,
) -> None:
    # Given two followers behind a shared inbox that is gone, and one elsewhere
    gone: list[tuple[str, int]] = []
    options = DeliveryOptions(
        max_retries=3, min_backoff=0.01, max_backoff=0.05, on_gone=lambda u, s: gone.append((u, s))
    )
    fed = make_federation(options)
    shared = server.url("/inbox")
    for n in range(2):
        fed.followers.add(
            {"id": f"https://r.example/u{n}", "inbox": "https://r.example/i", "sharedInbox": shared}
        )
    fed.followers.add({"id": "https://s.example/u", "inbox": "https://s.example/inbox"})
    server.script("/inbox", Reply(410))
    with Running(fed) as running:
        # When a delivery to it answers 410
        fed.send(ACTIVITY, [shared])
        running.join()
    # Then one request only, the hook ran, the followers behind it are dropped
    assert len(server.requests("/inbox")) == 1
    assert running.delays == []
    assert gone == [(shared, 410)]
    assert [f["id"] for f in fed.followers.iter()] == ["https://s.example/u"]


def test_404_is_gone_too(server: ScriptedServer) -> None:
    server.script("/inbox", Reply(404))
    assert once(make_federation(), server.url("/inbox")).outcome is Outcome.GONE


def test_400_is_permanent_and_not_retried(server: ScriptedServer) -> None:
    # Given an inbox rejecting the activity
    server.script("/inbox", Reply(400, body=b"bad activity"))
    fed = make_federation()
    assert once(fed, server.url("/inbox")).outcome is Outcome.PERMANENT
    with Running(fed) as running:
        fed.send(ACTIVITY, [server.url("/inbox")])
        # Then the job fails with the permanent error (dead-lettered), without retries
        with pytest.raises(PermanentDeliveryError, match="HTTP 400"):
            running.join()
    assert len(server.requests("/inbox")) == 2  # the direct probe and the single job attempt
    assert running.delays == []
    # And a permanent answer does not count as a host failure
    assert fed.kv.get(("botkit", "hosts", host_of(server.url()))) is None


@pytest.mark.parametrize("status", [401, 408, 429, 500, 502, 503, 501])
def test_retryable_statuses(server: ScriptedServer, status: int) -> None:
    server.script("/inbox", Reply(status))
    result = once(make_federation(), server.url("/inbox"))
    assert result.outcome is Outcome.RETRY and result.status == status


@pytest.mark.parametrize("status", [403, 405, 413, 422])
def test_other_4xx_are_permanent(server: ScriptedServer, status: int) -> None:
    server.script("/inbox", Reply(status))
    assert once(make_federation(), server.url("/inbox")).outcome is Outcome.PERMANENT


def test_retries_are_exhausted_after_max_retries(server: ScriptedServer) -> None:
    server.script("/inbox", Reply(503))
    fed = make_federation()
    with Running(fed) as running:
        fed.send(ACTIVITY, [server.url("/inbox")])
        with pytest.raises(dramatiq.Retry, match="HTTP 503"):
            running.join()
    # One attempt plus max_retries retries, then the message is dead.
    assert len(server.requests("/inbox")) == 1 + FAST.max_retries


def test_hanging_server_times_out_and_is_retried(server: ScriptedServer) -> None:
    # Given an inbox that answers only after 5 s, and a 0.5 s read timeout
    server.script("/inbox", Reply(202, delay=5.0))
    fed = make_federation()
    started = time.monotonic()
    result = once(fed, server.url("/inbox"))
    # Then the attempt gives up quickly and is classified as retryable
    assert time.monotonic() - started < 3.0
    assert result.outcome is Outcome.RETRY and result.status is None
    assert "timeout" in result.reason.lower()


def test_connection_refused_is_retried() -> None:
    fed = make_federation()
    result = once(fed, f"http://127.0.0.1:{closed_port()}/inbox")
    assert result.outcome is Outcome.RETRY and result.status is None
    assert "network error" in result.reason


def test_oversized_response_is_capped_and_classified_by_status(server: ScriptedServer) -> None:
    # Given inboxes answering with 64 MiB bodies
    server.script("/ok", Reply(202, body_size=64 << 20))
    server.script("/err", Reply(500, body_size=64 << 20))
    fed = make_federation()
    fed.private_key  # noqa: B018 - generate the key outside the measurement
    tracemalloc.start()
    try:
        ok = once(fed, server.url("/ok"))
        err = once(fed, server.url("/err"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Then at most 1 MiB is read, memory stays small, and the status decides
    assert ok.outcome is Outcome.DELIVERED and ok.body_bytes == FAST.max_response_bytes
    assert err.outcome is Outcome.RETRY and err.body_bytes == FAST.max_response_bytes
    assert peak < 8 << 20


def test_redirect_is_not_followed(server: ScriptedServer) -> None:
    # Given an inbox redirecting elsewhere
    server.script("/inbox", Reply(302, headers={"Location": server.url("/elsewhere")}))
    server.script("/elsewhere", Reply(202))
    result = once(make_federation(), server.url("/inbox"))
    # Then nothing is sent to the target; the redirect counts as a retryable failure
    assert server.requests("/elsewhere") == []
    assert result.outcome is Outcome.RETRY and result.status == 302
    assert "redirect" in result.reason


def test_private_address_is_refused_by_default(server: ScriptedServer) -> None:
    # Given a federation that does not allow private addresses
    server.script("/inbox", Reply(202))
    fed = make_federation(allow_private=False)
    # When delivering to loopback, over http and over https
    for url in (server.url("/inbox"), f"https://127.0.0.1:{server.port}/inbox"):
        result = once(fed, url)
        # Then it is refused before any connection, permanently
        assert result.outcome is Outcome.PERMANENT
        assert "unsafe destination" in result.reason
    assert server.requests() == []
    # And through the actor the job fails without retries
    with Running(fed) as running:
        fed.send(ACTIVITY, [f"https://localhost:{server.port}/inbox"])
        with pytest.raises(PermanentDeliveryError, match="unsafe destination"):
            running.join()
    assert running.delays == []
    assert server.requests() == []


def test_private_address_is_allowed_when_the_bot_allows_it(server: ScriptedServer) -> None:
    server.script("/inbox", Reply(202))
    fed = make_federation(allow_private=True)
    assert once(fed, server.url("/inbox")).outcome is Outcome.DELIVERED
    assert len(server.requests("/inbox")) == 1


def test_401_double_knocks_with_rfc9421_and_remembers_it_per_origin(
    server: ScriptedServer,
) -> None:
    # Given an inbox that only accepts RFC 9421 signatures
    def rfc9421_only(request: Request) -> Reply:
        return Reply(202) if "Signature-Input" in request.headers else Reply(401)

    server.handle("/inbox", rfc9421_only)
    server.handle("/other-inbox", rfc9421_only)
    fed = make_federation()
    # When the first delivery is made
    first = once(fed, server.url("/inbox"))
    # Then draft-cavage got 401, RFC 9421 was tried at once and worked
    assert first.outcome is Outcome.DELIVERED and first.scheme == "rfc9421"
    schemes = [assert_signed_by(fed, server, r) for r in server.requests("/inbox")]
    assert schemes == ["draft-cavage", "rfc9421"]
    assert fed.kv.get(("botkit", "sig-scheme", server.url("").rstrip("/"))) == "rfc9421"
    # And later deliveries to the same origin start with RFC 9421 (one request)
    second = once(fed, server.url("/other-inbox"))
    assert second.outcome is Outcome.DELIVERED
    assert len(server.requests("/other-inbox")) == 1
    assert "Signature-Input" in server.requests("/other-inbox")[0].headers


def test_401_with_both_schemes_is_retried(server: ScriptedServer) -> None:
    server.script("/inbox", Reply(401))
    fed = make_federation()
    result = once(fed, server.url("/inbox"))
    assert result.outcome is Outcome.RETRY and result.status == 401
    assert len(server.requests("/inbox")) == 2
    assert fed.kv.get(("botkit", "sig-scheme", server.url("").rstrip("/"))) is None


def test_fanout_delivery_reads_the_stored_body_once_per_attempt(server: ScriptedServer) -> None:
    # Given a follower, and an activity published through the facade
    server.script("/inbox", Reply(202))
    fed = make_federation()
    fed.followers.add({"id": "http://127.0.0.1/u", "inbox": server.url("/inbox")})
    with Running(fed) as running:
        fed.publish(ACTIVITY)
        running.broker.join("botkit.fanout", timeout=20_000)
        running.join()
    # Then the body sent is the stored activity, signed
    (request,) = server.requests("/inbox")
    assert_signed_by(fed, server, request)
    import json

    assert json.loads(request.body) == ACTIVITY


# ----------------------------------------------------------------------------- host tracking


DAY = 86400.0
T0 = calendar.timegm((2026, 3, 1, 12, 0, 0))


def test_host_becomes_unavailable_after_failures_on_distinct_days() -> None:
    kv = MemoryKvStore()
    # Many failures on one day count once
    for _ in range(5):
        assert record_host_failure(kv, "a.example", now=T0, unavailable_after_days=3) is False
    assert record_host_failure(kv, "a.example", now=T0 + DAY, unavailable_after_days=3) is False
    assert is_host_available(kv, "a.example")
    # The third distinct day marks it unavailable
    assert record_host_failure(kv, "a.example", now=T0 + 5 * DAY, unavailable_after_days=3)
    assert not is_host_available(kv, "a.example")
    assert is_host_available(kv, "b.example")
    # A success clears it entirely
    record_host_success(kv, "a.example")
    assert is_host_available(kv, "a.example")
    assert kv.get(("botkit", "hosts", "a.example")) is None


def test_delivery_failures_on_three_days_mark_the_host_and_a_success_clears_it(
    server: ScriptedServer,
) -> None:
    # Given a clock we move day by day and an inbox failing with 503
    clock: list[float] = [float(T0)]
    options = DeliveryOptions(read_timeout=0.5, clock=lambda: clock[0])
    fed = make_federation(options)
    url = server.url("/inbox")
    server.script("/inbox", Reply(503))
    for day in range(3):
        clock[0] = T0 + day * DAY
        assert is_host_available(fed.kv, host_of(url))
        assert perform_delivery(fed, url, BODY).outcome is Outcome.RETRY
    # Then after the third distinct day the host is unavailable
    assert not is_host_available(fed.kv, host_of(url))
    # And the fan-out job skips it while the direct delivery still goes through and clears it
    server.script("/inbox", Reply(202))
    assert perform_delivery(fed, url, BODY).outcome is Outcome.DELIVERED
    assert is_host_available(fed.kv, host_of(url))


def test_fanout_delivery_to_a_host_marked_unavailable_meanwhile_is_dropped(
    server: ScriptedServer,
) -> None:
    server.script("/inbox", Reply(202))
    fed = make_federation()
    for day in range(3):
        record_host_failure(fed.kv, host_of(server.url()), now=T0 + day * DAY)
    fed.kv.set(("botkit", "bot", "activities", ACTIVITY["id"]), ACTIVITY)
    with Running(fed) as running:
        fed.broker.get_actor("botkit_deliver").send("bot", ACTIVITY["id"], server.url("/inbox"))
        running.join()
    assert server.requests() == []


def test_missing_stored_activity_is_a_permanent_failure(server: ScriptedServer) -> None:
    fed = make_federation()
    with Running(fed) as running:
        fed.broker.get_actor("botkit_deliver").send("bot", "http://x/gone", server.url("/inbox"))
        with pytest.raises(PermanentDeliveryError, match="no longer stored"):
            running.join()
    assert server.requests() == []


def test_host_of_keeps_explicit_ports() -> None:
    assert host_of("https://Mastodon.Social/inbox") == "mastodon.social"
    assert host_of("http://127.0.0.1:8080/inbox") == "127.0.0.1:8080"


def test_500_twice_then_202_on_sql_broker_sqlite(server: ScriptedServer, sqlite_url: str) -> None:
    # Given the same flaky inbox, with deliveries queued in SqlBroker on SQLite
    sql = pytest.importorskip("botkit_tasks.brokers.sql")
    broker = sql.SqlBroker(sqlite_url, poll_interval=0.05)
    server.script("/inbox", Reply(500), Reply(500), Reply(202))
    fed = make_federation(broker=broker)
    worker = dramatiq.Worker(broker, worker_timeout=20, worker_threads=2)
    worker.start()
    try:
        # When the activity is sent and the outbox drains
        fed.send(ACTIVITY, [server.url("/inbox")])
        broker.join("botkit.outbox", timeout=20_000)
    finally:
        worker.stop()
        broker.close()
    # Then the third attempt delivered it, each attempt signed afresh
    requests = server.requests("/inbox")
    assert len(requests) == 3
    for request in requests:
        assert_signed_by(fed, server, request)


def test_401_then_400_on_the_second_knock_stays_retryable(server: ScriptedServer) -> None:
    # A server that cannot parse RFC 9421 must not turn a retryable 401 into a drop.
    def cavage_401_rfc9421_400(request: Request) -> Reply:
        return Reply(400) if "Signature-Input" in request.headers else Reply(401)

    server.handle("/inbox", cavage_401_rfc9421_400)
    result = once(make_federation(), server.url("/inbox"))
    assert result.outcome is Outcome.RETRY and result.status == 401
    assert len(server.requests("/inbox")) == 2


def test_trickling_response_is_cut_at_the_total_deadline(server: ScriptedServer) -> None:
    # Given a 202 whose 1 MiB body trickles in over ~5 s, and a 1 s total deadline
    server.script("/inbox", Reply(202, body_size=1 << 20, chunk_delay=0.3))
    fed = make_federation(DeliveryOptions(read_timeout=0.5, total_timeout=1.0))
    started = time.monotonic()
    result = once(fed, server.url("/inbox"))
    # Then reading stops at the deadline and the status decides the outcome
    assert time.monotonic() - started < 2.5
    assert result.outcome is Outcome.DELIVERED
    assert result.body_bytes < 1 << 20


def test_hanging_server_then_202_is_retried_by_the_worker(server: ScriptedServer) -> None:
    # Given an inbox that hangs once, then accepts
    server.script("/inbox", Reply(202, delay=5.0), Reply(202))
    fed = make_federation()
    with Running(fed) as running:
        fed.send(ACTIVITY, [server.url("/inbox")])
        running.join()
    # Then the timed-out attempt was retried with backoff and the retry delivered
    assert len(server.requests("/inbox")) == 2
    assert len(running.delays) == 1


def test_connection_refused_through_the_worker_exhausts_retries_and_records_the_host() -> None:
    # Given an inbox on a port where nothing listens
    fed = make_federation()
    url = f"http://127.0.0.1:{closed_port()}/inbox"
    with Running(fed) as running:
        fed.send(ACTIVITY, [url])
        # Then every attempt fails, is retried max_retries times, then the job dies
        with pytest.raises(dramatiq.Retry, match="network error"):
            running.join()
    assert len(running.delays) == FAST.max_retries
    # And today counts as a failure day for that host
    record = fed.kv.get(("botkit", "hosts", host_of(url)))
    days = record.get("days") if isinstance(record, dict) else None
    assert isinstance(days, list) and len(days) == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((), {}, "botkit_deliver"),
        (("bot",), {}, "botkit_deliver"),
        (("bot", 5, "http://127.0.0.1:1/inbox"), {}, "activity_id"),
        (("bot", "http://x/1", 5, {"id": "http://x/1"}), {}, "inbox_url"),
        (("bot", "http://x/1", "http://127.0.0.1:1/inbox", "not a dict"), {}, "activity"),
        (("bot", "http://x/1", "http://127.0.0.1:1/inbox"), {"bogus": 1}, "botkit_deliver"),
    ],
)
def test_delivery_job_with_malformed_arguments_fails_permanently(
    args: tuple[Any, ...], kwargs: dict[str, Any], match: str
) -> None:
    fed = make_federation()
    with Running(fed) as running:
        fed.broker.get_actor("botkit_deliver").send(*args, **kwargs)
        with pytest.raises(PermanentDeliveryError, match=match):
            running.join()
    assert running.delays == []  # not retried


@pytest.mark.parametrize(
    ("args", "match"),
    [((), "botkit_fanout"), (("bot",), "botkit_fanout"), (("bot", ["x"]), "activity_id")],
)
def test_fanout_job_with_malformed_arguments_fails_permanently(
    args: tuple[Any, ...], match: str
) -> None:
    fed = make_federation()
    with Running(fed) as running:
        fed.broker.get_actor("botkit_fanout").send(*args)
        with pytest.raises(PermanentDeliveryError, match=match):
            fed.broker.join("botkit.fanout", timeout=20_000)
    assert running.delays == []


@pytest.mark.parametrize(
    "options",
    [
        {"max_response_bytes": -1},
        {"activity_ttl": -1},  # used to fail only at publish, after the note was stored
        {"activity_ttl": 0},  # the body would expire before its deliveries ran
        {"max_retries": "3"},
    ],
)
def test_malformed_delivery_options_are_refused(options: dict[str, Any]) -> None:
    name = next(iter(options))
    with pytest.raises((TypeError, ValueError), match=name):
        DeliveryOptions(**options)
