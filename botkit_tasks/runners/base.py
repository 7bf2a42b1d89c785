"""The runner seam: declare :class:`~.spec.JobSpec` jobs and enqueue them, on Dramatiq or Celery.

The federation (delivery, fan-out, inbox) and ``Bot.job`` are written against
:class:`Runner`; :func:`~.select.runner_for` picks the implementation from what the
user handed in as ``broker=``: a ``dramatiq.Broker`` gives
:class:`~.dramatiq.DramatiqRunner`, a ``celery.Celery`` app
:class:`~.celery_runner.CeleryRunner` (imported only then, so Celery stays
an optional extra).  One runner exists per broker or app, kept on it, so every
federation on one broker sees the same declarations.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .spec import JobSpec

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["RUNNER_ATTR", "Job", "Runner", "lock"]

#: Attribute under which a broker or Celery app keeps its runner.
RUNNER_ATTR = "_botkit_runner"
#: Guards declarations and the creation of runners.
lock = threading.Lock()


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """One job to enqueue: the declared job's name and its JSON arguments.

    Attributes:
        name: The :attr:`JobSpec.name` it runs.
        args: Positional arguments (JSON values).
        kwargs: Keyword arguments (JSON values), or ``None``.
        ordering_key: Jobs with the same key run one at a time, in enqueue
            order, where the broker supports it (see ``docs/queue.md``).
        delay: Seconds before the job may run (``None``: at once).
    """

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    ordering_key: str | None = None
    delay: float | None = None


class Runner(abc.ABC):
    """Declares jobs on one broker (or Celery app) and enqueues them.

    Attributes:
        target: The Dramatiq broker or the Celery app.
    """

    #: ``"dramatiq"`` or ``"celery"``.
    kind: ClassVar[str]

    def __init__(self, target: Any) -> None:
        self.target = target
        self.specs: dict[str, JobSpec] = {}
        self.declared: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} on {self.target!r:.80}>"

    def declare(self, spec: JobSpec) -> Any:
        """Declare ``spec`` once; return the actor or task (the first one on a second call)."""
        with lock:
            existing = self.declared.get(spec.name)
            if existing is not None:
                return existing
            declared = self.declared[spec.name] = self._declare(spec)
            self.specs[spec.name] = spec
            return declared

    def is_declared(self, name: str) -> bool:
        """Whether a job named ``name`` was declared through this runner."""
        return name in self.declared

    @abc.abstractmethod
    def _declare(self, spec: JobSpec) -> Any:
        """Declare ``spec`` on the target and return the actor or task."""

    @abc.abstractmethod
    def enqueue(self, job: Job) -> None:
        """Enqueue one job of a declared name.

        Raises:
            LookupError: No job of that name is declared.
        """

    def enqueue_many(self, jobs: Sequence[Job]) -> None:
        """Enqueue several jobs, in one round trip where the broker allows it."""
        for job in jobs:
            self.enqueue(job)

    @property
    def engine(self) -> Engine | None:
        """The SQLAlchemy engine enqueues write through, when a SQL queue shares it.

        A key-value store on the same engine can commit its writes and the
        enqueue in one transaction (``botkit_tasks.atomic``).
        """
        return None

    def spec(self, name: str) -> JobSpec:
        """The declared spec named ``name``.

        Raises:
            LookupError: No job of that name is declared through this runner.
        """
        try:
            return self.specs[name]
        except KeyError:
            raise LookupError(f"no job {name!r} is declared on {self.target!r:.80}") from None
