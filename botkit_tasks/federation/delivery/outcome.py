"""How a delivery attempt ended: which statuses are done, gone, permanent or retried.

The table is in :mod:`botkit_tasks.federation.delivery`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import enum
import time

from botkit_tasks.federation import signatures
from botkit_tasks.runners.spec import PermanentJobError

from .options import DeliveryOptions

__all__ = [
    "DeliveryResult",
    "Outcome",
    "PermanentDeliveryError",
    "classify",
    "parse_retry_after",
]

#: Dramatiq refuses delays beyond 7 days (``Retries`` caps ``max_backoff`` there).
_DRAMATIQ_MAX_DELAY = 7 * 86400.0


class Outcome(enum.Enum):
    """How a delivery attempt ended."""

    DELIVERED = "delivered"
    RETRY = "retry"
    PERMANENT = "permanent"
    GONE = "gone"


@dataclasses.dataclass(frozen=True)
class DeliveryResult:
    """The classified result of one delivery attempt (double knock included).

    Attributes:
        outcome: See :class:`Outcome`.
        status: The final HTTP status, ``None`` when no response came.
        retry_after: For ``RETRY``: the server's ``Retry-After`` in seconds
            (capped at ``max_backoff``), or ``None`` to use the backoff.
        reason: A short human-readable explanation.
        scheme: The signature scheme of the last request sent, if any.
        body_bytes: How many response-body bytes were read (capped).
    """

    outcome: Outcome
    status: int | None = None
    retry_after: float | None = None
    reason: str = ""
    scheme: signatures.Scheme | None = None
    body_bytes: int = 0


class PermanentDeliveryError(PermanentJobError):
    """A delivery that must not be retried: dead-lettered at once, on either runner."""


def classify(
    status: int,
    retry_after_header: str | None,
    opts: DeliveryOptions,
    scheme: signatures.Scheme,
    read: int,
) -> DeliveryResult:
    """Classify a response status (see the table in :mod:`botkit_tasks.federation.delivery`)."""
    if 200 <= status < 300:
        return DeliveryResult(Outcome.DELIVERED, status, scheme=scheme, body_bytes=read)
    if status in (404, 410):
        return DeliveryResult(
            Outcome.GONE, status, reason=f"HTTP {status}", scheme=scheme, body_bytes=read
        )
    if 400 <= status < 500 and status not in (401, 408, 429):
        return DeliveryResult(
            Outcome.PERMANENT, status, reason=f"HTTP {status}", scheme=scheme, body_bytes=read
        )
    retry_after = parse_retry_after(retry_after_header, now=opts.clock())
    if retry_after is not None:
        retry_after = min(retry_after, opts.max_backoff, _DRAMATIQ_MAX_DELAY)
    kind = "redirect (not followed)" if 300 <= status < 400 else f"HTTP {status}"
    return DeliveryResult(
        Outcome.RETRY, status, retry_after, reason=kind, scheme=scheme, body_bytes=read
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header (delta seconds or an HTTP date) into seconds.

    Returns ``None`` when absent or unparseable; past dates give ``0.0``.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)
