"""Runners: the same job bodies on Dramatiq actors or on Celery tasks.

:class:`~botkit_tasks.runners.spec.JobSpec` describes a job once;
:func:`botkit_tasks.runners.dramatiq.declare_actor` and
:func:`botkit_tasks.runners.celery.declare_task` declare it on either runner;
:func:`runner_for` gives the :class:`Runner` (declare and enqueue) of a
Dramatiq broker or a Celery app, which the federation and ``Bot`` use.
The Celery modules import ``celery`` and are not imported here (install the
``botkit-tasks[celery]`` extra to use them).
"""

from __future__ import annotations

from .base import Job, Runner
from .select import runner_for
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
    "Job",
    "JobSpec",
    "PermanentJobError",
    "RetryLater",
    "RetryPolicy",
    "Runner",
    "checked_arguments",
    "decide",
    "runner_for",
]
