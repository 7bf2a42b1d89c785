"""Prometheus metrics: queue depths, dead letters, deliveries per outcome and host, durations.

Two parts, because they are measured in different places:

* :class:`BotkitCollector` reads the broker (through
  :func:`botkit_tasks.monitor.inspect`) and the KV store (the delivery
  statistics of :mod:`botkit_tasks.federation.stats`) at scrape time.  Every
  process sees the same numbers, so one exporter is enough; the dashboard's
  ``/metrics`` is one.  Register it on a registry of your own exporter::

      from prometheus_client import REGISTRY, start_http_server
      from botkit_tasks.metrics import BotkitCollector

      REGISTRY.register(BotkitCollector(broker, kv))
      start_http_server(9200)

* :class:`MetricsMiddleware` times ``enqueue`` calls and actor runs in the
  process where they happen (a Dramatiq middleware).  Add it to the broker of
  the bot and of the workers.  Its histograms are ordinary ``prometheus_client``
  metrics on the default registry, created on first use: in a worker started
  with Dramatiq's own ``Prometheus`` middleware they land in that middleware's
  multi-process files and appear on its exposition port (9191) next to the
  ``dramatiq_*`` metrics.

Host labels are bounded: the ``top_hosts`` busiest hosts of the hour get their
own series, the rest are summed under ``host="other"``.

Importing this module does not import ``prometheus_client``: that library picks
its single- or multi-process mode once, when it is first imported, and Dramatiq's
``Prometheus`` middleware sets the multi-process directory only at worker boot,
after the broker module (and this one) were imported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import dramatiq

from .federation import stats
from .monitor import inspect

if TYPE_CHECKING:
    from dramatiq.broker import MessageProxy
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.core import Metric

    from .kv.base import KvStore

__all__ = [
    "DEFAULT_TOP_HOSTS",
    "DURATION_BUCKETS",
    "OTHER_HOST",
    "BotkitCollector",
    "MetricsMiddleware",
]

#: Hosts given their own label value; the rest are ``other``.
DEFAULT_TOP_HOSTS = 20
#: The label value that sums every host outside the top ones.
OTHER_HOST = "other"
#: Histogram buckets in seconds, from a fast enqueue to a slow delivery.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, float("inf"),
)  # fmt: skip


class BotkitCollector:
    """Scrape-time metrics read from the broker and, when given, the KV store.

    ==========================================  ==============================================
    metric                                      meaning
    ==========================================  ==============================================
    ``botkit_queue_messages{queue,state}``      messages by state: ready, delayed, in_flight, dead
    ``botkit_dead_letters{queue}``              dead letters kept (the same as ``state="dead"``)
    ``botkit_workers``                          live workers (heartbeat within the timeout)
    ``botkit_deliveries_total{outcome}``        delivery attempts since the statistics began
                                                (counter; survives restarts: it lives in the KV)
    ``botkit_deliveries_last_hour{outcome,      attempts of the last hour, the ``top_hosts`` busiest
    host}``                                     hosts by name, the rest as ``host="other"``
    ``botkit_hosts_unavailable``                hosts that fan-outs skip
    ``botkit_scrape_duration_seconds``          how long reading all this took
    ==========================================  ==============================================

    Parameters:
        broker: A broker :func:`~botkit_tasks.monitor.inspect` supports.
        kv: The bot's KV store; without it the delivery metrics are left out.
        top_hosts: Hosts given their own ``host`` label (at least 0).
    """

    def __init__(
        self,
        broker: dramatiq.Broker,
        kv: KvStore | None = None,
        *,
        top_hosts: int = DEFAULT_TOP_HOSTS,
    ) -> None:
        if isinstance(top_hosts, bool) or not isinstance(top_hosts, int) or top_hosts < 0:
            raise ValueError(f"top_hosts must be an int >= 0, not {top_hosts!r}")
        self.inspector = inspect(broker)
        self.kv = kv
        self.top_hosts = top_hosts

    def describe(self) -> list[Metric]:
        """No up-front description: the series depend on the queues and hosts found."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Read the broker and the KV store and yield the metric families."""
        from prometheus_client.core import GaugeMetricFamily

        started = time.perf_counter()
        queues = self.inspector.queues()
        depth = GaugeMetricFamily(
            "botkit_queue_messages", "Messages by queue and state.", labels=["queue", "state"]
        )
        dead = GaugeMetricFamily(
            "botkit_dead_letters", "Dead letters kept for inspection.", labels=["queue"]
        )
        for q in queues:
            for state in ("ready", "delayed", "in_flight", "dead"):
                depth.add_metric([q.name, state], getattr(q, state))
            dead.add_metric([q.name], q.dead)
        yield depth
        yield dead
        yield GaugeMetricFamily(
            "botkit_workers", "Live workers.", value=len(self.inspector.workers())
        )
        if self.kv is not None:
            yield from self._deliveries(self.kv)
        yield GaugeMetricFamily(
            "botkit_scrape_duration_seconds",
            "Time spent reading the broker and the KV store for this scrape.",
            value=time.perf_counter() - started,
        )

    def _deliveries(self, kv: KvStore) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        total = CounterMetricFamily(
            "botkit_deliveries",
            "Delivery attempts by outcome since the statistics began.",
            labels=["outcome"],
        )
        for outcome, n in stats.totals(kv).items():
            total.add_metric([outcome], n)
        yield total
        hour = GaugeMetricFamily(
            "botkit_deliveries_last_hour",
            "Delivery attempts of the last hour by outcome and host (busiest hosts, then other).",
            labels=["outcome", "host"],
        )
        hosts = stats.host_counts(kv)
        other = dict.fromkeys(stats.OUTCOMES, 0)
        for rank, h in enumerate(hosts):
            if rank < self.top_hosts:
                for outcome, n in h.counts.items():
                    hour.add_metric([outcome, h.host], n)
            else:
                for outcome, n in h.counts.items():
                    other[outcome] += n
        if len(hosts) > self.top_hosts:
            for outcome, n in other.items():
                hour.add_metric([outcome, OTHER_HOST], n)
        yield hour
        yield GaugeMetricFamily(
            "botkit_hosts_unavailable",
            "Remote hosts marked unavailable (skipped by fan-outs).",
            value=sum(1 for r in stats.host_records(kv) if r.unavailable),
        )


