"""Ordering keys: messages with the same key run one at a time, in enqueue order.

Send a message with ``actor.send_with_options(args=…, ordering_key="…")``.
:class:`~botkit_tasks.brokers.SqlBroker` implements the option in its tables
(see ``botkit_tasks/brokers/_ordering.py``).  Every other Dramatiq broker —
Dramatiq's ``RedisBroker`` in particular, and ``StubBroker`` in tests — gets
it from the :class:`OrderingKeys` middleware defined here, which keeps one
small record per key in a :class:`~botkit_tasks.kv.KvStore`::

    broker = RedisBroker(url=…)
    broker.add_middleware(OrderingKeys(RedisKvStore(…)))

What the middleware guarantees, given a KV store whose ``cas`` is atomic
across processes (every botkit store):

* Each keyed message gets a sequence number when it is first enqueued
  (``options["ordering_seq"]``); retries and delays keep it.
* A message runs only when its number is its key's *turn* and no other copy
  of it holds the key's lease; the turn moves on when the message succeeds, is
  dead-lettered, or is acked after failing with no ``Retries`` middleware.
  A failure that will be retried keeps the turn: successors wait.
* A message that arrives out of turn is re-enqueued with a short backoff
  (:data:`MIN_DEFER` doubling to ``max_defer``) and its delivery skipped, so
  a successor starts up to ``max_defer`` after its predecessor finished;
  Redis itself cannot park a message until a key frees up.
* A turn nobody takes for ``stall_timeout`` (its message was flushed or lost)
  is handed, after a grace period in which every waiting message has checked
  in, to the smallest waiting number, so a lost message does not block its
  key forever.  A head waiting for a retry does not count as stalled until
  its retry is due.
* Records expire ``key_ttl`` after their last change, so one-off keys (one
  per delivered object, say) do not accumulate.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import dramatiq
from dramatiq.common import q_name
from dramatiq.middleware import Middleware, MiddlewareError, Retries, SkipMessage

from ..errors import BotkitError
from ..kv.base import JsonValue, KvStore

__all__ = [
    "MAX_KEY_LENGTH",
    "InvalidOrderingKey",
    "KeyTurns",
    "OrderingKeyTypeError",
    "OrderingKeys",
    "check_ordering_key",
]

logger = logging.getLogger(__name__)

#: Longest ordering key, in characters.
MAX_KEY_LENGTH = 255
#: First backoff (s) of a message that arrived out of turn.
MIN_DEFER = 0.02
#: Default longest backoff (s) between two looks of a waiting message.
DEFAULT_MAX_DEFER = 1.0
#: Default seconds a turn may go untaken before the smallest waiting message takes it.
DEFAULT_STALL_TIMEOUT = 3600.0
#: Default seconds a key's record lives after its last change.
DEFAULT_KEY_TTL = 7 * 86400.0
#: Default seconds the lease of a running message lasts (Dramatiq's default time limit).
DEFAULT_LEASE = 600.0


class InvalidOrderingKey(BotkitError, MiddlewareError, ValueError):
    """An ``ordering_key`` option with a bad value.

    A :class:`dramatiq.middleware.MiddlewareError`, so that it reaches the
    caller of ``send()`` from a ``before_enqueue`` hook (Dramatiq logs and
    swallows every other exception there).
    """


class OrderingKeyTypeError(BotkitError, MiddlewareError, TypeError):
    """An ``ordering_key`` option that is not a string."""


def check_ordering_key(value: object) -> str | None:
    """Validate the ``ordering_key`` option of a message; returns it.

    Raises:
        OrderingKeyTypeError: ``value`` is neither ``None`` nor a string (a
            ``TypeError``).
        InvalidOrderingKey: an empty string, one over :data:`MAX_KEY_LENGTH`
            characters, or one holding NUL or a lone surrogate (a ``ValueError``).
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise OrderingKeyTypeError(
            f"ordering_key must be a string, got {type(value).__name__} {value!r} "
            "(join the parts of a composite key into one string)"
        )
    if not value:
        raise InvalidOrderingKey("ordering_key must not be empty")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidOrderingKey(
            f"ordering_key must be at most {MAX_KEY_LENGTH} characters, got {len(value)} "
            f"({value[:40]!r}…); hash long keys"
        )
    if "\x00" in value:
        raise InvalidOrderingKey(f"ordering_key must not contain NUL: {value!r}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidOrderingKey(
            f"ordering_key must be valid Unicode (no lone surrogates): {value!r}"
        ) from None
    return value


