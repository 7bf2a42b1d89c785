"""What every subcommand shares: exit codes, errors, backends and plain-text tables."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import BotkitError

if TYPE_CHECKING:
    from ..config import Backends

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "ago",
    "backends_from_args",
    "one_line",
    "table",
    "when",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandError(BotkitError):
    """A command failed in a way the user should read about (exit code 1)."""


def backends_from_args(args: argparse.Namespace) -> Backends:
    from ..config import from_urls

    return from_urls(
        database_url=getattr(args, "database_url", None),
        redis_url=getattr(args, "redis_url", None),
        prefix=getattr(args, "prefix", None),
        runner=getattr(args, "runner", None),
    )


def when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def ago(value: datetime) -> str:
    seconds = (datetime.now(timezone.utc) - value).total_seconds()
    return f"{seconds:.0f}s ago" if seconds >= 0 else "now"


def one_line(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "-"
    return last if len(last) <= width else last[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO) -> None:
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
