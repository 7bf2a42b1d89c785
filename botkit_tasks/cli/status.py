"""``botkit-tasks status``: queues, workers, retrying messages and dead letters."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from .common import EXIT_OK, ago, one_line, table, when

if TYPE_CHECKING:
    from ..config import Backends
    from ..monitor import Inspector

__all__ = ["dead_table", "print_status", "status_command"]


def status_command(backends: Backends, args: argparse.Namespace, out: TextIO) -> int:
    from ..monitor import inspect

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
        table(["QUEUE", "READY", "DELAYED", "IN FLIGHT", "DEAD"], rows, out)
    else:
        print("(no queues)", file=out)
    workers = insp.workers()
    print(file=out)
    print(f"Workers ({len(workers)})", file=out)
    if workers:
        table(
            ["WORKER", "LAST HEARTBEAT", "IN FLIGHT"],
            [[w.id, ago(w.last_heartbeat), w.in_flight] for w in workers],
            out,
        )
    retrying = insp.retrying(limit=limit)
    print(file=out)
    print(f"Retrying (showing up to {limit})" if retrying else "Retrying: none", file=out)
    if retrying:
        table(
            ["MESSAGE ID", "QUEUE", "ACTOR", "RETRIES", "NEXT ATTEMPT (UTC)", "LAST ERROR"],
            [
                [r.message_id, r.queue, r.actor, r.retries, when(r.eta), one_line(r.last_error)]
                for r in retrying
            ],
            out,
        )
    dead = insp.dead_letters(limit=limit)
    print(file=out)
    print(f"Dead letters (showing up to {limit})" if dead else "Dead letters: none", file=out)
    if dead:
        dead_table(dead, out)


def dead_table(dead: Sequence[Any], out: TextIO) -> None:
    table(
        ["MESSAGE ID", "QUEUE", "ACTOR", "RETRIES", "DIED (UTC)", "ERROR"],
        [
            [d.message_id, d.queue, d.actor, d.retries, when(d.died_at), one_line(d.traceback)]
            for d in dead
        ],
        out,
    )
