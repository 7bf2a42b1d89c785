"""``Bot.job``: a user's function as a Dramatiq actor or a Celery task.

On Dramatiq the options go to ``dramatiq.actor`` unchanged.  On Celery the
Dramatiq-style options a bot's code already uses (``queue_name``,
``actor_name``, ``max_retries``, ``min_backoff``/``max_backoff``/``time_limit``
in milliseconds, ``throws``) become a :class:`~botkit_tasks.runners.JobSpec`
with Dramatiq's own defaults (20 retries, 15 s doubling, 7 days cap), so one
``@bot.job`` retries the same way on both runners.  The Celery task keeps
``delay()``/``apply_async()`` and gains ``send(*args, **kwargs)`` and
``send_with_options(args=, kwargs=, delay=ms)``, whose delayed jobs wait in
the runner's durable schedule rather than in a worker's memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import dramatiq

from ..runners.base import Job, Runner
from ..runners.spec import JobSpec, RetryPolicy

__all__ = ["CELERY_JOB_OPTIONS", "check_counts", "declare_job"]

_COUNT_OPTIONS = ("max_retries", "min_backoff", "max_backoff", "time_limit", "max_age")
#: What ``bot.job`` accepts on Celery, with Dramatiq's defaults (times in ms).
CELERY_JOB_OPTIONS: Mapping[str, Any] = {
    "queue_name": "default",
    "actor_name": None,
    "max_retries": 20,
    "min_backoff": 15_000,
    "max_backoff": 7 * 86_400_000,
    "time_limit": None,
    "throws": (),
}


def check_counts(options: Mapping[str, Any]) -> None:
    for option in _COUNT_OPTIONS:
        value = options.get(option)
        if value is None:
            continue
        # Dramatiq takes any value here and fails later, in the worker's middleware.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{option} must be a number, not {value!r:.100}")
        if value < 0:
            raise ValueError(f"{option} must not be negative: {value!r}")


def declare_job(runner: Runner, fn: Callable[..., Any], options: dict[str, Any]) -> Any:
    """Declare ``fn`` on ``runner`` with ``bot.job``'s ``options``; return the actor or task."""
    if not callable(fn):
        raise TypeError(f"a handler or job must be callable, not {fn!r:.100}")
    options = {"queue_name": "default", **options}
    check_counts(options)
    if runner.kind == "dramatiq":
        actor: dramatiq.Actor[..., Any] = dramatiq.actor(broker=runner.target, **options)(fn)
        return actor
    unknown = sorted(set(options) - CELERY_JOB_OPTIONS.keys())
    if unknown:
        raise TypeError(
            f"bot.job on Celery does not take {', '.join(unknown)}; "
            f"it takes {', '.join(CELERY_JOB_OPTIONS)}"
        )
    chosen = {**CELERY_JOB_OPTIONS, **options}
    throws = chosen["throws"]
    throws = tuple(throws) if isinstance(throws, (tuple, list)) else (throws,)
    time_limit = chosen["time_limit"]
    spec = JobSpec(
        name=chosen["actor_name"] or fn.__name__,
        queue=chosen["queue_name"],
        body=fn,
        policy=RetryPolicy(
            max_retries=int(chosen["max_retries"]),
            min_backoff=max(chosen["min_backoff"], 1) / 1000,
            max_backoff=max(chosen["max_backoff"], chosen["min_backoff"], 1) / 1000,
            permanent=throws,
        ),
        time_limit=None if time_limit is None else time_limit / 1000,
    )
    task = runner.declare(spec)
    name = spec.name

    def send(*args: Any, **kwargs: Any) -> None:
        """Enqueue one run (as Dramatiq's ``actor.send``)."""
        runner.enqueue(Job(name, args, kwargs or None))

    def send_with_options(
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: int | None = None,
        **unused: Any,
    ) -> None:
        """Enqueue one run, ``delay`` milliseconds from now (durably)."""
        if unused:
            raise TypeError(f"send_with_options on Celery does not take {', '.join(unused)}")
        runner.enqueue(
            Job(name, tuple(args), kwargs, delay=None if delay is None else delay / 1000)
        )

    task.send = send
    task.send_with_options = send_with_options
    return task
