"""What the federation's modules share: the protocols they see a federation through.

:class:`~botkit_tasks.federation.Federation` is the one implementation; the
modules below it (delivery, fan-out, inbox) are written against these
protocols so that none of them imports the class, and :class:`InboxContext`
and :data:`Handler`, which handlers see, live here for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .activities import is_http_url

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

    from ..kv.base import KvStore
    from ..runners.base import Runner
    from .delivery.options import DeliveryOptions
    from .followers import Followers
    from .keys import KeyResolver
    from .net import Fetcher

__all__ = ["FederationLike", "Handler", "InboxContext", "InboxFederation"]


class FederationLike(Protocol):
    """What the delivery and fan-out actors need from the ``Federation`` facade."""

    kv: KvStore
    #: The Dramatiq broker or the Celery app the federation was created on.
    broker: Any
    #: Declares and enqueues the federation's jobs on :attr:`broker`.
    runner: Runner
    username: str
    key_id: str
    allow_private_addresses: bool
    followers: Followers

    @property
    def delivery_options(self) -> DeliveryOptions | None: ...

    @property
    def private_key(self) -> RSAPrivateKey: ...


class InboxFederation(FederationLike, Protocol):
    """What the inbox endpoint, the inbox job and its handlers use of a ``Federation``."""

    base_url: str
    actor_id: str
    inbox_url: str
    shared_inbox_url: str
    user_agent: str | None
    fetcher: Fetcher
    keys: KeyResolver

    def publish(self, activity: dict[str, Any]) -> None:
        """Send ``activity`` to every follower (see ``Federation.publish``)."""

    def send(self, activity: dict[str, Any], inboxes: Iterable[str]) -> None:
        """Deliver ``activity`` to each of ``inboxes`` (see ``Federation.send``)."""

    def handlers_for(self, activity_type: str) -> list[Handler]:
        """The handlers registered for ``activity_type``, in registration order."""


@dataclass(frozen=True)
class InboxContext:
    """What a handler gets besides the activity.

    Attributes:
        federation: the receiving :class:`~botkit_tasks.federation.Federation`.
        activity: the verified activity, as received.
        actor: the sender's actor document (fetched, cached for an hour).
        actor_id: the sender's id; the HTTP signature was made with its key.
    """

    federation: InboxFederation
    activity: dict[str, Any]
    actor: dict[str, Any]
    actor_id: str

    @property
    def actor_inbox(self) -> str | None:
        """The sender's personal inbox URL, or ``None`` when its document has none."""
        inbox = self.actor.get("inbox")
        return inbox if is_http_url(inbox) else None


#: A handler registered with :meth:`Federation.on`: called as ``handler(ctx, activity)``.
Handler = Callable[[InboxContext, dict[str, Any]], None]
