"""Declare a :class:`~botkit_tasks.runners.spec.JobSpec` as a Dramatiq actor.

Dramatiq's ``Retries`` middleware does the retrying; this module only maps the
spec onto its options: ``max_retries``, ``min_backoff``/``max_backoff`` in
milliseconds (``compute_backoff`` doubles with jitter, like
:meth:`RetryPolicy.backoff`), ``throws`` for the permanent errors, and
``dramatiq.Retry(delay=…)`` for :class:`~botkit_tasks.runners.spec.RetryLater`.
A retry that would go past ``max_retries`` is dead-lettered by the middleware.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import dramatiq

from .base import Job, Runner
from .spec import JobSpec, PermanentJobError, RetryLater, checked_arguments

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["DRAMATIQ_MAX_DELAY", "DramatiqRunner", "declare_actor", "enqueue_messages"]

logger = logging.getLogger(__name__)

#: Dramatiq refuses delays beyond 7 days (``Retries`` caps ``max_backoff`` there), in seconds.
DRAMATIQ_MAX_DELAY = 7 * 86400.0


def declare_actor(spec: JobSpec, broker: dramatiq.Broker) -> dramatiq.Actor[..., Any]:
    """Declare ``spec`` on ``broker`` and return the actor.

    Options the broker's middleware does not understand are left out (a
    broker without ``Retries`` runs the job once, with a warning).
    """
    policy = spec.policy
    wanted: dict[str, Any] = {
        "max_retries": policy.max_retries,
        "min_backoff": max(int(policy.min_backoff * 1000), 1),
        "max_backoff": max(int(min(policy.max_backoff, DRAMATIQ_MAX_DELAY) * 1000), 1),
        "throws": (PermanentJobError, *policy.permanent),
    }
    if spec.time_limit is not None:
        wanted["time_limit"] = int(spec.time_limit * 1000)
    options = {k: v for k, v in wanted.items() if k in broker.actor_options}
    if "max_retries" not in options:
        logger.warning("Broker has no Retries middleware: %s will not be retried", spec.name)
    body = checked_arguments(spec.body)
    cap = min(policy.max_backoff, DRAMATIQ_MAX_DELAY)

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return body(*args, **kwargs)
        except RetryLater as exc:
            delay = None if exc.delay is None else int(min(exc.delay, cap) * 1000)
            raise dramatiq.Retry(exc.reason, delay=delay) from exc

    # Celery compiles a signature from the name: it must be an identifier.
    run.__name__ = run.__qualname__ = re.sub(r"\W", "_", spec.name)
    run.__doc__ = spec.body.__doc__
    actor: dramatiq.Actor[..., Any] = dramatiq.actor(
        actor_name=spec.name, queue_name=spec.queue, broker=broker, **options
    )(run)
    return actor


class DramatiqRunner(Runner):
    """Jobs as Dramatiq actors on one broker (``SqlBroker``, ``RedisBroker`` or any other)."""

    kind = "dramatiq"
    target: dramatiq.Broker

    def _declare(self, spec: JobSpec) -> dramatiq.Actor[..., Any]:
        existing = self.target.actors.get(spec.name)
        if existing is not None:
            # Declared on this broker before (by an earlier runner or by hand):
            # Dramatiq would replace it, and the first one may be in use.
            return existing
        return declare_actor(spec, self.target)

    def message(self, job: Job) -> dramatiq.Message[Any]:
        """``job`` as the message its actor would send."""
        try:
            actor = self.target.get_actor(job.name)
        except dramatiq.ActorNotFound:
            raise LookupError(f"no job {job.name!r} is declared on {self.target!r:.80}") from None
        options: dict[str, Any] = {}
        if job.ordering_key is not None:
            options["ordering_key"] = job.ordering_key
        return actor.message_with_options(args=job.args, kwargs=job.kwargs or {}, **options)

    def enqueue(self, job: Job) -> None:
        delay = None if job.delay is None else max(int(job.delay * 1000), 0)
        self.target.enqueue(self.message(job), delay=delay)

    def enqueue_many(self, jobs: Sequence[Job]) -> None:
        if any(job.delay for job in jobs):
            for job in jobs:
                self.enqueue(job)
            return
        enqueue_messages(self.target, [self.message(job) for job in jobs])

    @property
    def engine(self) -> Engine | None:
        engine = getattr(self.target, "engine", None)
        from sqlalchemy.engine import Engine

        return engine if isinstance(engine, Engine) else None


def enqueue_messages(broker: dramatiq.Broker, messages: Sequence[dramatiq.Message[Any]]) -> None:
    """Enqueue ``messages`` in as few round trips as ``broker`` allows.

    ``broker.enqueue_many`` when it has one (``SqlBroker``: one INSERT per
    batch), one Redis pipeline on Dramatiq's ``RedisBroker``, else one
    ``enqueue`` per message (``StubBroker`` and other brokers).
    """
    enqueue_many = getattr(broker, "enqueue_many", None)
    if callable(enqueue_many):
        enqueue_many(list(messages))
    elif _is_redis_broker(broker):
        _enqueue_redis_pipelined(broker, messages)
    else:
        for message in messages:
            broker.enqueue(message)


def _is_redis_broker(broker: dramatiq.Broker) -> bool:
    try:
        from dramatiq.brokers.redis import RedisBroker
    except ImportError:  # redis-py missing: it cannot be a RedisBroker
        return False
    return isinstance(broker, RedisBroker) and isinstance(getattr(broker, "scripts", None), dict)


def _enqueue_redis_pipelined(broker: Any, messages: Sequence[dramatiq.Message[Any]]) -> None:
    """``RedisBroker.enqueue`` for many messages in one round trip.

    Dramatiq's RedisBroker has no batch API and pays one Lua call round trip
    per message.  This sends the very same ``dispatch`` script calls (argument
    layout as documented in Dramatiq 2's ``dispatch.lua``; maintenance left to
    the consumers) through one non-transactional pipeline, with the same
    ``before_enqueue``/``after_enqueue`` hooks and per-enqueue message ids.
    """
    dispatch = broker.scripts["dispatch"]
    keys = [broker.namespace]
    pipe = broker.client.pipeline(transaction=False)
    stored = []
    for message in messages:
        # As RedisBroker.enqueue: every enqueue gets its own Redis-side id.
        message = message.copy(options={"redis_message_id": str(uuid.uuid4())})
        broker.emit_before("enqueue", message, None)
        args = [
            "enqueue",
            int(time.time() * 1000),
            message.queue_name,
            broker.broker_id,
            broker.heartbeat_timeout,
            broker.dead_message_ttl,
            0,
            broker._max_unpack_size(),
            message.options["redis_message_id"],
            message.encode(),
        ]
        dispatch(args=args, keys=keys, client=pipe)
        stored.append(message)
    pipe.execute()
    for message in stored:
        broker.emit_after("enqueue", message, None)
