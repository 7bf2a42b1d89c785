"""The retry, timeout and size policy of deliveries."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import httpx

__all__ = ["DeliveryOptions"]


@dataclasses.dataclass(frozen=True)
class DeliveryOptions:
    """Retry, timeout and size policy of deliveries.  Durations are in seconds.

    Attributes:
        max_retries: Retries after the first attempt before the job is dead;
            the default 9 makes 10 attempts in all (DESIGN §3).
        min_backoff: Delay before the first retry; doubled for each further
            retry, with jitter (each delay is drawn from ``[d, 2d)``).
        max_backoff: Cap on one retry delay, ``Retry-After`` included (12 h).
        connect_timeout: TCP + TLS connect timeout.
        read_timeout: Timeout of each read from the socket.
        total_timeout: Deadline for reading the whole response.
        max_response_bytes: At most this many response-body bytes are read
            (1 MiB); the rest is discarded unread.
        unavailable_after_days: A host is marked unavailable after failures
            on this many distinct UTC days with no success in between.
        activity_ttl: How long a stored activity body is kept for its
            deliveries (7 days, the longest delay Dramatiq allows); ``None``
            keeps it forever.
        on_gone: Called as ``on_gone(inbox_url, status)`` after a 404/410,
            once the followers behind the inbox have been dropped.
        clock: Returns the current time as a UNIX timestamp; injectable so
            tests can move between days.
    """

    max_retries: int = 9
    min_backoff: float = 1.0
    max_backoff: float = 12 * 3600.0
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    max_response_bytes: int = 1 << 20
    unavailable_after_days: int = 3
    activity_ttl: float | None = 7 * 86400.0
    on_gone: Callable[[str, int], None] | None = None
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        for name in ("max_retries", "unavailable_after_days", "max_response_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {value!r:.100}")
        if self.max_response_bytes < 0:
            raise ValueError(f"max_response_bytes must be >= 0: {self.max_response_bytes}")
        if self.activity_ttl is not None and not self.activity_ttl > 0:
            raise ValueError(f"activity_ttl must be positive or None: {self.activity_ttl!r}")
        if self.max_retries < 0 or self.unavailable_after_days < 1:
            raise ValueError("max_retries must be >= 0 and unavailable_after_days >= 1")
        if min(self.min_backoff, self.max_backoff) <= 0 or self.min_backoff > self.max_backoff:
            raise ValueError("need 0 < min_backoff <= max_backoff")
        if min(self.connect_timeout, self.read_timeout, self.total_timeout) <= 0:
            raise ValueError("timeouts must be positive")

    def timeout(self) -> httpx.Timeout:
        """The per-operation httpx timeout (writes share the read timeout)."""
        return httpx.Timeout(
            connect=self.connect_timeout,
            read=self.read_timeout,
            write=self.read_timeout,
            pool=self.connect_timeout,
        )
