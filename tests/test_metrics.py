"""Prometheus metrics: the scrape-time collector on real brokers, the duration middleware in a
real worker, and both beside Dramatiq's own ``Prometheus`` middleware under the ``dramatiq`` CLI.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import httpx
import pytest
from _broker_support import dramatiq_cli
from _dashboard_support import Backend, backend, free_port, populate
from conftest import unique_name
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from botkit_tasks.federation import stats
from botkit_tasks.federation.delivery import record_host_failure
from botkit_tasks.metrics import OTHER_HOST, BotkitCollector, MetricsMiddleware
from botkit_tasks.monitor import inspect

pytestmark = pytest.mark.timeout(120)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def populated(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[Backend, str]]:
    with backend(request, request.param, tmp_path) as b:
        queue = unique_name("q")
        populate(b.broker, queue, dead=2)
        yield b, queue


def test_queue_depths_and_dead_letters_equal_the_monitor(populated: tuple[Backend, str]) -> None:
    b, queue = populated
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BotkitCollector(b.broker, b.kv))
    got = _samples(registry)
    (q,) = [q for q in inspect(b.broker).queues() if q.name == queue]
    for state in ("ready", "delayed", "in_flight", "dead"):
        key = ("botkit_queue_messages", (("queue", queue), ("state", state)))
        assert got[key] == getattr(q, state), state
    assert got[("botkit_dead_letters", (("queue", queue),))] == 2
    assert got[("botkit_workers", ())] == len(inspect(b.broker).workers())


def test_host_labels_are_the_busiest_hosts_then_other(populated: tuple[Backend, str]) -> None:
    b, _ = populated
    # Given 25 hosts, host i with i+1 deliveries, and one host marked unavailable
    recorder = stats.DeliveryStats(b.kv, flush_interval=60)
    for i in range(25):
        for _ in range(i + 1):
            recorder.record(f"h{i:02}.example", "delivered")
    recorder.record("h00.example", "retry")
    recorder.flush()
    for day in range(3):
        record_host_failure(b.kv, "h00.example", now=1_900_000_000 + day * 86400)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BotkitCollector(b.broker, b.kv, top_hosts=3))
    got = _samples(registry)
    hosts = {dict(labels)["host"] for name, labels in got if name == "botkit_deliveries_last_hour"}
    # Then only the three busiest have their own label, and the rest are summed as other
    assert hosts == {"h24.example", "h23.example", "h22.example", OTHER_HOST}

    def hour(host: str, outcome: str) -> float:
        return got[("botkit_deliveries_last_hour", (("host", host), ("outcome", outcome)))]

    assert hour("h24.example", "delivered") == 25
    assert hour(OTHER_HOST, "delivered") == sum(range(1, 23))
    assert hour(OTHER_HOST, "retry") == 1
    # And the counter totals and the unavailable count come from the KV store
    assert got[("botkit_deliveries_total", (("outcome", "delivered"),))] == sum(range(1, 26))
    assert got[("botkit_hosts_unavailable", ())] == 1
    with pytest.raises(ValueError, match="top_hosts"):
        BotkitCollector(b.broker, b.kv, top_hosts=-1)


def test_the_middleware_times_enqueues_and_runs_in_a_worker(tmp_path: Any) -> None:
    from botkit_tasks.brokers import SqlBroker

    registry = CollectorRegistry()
    broker = SqlBroker(
        f"sqlite:///{tmp_path}/m.sqlite3",
        middleware=[m() for m in dramatiq.middleware.default_middleware],
    )
    broker.add_middleware(MetricsMiddleware(registry))
    queue = unique_name("q")

    @dramatiq.actor(broker=broker, queue_name=queue, max_retries=0)
    def work(n: int) -> None:
        time.sleep(0.02)
        if n == 0:
            raise ValueError("zero")

    for n in range(4):
        work.send(n)
    worker = dramatiq.Worker(broker, worker_threads=2)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = _samples(registry)
            done = sum(
                v for (name, _), v in got.items() if name == "botkit_run_duration_seconds_count"
            )
            if done == 4:
                break
            time.sleep(0.05)
    finally:
        worker.stop()
        broker.close()
    assert got[("botkit_enqueue_duration_seconds_count", (("queue", queue),))] == 4
    name = "botkit_run_duration_seconds_count"
    ok = (name, (("actor", "work"), ("queue", queue), ("result", "ok")))
    failed = (name, (("actor", "work"), ("queue", queue), ("result", "failed")))
    assert (got[ok], got[failed]) == (3, 1)
    # Each run slept 20 ms
    total = got[("botkit_run_duration_seconds_sum", ok[1])]
    assert 0.06 <= total < 5


def test_importing_metrics_and_the_dashboard_leaves_prometheus_client_unimported() -> None:
    code = (
        "import sys, botkit_tasks.metrics, botkit_tasks.dashboard, botkit_tasks.federation.stats\n"
        "assert 'prometheus_client' not in sys.modules, 'imported too early'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_beside_dramatiqs_prometheus_middleware_under_the_cli(tmp_path: Any) -> None:
    # Given a `dramatiq` worker whose broker has Dramatiq's Prometheus middleware
    # and botkit's, sharing the multi-process directory
    port = free_port()
    url = f"sqlite:///{tmp_path}/p.sqlite3"
    queue = unique_name("q")
    env = {
        "BOTKIT_BROKER_URL": url,
        "BOTKIT_BROKER_PREFIX": "p_",
        "BOTKIT_BROKER_QUEUE": queue,
        "dramatiq_prom_port": str(port),
        "dramatiq_prom_host": "127.0.0.1",
        "dramatiq_prom_db": str(tmp_path / "prom"),
    }
    from botkit_tasks.brokers import SqlBroker

    sender = SqlBroker(url, middleware=[], table_prefix="p_")
    for n in (1, 2, -1):
        sender.enqueue(dramatiq.Message(queue, "tick", (n,), {}, {}))
    with dramatiq_cli(
        "tests.broker_apps.prometheus", env, "-p", "1", "-t", "2", log=tmp_path / "w.log"
    ) as proc:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                text = ""
            if 'botkit_run_duration_seconds_count{actor="tick"' in text and (
                'dramatiq_messages_total{actor_name="tick"' in text
            ):
                break
            time.sleep(0.2)
    sender.close()
    log = (tmp_path / "w.log").read_text(errors="replace")
    # Then Dramatiq's exposition shows its own metrics and botkit's run durations together
    assert "dramatiq_message_duration_milliseconds" in text, log[-2000:]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    runs = {
        s.labels["result"]: s.value
        for s in families["botkit_run_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert runs == {"ok": 2.0, "failed": 1.0}
    dramatiq_total = sum(
        s.value for s in families["dramatiq_messages"].samples if s.name.endswith("_total")
    )
    assert dramatiq_total == 3
