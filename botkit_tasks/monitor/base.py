"""What an inspector reports (queue counts, workers, retrying messages, dead
letters), the :class:`Inspector` interface every broker's inspector implements,
and the helpers they share."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import dramatiq

__all__ = [
    "DeadLetter",
    "Inspector",
    "QueueStats",
    "RetryingMessage",
    "WorkerInfo",
    "at_ms",
    "from_ms",
    "requeue_copy",
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """This record as JSON-friendly values (datetimes as ISO 8601 strings)."""
        result: dict[str, Any] = _jsonable(asdict(self))  # type: ignore[call-overload]
        return result


@dataclass(frozen=True)
class QueueStats(_Record):
    """Message counts of one queue (canonical name, without ``.DQ``/``.XQ``).

    Attributes:
        name: The queue.
        ready: Messages due now, waiting for a worker.
        delayed: Messages whose ETA (a delay or a retry backoff) has not come yet.
        in_flight: Messages a worker has claimed and not yet acked.
        dead: Dead letters kept for inspection.
    """

    name: str
    ready: int
    delayed: int
    in_flight: int
    dead: int


@dataclass(frozen=True)
class WorkerInfo(_Record):
    """A live worker process (its broker's consumer registration).

    Attributes:
        id: The broker-assigned worker id.
        last_heartbeat: When it last reported in (UTC).
        in_flight: Messages it has claimed and not yet acked.
    """

    id: str
    last_heartbeat: datetime
    in_flight: int


@dataclass(frozen=True)
class RetryingMessage(_Record):
    """A message waiting for its next attempt after a failure.

    Attributes:
        message_id: Dramatiq's message id (the same across attempts).
        queue: The queue it will run on.
        actor: The actor name.
        retries: Failed attempts so far.
        eta: When the next attempt becomes due (UTC), if known.
        last_error: The traceback of the last failure, if recorded.
    """

    message_id: str
    queue: str
    actor: str
    retries: int
    eta: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class DeadLetter(_Record):
    """A message that failed for good and is kept for inspection.

    Attributes:
        message_id: Dramatiq's message id.
        queue: The queue it ran on.
        actor: The actor name.
        args: Positional arguments of the message.
        kwargs: Keyword arguments of the message.
        retries: Attempts that had failed before it was dead-lettered.
        traceback: The last traceback Dramatiq recorded, if any.
        died_at: When it was dead-lettered (UTC), if known.
    """

    message_id: str
    queue: str
    actor: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retries: int
    traceback: str | None
    died_at: datetime | None


class Inspector(abc.ABC):
    """Read and repair one broker's queues; see :func:`inspect`."""

    @abc.abstractmethod
    def queues(self) -> list[QueueStats]:
        """Counts for every known queue (declared or holding messages), by name."""

    @abc.abstractmethod
    def workers(self) -> list[WorkerInfo]:
        """Workers whose heartbeat is within the broker's heartbeat timeout."""

    @abc.abstractmethod
    def retrying(self, *, limit: int | None = None) -> list[RetryingMessage]:
        """Messages waiting for a retry, soonest ETA first (at most ``limit``)."""

    @abc.abstractmethod
    def dead_letters(
        self, queue: str | None = None, *, limit: int | None = None
    ) -> list[DeadLetter]:
        """Dead letters, most recent first, of one queue or all (at most ``limit``)."""

    @abc.abstractmethod
    def requeue(self, message_ids: Iterable[str]) -> int:
        """Send the given dead letters back to their queue with retries reset.

        Unknown ids are ignored.  A dead letter is requeued at most once even
        when two operators requeue it at the same time.

        Returns:
            How many dead letters were requeued.
        """

    @abc.abstractmethod
    def purge_dead(self, queue: str | None = None) -> int:
        """Delete the dead letters of ``queue`` (all queues when ``None``); return how many."""

    def to_dict(self, *, limit: int = 100) -> dict[str, Any]:
        """A JSON-friendly snapshot: queues, workers, and up to ``limit`` retrying
        messages and dead letters (what ``botkit-tasks status --json`` prints)."""
        return {
            "queues": [q.to_dict() for q in self.queues()],
            "workers": [w.to_dict() for w in self.workers()],
            "retrying": [r.to_dict() for r in self.retrying(limit=limit)],
            "dead_letters": [d.to_dict() for d in self.dead_letters(limit=limit)],
        }


def at_ms(value: int | float) -> datetime:
    """An epoch-milliseconds timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(float(value) / 1000.0, tz=timezone.utc)


def from_ms(value: int | float | None) -> datetime | None:
    """:func:`at_ms`, with ``None`` passed through."""
    return None if value is None else at_ms(value)


def requeue_copy(message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
    """The message as a fresh first attempt on its canonical queue.

    It keeps its ``ordering_key`` but not the number the ``OrderingKeys``
    middleware gave it (that turn has passed): it is numbered anew, so it runs
    after the messages of its key sent before the requeue.  ``SqlBroker``
    numbers rows itself and puts a requeued one back in its old place.
    """
    from dramatiq.common import q_name

    dropped = (
        # A fresh attempt: no retry count, no old error, no delay, no broker-specific ids.
        "retries", "traceback", "eta", "requeue_timestamp", "redis_message_id",
        "ordering_seq", "ordering_defers",
    )  # fmt: skip
    options = {k: v for k, v in message.options.items() if k not in dropped}
    options["retries"] = 0
    return dramatiq.Message(
        queue_name=q_name(message.queue_name),
        actor_name=message.actor_name,
        args=message.args,
        kwargs=message.kwargs,
        options=options,
        message_id=message.message_id,
        message_timestamp=message.message_timestamp,
    )
