"""Dramatiq results and rate limiting on any botkit key-value store.

Dramatiq ships a results backend and a rate-limiter backend for Redis and
Memcached.  These two classes give the same features on any
:class:`~botkit_tasks.kv.KvStore`, so a deployment that has only PostgreSQL or
only an SQLite file can still use ``Results``, ``ConcurrentRateLimiter``,
``WindowRateLimiter``, ``BucketRateLimiter``, ``Barrier`` and
``GroupCallbacks``::

    from dramatiq.results import Results
    from botkit_tasks.kv import SqlKvStore
    from botkit_tasks.results import KvRateLimiterBackend, KvResultBackend

    kv = SqlKvStore("sqlite:///bot.sqlite3")
    broker.add_middleware(Results(backend=KvResultBackend(kv)))
    limiter_backend = KvRateLimiterBackend(kv)

Both need only ``get``/``set``/``cas``/``delete`` with TTLs.  Every
read-modify-write is a compare-and-swap loop, so counters stay exact when many
threads and processes update them at once.  Waiting (blocking ``get_result``,
``Barrier.wait``) is done by polling the store with a short backoff; waiters in
the same process are also woken at once through a condition variable.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from dramatiq.encoder import Encoder
from dramatiq.rate_limits import RateLimiterBackend
from dramatiq.results import ResultBackend
from dramatiq.results.backend import Missing

from .kv.base import JsonValue, KvKey, KvStore

__all__ = ["DEFAULT_KEY_PREFIX", "KvRateLimiterBackend", "KvResultBackend"]

#: Key prefix under which both backends store their entries.
DEFAULT_KEY_PREFIX: KvKey = ("dramatiq",)

#: Shortest and longest pause, in seconds, between two polls of a waiting call.
MIN_POLL_INTERVAL = 0.005
MAX_POLL_INTERVAL = 0.1


def _ttl_seconds(ttl_ms: int | float | None) -> float | None:
    # Dramatiq speaks milliseconds; the KvStore contract speaks seconds.
    if ttl_ms is None:
        return None
    return max(float(ttl_ms), 0.0) / 1000.0


def _key_prefix(key_prefix: Iterable[str]) -> KvKey:
    # A bare string is iterable too: "myapp" would become ("m", "y", "a", "p", "p").
    if isinstance(key_prefix, (str, bytes)) or not isinstance(key_prefix, Iterable):
        raise TypeError(f"key_prefix must be a tuple of strings, not {key_prefix!r:.100}")
    parts = tuple(key_prefix)
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(
                f"key_prefix parts must be strings, not {part!r:.100} in {parts!r:.100}"
            )
    return parts


class _Waiters:
    """Wakes same-process waiters at once; other processes are reached by polling."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def poll(self, check: Callable[[], bool], timeout: float | None) -> bool:
        """Call ``check`` until it is true or ``timeout`` seconds pass (``None``: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = MIN_POLL_INTERVAL
        while True:
            with self._cond:
                generation = self._generation
            if check():
                return True
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                pause = min(pause, remaining)
            with self._cond:
                if self._generation == generation:
                    self._cond.wait(pause)
            pause = min(pause * 2, MAX_POLL_INTERVAL)


class KvResultBackend(ResultBackend):
    """A Dramatiq result backend that keeps results in a :class:`KvStore`.

    Results are stored under ``key_prefix + (namespace, message_key)`` as the
    base64 text of the encoder's bytes, so any Dramatiq encoder works (pickle
    included), and they expire after the ``result_ttl`` the ``Results``
    middleware passes (milliseconds).

    Args:
        kv: The store; it is not closed by this backend.
        namespace: Dramatiq's logical namespace, part of every result key.
        encoder: The encoder for result data; Dramatiq's global encoder by default.
        use_namespace_prefix_keys: Readable keys instead of MD5 digests, as in
            Dramatiq's own backends.
        key_prefix: Leading key parts of every entry.
    """

    def __init__(
        self,
        kv: KvStore,
        *,
        namespace: str = "dramatiq-results",
        encoder: Encoder | None = None,
        use_namespace_prefix_keys: bool = False,
        key_prefix: Iterable[str] = DEFAULT_KEY_PREFIX,
    ) -> None:
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a string, not {namespace!r:.100}")
        key_prefix = _key_prefix(key_prefix)
        super().__init__(
            namespace=namespace,
            encoder=encoder,
            use_namespace_prefix_keys=use_namespace_prefix_keys,
        )
        self.kv = kv
        self.key_prefix: KvKey = (*tuple(key_prefix), "results")
        self._waiters = _Waiters()

    def _key(self, message_key: str) -> KvKey:
        return (*self.key_prefix, self.namespace, message_key)

    def get_result(self, message: Any, *, block: bool = False, timeout: int | None = None) -> Any:
        """Return the result of ``message``, waiting up to ``timeout`` ms when ``block``.

        Raises:
            dramatiq.results.ResultMissing: ``block`` is false and there is no result yet.
            dramatiq.results.ResultTimeout: no result arrived within ``timeout``
                (default 10,000 ms).
        """
        if not block:
            return super().get_result(message, block=False)
        from dramatiq.results import ResultTimeout
        from dramatiq.results.backend import DEFAULT_TIMEOUT

        key = self.build_message_key(message)
        found: list[Any] = []

        def check() -> bool:
            value = self._get(key)
            if value is Missing:
                return False
            found.append(value)
            return True

        wait_ms = DEFAULT_TIMEOUT if timeout is None else timeout
        if not self._waiters.poll(check, wait_ms / 1000):
            raise ResultTimeout(message)  # type: ignore[no-untyped-call]
        return self.unwrap_result(found[0])  # type: ignore[no-untyped-call]

    def _get(self, message_key: str) -> Any:
        stored = self.kv.get(self._key(message_key))
        if not isinstance(stored, str):
            return Missing
        return self.encoder.decode(base64.b64decode(stored))

    def _store(self, message_key: str, result: Any, ttl: int) -> None:
        data = base64.b64encode(self.encoder.encode(result)).decode("ascii")
        self.kv.set(self._key(message_key), data, ttl=_ttl_seconds(ttl))
        self._waiters.notify()


class KvRateLimiterBackend(RateLimiterBackend):
    """A Dramatiq rate-limiter backend on a :class:`KvStore`.

    Counters are integers under ``key_prefix + ("rate-limits", key)``; every
    update is a ``cas`` loop, so concurrent ``incr``/``decr`` never lose an
    update and never overshoot ``maximum``.  TTLs are milliseconds, as in
    Dramatiq, and each successful update restarts the key's clock (as
    Dramatiq's Redis backend does).

    ``incr_and_sum`` (used by ``WindowRateLimiter``) swaps only the current
    window's key; the older windows it sums are read just before the swap.
    Those keys are no longer written once their second has passed, so the sum
    is exact except for a writer still finishing in the previous second.

    Args:
        kv: The store; it is not closed by this backend.
        key_prefix: Leading key parts of every entry.
    """

    def __init__(self, kv: KvStore, *, key_prefix: Iterable[str] = DEFAULT_KEY_PREFIX) -> None:
        self.kv = kv
        self.key_prefix: KvKey = (*_key_prefix(key_prefix), "rate-limits")
        self._waiters = _Waiters()

    def _key(self, key: str) -> KvKey:
        return (*self.key_prefix, key)

    def _read_int(self, key: str) -> int:
        value = self.kv.get(self._key(key))
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    def add(self, key: str, value: int, ttl: int) -> bool:
        """Create ``key`` with ``value`` unless it exists; return whether it was created."""
        return self.kv.cas(self._key(key), None, value, ttl=_ttl_seconds(ttl))

    def _update(self, key: str, delta: int, accept: Callable[[int], bool], ttl: int) -> bool:
        kv_key = self._key(key)
        while True:
            current: JsonValue | None = self.kv.get(kv_key)
            base = current if isinstance(current, int) and not isinstance(current, bool) else 0
            new = base + delta
            if not accept(new):
                return False
            if self.kv.cas(kv_key, current, new, ttl=_ttl_seconds(ttl)):
                return True

    def incr(self, key: str, amount: int, maximum: int, ttl: int) -> bool:
        """Add ``amount`` unless the result would exceed ``maximum``; return whether it did."""
        return self._update(key, amount, lambda value: value <= maximum, ttl)

    def decr(self, key: str, amount: int, minimum: int, ttl: int) -> bool:
        """Subtract ``amount`` unless the result would go below ``minimum``."""
        return self._update(key, -amount, lambda value: value >= minimum, ttl)

    def incr_and_sum(
        self,
        key: str,
        keys: Callable[[], Iterable[str]],
        amount: int,
        maximum: int,
        ttl: int,
    ) -> bool:
        """Add ``amount`` to ``key`` unless the sum over ``keys()`` would exceed ``maximum``."""
        self.add(key, 0, ttl)
        kv_key = self._key(key)
        while True:
            current = self.kv.get(kv_key)
            base = current if isinstance(current, int) and not isinstance(current, bool) else 0
            new = base + amount
            if new > maximum:
                return False
            others = sum(self._read_int(k) for k in keys() if k != key)
            if new + others > maximum:
                return False
            if self.kv.cas(kv_key, current, new, ttl=_ttl_seconds(ttl)):
                return True

    def wait(self, key: str, timeout: int | None) -> bool:
        """Wait up to ``timeout`` ms (``None``: forever) for :meth:`wait_notify` on ``key``.

        As with Dramatiq's Redis backend, a notification stays visible until its
        TTL runs out, so a waiter that arrives late returns ``True`` at once.
        """
        kv_key = (*self._key(key), "notified")
        return self._waiters.poll(
            lambda: self.kv.get(kv_key) is not None,
            None if timeout is None else timeout / 1000,
        )

    def wait_notify(self, key: str, ttl: int) -> None:
        """Wake every party waiting on ``key``; the notice lasts ``ttl`` ms."""
        self.kv.set((*self._key(key), "notified"), 1, ttl=_ttl_seconds(ttl))
        self._waiters.notify()
