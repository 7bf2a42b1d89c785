"""Declare a :class:`~botkit_tasks.runners.spec.JobSpec` as a Celery task.

At-least-once settings (:func:`configure` puts them on the app, and every task
declared here carries them too):

- ``acks_late=True``: the message is acked after the task ran, not when it
  was received, so a worker that dies mid-task leaves it in the broker;
- ``reject_on_worker_lost=True``: a pool process killed mid-task (SIGKILL,
  OOM) puts the message back instead of acking it as failed;
- ``task_acks_on_failure_or_timeout=True``, chosen on purpose: every failure
  the task body sees is first recorded durably by this runner — as a delayed
  retry or as a dead letter with its traceback — and only then is the message
  acked.  ``False`` would reject a failed message; on Redis that drops it, and
  on any broker a job that always hits the hard time limit would come back
  at once, forever.  The one failure the body never sees, the *hard* time
  limit (the pool process is killed), is recorded as a dead letter by a
  ``task_failure`` handler in the worker (Celery >= 5.7 sends it for hard
  time limits; before that such a job is only marked failed).  A spec's
  ``time_limit`` is the *soft* limit (raised inside the body, so retried by
  the policy); the hard one is 30 s later.

Retries never use Celery's ``countdown``: :mod:`.celery_store` keeps them.

A ``celery worker`` started without ``-Q`` consumes the queues of every task
declared here, beside the app's default queue.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
import traceback
import weakref
from dataclasses import replace
from typing import Any, TypeVar

import celery
from celery import bootsteps, signals
from celery.exceptions import Retry, TimeLimitExceeded

from . import kombu_sql
from .celery_store import CeleryJob, JobStore, store_for_url
from .envelope import (
    ORDERING_DEFERS_HEADER,
    ORDERING_HEADER,
    ORDERING_SEQ_HEADER,
    ordering_headers,
)
from .spec import JobSpec, checked_arguments, decide

__all__ = ["AT_LEAST_ONCE", "HARD_LIMIT_GRACE", "configure", "declare_task", "store_for"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: The settings :func:`configure` applies (see the module docstring).
AT_LEAST_ONCE: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "task_acks_on_failure_or_timeout": True,
    "broker_connection_retry_on_startup": True,
}
#: Seconds between a spec's (soft) time limit and the hard one.
HARD_LIMIT_GRACE = 30.0
#: Seconds between two looks at the Redis retry schedule, per worker.
RELEASE_INTERVAL = 0.25

kombu_sql.register()


def store_for(app: celery.Celery) -> JobStore:
    """The durable retry schedule and dead-letter store of ``app``'s broker."""
    options = dict(app.conf.broker_transport_options or {})
    return store_for_url(str(app.conf.broker_url), options)


def _publish(app: celery.Celery, job: CeleryJob) -> None:
    app.send_task(
        job.name,
        args=job.args,
        kwargs=job.kwargs,
        task_id=job.task_id,
        queue=job.queue,
        retries=job.retries,
        headers=ordering_headers(job.ordering_key, job.ordering_seq, job.ordering_defers),
    )


