"""The ``botkit-tasks`` command.

::

    botkit-tasks demo                      the whole system on loopback, in under a minute
    botkit-tasks run MODULE:BOT            a bot's web app plus in-process workers (development)
    botkit-tasks status [--json]           queues, workers, retries and dead letters
    botkit-tasks dead list|show|requeue|purge
    botkit-tasks migrate                   create the key-value and broker tables
    botkit-tasks dashboard [--host --port --token]   web dashboard and Prometheus /metrics

Backends come from ``--database-url`` / ``--redis-url`` / ``--prefix`` when
given, else from the environment exactly as :func:`botkit_tasks.config.from_env`
reads it.  Exit codes: 0 success, 1 failure (including a demo that did not
behave as scripted, and ``dead show`` of an unknown id), 2 usage or
configuration error, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

from ..errors import BotkitError, ConfigurationError
from .common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CommandError,
    backends_from_args,
)
from .dashboard import dashboard_command
from .dead import dead_command
from .migrate import migrate_command
from .parser import build_parser
from .run import load_bot, run_command
from .status import print_status, status_command

__all__ = ["CommandError", "load_bot", "main", "print_status"]


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:
    """Run the command line; return the exit status.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.
        stdout: Where output goes (``sys.stdout`` when ``None``); errors go to stderr.
    """
    out = stdout if stdout is not None else sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if args.command == "demo":
            from ..demo import MIN_FOLLOWERS, run_demo

            if args.followers < MIN_FOLLOWERS:
                raise ConfigurationError(
                    f"--followers {args.followers}: "
                    f"the demo needs at least {MIN_FOLLOWERS} followers"
                )

            return run_demo(
                followers=args.followers,
                threads=args.threads,
                processes=args.processes,
                plain=args.plain or not out.isatty(),
                keep=args.keep,
                out=out,
            )
        if args.command == "run":
            return run_command(args, out)
        backends = backends_from_args(args)
        try:
            if args.command == "status":
                return status_command(backends, args, out)
            if args.command == "dead":
                return dead_command(backends, args, out)
            if args.command == "migrate":
                return migrate_command(backends, out)
            if args.command == "dashboard":
                return dashboard_command(backends, args, out)
        finally:
            backends.close()
    except KeyboardInterrupt:
        print("botkit-tasks: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigurationError as exc:
        print(f"botkit-tasks: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BotkitError, OSError) as exc:
        print(f"botkit-tasks: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # driver errors (database or Redis down): say what, not a traceback
        if os.environ.get("BOTKIT_DEBUG"):
            raise
        print(f"botkit-tasks: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse checks