def _now_ms() -> int:
    return int(time.time() * 1000)


class KeyTurns:
    """The per-key turn records behind ordering keys, for any runner.

    One record per key in ``kv`` (under ``(namespace, key)``): the next number
    to hand out, whose *turn* it is, since when, and the lease of the message
    running the turn.  :class:`OrderingKeys` uses it for Dramatiq brokers, the
    Celery runner for Celery's Redis transport.  Every change is a
    compare-and-swap on the record, so producers and workers in any number of
    processes agree.

    Args:
        kv: Where the records live; share it between every producer and worker.
        namespace: First part of every record's key.
        max_defer: Longest backoff, in seconds, of a message waiting for its turn.
        stall_timeout: Seconds an untaken turn waits before it is handed on.
        key_ttl: Seconds a key's record lives after its last change.
        lease: Seconds a running message holds its key against duplicates of itself.
    """

    def __init__(
        self,
        kv: KvStore,
        *,
        namespace: str = "botkit-ordering",
        max_defer: float = DEFAULT_MAX_DEFER,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        key_ttl: float = DEFAULT_KEY_TTL,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        if min(max_defer, stall_timeout, key_ttl, lease) <= 0:
            raise ValueError("max_defer, stall_timeout, key_ttl and lease must be positive")
        self.kv = kv
        self.namespace = namespace
        self.max_defer = max_defer
        self.stall_timeout = stall_timeout
        self.key_ttl = key_ttl
        self.lease = lease

    def _update(self, key: str, change: Any) -> Any:
        """Apply ``change(record) -> (new record | None, result)`` atomically; returns result."""
        kv_key = (self.namespace, key)
        while True:
            old = self.kv.get(kv_key)
            record: dict[str, Any] | None = dict(old) if isinstance(old, dict) else None
            new, result = change(record)
            if new is None or self.kv.cas(kv_key, old, new, ttl=self.key_ttl):
                return result

    def backoff(self, defers: int) -> float:
        """Seconds a message that found the key busy ``defers`` times before waits now."""
        return float(min(MIN_DEFER * 2**defers, self.max_defer))

    def number(self, key: str) -> int:
        """Hand out the next number of ``key`` (enqueue order)."""

        def number(record: dict[str, Any] | None) -> tuple[JsonValue, int]:
            record = record or {"next": 0, "turn": 1, "since": _now_ms()}
            record["next"] += 1
            return record, record["next"]

        result: int = self._update(key, number)
        return result

    def postpone(self, key: str, seq: int, due_ms: int) -> None:
        """Message ``seq`` holds its turn until ``due_ms`` (a retry): not stalled before."""

        def postpone(record: dict[str, Any] | None) -> tuple[JsonValue | None, None]:
            if record is None or record.get("turn") != seq:
                return None, None
            record["since"] = max(int(record.get("since", 0)), due_ms)
            return record, None

        self._update(key, postpone)

    def take(self, key: str, seq: int, holder: str) -> str:
        """Whether message ``seq`` (id ``holder``) may run now.

        Returns ``"run"`` (it holds the turn's lease now), ``"wait"`` (try
        again after :meth:`backoff`) or ``"done"`` (its turn has passed: a
        duplicate, to be skipped).
        """
        now = _now_ms()

        def take(record: dict[str, Any] | None) -> tuple[JsonValue | None, str]:
            if record is None:  # expired while this message waited: start afresh
                record = {"next": seq, "turn": seq, "since": now}
            turn = int(record["turn"])
            free = record.get("holder") in (None, holder) or int(record.get("until", 0)) < now
            if seq < turn:
                return None, "done"
            if seq == turn and free:
                record.update(holder=holder, until=now + int(self.lease * 1000))
                record.pop("stall_min", None)
                record.pop("stall_at", None)
                return record, "run"
            idle = record.get("holder") is None or int(record.get("until", 0)) < now
            if idle and now - int(record["since"]) > self.stall_timeout * 1000:
                # Nobody took the turn: collect the waiting numbers for a while
                # (every waiter looks at least every max_defer), then the smallest runs.
                if "stall_at" not in record:
                    record.update(stall_at=now, stall_min=seq)
                    return record, "wait"
                record["stall_min"] = min(int(record["stall_min"]), seq)
                grace = 3 * self.max_defer * 1000
                if now - int(record["stall_at"]) >= grace and seq == record["stall_min"]:
                    logger.warning(
                        "ordering key %r: turn %d was never taken; skipping to %d", key, turn, seq
                    )
                    record.update(turn=seq, holder=holder, until=now + int(self.lease * 1000))
                    record.pop("stall_min")
                    record.pop("stall_at")
                    return record, "run"
                return record, "wait"
            return None, "wait"

        verdict: str = self._update(key, take)
        return verdict

    def finish(self, key: str, seq: int, holder: str, *, advance: bool) -> None:
        """Message ``seq`` ran: drop its lease; ``advance`` hands the turn to the next."""

        def done(record: dict[str, Any] | None) -> tuple[JsonValue | None, None]:
            if record is None or int(record["turn"]) != seq:
                return None, None
            if record.get("holder") not in (None, holder):
                return None, None  # a duplicate's lease: its owner finishes the turn
            record.pop("holder", None)
            record.pop("until", None)
            if advance:
                record.update(turn=seq + 1, since=_now_ms())
            return record, None

        self._update(key, done)


class OrderingKeys(Middleware):
    """Ordering keys for brokers that have no notion of them (see the module docstring).

    Args:
        kv: Where the per-key records live (:class:`KeyTurns`); share it
            between every producer and worker of the broker.
        namespace, max_defer, stall_timeout, key_ttl, lease: as for :class:`KeyTurns`.
    """

    def __init__(
        self,
        kv: KvStore,
        *,
        namespace: str = "botkit-ordering",
        max_defer: float = DEFAULT_MAX_DEFER,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        key_ttl: float = DEFAULT_KEY_TTL,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self.turns = KeyTurns(
            kv,
            namespace=namespace,
            max_defer=max_defer,
            stall_timeout=stall_timeout,
            key_ttl=key_ttl,
            lease=lease,
        )
        self._lock = threading.Lock()
        # message_id -> "ok" | "failed": the outcome of a message this process runs.
        self._running: dict[str, str] = {}

    # -- producer side ------------------------------------------------------------

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        key = check_ordering_key(message.options.get("ordering_key"))
        if key is None:
            return
        if "ordering_seq" not in message.options:
            message.options["ordering_seq"] = self.turns.number(key)
        elif delay:
            # A retry (or a delayed copy) of a numbered message: its turn is not
            # stalled before it is due.
            self.turns.postpone(key, message.options["ordering_seq"], _now_ms() + int(delay))

    # -- worker side ----------------------------------------------------------------

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        key = message.options.get("ordering_key")
        seq = message.options.get("ordering_seq")
        if key is None:
            return
        if not isinstance(seq, int):
            logger.warning("message %s has an ordering_key but no number", message.message_id)
            return
        mid = message.message_id
        verdict = self.turns.take(key, seq, mid)
        if verdict == "run":
            with self._lock:
                self._running[mid] = "ok"
            return
        if verdict == "wait":
            defers = int(message.options.get("ordering_defers", 0))
            broker.enqueue(
                message.copy(
                    queue_name=q_name(message.queue_name), options={"ordering_defers": defers + 1}
                ),
                delay=int(self.turns.backoff(defers) * 1000),
            )
        else:
            logger.info("skipping %s: its ordering turn has passed (a duplicate)", mid)
        raise SkipMessage()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is not None:
            with self._lock:
                if message.message_id in self._running:
                    self._running[message.message_id] = "failed"

    def after_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        if message.queue_name != q_name(message.queue_name):
            # A delay-queue copy acked as it moves to its queue: a copy of the
            # same message may be running right now; its own ack finishes it.
            return
        with self._lock:
            outcome = self._running.pop(message.message_id, None)
        if outcome is None:
            return
        retried = outcome == "failed" and any(isinstance(m, Retries) for m in broker.middleware)
        self._finish(message, advance=not retried)

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        with self._lock:
            self._running.pop(message.message_id, None)
        if message.options.get("ordering_key") is not None:
            self._finish(message, advance=True)  # dead-lettered: the key moves on

    def _finish(self, message: Any, *, advance: bool) -> None:
        key, seq = message.options.get("ordering_key"), message.options.get("ordering_seq")
        if key is None or not isinstance(seq, int):
            return
        self.turns.finish(key, seq, message.message_id, advance=advance)
