"""Pick the :class:`~.base.Runner` for what a user handed in as ``broker=``."""

from __future__ import annotations

from .base import RUNNER_ATTR, Runner, lock

__all__ = ["is_celery_app", "runner_for"]


def is_celery_app(target: object) -> bool:
    """Whether ``target`` is a ``celery.Celery`` app (without importing Celery)."""
    for cls in type(target).__mro__:
        if cls.__module__.split(".")[0] == "celery" and cls.__name__ == "Celery":
            return True
    return False


def runner_for(target: object) -> Runner:
    """The runner of ``target``, a ``dramatiq.Broker`` or a ``celery.Celery`` app (created once).

    Raises:
        TypeError: ``target`` is neither.
    """
    runner = getattr(target, RUNNER_ATTR, None)
    if isinstance(runner, Runner) and runner.target is target:
        return runner
    import dramatiq

    created: Runner
    if isinstance(target, dramatiq.Broker):
        from .dramatiq import DramatiqRunner

        created = DramatiqRunner(target)
    elif is_celery_app(target):
        from .celery_runner import CeleryRunner

        created = CeleryRunner(target)
    else:
        raise TypeError(
            f"broker must be a dramatiq.Broker or a celery.Celery app, not {target!r:.100}"
        )
    with lock:
        runner = getattr(target, RUNNER_ATTR, None)
        if isinstance(runner, Runner) and runner.target is target:
            return runner
        setattr(target, RUNNER_ATTR, created)
        return created
