"""Delivery outcomes over the last hour, per minute and per host, kept in the KV store.

The delivery actor calls :func:`record` once per attempt, after the answer is
classified.  Counts are kept where the bot already keeps its state, so every
worker process adds to the same history, and a restart of the dashboard (or of
every process) loses nothing:

=========================================================  ====================================
key                                                        value
=========================================================  ====================================
``("botkit", "delivery-stats", "minute", M)``              ``{outcome: count}`` of UTC minute
                                                           ``M`` (minutes since the epoch);
                                                           expires an hour after that minute
``("botkit", "delivery-stats", "host", host)``             ``{M: {outcome: count}}``, the
                                                           host's minutes of the last hour;
                                                           expires an hour after its last write
``("botkit", "delivery-stats", "total")``                  ``{outcome: count}`` since the store
                                                           was created (never expires)
=========================================================  ====================================

Outcomes are :data:`OUTCOMES`, the values of
:class:`botkit_tasks.federation.delivery.Outcome`.

Writing one KV entry per attempt would make the minute entry a hot spot that
every worker thread fights over (``cas`` retries).  So a process adds its
counts up in memory and writes them at most every ``flush_interval`` seconds
(and at exit), one compare-and-swap per touched entry, which merges with what
other processes wrote meanwhile.  A recording failure is logged, never raised:
statistics must not turn a settled delivery into a retry.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from botkit_tasks.kv.base import JsonValue, KvKey, KvStore

__all__ = [
    "OUTCOMES",
    "WINDOW_MINUTES",
    "DeliveryStats",
    "HostCounts",
    "HostRecord",
    "MinuteCounts",
    "host_counts",
    "host_records",
    "record",
    "recorder_for",
    "timeline",
    "totals",
]

logger = logging.getLogger(__name__)

#: The outcome classes counted, as :class:`~botkit_tasks.federation.delivery.Outcome` values.
OUTCOMES = ("delivered", "retry", "permanent", "gone")
#: Minutes of history kept.
WINDOW_MINUTES = 60

_PREFIX: KvKey = ("botkit", "delivery-stats")
_MINUTE = (*_PREFIX, "minute")
_HOST = (*_PREFIX, "host")
_TOTAL = (*_PREFIX, "total")
#: Where delivery's per-host failure tracking keeps its records (see
#: :func:`botkit_tasks.federation.delivery.record_host_failure`).
_HOSTS_TRACKED: KvKey = ("botkit", "hosts")
_CAS_ATTEMPTS = 20


@dataclass(frozen=True)
class MinuteCounts:
    """Deliveries that ended in one UTC minute.

    Attributes:
        minute: Minutes since the epoch (UTC); the minute starts at ``minute * 60``.
        counts: Attempts per outcome class (every class of :data:`OUTCOMES` present).
    """

    minute: int
    counts: dict[str, int]

    @property
    def failed(self) -> int:
        """Attempts that did not deliver (retried, permanent or gone)."""
        return sum(n for outcome, n in self.counts.items() if outcome != "delivered")


@dataclass(frozen=True)
class HostCounts:
    """One remote host's delivery attempts over the last hour.

    Attributes:
        host: Lower-case host, with its port when the inbox URL had one.
        counts: Attempts per outcome class (every class of :data:`OUTCOMES` present).
        last_minute: The latest minute with an attempt.
    """

    host: str
    counts: dict[str, int]
    last_minute: int

    @property
    def total(self) -> int:
        """All attempts of the hour."""
        return sum(self.counts.values())


@dataclass(frozen=True)
class HostRecord:
    """A host's failure tracking, as delivery keeps it.

    Attributes:
        host: The host.
        failure_days: Distinct UTC days (``YYYY-MM-DD``) with a retryable failure.
        unavailable: Whether fan-outs skip it.
    """

    host: str
    failure_days: list[str] = field(default_factory=list)
    unavailable: bool = False


def _minute_of(now: float) -> int:
    return int(now // 60)


def _add(current: JsonValue | None, counts: Counter[str]) -> dict[str, JsonValue]:
    merged: dict[str, JsonValue] = dict(current) if isinstance(current, dict) else {}
    for outcome, n in counts.items():
        old = merged.get(outcome)
        merged[outcome] = (old if isinstance(old, int) else 0) + n
    return merged


def _adder(counts: Counter[str]) -> Callable[[JsonValue | None], JsonValue]:
    return lambda current: _add(current, counts)


def _host_adder(
    by_minute: dict[int, Counter[str]], oldest: int
) -> Callable[[JsonValue | None], JsonValue]:
    """Add a host's per-minute counts, dropping minutes that left the window."""

    def update(current: JsonValue | None) -> JsonValue:
        old = current if isinstance(current, dict) else {}
        new: dict[str, JsonValue] = {
            m: v for m, v in old.items() if m.isdigit() and int(m) > oldest
        }
        for minute, counts in by_minute.items():
            if minute > oldest:
                new[str(minute)] = _add(new.get(str(minute)), counts)
        return new

    return update


