"""Greet Bot: welcomes new followers and posts on a schedule.

Backends come from the environment alone (``botkit_tasks.config.from_env``):
``DATABASE_URL`` for PostgreSQL, ``REDIS_URL`` (or ``REDIS_HOST`` …) for
Redis/Valkey, and nothing at all for an embedded SQLite file
``./botkit.sqlite3``.  The bot's public URL comes from ``GREETBOT_BASE_URL``.

Development, one process (web app + worker threads + the schedule)::

    GREETBOT_BASE_URL=https://my-tunnel.example python examples/greetbot.py

Production, three kinds of processes sharing the same environment::

    uvicorn greetbot:app                                   # the web app
    dramatiq greetbot                                      # workers
    python -c "import greetbot; greetbot.start_schedule()" # once, on deploy

Settings: ``GREETBOT_BASE_URL`` (default ``http://localhost:8000``; plain
``http`` and loopback addresses are only allowed for ``localhost`` and
``127.0.0.1``), ``GREETBOT_INTERVAL`` (seconds between scheduled posts,
default 3600).
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any
from urllib.parse import urlsplit

from botkit_tasks import Bot
from botkit_tasks.bot import BotContext
from botkit_tasks.config import from_env

BASE_URL = os.environ.get("GREETBOT_BASE_URL", "http://localhost:8000")
#: Seconds between two scheduled posts.
INTERVAL = float(os.environ.get("GREETBOT_INTERVAL", "3600"))
#: Where the schedule keeps its state: {"token": current chain, "count": posts so far}.
SCHEDULE_KEY = ("greetbot", "schedule")

backends = from_env()
bot = Bot(
    "greetbot",
    base_url=BASE_URL,
    name="Greet Bot",
    summary="I greet everyone who follows me, and say hello to my followers every hour.",
    kv=backends.kv,
    broker=backends.broker,
    # Loopback and plain http only while developing on this machine.
    allow_private_addresses=urlsplit(BASE_URL).hostname in ("localhost", "127.0.0.1"),
)
app = bot.asgi_app()


@bot.on_follow
def welcome(ctx: BotContext, follow: dict[str, Any]) -> None:
    # The follower is already stored and accepted; this is the extra work.
    name = ctx.actor.get("name") or ctx.actor.get("preferredUsername") or "there"
    ctx.reply(f"Welcome, {name}! Thanks for following. I post a greeting every so often.")


@bot.on_mention
def answer(ctx: BotContext, note: dict[str, Any]) -> None:
    ctx.reply("Hello! I'm a bot; follow me and I'll greet you.")


@bot.job(max_retries=3)
def scheduled_post(token: str) -> None:
    """Post a greeting, then enqueue the next run ``INTERVAL`` seconds later.

    Only the chain holding the current token posts: a second
    ``start_schedule()`` or a duplicate delivery of this message cannot
    double the schedule, because replacing the token is a compare-and-swap.
    """
    state = bot.kv.get(SCHEDULE_KEY)
    if not isinstance(state, dict) or state.get("token") != token:
        return  # a stale chain
    count = int(state.get("count", 0)) + 1
    bot.publish(f"Greeting #{count}: hello to all my followers!")
    next_state = {"token": uuid.uuid4().hex, "count": count}
    if bot.kv.cas(SCHEDULE_KEY, state, next_state):
        scheduled_post.send_with_options(args=(next_state["token"],), delay=int(INTERVAL * 1000))


def start_schedule() -> bool:
    """Start the posting schedule unless it runs already; return whether this call started it."""
    token = uuid.uuid4().hex
    if not bot.kv.cas(SCHEDULE_KEY, None, {"token": token, "count": 0}):
        return False
    scheduled_post.send(token)
    return True


def main(argv: list[str] | None = None) -> int:
    """Start the schedule and serve the bot with in-process workers (development)."""
    from botkit_tasks.cli import main as cli

    started = start_schedule()
    print(f"Schedule {'started' if started else 'already running'}; {bot.handle}")
    return cli(["run", "__main__:bot", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
