"""Runners: the same job bodies on Dramatiq actors or on Celery tasks.

:class:`~botkit_tasks.runners.spec.JobSpec` describes a job once;
:func:`botkit_tasks.runners.dramatiq.declare_actor` and
:func:`botkit_tasks.runners.celery.declare_task` declare it on either runner.
The Celery modules import ``celery`` and are not imported here (install the
``botkit-tasks[celery]`` extra to use them).
"""

from __future__ import annotations

from .spec import (
    DEFAULT_MAX_BACKOFF,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MIN_BACKOFF,
    Decision,
    JobSpec,
    PermanentJobError,
    RetryLater,
    RetryPolicy,
    checked_arguments,
    decide,
)

__all__ = [
    "DEFAULT_MAX_BACKOFF",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_MIN_BACKOFF",
    "Decision",
    "JobSpec",
    "PermanentJobError",
    "RetryLater",
    "RetryPolicy",
    "checked_arguments",
    "decide",
]
