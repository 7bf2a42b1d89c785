"""The bot: an ActivityPub actor whose work runs as Dramatiq jobs.

==============================  ================================================
:mod:`~botkit_tasks.bot.core`   :class:`Bot`, :class:`BotContext`: identity,
                                decorators, jobs
``outgoing``                    publish, follow, unfollow (stored + enqueued)
``handlers``                    the built-in inbox handling of every bot
``documents``                   JSON-LD contexts, the actor document, note HTML
``web``                         the ASGI app (WebFinger, actor, inbox, notes)
==============================  ================================================
"""

from __future__ import annotations

from .core import Bot, BotContext, BotHandler
from .documents import AS_CONTEXT, SECURITY_CONTEXT

__all__ = [
    "AS_CONTEXT",
    "SECURITY_CONTEXT",
    "Bot",
    "BotContext",
    "BotHandler",
]
