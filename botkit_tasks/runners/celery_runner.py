"""The :class:`~.base.Runner` on a Celery app: jobs are tasks (:func:`.celery.declare_task`).

Enqueueing is ``send_task`` on the spec's queue.  A job with a ``delay`` is
never a Celery ``countdown`` (held in a worker's memory, handed out again
after Redis's ``visibility_timeout``): it is written to the app's durable
schedule (:func:`.celery.store_for`) and published when due, like a retry.

Ordering keys travel as the ``botkit_ordering_key`` message header.  On our
SQL transport the row is keyed and ``SqlBroker`` orders it.  On Celery's
Redis transport, whose lists cannot hold a job back, the runner orders it:
the job gets its number under the key here (:class:`~botkit_tasks.brokers.
ordering.KeyTurns`, header ``botkit_ordering_seq``) and the task waits for
its turn (:func:`.celery.declare_task`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from typing import Any

import celery
from sqlalchemy.engine import Engine

from .._sql import atomic
from ..brokers.ordering import check_ordering_key
from .base import Job, Runner
from .celery import declare_task, store_for
from .celery_store import CeleryJob, SqlJobStore
from .envelope import ORDERING_HEADER, ordering_headers
from .spec import JobSpec

__all__ = ["ORDERING_HEADER", "CeleryRunner"]


class CeleryRunner(Runner):
    """Jobs as Celery tasks of one app (with the at-least-once settings of :mod:`.celery`)."""

    kind = "celery"
    target: celery.Celery

    def _declare(self, spec: JobSpec) -> celery.Task:
        return declare_task(spec, self.target)

    def _queue(self, name: str) -> str:
        spec = self.specs.get(name)
        if spec is not None:
            return spec.queue
        task = self.target.tasks.get(name)
        queue = getattr(task, "queue", None)
        if isinstance(queue, str) and queue:
            return queue
        raise LookupError(f"no job {name!r} is declared on {self.target!r:.80}")

    def _send(self, job: Job, producer: Any = None) -> None:
        queue = self._queue(job.name)
        args, kwargs = list(job.args), dict(job.kwargs or {})
        key, seq = check_ordering_key(job.ordering_key), None
        store = store_for(self.target)
        if key is not None and store.turns is not None:
            seq = store.turns.number(key)  # enqueue order, where the runner orders
        if job.delay is not None and job.delay > 0:
            delayed = CeleryJob(job.name, queue, args, kwargs, str(uuid.uuid4()), 0, key, seq)
            store.schedule(delayed, job.delay, "")
            return
        headers = ordering_headers(key, seq)
        self.target.send_task(
            job.name, args=args, kwargs=kwargs, queue=queue, headers=headers, producer=producer
        )

    def enqueue(self, job: Job) -> None:
        self._send(job)

    def enqueue_many(self, jobs: Sequence[Job]) -> None:
        with contextlib.ExitStack() as stack:
            engine = self.engine
            if engine is not None:
                # Our SQL transport: the whole batch is one transaction (one
                # commit, one wake-up), each task still published by Celery.
                stack.enter_context(atomic(engine))
            # One connection and producer for the whole batch.
            producer = stack.enter_context(self.target.producer_or_acquire())
            for job in jobs:
                self._send(job, producer)

    @property
    def engine(self) -> Engine | None:
        """The engine of the ``botkit+`` transport's table (``None`` on Redis).

        With ``config.from_env()`` it is the key-value store's, so the bot's
        transactional outbox covers Celery tasks too.
        """
        store = store_for(self.target)
        return store.broker.engine if isinstance(store, SqlJobStore) else None
