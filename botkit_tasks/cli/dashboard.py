"""``botkit-tasks dashboard``: the web dashboard and ``/metrics`` for the configured backends."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TextIO

from .common import EXIT_OK

if TYPE_CHECKING:
    from ..config import Backends

__all__ = ["dashboard_command"]


def dashboard_command(backends: Backends, args: argparse.Namespace, out: TextIO) -> int:
    """Serve until interrupted; refuse a non-loopback ``--host`` without a token (exit 2)."""
    from ..dashboard import app, check_bind, serve
    from ..dashboard.server import token_from_env

    token = token_from_env(args.token)
    check_bind(args.host, token)
    dashboard = app(
        backends.broker, backends.kv, token=token, title=args.title, refresh=args.refresh
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Dashboard for {backends.kind} {backends.url}", file=out)
    print(f"  http://{host}:{args.port}/   (Prometheus: /metrics)", file=out)
    if token is not None:
        print("  access token required (sign in on the page, or Authorization: Bearer)", file=out)
    out.flush()
    serve(dashboard, args.host, args.port)
    return EXIT_OK
