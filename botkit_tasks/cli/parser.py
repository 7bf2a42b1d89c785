"""The argument parser of ``botkit-tasks``: global backend options and one subparser per command."""

from __future__ import annotations

import argparse

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
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
    group.add_argument(
        "--runner",
        choices=("dramatiq", "celery"),
        default=argparse.SUPPRESS,
        help="whose jobs to read: dramatiq or celery (overrides BOTKIT_RUNNER)",
    )

    parser = argparse.ArgumentParser(
        prog="botkit-tasks",
        description="Run, watch and repair the task queue of an ActivityPub bot.",
        parents=[backend],
    )
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="run the whole system on loopback: bot, workers and a simulated fediverse",
        description=(
            "Start a bot on loopback with an embedded SQLite database in a temporary "
            "directory, real `dramatiq` worker processes and a simulated remote server whose "
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
    demo.add_argument(
        "--processes", type=int, default=2, help="dramatiq worker processes (default 2)"
    )
    demo.add_argument(
        "--threads", type=int, default=8, help="worker threads per process (default 8)"
    )
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

    from ..dashboard.server import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV

    dashboard = commands.add_parser(
        "dashboard",
        parents=[backend],
        help="web dashboard and Prometheus /metrics for queues, dead letters and remote hosts",
        description=(
            "Serve the operator dashboard: queues, workers, retries, dead letters (requeue, "
            "purge), remote hosts and the deliveries of the last hour, plus /metrics. It "
            f"listens on {DEFAULT_HOST} unless --host says otherwise; any other address "
            f"needs a token (--token or {TOKEN_ENV})."
        ),
    )
    dashboard.add_argument("--host", default=DEFAULT_HOST, help=f"address (default {DEFAULT_HOST})")
    dashboard.add_argument(
        "--port", type=_positive_int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})"
    )
    dashboard.add_argument(
        "--token", default=None, help=f"access token, at least 8 characters (default ${TOKEN_ENV})"
    )
    dashboard.add_argument(
        "--refresh", type=float, default=5.0, help="seconds between live updates (0: off)"
    )
    dashboard.add_argument("--title", default="botkit-tasks", help="the page's heading")

    commands.add_parser(
        "migrate",
        parents=[backend],
        help="create the key-value and broker tables (SQL backends; nothing to do on Redis)",
    )
    return parser


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value
