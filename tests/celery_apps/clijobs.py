"""The jobs of the command-line tests, on the Celery app ``config.from_env()`` builds.

``BOTKIT_RUNNER=celery`` and the backend variables choose the broker; the
jobs are declared through the runner, as ``Bot.job`` does:

- ``boom(n)`` fails every attempt, one quick retry, then it is dead;
- ``flaky()`` fails and waits an hour for its retry;
- ``fine()`` does nothing.
"""

from __future__ import annotations

import os
from typing import Any

from botkit_tasks.config import from_env
from botkit_tasks.runners import JobSpec, RetryPolicy
from botkit_tasks.runners.base import Runner
from botkit_tasks.runners.select import runner_for

HOUR = 3600.0


def boom(n: int) -> None:
    raise RuntimeError(f"boom {n}")


def flaky() -> None:
    raise RuntimeError("try again later")


def fine() -> None:
    return None


def declare(app: Any) -> Runner:
    """Declare the three jobs on ``app`` (on queue ``jobs``); return its runner."""
    runner = runner_for(app)
    for name, body, policy in [
        ("boom", boom, RetryPolicy(max_retries=1, min_backoff=0.001, max_backoff=0.001)),
        ("flaky", flaky, RetryPolicy(max_retries=5, min_backoff=HOUR, max_backoff=HOUR)),
        ("fine", fine, RetryPolicy()),
    ]:
        runner.declare(JobSpec(name=name, queue="jobs", body=body, policy=policy))
    return runner


if os.environ.get("BOTKIT_RUNNER") == "celery":
    # What `celery -A celery_apps.clijobs worker` finds.
    app = from_env().broker
    app.conf.update(worker_hijack_root_logger=False)
    declare(app)
