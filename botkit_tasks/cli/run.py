"""``botkit-tasks run MODULE:BOT``: a bot's web app plus in-process workers, for development."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import ConfigurationError
from .common import EXIT_OK, CommandError

if TYPE_CHECKING:
    from ..bot import Bot

__all__ = ["load_bot", "run_command"]


def load_bot(target: str) -> Bot:
    """Import ``MODULE[:ATTRIBUTE]`` (attribute default ``bot``) and return the Bot there.

    The current directory is put on ``sys.path`` first, as ``uvicorn`` and
    ``dramatiq`` do, so ``botkit-tasks run mybot`` finds ``./mybot.py``.
    """
    from ..bot import Bot

    module_name, _, attribute = target.partition(":")
    attribute = attribute or "bot"
    if not module_name:
        raise ConfigurationError(f"{target!r}: expected MODULE or MODULE:BOT")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise ConfigurationError(f"cannot import module {module_name!r}") from exc
        raise
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Bot):
        raise ConfigurationError(f"{target!r} is a {type(obj).__name__}, not a botkit_tasks.Bot")
    return obj


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_command(args: argparse.Namespace, out: TextIO) -> int:
    import dramatiq
    import uvicorn

    from ..config import BACKEND_VARIABLES

    # The bot module builds its own backends, usually with from_env(): pass the
    # command-line choices on through the environment it reads.
    if hasattr(args, "database_url") or hasattr(args, "redis_url"):
        for name in BACKEND_VARIABLES:
            os.environ.pop(name, None)
        if hasattr(args, "database_url"):
            os.environ["DATABASE_URL"] = args.database_url
        if hasattr(args, "redis_url"):
            os.environ["REDIS_URL"] = args.redis_url
    if hasattr(args, "prefix"):
        os.environ["BOTKIT_PREFIX"] = args.prefix
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    bot = load_bot(args.target)
    worker = None
    if not args.no_workers and bot.runner.kind != "dramatiq":
        bot.close()
        raise CommandError(
            f"{args.target} runs its jobs on Celery: start workers with "
            "`celery -A <module>:<celery app attribute> worker` and serve the bot with "
            "`botkit-tasks run --no-workers`"
        )
    if not args.no_workers:
        worker = dramatiq.Worker(
            bot.broker, worker_threads=max(args.threads, 1), worker_timeout=100
        )
        worker.start()
        print(
            f"Workers: {max(args.threads, 1)} threads on queues "
            f"{', '.join(sorted(bot.broker.get_declared_queues()))}",
            file=out,
        )
    print(f"Serving {bot.actor_id} on http://{args.host}:{args.port} (Ctrl-C stops)", file=out)
    config = uvicorn.Config(bot.asgi_app(), host=args.host, port=args.port, log_level="info")
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn stops gracefully on SIGINT/SIGTERM and then re-raises the signal
        # through the previous handler: make SIGTERM unwind like Ctrl-C so the
        # workers below are stopped too.
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM: a normal way to stop a server
    finally:
        if worker is not None:
            # Waits up to 10 s for running jobs; unfinished ones are redelivered later.
            worker.stop(timeout=10_000)
        bot.close()
        bot.broker.close()
    return EXIT_OK
