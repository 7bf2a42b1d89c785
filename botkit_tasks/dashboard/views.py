"""What the dashboard shows, read in one go (blocking; the app runs it in a thread).

:func:`read_snapshot` asks the broker's :class:`~botkit_tasks.monitor.Inspector`
for queues, workers, retries and dead letters, and the KV store for delivery
statistics and host records.  The page, ``/snapshot.json`` and the browser test
all read this same structure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..federation import stats
from ..kv.base import KvStore
from ..monitor import DeadLetter, Inspector, QueueStats, RetryingMessage, WorkerInfo
from .chart import deliveries_svg

__all__ = ["HostRow", "Snapshot", "read_snapshot"]


@dataclass(frozen=True)
class HostRow:
    """One remote host: the hour's outcomes and its failure record.

    Attributes:
        host: The host.
        counts: Attempts of the last hour per outcome class.
        failure_days: Distinct UTC days with retryable failures.
        unavailable: Whether fan-outs skip it.
    """

    host: str
    counts: dict[str, int]
    failure_days: list[str]
    unavailable: bool

    @property
    def total(self) -> int:
        """Attempts of the last hour."""
        return sum(self.counts.values())


@dataclass
class Snapshot:
    """Everything one page shows, as read at ``taken_at``."""

    taken_at: datetime
    queues: list[QueueStats]
    workers: list[WorkerInfo]
    retrying: list[RetryingMessage]
    dead_letters: list[DeadLetter]
    limit: int
    has_kv: bool = False
    hosts: list[HostRow] = field(default_factory=list)
    timeline: list[stats.MinuteCounts] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def queue_totals(self) -> dict[str, int]:
        """Sums over every queue, by state."""
        return {
            state: sum(getattr(q, state) for q in self.queues)
            for state in ("ready", "delayed", "in_flight", "dead")
        }

    @property
    def unavailable_hosts(self) -> list[HostRow]:
        """Hosts marked unavailable."""
        return [h for h in self.hosts if h.unavailable]

    @property
    def hour(self) -> dict[str, int]:
        """Attempts of the last hour by outcome class."""
        return {o: sum(m.counts.get(o, 0) for m in self.timeline) for o in stats.OUTCOMES}

    def chart(self) -> str:
        """The deliveries chart as inline SVG."""
        return deliveries_svg(self.timeline)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: what ``/snapshot.json`` answers."""
        return {
            "taken_at": self.taken_at.isoformat(),
            "queues": [q.to_dict() for q in self.queues],
            "queue_totals": self.queue_totals,
            "workers": [w.to_dict() for w in self.workers],
            "retrying": [r.to_dict() for r in self.retrying],
            "dead_letters": [d.to_dict() for d in self.dead_letters],
            "deliveries": {
                "last_hour": self.hour,
                "total": self.totals,
                "per_minute": [{"minute": m.minute, **m.counts} for m in self.timeline],
            }
            if self.has_kv
            else None,
            "hosts": [
                {
                    "host": h.host,
                    "last_hour": h.counts,
                    "failure_days": h.failure_days,
                    "unavailable": h.unavailable,
                }
                for h in self.hosts
            ]
            if self.has_kv
            else None,
        }


def _hosts(kv: KvStore, now: float) -> list[HostRow]:
    counts = {h.host: h.counts for h in stats.host_counts(kv, now=now)}
    records = {r.host: r for r in stats.host_records(kv)}
    zero = dict.fromkeys(stats.OUTCOMES, 0)
    rows = [
        HostRow(
            host,
            counts.get(host, zero),
            records[host].failure_days if host in records else [],
            records[host].unavailable if host in records else False,
        )
        for host in counts.keys() | records.keys()
    ]
    # Unavailable first, then the busiest, then by name.
    rows.sort(key=lambda r: (not r.unavailable, -r.total, r.host))
    return rows


def read_snapshot(
    inspector: Inspector, kv: KvStore | None, *, limit: int = 50, now: float | None = None
) -> Snapshot:
    """Read the broker (and the KV store, when given) for one page."""
    now = time.time() if now is None else now
    snap = Snapshot(
        taken_at=datetime.fromtimestamp(now, timezone.utc),
        queues=inspector.queues(),
        workers=inspector.workers(),
        retrying=inspector.retrying(limit=limit),
        dead_letters=inspector.dead_letters(limit=limit),
        limit=limit,
    )
    if kv is not None:
        snap.has_kv = True
        snap.timeline = stats.timeline(kv, now=now)
        snap.hosts = _hosts(kv, now)
        snap.totals = stats.totals(kv)
    return snap
