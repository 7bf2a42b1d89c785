"""Signed delivery of one activity to one inbox, as the Dramatiq actor ``botkit_deliver``.

One job per (activity, inbox) on the queue ``botkit.outbox``.  A job loads the
activity body (stored once by the fan-out under ``("botkit", username,
"activities", id)``, or passed inline for small direct sends such as an
``Accept``), refuses unsafe destinations (after DNS resolution), signs the
request *at send time* and POSTs it with httpx.  The answer is classified as
in DESIGN §3 (Mastodon's rules, with Fedify's gone hook):

==========================================  ==============================================
response                                    outcome
==========================================  ==============================================
2xx                                         ``DELIVERED``; the host's failure days cleared
404, 410                                    ``GONE``: no retry; followers behind the inbox
                                            dropped, ``DeliveryOptions.on_gone`` called
other 4xx except 401/408/429                ``PERMANENT``: no retry (dead-lettered)
unsafe destination (SSRF), bad message      ``PERMANENT``
401                                         double knock: resend at once with the other
                                            signature scheme; a 2xx remembers that scheme
                                            for the origin; otherwise ``RETRY`` (a 4xx to
                                            the unfamiliar scheme does not make it final)
408, 429, 5xx, timeouts, network errors     ``RETRY`` with exponential backoff and jitter,
                                            ``Retry-After`` honoured; a failure day
                                            recorded for the host
3xx                                         ``RETRY`` (see below)
==========================================  ==============================================

Redirects are never followed: following one would send a signed POST to a
URL nobody vetted.  Mastodon follows up to three hops and retries whatever it
ends on that is neither 2xx nor a 4xx, so a final 3xx is retried there; we
do the same (``RETRY``), which also records failure days so that a host that
keeps redirecting its inbox ends up marked unavailable.

Unlike Mastodon, a 501 is retried like every other 5xx, as DESIGN §3 says.

Timeouts: httpx enforces the connect timeout and a per-read/write timeout;
the total deadline is checked while the response body is read (reading stops
there, and the status already received decides).  A server trickling its
*headers* is bounded by the per-read timeout per chunk and, in the worker, by
the actor's Dramatiq ``time_limit``.

Retries use Dramatiq's own machinery: the actor's ``max_retries``,
``min_backoff`` and ``max_backoff`` options (``compute_backoff`` doubles the
delay per retry with jitter ``U(1, 2)``), ``dramatiq.Retry(delay=ms)`` for a
``Retry-After`` delay, and ``throws=(PermanentDeliveryError,)`` so permanent
failures are never retried.  ``max_retries`` counts retries after the first
attempt, as everywhere in Dramatiq.

Per-host failure tracking (``("botkit", "hosts", host)``) records the
distinct UTC days on which a delivery to the host failed in a retryable way;
after ``unavailable_after_days`` distinct days the host is unavailable and
the fan-out skips it, until a delivery to it succeeds (or
:func:`reset_host` is called, e.g. when the host sends us a signed request).
"""

from __future__ import annotations

from botkit_tasks.federation.base import FederationLike as FederationLike  # not in __all__

from .actor import (
    DELIVER_ACTOR_NAME,
    OUTBOX_QUEUE,
    activity_key,
    declare_delivery_actors,
    perform_delivery,
)
from .attempt import ACTIVITY_CONTENT_TYPE, DEFAULT_USER_AGENT, deliver_once
from .hosts import host_of, is_host_available, record_host_failure, record_host_success, reset_host
from .options import DeliveryOptions
from .outcome import DeliveryResult, Outcome, PermanentDeliveryError
from .outcome import parse_retry_after as parse_retry_after  # not in __all__

__all__ = [
    "ACTIVITY_CONTENT_TYPE",
    "DEFAULT_USER_AGENT",
    "DELIVER_ACTOR_NAME",
    "OUTBOX_QUEUE",
    "DeliveryOptions",
    "DeliveryResult",
    "Outcome",
    "PermanentDeliveryError",
    "activity_key",
    "declare_delivery_actors",
    "deliver_once",
    "host_of",
    "is_host_available",
    "perform_delivery",
    "record_host_failure",
    "record_host_success",
    "reset_host",
]
