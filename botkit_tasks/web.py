"""The bot's web side; it lives in :mod:`botkit_tasks.bot.web` (see there)."""

from __future__ import annotations

from .bot.web import ACTIVITY_JSON, FOLLOWERS_PAGE_SIZE, LD_JSON, BotApp, negotiate

__all__ = [
    "ACTIVITY_JSON",
    "FOLLOWERS_PAGE_SIZE",
    "LD_JSON",
    "BotApp",
    "negotiate",
]
