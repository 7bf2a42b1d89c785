"""What the parts of a bot need from it, as a protocol.

:class:`~botkit_tasks.bot.core.Bot` satisfies :class:`BotCore`; the outgoing
API, the inbox handlers and the web app are written against this protocol, so
none of them imports the class that composes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..federation import Federation
    from ..kv.base import KvStore

__all__ = ["BotCore"]


class BotCore(Protocol):
    """The identity, storage and federation of one bot."""

    username: str
    name: str
    summary: str
    kv: KvStore
    #: The Dramatiq broker or the Celery app.
    broker: Any
    federation: Federation

    @property
    def base_url(self) -> str:
        """The site's URL without a trailing slash."""
        ...

    @property
    def actor_id(self) -> str:
        """``{base_url}/users/{username}``."""
        ...

    @property
    def followers_url(self) -> str:
        """The followers collection."""
        ...

    @property
    def handle(self) -> str:
        """``@username@host``."""
        ...

    def actor_document(self) -> dict[str, Any]:
        """The actor document, with its public key."""
        ...

    def get_note(self, key: str) -> dict[str, Any] | None:
        """A stored ``{"note", "activity"}`` record."""
        ...

    def note_count(self) -> int:
        """How many public notes the bot has published."""
        ...
