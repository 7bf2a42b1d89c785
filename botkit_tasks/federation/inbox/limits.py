"""Flood limits of the inbox: rates per remote host and overall, bounded key fetches.

A public inbox is reachable by anyone, and verifying a request may mean
fetching the signer's key from a server the sender picked.  So, before any
body is read or any thread is taken:

- **Per remote host**, a token bucket (``host_rate`` requests per second,
  bursts up to ``host_burst``); the host is the one named by the signature's
  ``keyId``, which is where a key would be fetched from.  Beyond it: ``429``
  with ``Retry-After`` (seconds until a token is back).
- **Overall**, a token bucket (``global_rate``/``global_burst``) and at most
  ``max_concurrent`` requests being read or verified at once, so memory stays
  bounded (each holds at most one 1 MiB body).  Beyond them: ``429``.

While verifying:

- at most ``key_fetches_per_host`` key fetches run at once per host and
  ``max_key_fetches`` overall (further requests wait for a slot, within
  their budget);
- a request waits at most ``key_fetch_budget`` seconds for keys.  When the
  budget runs out (a key server that hangs) the request is answered ``429``
  and the host's key fetches pause for ``key_fetch_cooldown`` seconds (answered
  ``429`` at once); the fetch itself finishes in the background, bounded by
  the fetcher's own timeouts, and its result is cached as usual.

Never a ``5xx``: every limit is a ``429``, which senders retry.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from ..delivery import host_of

__all__ = ["InboxLimits", "KeyFetchGate", "KeyFetchThrottled", "RateLimiter"]

#: Hosts tracked at most by a :class:`RateLimiter`; idle (full) buckets are dropped first.
MAX_TRACKED_HOSTS = 10_000


@dataclass(frozen=True)
class InboxLimits:
    """The flood limits of an inbox (see the module docstring).  Durations in seconds."""

    host_rate: float = 20.0
    host_burst: int = 100
    global_rate: float = 200.0
    global_burst: int = 400
    max_concurrent: int = 32
    key_fetches_per_host: int = 2
    max_key_fetches: int = 16
    key_fetch_budget: float = 5.0
    key_fetch_cooldown: float = 30.0

    def __post_init__(self) -> None:
        for name in ("host_rate", "global_rate", "key_fetch_budget", "key_fetch_cooldown"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"InboxLimits.{name} must be a positive number, not {value!r}")
        for name in (
            "host_burst",
            "global_burst",
            "max_concurrent",
            "key_fetches_per_host",
            "max_key_fetches",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InboxLimits.{name} must be an int >= 1, not {value!r}")


class KeyFetchThrottled(Exception):
    """Internal: the key could not be fetched within the inbox's limits (answered 429).

    Deliberately not a :class:`~botkit_tasks.errors.BotkitError`: the key
    resolver caches those as failed fetches, and a throttled fetch did not fail.
    """

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def retry_after_header(seconds: float) -> tuple[bytes, bytes]:
    """A ``Retry-After`` header of whole seconds, at least 1."""
    return (b"retry-after", str(max(1, math.ceil(seconds))).encode("ascii"))


class RateLimiter:
    """Token buckets per host and overall, plus a cap on requests in progress.  Thread-safe."""

    def __init__(self, limits: InboxLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._lock = threading.Lock()
        self._hosts: dict[str, tuple[float, float]] = {}  # host -> (tokens, at)
        self._global = (float(limits.global_burst), clock())
        self.in_progress = 0
        #: The most requests ever in progress at once (for tests and metrics).
        self.peak_in_progress = 0

    @staticmethod
    def _refill(bucket: tuple[float, float], rate: float, burst: int, now: float) -> float:
        tokens, at = bucket
        return min(float(burst), tokens + (now - at) * rate)

    def admit(self, host: str) -> float | None:
        """Take a token for a request from ``host``; ``None`` if admitted, else seconds to wait.

        An admitted request must be followed by :meth:`done`.
        """
        limits = self.limits
        with self._lock:
            now = self.clock()
            tokens = self._refill(
                self._hosts.get(host, (limits.host_burst, now)),
                limits.host_rate,
                limits.host_burst,
                now,
            )
            if tokens < 1:
                # Rejected by its own host's limit: the global budget is not spent.
                self._hosts[host] = (tokens, now)
                return (1 - tokens) / limits.host_rate
            overall = self._refill(self._global, limits.global_rate, limits.global_burst, now)
            if overall < 1:
                self._global = (overall, now)
                return (1 - overall) / limits.global_rate
            if self.in_progress >= limits.max_concurrent:
                return 1.0
            self._global = (overall - 1, now)
            self._remember(host, tokens - 1, now)
            self.in_progress += 1
            self.peak_in_progress = max(self.peak_in_progress, self.in_progress)
            return None

    def done(self) -> None:
        """A request admitted by :meth:`admit` has been answered."""
        with self._lock:
            self.in_progress -= 1

    def _remember(self, host: str, tokens: float, now: float) -> None:
        if host not in self._hosts and len(self._hosts) >= MAX_TRACKED_HOSTS:
            limits = self.limits
            full = [
                h
                for h, bucket in self._hosts.items()
                if self._refill(bucket, limits.host_rate, limits.host_burst, now)
                >= limits.host_burst
            ]
            for h in full:
                del self._hosts[h]
            if len(self._hosts) >= MAX_TRACKED_HOSTS:
                return  # every tracked host is busy: this one is held by the global limit
        self._hosts[host] = (tokens, now)


_deadline = threading.local()


class KeyFetchGate:
    """Wraps a fetcher (``get_json(url)``): bounded concurrent fetches and a per-request budget.

    The budget applies inside :meth:`budget` blocks (the inbox opens one per
    request); elsewhere fetches pass through unchanged.
    """

    def __init__(self, fetcher: Any, limits: InboxLimits) -> None:
        self.fetcher = fetcher
        self.limits = limits
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._running: dict[str, int] = {}
        self._cooldown: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=limits.max_key_fetches, thread_name_prefix="botkit-key-fetch"
        )
        self._total = threading.BoundedSemaphore(limits.max_key_fetches)

    def budget(self) -> _Budget:
        """A context in which key fetches of this thread share one time budget."""
        return _Budget(self.limits.key_fetch_budget)

    def get_json(self, url: str) -> dict[str, Any]:
        deadline: float | None = getattr(_deadline, "value", None)
        if deadline is None:
            result: dict[str, Any] = self.fetcher.get_json(url)
            return result
        host = host_of(url)
        now = time.monotonic()
        with self._lock:
            paused_until = self._cooldown.get(host, 0.0)
            if paused_until > now:
                raise KeyFetchThrottled(f"key fetches from {host} are paused", paused_until - now)
            self._cooldown.pop(host, None)
            # Many actors of one instance may post at once: wait for a slot
            # (within the budget) rather than refuse them all.
            while self._running.get(host, 0) >= self.limits.key_fetches_per_host:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KeyFetchThrottled(f"too many key fetches from {host} at once", 1.0)
                self._freed.wait(remaining)
            self._running[host] = self._running.get(host, 0) + 1
        try:
            if not self._total.acquire(timeout=max(deadline - now, 0.0)):
                raise KeyFetchThrottled("too many key fetches at once", 1.0)
        except BaseException:
            self._release(host)
            raise
        future = self._pool.submit(self._fetch, url, host)
        try:
            return future.result(timeout=max(deadline - time.monotonic(), 0.0))
        except FutureTimeout:
            with self._lock:
                self._cooldown[host] = time.monotonic() + self.limits.key_fetch_cooldown
            raise KeyFetchThrottled(
                f"the key server of {host} did not answer in time",
                self.limits.key_fetch_cooldown,
            ) from None

    def _fetch(self, url: str, host: str) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self.fetcher.get_json(url)
            return result
        finally:
            self._total.release()
            self._release(host)

    def _release(self, host: str) -> None:
        with self._lock:
            left = self._running.get(host, 1) - 1
            if left > 0:
                self._running[host] = left
            else:
                self._running.pop(host, None)
            self._freed.notify_all()

    def close(self) -> None:
        """Stop the fetch threads (fetches under way finish first); idempotent."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        _deadline.value = time.monotonic() + self.seconds

    def __exit__(self, *exc: object) -> None:
        _deadline.value = None
