"""``botkit-tasks dead list|show|requeue|purge``: the dead letters."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, TextIO

from ..errors import ConfigurationError
from .common import EXIT_FAILURE, EXIT_OK, CommandError, when
from .status import dead_table

if TYPE_CHECKING:
    from ..config import Backends

__all__ = ["dead_command"]


# --------------------------------------------------------------------------- dead


def dead_command(backends: Backends, args: argparse.Namespace, out: TextIO) -> int:
    from ..monitor import inspect

    insp = inspect(backends.broker)
    action = args.dead_command
    if action == "list":
        dead = insp.dead_letters(args.queue, limit=max(args.limit, 0))
        if args.json:
            print(json.dumps([d.to_dict() for d in dead], indent=2), file=out)
        elif dead:
            dead_table(dead, out)
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
            ("Died", f"{when(letter.died_at)} UTC"),
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
