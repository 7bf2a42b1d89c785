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
from typing import Any

import dramatiq

from .spec import JobSpec, PermanentJobError, RetryLater, checked_arguments

__all__ = ["DRAMATIQ_MAX_DELAY", "declare_actor"]

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