#: Starts remembered per thread before the oldest are forgotten.
_MAX_PENDING = 10_000

_histograms: dict[int, tuple[Histogram, Histogram]] = {}
_histograms_lock = threading.Lock()


def _durations(registry: CollectorRegistry) -> tuple[Histogram, Histogram]:
    """The two histograms on ``registry``, created once per registry (and process)."""
    from prometheus_client import Histogram

    with _histograms_lock:
        found = _histograms.get(id(registry))
        if found is None:
            found = _histograms[id(registry)] = (
                Histogram(
                    "botkit_enqueue_duration_seconds",
                    "Time spent in broker.enqueue (the database or Redis write).",
                    ["queue"],
                    buckets=DURATION_BUCKETS,
                    registry=registry,
                ),
                Histogram(
                    "botkit_run_duration_seconds",
                    "Time an actor ran, by queue, actor and result (ok or failed).",
                    ["queue", "actor", "result"],
                    buckets=DURATION_BUCKETS,
                    registry=registry,
                ),
            )
        return found


class MetricsMiddleware(dramatiq.Middleware):
    """Time enqueues and actor runs into ``botkit_enqueue_duration_seconds`` and
    ``botkit_run_duration_seconds``.

    Parameters:
        registry: Where the histograms live (``prometheus_client``'s default
            registry unless given).  They are created at the first enqueue or
            run, so a multi-process directory set at worker boot (Dramatiq's
            ``Prometheus`` middleware does that) is honoured.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._registry = registry
        self._local = threading.local()

    @property
    def registry(self) -> CollectorRegistry:
        """Where the histograms live."""
        if self._registry is None:
            from prometheus_client import REGISTRY

            self._registry = REGISTRY
        return self._registry

    def _starts(self, name: str) -> dict[str, float]:
        starts: dict[str, float] | None = getattr(self._local, name, None)
        if starts is None or len(starts) > _MAX_PENDING:
            # An enqueue that raised never reaches after_enqueue: forget such starts.
            starts = {}
            setattr(self._local, name, starts)
        return starts

    def before_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int
    ) -> None:
        """Note when the enqueue started (enqueues run on the caller's thread)."""
        self._starts("enqueue")[message.message_id] = time.perf_counter()

    def after_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int
    ) -> None:
        """Observe the enqueue's duration."""
        started = self._starts("enqueue").pop(message.message_id, None)
        if started is not None:
            from dramatiq.common import q_name

            enqueue, _ = _durations(self.registry)
            enqueue.labels(q_name(message.queue_name)).observe(time.perf_counter() - started)

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Note when the actor started."""
        self._starts("run")[message.message_id] = time.perf_counter()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Observe the run's duration, labelled ``ok`` or ``failed``."""
        started = self._starts("run").pop(message.message_id, None)
        if started is not None:
            _, run = _durations(self.registry)
            outcome = "ok" if exception is None else "failed"
            run.labels(message.queue_name, message.actor_name, outcome).observe(
                time.perf_counter() - started
            )

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Forget the start of a message that was skipped (it did not run)."""
        self._starts("run").pop(message.message_id, None)
