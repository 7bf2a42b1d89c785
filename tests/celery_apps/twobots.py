"""Two bots, alice and bob, whose jobs are Celery tasks: what ``celery -A`` loads.

Built the way the README tells a user to: ``config.from_env()`` with
``BOTKIT_RUNNER=celery`` and ``Bot(..., broker=backends.broker)``.  The test
process builds the same bots (same store, same app) to serve their web apps
on loopback ports; the ``celery worker`` processes run their jobs.  Handlers
run in the workers, so they record what they saw in the key-value store,
under ``("test", event)``, for the test to read.

Environment: the backend variables of ``from_env`` (``BOTKIT_RUNNER=celery``,
``BOTKIT_PREFIX``, …) and ``TWOBOTS_ALICE_URL`` / ``TWOBOTS_BOB_URL``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from botkit_tasks import Bot
from botkit_tasks.bot import BotContext
from botkit_tasks.config import Backends, from_env
from botkit_tasks.federation.delivery import DeliveryOptions
from botkit_tasks.kv.base import KvStore


def _record(kv: KvStore, event: str, value: Any) -> None:
    key = ("test", event)
    for _ in range(100):
        current = kv.get(key)
        if kv.cas(key, current, [*(current if isinstance(current, list) else []), value]):
            return
    raise RuntimeError(f"could not record {event}")


def build(env: Mapping[str, str]) -> tuple[Backends, Bot, Bot]:
    """The backends and the two bots described by ``env``."""
    backends = from_env(env)
    options = DeliveryOptions(min_backoff=0.2, max_backoff=2.0, max_retries=4)
    alice, bob = (
        Bot(
            name,
            base_url=env[f"TWOBOTS_{name.upper()}_URL"],
            kv=backends.kv,
            broker=backends.broker,
            allow_private_addresses=True,
            delivery_options=options,
        )
        for name in ("alice", "bob")
    )
    kv = backends.kv

    @bob.on_follow
    def on_follow(ctx: BotContext, follow: dict[str, Any]) -> None:
        _record(kv, "followed", ctx.actor_id)

    @bob.on_unfollow
    def on_unfollow(ctx: BotContext, undo: dict[str, Any]) -> None:
        _record(kv, "unfollowed", ctx.actor_id)

    @alice.on_message
    def on_message(ctx: BotContext, note: dict[str, Any]) -> None:
        _record(kv, "received", note)

    @bob.on_mention
    def on_mention(ctx: BotContext, note: dict[str, Any]) -> None:
        _record(kv, "mentioned", note)

    @bob.job(max_retries=2, min_backoff=100, max_backoff=200, queue_name="botkit.outbox")
    def remember(token: str) -> None:
        """A ``bot.job`` on Celery: fails once, then records ``token``."""
        if not _seen(kv, token):
            raise RuntimeError(f"first attempt of {token}")
        _record(kv, "jobs", token)

    return backends, alice, bob


def _seen(kv: KvStore, token: str) -> bool:
    """Whether ``token`` was seen before (and mark it seen)."""
    return not kv.cas(("test", "attempted", token), None, 1)


if "TWOBOTS_ALICE_URL" in os.environ:
    backends, alice, bob = build(os.environ)
    # What `celery -A celery_apps.twobots worker` finds.
    app = bob.celery
    app.conf.update(worker_hijack_root_logger=False)