class ReleaseRetries(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: a thread that publishes due retries (Redis schedule only)."""

    label = "botkit retries"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        app = worker.app
        if not str(app.conf.broker_url).startswith(("redis://", "rediss://")):
            return  # the SQL transport delivers due rows itself
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(app,), name="botkit-release-retries", daemon=True
        )
        self._thread.start()

    def _run(self, app: celery.Celery) -> None:
        store = store_for(app)
        while not self._stop.is_set():
            try:
                if store.release(lambda job: _publish(app, job)):
                    continue
            except Exception:
                logger.exception("Could not release due retries; trying again")
            self._stop.wait(RELEASE_INTERVAL)

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def configure(app: celery.Celery) -> celery.Celery:
    """Apply :data:`AT_LEAST_ONCE` and install the retry releaser (idempotent)."""
    if getattr(app, "_botkit_configured", False):
        return app
    app.conf.update(AT_LEAST_ONCE)
    app.steps["worker"].add(ReleaseRetries)
    app._botkit_configured = True
    specs: dict[str, JobSpec] = {}
    app._botkit_specs = specs

    def route(name: str, *args: Any, **kwargs: Any) -> dict[str, str] | None:
        # Celery 5.7 deprecates the task's own ``queue`` attribute for routes.
        spec = specs.get(name)
        return None if spec is None else {"queue": spec.queue}

    routes = app.conf.task_routes
    others = list(routes) if isinstance(routes, (list, tuple)) else [routes] if routes else []
    app.conf.task_routes = [route, *others]
    return app


def declare_task(spec: JobSpec, app: celery.Celery) -> celery.Task:
    """Declare ``spec`` on ``app`` and return the task (name ``spec.name``, queue ``spec.queue``).

    The task runs the body; on a failure :func:`~.spec.decide` picks a retry
    (written to :func:`store_for`'s schedule, then the task ends in state
    ``RETRY``) or a dead letter (written with its traceback, then the task
    ends in ``FAILURE``).
    """
    configure(app)
    body = checked_arguments(spec.body)
    policy = spec.policy
    limits: dict[str, Any] = {}
    if spec.time_limit is not None:
        limits = {
            "soft_time_limit": spec.time_limit,
            "time_limit": spec.time_limit + HARD_LIMIT_GRACE,
        }

    def run(self: celery.Task, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        retries = int(request.retries or 0)
        key, seq = (
            _header(request, ORDERING_HEADER, str),
            _header(request, ORDERING_SEQ_HEADER, int),
        )
        job = CeleryJob(
            spec.name, spec.queue, list(args), dict(kwargs), request.id, retries, key, seq
        )
        store = store_for(self.app)
        turns = store.turns if key is not None and seq is not None else None
        if turns is not None:
            assert key is not None and seq is not None
            verdict = turns.take(key, seq, job.task_id)
            if verdict == "done":
                logger.info(
                    "%s[%s]: its ordering turn has passed (a duplicate)", spec.name, job.task_id
                )
                return None
            if verdict == "wait":
                defers = _header(request, ORDERING_DEFERS_HEADER, int) or 0
                wait = turns.backoff(defers)
                store.schedule(replace(job, ordering_defers=defers + 1), wait, "")
                raise Retry(f"waiting for the turn of ordering key {key!r}", None, wait)
        try:
            result = body(*args, **kwargs)
        except Exception as exc:
            decision = decide(policy, exc, retries)
            error = traceback.format_exc()
            if decision.retry:
                store.schedule(replace(job, retries=retries + 1), decision.delay, error)
                if turns is not None:
                    # The turn stays this job's until its retry ends: successors wait.
                    assert key is not None and seq is not None
                    turns.postpone(key, seq, int((time.time() + decision.delay) * 1000))
                    turns.finish(key, seq, job.task_id, advance=False)
                logger.info(
                    "%s[%s] retries in %.1f s: %s",
                    spec.name,
                    job.task_id,
                    decision.delay,
                    decision.reason,
                )
                raise Retry(decision.reason, exc, decision.delay) from exc
            logger.warning("%s[%s] is dead: %s", spec.name, job.task_id, decision.reason)
            store.dead(job, error)
            if turns is not None:
                assert key is not None and seq is not None
                turns.finish(key, seq, job.task_id, advance=True)  # dead: the key moves on
            raise
        if turns is not None:
            assert key is not None and seq is not None
            turns.finish(key, seq, job.task_id, advance=True)
        return result

    # Celery compiles a signature from the name: it must be an identifier.
    run.__name__ = run.__qualname__ = re.sub(r"\W", "_", spec.name)
    run.__doc__ = spec.body.__doc__
    # shared=False: the task belongs to this app only.  A shared task would be
    # added to every Celery app finalized later in the process, where a second
    # bot's declaration of the same name then collides with it.
    task = app.task(
        name=spec.name,
        shared=False,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        acks_on_failure_or_timeout=True,
        max_retries=policy.max_retries,
        typing=False,
        **limits,
    )(run)
    app._botkit_specs[spec.name] = spec
    return task


def _header(request: Any, name: str, kind: type[T]) -> T | None:
    """The custom header ``name`` the running task was sent with, if it is a ``kind``."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return _typed(value, kind)


def _typed(value: object, kind: type[T]) -> T | None:
    """``value`` if it is a ``kind`` (a ``bool`` is no ``int`` here), else ``None``."""
    if kind is int and isinstance(value, bool):
        return None
    return value if isinstance(value, kind) else None


def _hard_time_limit(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **extra: Any,
) -> None:
    # Sent in the worker's main process when a pool process is killed for the
    # hard time limit (the message is acked, not retried): keep a dead letter.
    if not isinstance(exception, TimeLimitExceeded) or sender is None:
        return
    app = sender.app
    spec = getattr(app, "_botkit_specs", {}).get(sender.name)
    if spec is None or task_id is None:
        return
    with _recorded_lock:
        # Celery >= 5.7 sends task_failure twice for one hard time limit (from
        # the pool's error callback and from the timeout handler): record once.
        if task_id in _recorded:
            return
        _recorded[task_id] = None
        while len(_recorded) > 1000:
            _recorded.popitem(last=False)
    request = _keyed_requests.pop(task_id, None)
    headers: dict[str, Any] = getattr(request, "request_dict", None) or {}
    key, seq, retries = (
        _typed(headers.get(ORDERING_HEADER), str),
        _typed(headers.get(ORDERING_SEQ_HEADER), int),
        _typed(headers.get("retries"), int) or 0,
    )
    einfo = extra.get("einfo")
    error = str(getattr(einfo, "traceback", "")) or f"TimeLimitExceeded: {exception}"
    job = CeleryJob(
        spec.name, spec.queue, list(args or ()), dict(kwargs or {}), task_id, retries, key, seq
    )
    store = store_for(app)
    store.dead(job, error)
    if store.turns is not None and key is not None and seq is not None:
        # The killed process never finished its turn: dead, the key moves on.
        store.turns.finish(key, seq, task_id, advance=True)


signals.task_failure.connect(_hard_time_limit, weak=False)

#: The task ids whose hard time limit was recorded lately (oldest first).
_recorded: collections.OrderedDict[str, None] = collections.OrderedDict()
_recorded_lock = threading.Lock()
#: The requests for keyed tasks that this worker's main process holds, by task
#: id, for as long as Celery holds them: the hard-time-limit handler needs their
#: ordering headers, which ``task_failure`` does not carry.
_keyed_requests: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def _remember_keyed(sender: Any = None, request: Any = None, **extra: Any) -> None:
    headers = getattr(request, "request_dict", None)
    if isinstance(headers, dict) and headers.get(ORDERING_HEADER) is not None:
        _keyed_requests[request.id] = request


signals.task_received.connect(_remember_keyed, weak=False)


def _consume_declared_queues(
    sender: Any = None, instance: Any = None, options: Any = None, **extra: Any
) -> None:
    # Sent when `celery worker` starts, before it picks its queues.  Without
    # -Q a worker consumes only the app's default queue ("celery"), which
    # would leave every job declared here unconsumed; so add their queues to
    # what it consumes.  An explicit -Q (or -X) is the operator's choice and
    # is left alone.
    app = getattr(instance, "app", None)
    specs = getattr(app, "_botkit_specs", None)
    if app is None or not specs or (options or {}).get("queues"):
        return
    for queue in sorted({spec.queue for spec in specs.values()}):
        app.amqp.queues.select_add(queue)


signals.celeryd_init.connect(_consume_declared_queues, weak=False)
