"""Runs: a key's next messages, read ahead by the consumer that holds the key (PostgreSQL).

Without runs, a key's next message needs the full hand-on (``_handon.py``):
lock the key, look up its next waiting row, claim it.  When the hand-on
claims a keyed row, it also reads up to :data:`RUN_LENGTH` of the key's next
``waiting`` rows, as long as they are in the same queue and due: the claimed
row's *run*.  The members stay ``waiting``.  When the key's head is acked,
the consumer takes the next member with a lighter statement
(``_handon.step_sql``): it deletes the acked head and makes the member
``consumed``, the key's new head, in one transaction, and only then hands
the member out.  So the rule of ordering keys is unchanged: the message
that runs is its key's head in the database, and a message runs only after
its predecessor's ack is committed, so a crash reruns at most the head.

The step refuses a member that is no longer its key's next waiting row — a
retry of its predecessor (which inherits the predecessor's place) or a
requeued dead letter came first — and the run ends: the key is released as
after any ack, and its next message runs, from the database.  A run also
ends when its head is dead-lettered or requeued, when its consumer closes,
and when its members are used up.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from dramatiq.broker import MessageProxy
from dramatiq.message import Message

__all__ = [
    "RUN_LENGTH",
    "Run",
    "Runs",
    "drop_steps",
    "end_run",
    "held_for_step",
    "start_run",
    "step_runs",
]

#: Most members a run reads ahead.
RUN_LENGTH = 31


@dataclass(eq=False)
class Run:
    """A key's head row, claimed by a consumer, and the members read after it."""

    key: str
    #: The key's head: the row that runs now (``consumed``).
    head: int
    #: The consumer that holds the head among its claimed rows.
    owner: Any
    #: Members not taken yet, in order: ``(SqlMessageProxy, ordering_seq)``.
    pending: deque[tuple[Any, int]]


class Runs:
    """The runs of one broker's consumers in this process, by head row."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_head: dict[int, Run] = {}

    def __bool__(self) -> bool:
        """Whether any run is going on (read without the lock: a hint)."""
        return bool(self._by_head)

    def start(self, run: Run) -> None:
        """Register ``run`` under its head."""
        with self._lock:
            self._by_head[run.head] = run

    def take(self, row_id: int) -> Run | None:
        """Unregister the run whose head is ``row_id`` (acked, dead or requeued)."""
        with self._lock:
            return self._by_head.pop(row_id, None)


# -- what a consumer (``_consumer.SqlConsumer``) does with runs ---------------


def start_run(consumer: Any, head: Any, members: list[tuple[int, bytes, int]]) -> None:
    """Register the run of ``head``, a keyed row ``consumer`` just claimed.

    ``members`` are ``(id, data, ordering_seq)`` in order; the run stops
    before the first one that cannot be decoded (it stays waiting: as its
    key's head it becomes a dead letter) or has another key.
    """
    key = head.options.get("ordering_key")
    if not isinstance(key, str):
        return
    pending: deque[tuple[Any, int]] = deque()
    for row_id, data, seq in members:
        try:
            message = Message.decode(bytes(data))
        except Exception:
            break
        if message.options.get("ordering_key") != key:
            break
        pending.append((type(head)(message, row_id), seq))
    if pending:
        consumer.broker.ordering.runs.start(Run(key, head.row_id, consumer, pending))


def held_for_step(consumer: Any, message: MessageProxy, row_id: int) -> bool:
    """For the ack of ``row_id``: keep it for :func:`step_runs` if its run goes on.

    Called from worker threads.  Returns ``False`` when the ack is an
    ordinary one (no run — a run is registered only while it has members
    left — or ``consumer`` is closed: the key is then released as after any
    keyed ack).
    """
    runs = consumer.broker.ordering.runs
    if not runs or message.options.get("ordering_key") is None:
        return False
    run = runs.take(row_id)
    if run is None:
        return False
    with consumer._lock:
        if consumer._closed:
            return False
        consumer._steps.append((row_id, run))
    consumer._event.set()
    return True


def end_run(consumer: Any, message: MessageProxy, row_id: int) -> None:
    """A head is dead-lettered or requeued: its run, if any, ends."""
    runs = consumer.broker.ordering.runs
    if runs and message.options.get("ordering_key") is not None:
        runs.take(row_id)


def step_runs(consumer: Any) -> None:
    """Delete the acked heads ``consumer`` holds steps for; take their runs' next rows.

    One transaction (``SqlOrdering.step``); each next row taken becomes one
    of ``consumer``'s claimed rows and is handed out.  A key whose next row
    was refused is released from the database.  On an error the steps stay
    for the next try (or for ``drop_steps`` when the consumer closes).
    """
    with consumer._lock:
        steps, consumer._steps = consumer._steps, []
    members = [(run.pending[0][0].row_id, run.key, run.pending[0][1]) for _, run in steps]
    try:
        conn = consumer._connection()
        if time.monotonic() >= consumer._next_heartbeat:
            with conn.begin():
                consumer._heartbeat(conn, time.monotonic())
        taken = consumer.broker.ordering.step(
            conn, [head for head, _ in steps], members, consumer.worker_id
        )
    except BaseException:
        with consumer._lock:
            consumer._steps[:0] = steps
        raise
    refused: list[str] = []
    for head, run in steps:
        proxy, _seq = run.pending.popleft()
        if proxy.row_id in taken:
            with consumer._lock:
                consumer._unacked.add(proxy.row_id)
            run.owner._release((head,))
            run.owner, run.head = consumer, proxy.row_id
            if run.pending:
                consumer.broker.ordering.runs.start(run)
            consumer._cache.append(proxy)
        else:
            # Something came before it (a retry of its predecessor, a
            # requeued dead letter): the key goes on from the database.
            run.owner._release((head,))
            refused.append(run.key)
    if refused:
        consumer.broker.ordering.release_acked([], sorted(set(refused)))


def drop_steps(consumer: Any) -> None:
    """``consumer`` closes: its steps become plain keyed acks, for its flush."""
    with consumer._lock:
        steps, consumer._steps = consumer._steps, []
    for head, run in steps:
        run.owner._release((head,))
        consumer.broker.ordering.ack(head, run.key, consumer.queue_name)
