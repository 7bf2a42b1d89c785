"""The demo's bot, built the same way in the demo process and in its worker processes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .settings import DEMO_DELIVERY

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from ..bot import Bot
    from ..brokers.sql import SqlBroker
    from ..kv.sql import SqlKvStore

__all__ = ["DemoBackends", "build_demo_bot"]


@dataclass
class DemoBackends:
    """The demo bot and the storage under it (one SQLite file, one engine)."""

    bot: Bot
    engine: Engine
    kv: SqlKvStore
    broker: SqlBroker


def build_demo_bot(db_path: str | Path, base_url: str, *, global_broker: bool) -> DemoBackends:
    """The demo bot on ``db_path``, served at ``base_url``.

    The web process and every ``dramatiq`` worker process call this with the
    same arguments, so they declare the same actors with the same delivery
    policy, and share the key pair through the KV store.

    Args:
        db_path: The SQLite file holding the KV store and the queue.
        base_url: Where the demo's web server answers (``http://127.0.0.1:PORT``).
        global_broker: Make the broker Dramatiq's global one (worker processes).
    """
    from .._sql import create_engine
    from ..bot import Bot
    from ..brokers.retry_guard import install_retry_guard
    from ..brokers.sql import SqlBroker
    from ..kv.sql import SqlKvStore
    from ..monitor.middleware import MonitorMiddleware

    engine = create_engine(f"sqlite:///{db_path}")
    kv = SqlKvStore(engine)
    # Short polls: retries become due within a fraction of a second.
    broker = SqlBroker(engine, poll_interval=0.1)
    broker.add_middleware(MonitorMiddleware())
    install_retry_guard(broker)
    bot = Bot(
        "demo",
        base_url=base_url,
        name="Demo Bot",
        summary="I run on botkit-tasks: a SQLite queue and Dramatiq workers.",
        kv=kv,
        broker=broker,
        allow_private_addresses=True,
        delivery_options=DEMO_DELIVERY,
        set_global_broker=global_broker,
    )
    return DemoBackends(bot=bot, engine=engine, kv=kv, broker=broker)
