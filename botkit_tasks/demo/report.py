"""What the demo shows: the live progress display, the checks and the summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .display import bar, table

if TYPE_CHECKING:
    from ..monitor import DeadLetter, QueueStats
    from .remote import RemoteFediverse

__all__ = ["Check", "DemoResult", "print_summary", "render_progress"]


@dataclass
class Check:
    """One expectation of the script and what was observed."""

    label: str
    expected: int
    actual: int

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


@dataclass
class DemoResult:
    """What :func:`run_demo` observed (also returned by :meth:`Demo.run`)."""

    checks: list[Check] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checks)


def render_progress(
    remote: RemoteFediverse,
    stats: Sequence[QueueStats],
    *,
    elapsed: float,
    phase: int,
    n_followers: int,
    expected_inboxes: int,
    live: bool,
) -> list[str]:
    """The progress display: one line (``live=False``) or the live multi-line panel."""
    by_name = {q.name: q for q in stats}
    with remote.lock:
        accepted = sum(1 for a in remote.actors.values() if a.accepted)
        a_actors = [a for a in remote.actors.values() if a.instance == "a"]
        delivered = sum(1 for a in a_actors if 202 in a.create_statuses) + (
            1 if 202 in remote.instances["b"].shared_statuses else 0
        )
        retrying = sum(
            1
            for a in a_actors
            if a.create_statuses and 202 not in a.create_statuses and a.create_statuses[-1] != 410
        )
        gone = sum(1 for a in a_actors if 410 in a.create_statuses)
        events = list(remote.events)
    dead = sum(q.dead for q in stats)
    if not live:
        outbox = by_name.get("botkit.outbox")
        queued = (
            f"outbox ready {outbox.ready}, delayed {outbox.delayed}, in flight {outbox.in_flight}"
            if outbox
            else "outbox idle"
        )
        return [
            f"[{elapsed:5.1f}s] phase {phase}/2 | follows {accepted}/{n_followers}"
            f" | delivered {delivered}/{expected_inboxes} | retrying {retrying}"
            f" | gone {gone} | dead letters {dead} | {queued}"
        ]

    def queue(name: str, label: str) -> str:
        q = by_name.get(name)
        if q is None:
            return f"{label} -"
        return f"{label} {q.ready}/{q.delayed}/{q.in_flight}"

    lines = [
        f"  {elapsed:5.1f} s",
        f"  Follows     {bar(accepted, n_followers)} {accepted}/{n_followers}"
        " accepted (Accept verified by the follower's server)",
        f"  Deliveries  {bar(delivered, expected_inboxes)} {delivered}/"
        f"{expected_inboxes} inboxes | retrying {retrying} | gone {gone}"
        f" | dead letters {dead}",
        "  Queues      (ready/delayed/running) "
        + " | ".join(
            [
                queue("botkit.inbox", "inbox"),
                queue("botkit.fanout", "fanout"),
                queue("botkit.outbox", "outbox"),
            ]
        ),
        "  Recent events:",
    ]
    lines += [f"    {e}" for e in events] or ["    (none yet)"]
    return lines


def print_summary(
    out: TextIO,
    result: DemoResult,
    *,
    unscripted_retries: int,
    dead_letters: Sequence[DeadLetter],
    log_path: Path,
    keep: str | None,
    db_path: Path,
) -> None:
    """Print the table of checks, the first dead letters and the verdict."""
    print(file=out)
    print(f"Summary ({result.seconds:.1f} s)", file=out)
    rows: list[list[object]] = [
        [c.label, c.actual, c.expected, "ok" if c.ok else "MISMATCH"] for c in result.checks
    ]
    for line in table(rows, headers=["", "observed", "expected", ""]):
        print(f"  {line}", file=out)
    extra = unscripted_retries
    if extra:
        print(f"  (also retried: {extra} normal inboxes that answered too slowly)", file=out)
    for d in dead_letters[:3]:
        error = (d.traceback or "").strip().splitlines()
        target = d.args[2] if d.actor == "botkit_deliver" and len(d.args) > 2 else d.args
        print(f"  dead letter {d.message_id} ({d.actor} to {target}):", file=out)
        print(f"    {error[-1] if error else '-'}", file=out)
    for problem in result.problems:
        print(f"  problem: {problem}", file=out)
    print(file=out)
    if result.ok:
        print("Result: OK - everything behaved as scripted.", file=out)
    else:
        print(f"Result: FAILED - see above and {log_path}", file=out)
    if keep:
        print(
            f"Inspect it: botkit-tasks --database-url sqlite:///{db_path} status",
            file=out,
        )
