"""botkit-tasks: the key-value store and task queue of an ActivityPub bot.

State lives in a :mod:`botkit_tasks.kv` store; background work (activity
delivery, fan-out, inbox processing, the bot's own jobs) runs as Dramatiq actors
on Dramatiq's ``RedisBroker`` or on :class:`botkit_tasks.brokers.SqlBroker`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._sql import atomic
from ._version import __version__ as __version__
from .errors import BotkitError, ConfigurationError, StoreError

if TYPE_CHECKING:
    from .bot import Bot

__all__ = [
    # Bots
    "Bot",
    # Errors
    "BotkitError",
    "ConfigurationError",
    "StoreError",
    # Transactions
    "atomic",
]


def __getattr__(name: str) -> Any:
    # The bot pulls in the web and federation layers; import it only when asked.
    if name == "Bot":
        from .bot import Bot

        return Bot
    raise AttributeError(f"module 'botkit_tasks' has no attribute {name!r}")
