"""The benchmark's Celery app and tasks on the backend named by the environment.

``benchmarks/broker.py`` imports :func:`make` to enqueue, and starts
``celery -A _broker_apps.celery_app worker -c 8`` with ``BENCH_KIND``,
``BENCH_URL``, ``BENCH_PREFIX``, ``BENCH_QUEUE`` and ``BENCH_LATENCY_FILE``
set, so the workers build the very same app and tasks.

Kinds: ``celery-redis`` (Celery's own ``redis://`` transport), ``celery-pg``
and ``celery-sqlite`` (botkit's ``botkit+…`` kombu transport on SqlBroker's
tables).  The app is the one ``botkit_tasks.config.from_env`` builds with
``BOTKIT_RUNNER=celery`` (``BOTKIT_PREFIX`` is the prefix: the SQL tables
``{prefix}_…``, the Redis keys ``{prefix}:kombu:…`` and ``{prefix}:celery:…``),
so it carries the at-least-once settings of
:func:`botkit_tasks.runners.celery.configure`.  Both tasks are declared with
:func:`botkit_tasks.runners.celery.declare_task`, as bot jobs are.
"""

from __future__ import annotations

import os
import time
from typing import Any

import celery

from botkit_tasks.config import from_env
from botkit_tasks.runners.celery import declare_task
from botkit_tasks.runners.spec import JobSpec, RetryPolicy

KINDS = ("celery-redis", "celery-pg", "celery-sqlite")
NOOP = "bench.noop"
PING = "bench.ping"


def _noop() -> None:
    pass


def _ping(sent: float) -> None:
    received = time.time()
    # O_APPEND writes of one short line are atomic between pool processes.
    with open(os.environ.get("BENCH_LATENCY_FILE", os.devnull), "a") as f:
        f.write(f"{sent!r} {received!r}\n")


def make_app(kind: str, url: str, prefix: str) -> celery.Celery:
    """The Celery app of ``from_env`` for ``kind`` on ``url`` under ``prefix``."""
    if kind not in KINDS:
        raise ValueError(f"unknown Celery kind {kind!r}")
    variable = "REDIS_URL" if kind == "celery-redis" else "DATABASE_URL"
    backends = from_env(
        {
            variable: url,
            "BOTKIT_PREFIX": prefix,
            "BOTKIT_RUNNER": "celery",
            "BOTKIT_CELERY_APP": "bench",
        }
    )
    # Only the Celery app is used here: the key-value store goes.
    backends.kv.close()
    app = backends.broker
    assert isinstance(app, celery.Celery)
    return app


def make(kind: str, url: str, prefix: str, queue: str) -> tuple[celery.Celery, Any, Any]:
    """Return ``(app, noop, ping)``: the app and the two benchmark tasks."""
    app = make_app(kind, url, prefix)
    never = RetryPolicy(max_retries=0)
    noop = declare_task(JobSpec(NOOP, queue, _noop, never), app)
    ping = declare_task(JobSpec(PING, queue, _ping, never), app)
    return app, noop, ping


if os.environ.get("BENCH_KIND", "").startswith("celery-"):
    app, noop, ping = make(
        os.environ["BENCH_KIND"],
        os.environ["BENCH_URL"],
        os.environ["BENCH_PREFIX"],
        os.environ["BENCH_QUEUE"],
    )
