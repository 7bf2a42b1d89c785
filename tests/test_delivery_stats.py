"""Delivery outcomes per minute and per host, in real KV stores (SQLite, PostgreSQL, Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _dashboard_support import backend

from botkit_tasks.federation import stats
from botkit_tasks.federation.delivery import record_host_failure
from botkit_tasks.kv.base import KvStore

pytestmark = pytest.mark.timeout(120)

NOW = 1_900_000_000.0  # a fixed instant, 20 s into its minute


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def kv(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[KvStore]:
    with backend(request, request.param, tmp_path) as b:
        yield b.kv


def test_counts_per_minute_per_host_and_in_total(kv: KvStore) -> None:
    clock = Clock()
    recorder = stats.DeliveryStats(kv, flush_interval=0, clock=clock)
    # Given attempts in this minute and in the one ten minutes ago
    for _ in range(3):
        recorder.record("a.example", "delivered")
    recorder.record("b.example:8443", "retry")
    clock.now -= 600
    recorder.record("a.example", "gone")
    recorder.record("a.example", "permanent")
    clock.now += 600

    # Then the timeline has 60 minutes, the current one last, with those counts
    line = stats.timeline(kv, now=clock.now)
    assert len(line) == 60
    assert line[-1].minute == int(NOW // 60)
    assert line[-1].counts == {"delivered": 3, "retry": 1, "permanent": 0, "gone": 0}
    assert line[-11].counts == {"delivered": 0, "retry": 0, "permanent": 1, "gone": 1}
    assert line[-11].failed == 2
    assert sum(m.failed for m in line) == 3
    # And hosts are listed busiest first with the hour's counts
    hosts = stats.host_counts(kv, now=clock.now)
    assert [(h.host, h.total) for h in hosts] == [("a.example", 5), ("b.example:8443", 1)]
    assert hosts[0].counts == {"delivered": 3, "retry": 0, "permanent": 1, "gone": 1}
    assert hosts[0].last_minute == int(NOW // 60)
    # And the totals add everything up
    assert stats.totals(kv) == {"delivered": 3, "retry": 1, "permanent": 1, "gone": 1}


def test_minutes_older_than_an_hour_leave_the_window(kv: KvStore) -> None:
    clock = Clock()
    recorder = stats.DeliveryStats(kv, flush_interval=0, clock=clock)
    recorder.record("old.example", "retry")
    # When 61 minutes pass and another host gets a delivery
    clock.now += 61 * 60
    recorder.record("new.example", "delivered")
    # Then the old minute is gone from the timeline and the host list
    line = stats.timeline(kv, now=clock.now)
    assert sum(m.counts["retry"] for m in line) == 0
    assert sum(m.counts["delivered"] for m in line) == 1
    assert [h.host for h in stats.host_counts(kv, now=clock.now)] == ["new.example"]
    # But the totals keep it
    assert stats.totals(kv)["retry"] == 1


def test_two_recorders_like_two_processes_merge_their_counts(kv: KvStore) -> None:
    # Given two recorders (two worker processes) counting in memory concurrently
    first = stats.DeliveryStats(kv, flush_interval=60)
    second = stats.DeliveryStats(kv, flush_interval=60)

    def work(recorder: stats.DeliveryStats) -> None:
        for i in range(50):
            recorder.record(f"h{i % 5}.example", "delivered" if i % 10 else "retry")

    threads = [threading.Thread(target=work, args=(r,)) for r in (first, second, first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Nothing is written before a flush
    assert first.pending() == 100
    assert stats.totals(kv) == {"delivered": 0, "retry": 0, "permanent": 0, "gone": 0}
    # When both flush at the same time
    flushers = [threading.Thread(target=r.flush) for r in (first, second)]
    for t in flushers:
        t.start()
    for t in flushers:
        t.join()
    # Then no count is lost
    assert stats.totals(kv) == {"delivered": 180, "retry": 20, "permanent": 0, "gone": 0}
    hosts = stats.host_counts(kv)
    assert sorted(h.host for h in hosts) == [f"h{i}.example" for i in range(5)]
    assert all(h.total == 40 for h in hosts)
    assert first.pending() == second.pending() == 0


def test_the_timer_writes_pending_counts_without_another_record(kv: KvStore) -> None:
    recorder = stats.DeliveryStats(kv, flush_interval=0.05)
    recorder.record("a.example", "delivered")
    deadline = time.monotonic() + 10
    while stats.totals(kv)["delivered"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats.totals(kv)["delivered"] == 1
    assert recorder.pending() == 0


def test_the_shared_recorder_flushes_at_close(kv: KvStore) -> None:
    stats.record(kv, "a.example", "permanent")
    stats.recorder_for(kv).close()
    assert stats.totals(kv)["permanent"] == 1
    assert stats.recorder_for(kv) is stats.recorder_for(kv)


def test_host_records_show_the_failure_tracking(kv: KvStore) -> None:
    for day in range(3):
        record_host_failure(kv, "down.example", now=NOW + day * 86400)
    record_host_failure(kv, "flaky.example", now=NOW)
    records = {r.host: r for r in stats.host_records(kv)}
    assert records["down.example"].unavailable
    assert len(records["down.example"].failure_days) == 3
    assert not records["flaky.example"].unavailable


def test_bad_input_is_refused_and_a_broken_store_never_raises(kv: KvStore) -> None:
    recorder = stats.DeliveryStats(kv, flush_interval=0)
    with pytest.raises(ValueError, match="unknown delivery outcome 'ok'"):
        recorder.record("a.example", "ok")
    with pytest.raises(ValueError, match="host"):
        recorder.record("", "delivered")
    with pytest.raises(ValueError, match="flush_interval"):
        stats.DeliveryStats(kv, flush_interval=-1)
    with pytest.raises(ValueError, match="minutes"):
        stats.timeline(kv, minutes=0)
    # A store that fails on write loses the counts but does not raise
    kv.close()
    closed = stats.DeliveryStats(_Broken(), flush_interval=0)
    closed.record("a.example", "delivered")
    assert closed.pending() == 0


class _Broken(KvStore):
    """A store whose every call fails, as a database that went away does."""

    def get(self, key: Any) -> Any:
        raise ConnectionError("database is down")

    def set(self, key: Any, value: Any, *, ttl: Any = None) -> None:
        raise ConnectionError("database is down")

    def delete(self, key: Any) -> None:
        raise ConnectionError("database is down")

    def cas(self, key: Any, expected: Any, new: Any, *, ttl: Any = None) -> bool:
        raise ConnectionError("database is down")

    def list(self, prefix: Any = ()) -> Any:
        raise ConnectionError("database is down")

    def close(self) -> None:
        pass


def test_every_delivery_attempt_is_counted_for_its_host(tmp_path: Any) -> None:
    from _http_server import Reply, ScriptedServer
    from dramatiq.brokers.stub import StubBroker

    from botkit_tasks.federation import Federation
    from botkit_tasks.federation.delivery import DeliveryOptions, host_of, perform_delivery
    from botkit_tasks.kv.sql import SqlKvStore

    kv = SqlKvStore(f"sqlite:///{tmp_path}/kv.sqlite3")
    fed = Federation(
        kv=kv,
        broker=StubBroker(),
        base_url="http://127.0.0.1:1",
        username="bot",
        allow_private_addresses=True,
        delivery_options=DeliveryOptions(read_timeout=0.5, total_timeout=2.0),
    )
    body = b'{"type":"Create","id":"http://127.0.0.1/activities/1"}'
    try:
        with ScriptedServer() as server:
            # Given an inbox answering 202, 202, 503, 400 and then 410
            url = server.url("/inbox")
            for status in (202, 202, 503, 400, 410):
                server.script("/inbox", Reply(status))
                perform_delivery(fed, url, body)
        # Then, once the process's recorder has written, each attempt is counted
        stats.recorder_for(kv).flush()
        (counted,) = stats.host_counts(kv)
        assert counted.host == host_of(url)
        assert counted.counts == {"delivered": 2, "retry": 1, "permanent": 1, "gone": 1}
        assert (
            stats.timeline(kv)[-1].counts == counted.counts
            or sum(m.failed for m in stats.timeline(kv)[-2:]) == 3
        )  # the attempts may straddle a minute boundary
    finally:
        kv.close()
