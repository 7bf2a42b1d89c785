"""Per-host failure tracking: the UTC days a host failed, and its unavailable mark.

A host is marked unavailable after failures on ``unavailable_after_days``
distinct days with no success in between; the fan-out then skips it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from urllib.parse import urlsplit

from botkit_tasks.kv.base import JsonValue, KvKey, KvStore

__all__ = [
    "host_of",
    "is_host_available",
    "record_host_failure",
    "record_host_success",
    "reset_host",
]

# One logger for the whole package, under the name it has always had.
logger = logging.getLogger("botkit_tasks.federation.delivery")

_MAX_CAS_ATTEMPTS = 50
#: Failure days kept per host; more than any sensible ``unavailable_after_days``.
_MAX_FAILURE_DAYS = 31


def host_of(url: str) -> str:
    """The host an inbox URL belongs to, lower case, with its port when explicit."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return f"{host}:{parts.port}" if parts.port is not None else host


def _host_key(host: str) -> KvKey:
    return ("botkit", "hosts", host)


def _day(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y-%m-%d")


def record_host_failure(
    kv: KvStore, host: str, *, now: float | None = None, unavailable_after_days: int = 3
) -> bool:
    """Record a retryable delivery failure to ``host`` today; return whether it is unavailable.

    Only the distinct UTC day is stored, so the KV is written at most once per
    host and day however many deliveries fail.
    """
    today = _day(time.time() if now is None else now)
    key = _host_key(host)
    for _ in range(_MAX_CAS_ATTEMPTS):
        current = kv.get(key)
        record = current if isinstance(current, dict) else {}
        raw_days = record.get("days")
        days = [d for d in raw_days if isinstance(d, str)] if isinstance(raw_days, list) else []
        if today in days:
            return bool(record.get("unavailable"))
        days = sorted([*days, today])[-_MAX_FAILURE_DAYS:]
        unavailable = len(days) >= unavailable_after_days
        new: dict[str, JsonValue] = {"days": list(days), "unavailable": unavailable}
        if kv.cas(key, current, new):
            if unavailable and not record.get("unavailable"):
                logger.warning("Host %s marked unavailable after failures on %s", host, days)
            return unavailable
    raise RuntimeError(f"could not record a failure for {host!r}: too much contention")


def record_host_success(kv: KvStore, host: str) -> None:
    """Clear the failure record of ``host`` after a successful delivery."""
    key = _host_key(host)
    # Read first: a success is the common case and usually has nothing to clear.
    if kv.get(key) is not None:
        kv.delete(key)


#: Clearing the record on a verified inbound request re-enables delivery (Mastodon does so).
reset_host = record_host_success


def is_host_available(kv: KvStore, host: str) -> bool:
    """Whether deliveries to ``host`` should be attempted (not marked unavailable)."""
    record = kv.get(_host_key(host))
    return not (isinstance(record, dict) and record.get("unavailable"))
