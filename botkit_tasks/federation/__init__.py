"""ActivityPub federation as Dramatiq jobs: signatures, delivery, fan-out and the inbox.

:class:`Federation` ties one local actor (``{base_url}/users/{username}``) to a
key-value store and a Dramatiq broker.  Creating it declares three actors on
the broker:

* ``botkit_fanout`` (queue ``botkit.fanout``): expands one published activity
  to follower inboxes;
* ``botkit_deliver`` (queue ``botkit.outbox``): one signed POST per
  (activity, inbox), retried with backoff;
* ``botkit_inbox`` (queue ``botkit.inbox``): runs the handlers registered with
  :meth:`Federation.on` for activities accepted by :attr:`Federation.inbox_app`.

Actor names are fixed so that standard ``dramatiq`` workers find them; several
federations may share one broker, and jobs carry the username so that each job
finds its own :class:`Federation` again (:func:`get_federation`).  The first
federation created on a broker declares the actors, so their retry options
come from its ``delivery_options``.
"""

from __future__ import annotations

from .activities import MalformedActivityError
from .base import Handler, InboxContext
from .core import Federation, get_federation

__all__ = [
    "Federation",
    "Handler",
    "InboxContext",
    "MalformedActivityError",
    "get_federation",
]
