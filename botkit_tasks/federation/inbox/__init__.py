"""The inbox: an ASGI endpoint that verifies and enqueues, and the job that dispatches.

The HTTP side does only what must happen before answering (Mastodon's order):
read the raw body under a size cap, parse it, verify the HTTP signature with the
sender's (cached) key, check that the key belongs to ``activity.actor``,
de-duplicate by activity id for 24 hours, enqueue one ``botkit_inbox`` job and
answer ``202 Accepted``.  Everything slow or fallible that the sender cannot fix
(fetching the actor document, running the bot's handlers) happens in the job,
on a worker, with retries.

Status codes: 202 accepted (also for duplicates and for a self-``Delete`` of an
actor we do not know, which is ignored without fetching anything); 400 a body
that is not a JSON object or an activity without a usable actor; 401 a missing
or bad signature, a digest mismatch, or a key whose owner is not the actor;
404 another path; 405 another method; 413 a body over 1 MiB; 429 with
``Retry-After`` beyond the flood limits (:mod:`.limits`: per sending host,
overall, and for key fetches from slow key servers); 503 when the
key-value store or the broker fails (the sender retries).  Hostile input never
produces a 5xx.
"""

from __future__ import annotations

from ..base import InboxContext
from .app import SEEN_TTL, InboxApp
from .asgi import MAX_BODY_BYTES
from .asgi import Receive as Receive  # the names below are not in __all__, as before
from .asgi import Scope as Scope
from .asgi import Send as Send
from .job import (
    ACTOR_CACHE_TTL,
    INBOX_ACTOR_NAME,
    INBOX_QUEUE,
    declare_inbox_actor,
    load_actor,
    process_inbox_job,
)
from .job import INBOX_MAX_BACKOFF_MS as INBOX_MAX_BACKOFF_MS
from .job import INBOX_MAX_RETRIES as INBOX_MAX_RETRIES
from .job import INBOX_MIN_BACKOFF_MS as INBOX_MIN_BACKOFF_MS
from .limits import InboxLimits

__all__ = [
    "ACTOR_CACHE_TTL",
    "INBOX_ACTOR_NAME",
    "INBOX_QUEUE",
    "MAX_BODY_BYTES",
    "SEEN_TTL",
    "InboxApp",
    "InboxContext",
    "InboxLimits",
    "declare_inbox_actor",
    "load_actor",
    "process_inbox_job",
]