def _merge(
    kv: KvStore,
    key: KvKey,
    update: Callable[[JsonValue | None], JsonValue],
    ttl: float | None,
) -> None:
    """Apply ``update`` to the entry at ``key`` atomically (compare-and-swap until it sticks)."""
    for _ in range(_CAS_ATTEMPTS):
        current = kv.get(key)
        if kv.cas(key, current, update(current), ttl=ttl):
            return
    raise RuntimeError(f"too much contention on {key!r}")


class DeliveryStats:
    """Counts delivery outcomes in memory and adds them to the KV store in batches.

    Use :func:`record` (one recorder per store) rather than building one.

    Parameters:
        kv: Where the counts go.
        flush_interval: Seconds between writes; ``0`` writes on every record.
        clock: Seconds since the epoch (tests pass a fake).
    """

    def __init__(
        self,
        kv: KvStore,
        *,
        flush_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if flush_interval < 0:
            raise ValueError(f"flush_interval must be >= 0, not {flush_interval!r}")
        self.kv = kv
        self.flush_interval = flush_interval
        self.clock = clock
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._minutes: dict[int, Counter[str]] = {}
        self._hosts: dict[str, dict[int, Counter[str]]] = {}
        self._timer: threading.Timer | None = None

    def record(self, host: str, outcome: str) -> None:
        """Count one attempt to ``host`` that ended in ``outcome`` (one of :data:`OUTCOMES`)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown delivery outcome {outcome!r}; expected one of {OUTCOMES}")
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string, not {host!r}")
        minute = _minute_of(self.clock())
        with self._lock:
            self._minutes.setdefault(minute, Counter())[outcome] += 1
            self._hosts.setdefault(host, {}).setdefault(minute, Counter())[outcome] += 1
            if self.flush_interval and self._timer is None:
                self._timer = threading.Timer(self.flush_interval, self._timed_flush)
                self._timer.daemon = True
                self._timer.start()
        if not self.flush_interval:
            self._timed_flush()

    def pending(self) -> int:
        """Attempts counted in memory and not yet written."""
        with self._lock:
            return sum(sum(c.values()) for c in self._minutes.values())

    def _timed_flush(self) -> None:
        try:
            self.flush()
        except Exception:
            logger.exception("Could not write delivery statistics; these counts are lost")

    def flush(self) -> None:
        """Write the counts gathered so far (merging with other processes' counts)."""
        with self._flush_lock:
            with self._lock:
                minutes, self._minutes = self._minutes, {}
                hosts, self._hosts = self._hosts, {}
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            if not minutes:
                return
            now = self.clock()
            oldest = _minute_of(now) - WINDOW_MINUTES
            for minute, counts in sorted(minutes.items()):
                expires = (minute + 1 + WINDOW_MINUTES) * 60 - now
                if expires > 0:
                    _merge(self.kv, (*_MINUTE, str(minute)), _adder(counts), expires)
            for host, by_minute in sorted(hosts.items()):
                update = _host_adder(by_minute, oldest)
                _merge(self.kv, (*_HOST, host), update, WINDOW_MINUTES * 60.0 + 60.0)
            total: Counter[str] = Counter()
            for counts in minutes.values():
                total.update(counts)
            _merge(self.kv, _TOTAL, _adder(total), None)

    def close(self) -> None:
        """Write what is pending and stop the timer."""
        self._timed_flush()


_recorders: weakref.WeakKeyDictionary[KvStore, DeliveryStats] = weakref.WeakKeyDictionary()
_recorders_lock = threading.Lock()


def _forget_after_fork() -> None:
    # A forked worker (the ``dramatiq`` command forks) inherits recorders whose
    # timer threads did not survive the fork: start afresh, the parent writes its own.
    global _recorders_lock
    _recorders.clear()
    _recorders_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def recorder_for(kv: KvStore) -> DeliveryStats:
    """The process's recorder for ``kv`` (created on first use, flushed at exit)."""
    with _recorders_lock:
        recorder = _recorders.get(kv)
        if recorder is None:
            recorder = _recorders[kv] = DeliveryStats(kv)
            atexit.register(_flush_at_exit, weakref.ref(recorder))
        return recorder


def _flush_at_exit(ref: weakref.ref[DeliveryStats]) -> None:
    recorder = ref()
    if recorder is not None:
        recorder.close()


def record(kv: KvStore, host: str, outcome: str) -> None:
    """Count one delivery attempt to ``host`` ending in ``outcome``; never raises for KV trouble.

    ``outcome`` is an :class:`~botkit_tasks.federation.delivery.Outcome` value
    (``"delivered"``, ``"retry"``, ``"permanent"`` or ``"gone"``).
    """
    recorder_for(kv).record(host, outcome)


def _counts(value: JsonValue | None) -> dict[str, int]:
    raw = value if isinstance(value, dict) else {}
    return {o: v if isinstance(v := raw.get(o), int) else 0 for o in OUTCOMES}


def timeline(
    kv: KvStore, *, minutes: int = WINDOW_MINUTES, now: float | None = None
) -> list[MinuteCounts]:
    """The last ``minutes`` minutes, oldest first, the current minute last (zeros included)."""
    if not 1 <= minutes <= WINDOW_MINUTES:
        raise ValueError(f"minutes must be between 1 and {WINDOW_MINUTES}, not {minutes!r}")
    current = _minute_of(time.time() if now is None else now)
    stored = {key[-1]: value for key, value in kv.list(_MINUTE) if len(key) == len(_MINUTE) + 1}
    return [
        MinuteCounts(m, _counts(stored.get(str(m))))
        for m in range(current - minutes + 1, current + 1)
    ]


def host_counts(kv: KvStore, *, now: float | None = None) -> list[HostCounts]:
    """Hosts with attempts in the last hour, most attempts first (then by name)."""
    oldest = _minute_of(time.time() if now is None else now) - WINDOW_MINUTES
    found: list[HostCounts] = []
    for key, value in kv.list(_HOST):
        if len(key) != len(_HOST) + 1 or not isinstance(value, dict):
            continue
        sums: Counter[str] = Counter()
        last = -1
        for minute, counts in value.items():
            if minute.isdigit() and int(minute) > oldest:
                sums.update(_counts(counts))
                last = max(last, int(minute))
        if last >= 0:
            found.append(HostCounts(key[-1], {o: sums[o] for o in OUTCOMES}, last))
    found.sort(key=lambda h: (-h.total, h.host))
    return found


def totals(kv: KvStore) -> dict[str, int]:
    """Attempts per outcome class since the statistics began (what counters export)."""
    return _counts(kv.get(_TOTAL))


def host_records(kv: KvStore) -> list[HostRecord]:
    """Every host with a failure record (the unavailable ones among them), by name."""
    records = []
    for key, value in kv.list(_HOSTS_TRACKED):
        if len(key) != len(_HOSTS_TRACKED) + 1 or not isinstance(value, dict):
            continue
        days = value.get("days")
        records.append(
            HostRecord(
                key[-1],
                [d for d in days if isinstance(d, str)] if isinstance(days, list) else [],
                bool(value.get("unavailable")),
            )
        )
    return records
