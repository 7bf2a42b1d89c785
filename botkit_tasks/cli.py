"""The ``botkit-tasks`` command.

::

    botkit-tasks demo                      the whole system on loopback, in under a minute
    botkit-tasks run MODULE:BOT            a bot's web app plus in-process workers (development)
    botkit-tasks status [--json]           queues, workers, retries and dead letters
    botkit-tasks dead list|show|requeue|purge
    botkit-tasks migrate                   create the key-value and broker tables

Backends come from ``--database-url`` / ``--redis-url`` / ``--prefix`` when
given, else from the environment exactly as :func:`botkit_tasks.config.from_env`
reads it.  Exit codes: 0 success, 1 failure (including a demo that did not
behave as scripted, and ``dead show`` of an unknown id), 2 usage or
configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

from .errors import BotkitError, ConfigurationError

if TYPE_CHECKING:
    from .bot import Bot
    from .config import Backends
    from .monitor import Inspector

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandError(BotkitError):
    """A command failed in a way the user should read about (exit code 1)."""


# --------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    # The backend options are accepted before or after the subcommand.
    backend = argparse.ArgumentParser(add_help=False)
    group = backend.add_argument_group("backends (default: from the environment)")
    group.add_argument(
        "--database-url",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="PostgreSQL or SQLite URL (overrides DATABASE_URL and REDIS_*)",
    )
    group.add_argument(
        "--redis-url",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="Redis/Valkey URL (overrides REDIS_URL and DATABASE_URL)",
    )
    group.add_argument(
        "--prefix",
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="table/key prefix (overrides BOTKIT_PREFIX)",
    )

    parser = argparse.ArgumentParser(
        prog="botkit-tasks",
        description="Run, watch and repair the task queue of an ActivityPub bot.",
        parents=[backend],
    )
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="run the whole system on loopback: bot, workers and a simulated fediverse",
        description=(
            "Start a bot on loopback with an embedded SQLite database in a temporary "
            "directory, real Dramatiq workers and a simulated remote server whose "
            "followers follow the bot; publish a note and show deliveries and "
            "retries live. Exit status 0 when everything behaved as scripted."
        ),
    )
    demo.add_argument(
        "--followers", type=int, default=240, help="number of remote followers (default 240)"
    )
    demo.add_argument(
        "--plain",
        action="store_true",
        help="periodic progress lines instead of a live display (default when not a TTY)",
    )
    demo.add_argument("--threads", type=int, default=8, help="worker threads (default 8)")
    demo.add_argument(
        "--keep",
        metavar="DIR",
        help="keep the SQLite database in DIR (inspect it afterwards with "
        "botkit-tasks --database-url sqlite:///DIR/demo.sqlite3 status)",
    )

    run = commands.add_parser(
        "run",
        parents=[backend],
        help="serve a bot's web app with in-process workers (development)",
        description=(
            "Import MODULE, take its Bot object (attribute BOT, default 'bot'), serve "
            "bot.asgi_app() with uvicorn and run Dramatiq workers as threads in the same "
            "process. --database-url/--redis-url/--prefix are passed to the module through "
            "the environment (for bots that use from_env()). For production run uvicorn and "
            "`dramatiq MODULE` separately."
        ),
    )
    run.add_argument("target", metavar="MODULE[:BOT]", help="e.g. mybot:bot")
    run.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    run.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    run.add_argument("--no-workers", action="store_true", help="serve the web app only")

    status = commands.add_parser(
        "status", parents=[backend], help="queues, workers, retrying messages and dead letters"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--limit", type=_positive_int, default=20, help="retrying/dead messages listed (default 20)"
    )

    dead = commands.add_parser("dead", help="inspect, requeue or purge dead letters")
    dead_commands = dead.add_subparsers(dest="dead_command", metavar="ACTION", required=True)
    dead_list = dead_commands.add_parser("list", parents=[backend], help="list dead letters")
    dead_list.add_argument("--queue", help="only this queue")
    dead_list.add_argument(
        "--limit", type=_positive_int, default=100, help="at most this many (100)"
    )
    dead_list.add_argument("--json", action="store_true", help="print JSON")
    dead_show = dead_commands.add_parser(
        "show", parents=[backend], help="one dead letter with its traceback"
    )
    dead_show.add_argument("message_id", metavar="ID", help="message id (a unique prefix works)")
    dead_show.add_argument("--json", action="store_true", help="print JSON")
    dead_requeue = dead_commands.add_parser(
        "requeue", parents=[backend], help="send dead letters back to their queue"
    )
    dead_requeue.add_argument("message_ids", metavar="ID", nargs="*", help="message ids")
    dead_requeue.add_argument("--all", action="store_true", help="every dead letter")
    dead_requeue.add_argument("--queue", help="with --all: only this queue")
    dead_purge = dead_commands.add_parser("purge", parents=[backend], help="delete dead letters")
    dead_purge.add_argument("--queue", help="only this queue")

    commands.add_parser(
        "migrate",
        parents=[backend],
        help="create the key-value and broker tables (SQL backends; nothing to do on Redis)",
    )
    return parser


# --------------------------------------------------------------------------- main


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:
    """Run the command line; return the exit status.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.
        stdout: Where output goes (``sys.stdout`` when ``None``); errors go to stderr.
    """
    out = stdout if stdout is not None else sys.stdout
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if args.command == "demo":
            from .demo import MIN_FOLLOWERS, run_demo

            if args.followers < MIN_FOLLOWERS:
                raise ConfigurationError(
                    f"--followers {args.followers}: "
                    f"the demo needs at least {MIN_FOLLOWERS} followers"
                )

            return run_demo(
                followers=args.followers,
                threads=args.threads,
                plain=args.plain or not out.isatty(),
                keep=args.keep,
                out=out,
            )
        if args.command == "run":
            return _run(args, out)
        backends = _backends(args)
        try:
            if args.command == "status":
                return _status(backends, args, out)
            if args.command == "dead":
                return _dead(backends, args, out)
            if args.command == "migrate":
                return _migrate(backends, out)
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


def _backends(args: argparse.Namespace) -> Backends:
    from .config import from_urls

    return from_urls(
        database_url=getattr(args, "database_url", None),
        redis_url=getattr(args, "redis_url", None),
        prefix=getattr(args, "prefix", None),
    )


# --------------------------------------------------------------------------- status


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: datetime) -> str:
    seconds = (datetime.now(timezone.utc) - value).total_seconds()
    return f"{seconds:.0f}s ago" if seconds >= 0 else "now"


def _one_line(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "-"
    return last if len(last) <= width else last[: width - 1] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    """Print an aligned text table; numbers are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        all(isinstance(row[i], int) for row in rows) if rows else False for i in range(len(headers))
    ]

    def fmt(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if numeric[i] else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    print(fmt(headers), file=out)
    for row in cells:
        print(fmt(row), file=out)


def _status(backends: Backends, args: argparse.Namespace, out: TextIO) -> int:
    from .monitor import inspect

    insp = inspect(backends.broker)
    limit = max(args.limit, 0)
    if args.json:
        snapshot = {"backend": {"kind": backends.kind, "url": backends.url}}
        snapshot.update(insp.to_dict(limit=limit))
        print(json.dumps(snapshot, indent=2), file=out)
        return EXIT_OK
    print_status(insp, out, backend=f"{backends.kind} {backends.url}", limit=limit)
    return EXIT_OK


def print_status(
    insp: Inspector, out: TextIO, *, backend: str | None = None, limit: int = 20
) -> None:
    """Print the monitor's view as text tables (what ``botkit-tasks status`` shows)."""
    if backend is not None:
        print(f"Backend: {backend}", file=out)
        print(file=out)
    queues = insp.queues()
    rows = [[q.name, q.ready, q.delayed, q.in_flight, q.dead] for q in queues]
    if queues:
        rows.append(
            [
                "total",
                sum(q.ready for q in queues),
                sum(q.delayed for q in queues),
                sum(q.in_flight for q in queues),
                sum(q.dead for q in queues),
            ]
        )
    print("Queues", file=out)
    if rows:
        _table(["QUEUE", "READY", "DELAYED", "IN FLIGHT", "DEAD"], rows, out)
    else:
        print("(no queues)", file=out)
    workers = insp.workers()
    print(file=out)
    print(f"Workers ({len(workers)})", file=out)
    if workers:
        _table(
            ["WORKER", "LAST HEARTBEAT", "IN FLIGHT"],
            [[w.id, _ago(w.last_heartbeat), w.in_flight] for w in workers],
            out,
        )
    retrying = insp.retrying(limit=limit)
    print(file=out)
    print(f"Retrying (showing up to {limit})" if retrying else "Retrying: none", file=out)
    if retrying:
        _table(
            ["MESSAGE ID", "QUEUE", "ACTOR", "RETRIES", "NEXT ATTEMPT (UTC)", "LAST ERROR"],
            [
                [r.message_id, r.queue, r.actor, r.retries, _when(r.eta), _one_line(r.last_error)]
                for r in retrying
            ],
            out,
        )
    dead = insp.dead_letters(limit=limit)
    print(file=out)
    print(f"Dead letters (showing up to {limit})" if dead else "Dead letters: none", file=out)
    if dead:
        _dead_table(dead, out)


def _dead_table(dead: Sequence[Any], out: TextIO) -> None:
    _table(
        ["MESSAGE ID", "QUEUE", "ACTOR", "RETRIES", "DIED (UTC)", "ERROR"],
        [
            [d.message_id, d.queue, d.actor, d.retries, _when(d.died_at), _one_line(d.traceback)]
            for d in dead
        ],
        out,
    )


# --------------------------------------------------------------------------- dead


def _dead(backends: Backends, args: argparse.Namespace, out: TextIO) -> int:
    from .monitor import inspect

    insp = inspect(backends.broker)
    action = args.dead_command
    if action == "list":
        dead = insp.dead_letters(args.queue, limit=max(args.limit, 0))
        if args.json:
            print(json.dumps([d.to_dict() for d in dead], indent=2), file=out)
        elif dead:
            _dead_table(dead, out)
        else:
            print("No dead letters.", file=out)
        return EXIT_OK
    if action == "show":
        matches = [d for d in insp.dead_letters() if d.message_id.startswith(args.message_id)]
        if not matches:
            raise CommandError(f"no dead letter with id {args.message_id!r}")
        if len({d.message_id for d in matches}) > 1:
            raise CommandError(
                f"{args.message_id!r} matches {len(matches)} dead letters; give more of the id"
            )
        letter = matches[0]
        if args.json:
            print(json.dumps(letter.to_dict(), indent=2), file=out)
            return EXIT_OK
        for label, value in (
            ("Message", letter.message_id),
            ("Queue", letter.queue),
            ("Actor", letter.actor),
            ("Args", json.dumps(letter.args, default=repr)),
            ("Kwargs", json.dumps(letter.kwargs, default=repr)),
            ("Retries", letter.retries),
            ("Died", f"{_when(letter.died_at)} UTC"),
        ):
            print(f"{label + ':':9} {value}", file=out)
        print("Traceback:", file=out)
        print(letter.traceback or "(none recorded)", file=out)
        return EXIT_OK
    if action == "requeue":
        if args.all == bool(args.message_ids):
            raise ConfigurationError("dead requeue: give message ids or --all (not both)")
        if args.all:
            ids = [d.message_id for d in insp.dead_letters(args.queue)]
        else:
            ids = list(args.message_ids)
        count = insp.requeue(ids)
        print(f"Requeued {count} dead letter{'s' if count != 1 else ''}.", file=out)
        if not args.all and count < len(set(ids)):
            print(
                f"botkit-tasks: {len(set(ids)) - count} of the ids are not dead letters",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        return EXIT_OK
    if action == "purge":
        count = insp.purge_dead(args.queue)
        print(f"Purged {count} dead letter{'s' if count != 1 else ''}.", file=out)
        return EXIT_OK
    raise ConfigurationError(f"unknown dead action {action!r}")


# --------------------------------------------------------------------------- migrate


def _migrate(backends: Backends, out: TextIO) -> int:
    if backends.kind == "redis":
        print(f"Redis ({backends.url}) needs no tables: nothing to do.", file=out)
        return EXIT_OK
    broker: Any = backends.broker
    broker.create_tables()
    # SqlKvStore creates its table (idempotently) on first use.
    backends.kv.get(("botkit", "schema"))
    kv_table = getattr(backends.kv, "table_name", "?")
    print(
        f"Tables ready on {backends.url}: {kv_table}, "
        f"{broker.table_prefix}messages, {broker.table_prefix}workers",
        file=out,
    )
    return EXIT_OK


# --------------------------------------------------------------------------- run


def load_bot(target: str) -> Bot:
    """Import ``MODULE[:ATTRIBUTE]`` (attribute default ``bot``) and return the Bot there.

    The current directory is put on ``sys.path`` first, as ``uvicorn`` and
    ``dramatiq`` do, so ``botkit-tasks run mybot`` finds ``./mybot.py``.
    """
    from .bot import Bot

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


def _run(args: argparse.Namespace, out: TextIO) -> int:
    import dramatiq
    import uvicorn

    from .config import BACKEND_VARIABLES

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
