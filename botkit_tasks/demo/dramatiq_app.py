"""The module the demo's ``dramatiq`` worker processes load: ``botkit_tasks.demo.dramatiq_app``.

The demo starts ``dramatiq botkit_tasks.demo.dramatiq_app:broker``, as a
deployment starts ``dramatiq mybot``.  Importing this module builds the demo
bot from the environment the demo sets:

- ``BOTKIT_DEMO_DB``: the SQLite file of the run;
- ``BOTKIT_DEMO_BASE_URL``: the bot's URL (``http://127.0.0.1:PORT``);
- ``BOTKIT_DEMO_LIFELINE`` (optional): a file descriptor the demo keeps the
  other end of.  When it reads end-of-file the demo is gone (even killed with
  ``SIGKILL``), and this process asks its ``dramatiq`` parent to shut down, so
  no worker outlives the demo.
"""

from __future__ import annotations

import os
import signal
import threading

from ..errors import ConfigurationError
from .bot_factory import build_demo_bot

__all__ = ["bot", "broker"]


def _watch_lifeline(fd: int) -> None:
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        return  # not inherited (a spawned process): nothing to watch
    # The demo is gone: the dramatiq parent turns SIGTERM into a graceful stop
    # of every worker process.
    os.kill(os.getppid(), signal.SIGTERM)


def _start() -> None:
    lifeline = os.environ.get("BOTKIT_DEMO_LIFELINE", "")
    if lifeline.isdigit():
        threading.Thread(
            target=_watch_lifeline, args=(int(lifeline),), name="botkit-demo-lifeline", daemon=True
        ).start()


_db = os.environ.get("BOTKIT_DEMO_DB")
_base_url = os.environ.get("BOTKIT_DEMO_BASE_URL")
if not _db or not _base_url:
    raise ConfigurationError(
        "botkit_tasks.demo.dramatiq_app is started by `botkit-tasks demo`; "
        "BOTKIT_DEMO_DB and BOTKIT_DEMO_BASE_URL are not set"
    )
_start()
_backends = build_demo_bot(_db, _base_url, global_broker=True)
bot = _backends.bot
broker = _backends.broker
