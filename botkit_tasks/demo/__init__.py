"""``botkit-tasks demo``: the whole system on loopback, in under a minute.

What runs, on ``127.0.0.1``:

* the bot's web app (:meth:`Bot.asgi_app`) under uvicorn, on a free port;
* a simulated remote fediverse (:mod:`.remote`): two instances on their own
  ports with a few hundred follower accounts, one instance with a shared
  inbox; every inbox verifies HTTP signatures, and some are scripted to fail
  the way real servers do (500s, a 429 with ``Retry-After``, a 410, one that
  hangs);
* real ``dramatiq`` worker processes (``dramatiq
  botkit_tasks.demo.dramatiq_app:broker``, as a deployment runs ``dramatiq
  mybot``) on a ``SqlBroker`` and a ``SqlKvStore`` sharing one SQLite file in
  a temporary directory.  They are stopped on the way out, Ctrl-C included,
  and stop by themselves should the demo die (:mod:`.processes`).

The script: every remote account sends a signed ``Follow``; the bot's inbox
verifies it and enqueues an inbox job; the job stores the follower and
enqueues a signed ``Accept``, which the remote inbox verifies.  Then the bot
publishes a note: one fan-out job, one delivery job per inbox, retries with
backoff shown live.  A summary compares what happened with what the script
says must happen; the exit status is 0 only when they agree.

Deliveries use short demo timeouts and backoffs (:data:`DEMO_DELIVERY`) so
that retries, the 429 and the dead letter all happen within seconds.
"""

from __future__ import annotations

import sys
from typing import TextIO

from .report import Check, DemoResult
from .scenario import Demo
from .settings import DEMO_DELIVERY, MIN_FOLLOWERS, PHASE_TIMEOUT

__all__ = [
    "DEMO_DELIVERY",
    "MIN_FOLLOWERS",
    "PHASE_TIMEOUT",
    "Check",
    "Demo",
    "DemoResult",
    "run_demo",
]


def run_demo(
    *,
    followers: int = 240,
    threads: int = 8,
    processes: int = 2,
    plain: bool = False,
    keep: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the demo; return the exit status (0 when everything behaved as scripted).

    Args:
        followers: Remote accounts that follow the bot (at least 20).
        threads: Dramatiq worker threads per process.
        processes: ``dramatiq`` worker processes.
        plain: Periodic progress lines instead of the live ANSI display.
        keep: Directory to keep the SQLite database and log in (default: a
            temporary directory, removed afterwards).
        out: Where to write (``sys.stdout`` when ``None``).
    """
    stream = out if out is not None else sys.stdout
    demo = Demo(
        followers=followers,
        threads=threads,
        processes=processes,
        live=not plain,
        keep=keep,
        out=stream,
    )
    try:
        result = demo.run()
    except KeyboardInterrupt:
        print("\nInterrupted; stopping workers and servers...", file=stream)
        demo.close()
        return 130
    except BaseException:
        demo.close()
        raise
    demo.close()
    return 0 if result.ok else 1
