"""The :class:`~.base.Runner` on a Celery app: jobs are tasks (:func:`.celery.declare_task`).

Enqueueing is ``send_task`` on the spec's queue.  A job with a ``delay`` is
never a Celery ``countdown`` (held in a worker's memory, handed out again
after Redis's ``visibility_timeout``): it is written to the app's durable
schedule (:func:`.celery.store_for`) and published when due, like a retry.

Ordering keys travel as the ``botkit_ordering_key`` message header, but
nothing on the Celery side enforces them yet: Celery's retries are new
messages (the runner's durable schedule), so a key's later jobs cannot be
held back behind a retrying head the way ``SqlBroker`` does.  Deliveries
that must keep ``Create`` → ``Update`` → ``Delete`` order need the Dramatiq
runner (``docs/celery.md``, "What differs from Dramatiq").
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import celery

from .base import Job, Runner
from .celery import declare_task, store_for
from .celery_store import CeleryJob
from .envelope import ORDERING_HEADER
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
        if job.delay is not None and job.delay > 0:
            delayed = CeleryJob(
                job.name, queue, args, kwargs, str(uuid.uuid4()), 0, job.ordering_key
            )
            store_for(self.target).schedule(delayed, job.delay, "")
            return
        headers = {} if job.ordering_key is None else {ORDERING_HEADER: job.ordering_key}
        self.target.send_task(
            job.name, args=args, kwargs=kwargs, queue=queue, headers=headers, producer=producer
        )

    def enqueue(self, job: Job) -> None:
        self._send(job)

    def enqueue_many(self, jobs: Sequence[Job]) -> None:
        # One connection and producer for the whole batch.
        with self.target.producer_or_acquire() as producer:
            for job in jobs:
                self._send(job, producer)
