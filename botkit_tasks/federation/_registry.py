"""The federations declared on each broker (or Celery app), by username.

Jobs carry only the username; an actor declared once on a broker serves every
federation created on it and finds the job's own one here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import InboxFederation

__all__ = ["lookup", "register"]

#: Attribute under which a broker keeps the federations declared on it, by username.
_REGISTRY_ATTR = "_botkit_federations"


def register(broker: object, username: str, federation: InboxFederation) -> None:
    """Make ``federation`` the one :func:`lookup` finds for ``username`` on ``broker``."""
    registry: dict[str, InboxFederation] | None = getattr(broker, _REGISTRY_ATTR, None)
    if registry is None:
        registry = {}
        setattr(broker, _REGISTRY_ATTR, registry)
    registry[username] = federation


def lookup(broker: object, username: str) -> InboxFederation:
    """The federation registered for ``username`` on ``broker``.

    Raises:
        LookupError: when no federation for ``username`` was created on ``broker``
            in this process (the worker did not import the bot's module).
    """
    registry: dict[str, InboxFederation] = getattr(broker, _REGISTRY_ATTR, None) or {}
    try:
        return registry[username]
    except KeyError:
        raise LookupError(
            f"no Federation for user {username!r} on broker {broker!r}; "
            "does the worker import the module that creates the bot?"
        ) from None
