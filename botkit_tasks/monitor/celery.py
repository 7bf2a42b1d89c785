"""Inspectors for Celery apps run by :mod:`botkit_tasks.runners.celery`.

- On our ``botkit+postgresql://`` / ``botkit+sqlite:///`` transport every
  message, delayed retry and dead letter is a row of the ``SqlBroker`` table,
  so the inspector is :class:`~botkit_tasks.monitor.sql.SqlInspector` on the
  transport's broker.
- On Celery's own ``redis://`` transport, :class:`CeleryRedisInspector` reads
  kombu's keys (with the app's ``global_keyprefix``): one list per queue
  (ready; with priorities, one list per priority step), the ``unacked`` hash
  (in flight: fetched by a worker, not acked), and the runner's own keys
  (:class:`~botkit_tasks.runners.celery_store.RedisJobStore`): the retry
  schedule (delayed; the entries written after a failure are the
  ``retrying`` ones, with their traceback) and the dead-letter hash.
  Workers are the ones answering Celery's remote control (``inspect
  active``), which needs the worker's pidbox; workers started with
  ``--without-mingle --without-gossip`` still answer it on Redis.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import redis

from .base import DeadLetter, Inspector, QueueStats, RetryingMessage, WorkerInfo

if TYPE_CHECKING:
    import celery

    from ..runners.celery_store import CeleryJob, RedisJobStore

__all__ = ["CeleryRedisInspector", "inspect_celery"]

#: Seconds the inspector waits for workers to answer ``inspect active``.
CONTROL_TIMEOUT = 0.5
#: kombu's separator between a queue's name and its priority step.
_PRIORITY_SEP = "\x06\x16"


def inspect_celery(app: celery.Celery) -> Inspector:
    """The inspector of ``app``'s broker (``botkit+…`` SQL or ``redis://``).

    Raises:
        TypeError: the app uses another broker.
    """
    url = str(app.conf.broker_url)
    options = dict(app.conf.broker_transport_options or {})
    if url.startswith("botkit+"):
        from ..runners.kombu_sql import broker_for
        from .sql import SqlInspector

        return SqlInspector(broker_for(url.removeprefix("botkit+"), options))
    if url.startswith(("redis://", "rediss://", "redis+socket://")):
        return CeleryRedisInspector(app)
    scheme = url.partition("://")[0]
    raise TypeError(
        f"cannot inspect a Celery app on {scheme}://: botkit_tasks.monitor supports the "
        "botkit+postgresql://, botkit+sqlite:/// and redis:// brokers"
    )


def _at(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc)


class CeleryRedisInspector(Inspector):
    """Queues, retries and dead letters of a Celery app on Celery's Redis transport."""

    def __init__(self, app: celery.Celery) -> None:
        from ..runners.celery import store_for
        from ..runners.celery_store import RedisJobStore

        self.app = app
        store = store_for(app)
        assert isinstance(store, RedisJobStore)
        self.store: RedisJobStore = store
        options = dict(app.conf.broker_transport_options or {})
        self.prefix = str(options.get("global_keyprefix", ""))
        self.unacked_key = self.prefix + str(options.get("unacked_key", "unacked"))
        url = str(app.conf.broker_url)
        if url.startswith("redis+socket://"):
            url = "unix://" + url.removeprefix("redis+socket://")
        self.client = redis.Redis.from_url(url)

    # ------------------------------------------------------------------ reading

    def _queue_names(self) -> set[str]:
        names = {spec.queue for spec in getattr(self.app, "_botkit_specs", {}).values()}
        binding = f"{self.prefix}_kombu.binding."
        for key in self.client.scan_iter(match=f"{binding}*", count=1000):
            names.add(key.decode().removeprefix(binding))
        return {name for name in names if name and not name.endswith(".pidbox")}

    def _ready(self, name: str) -> int:
        key = self.prefix + name
        total = int(self.client.llen(key))
        for found in self.client.scan_iter(match=f"{key}{_PRIORITY_SEP}*", count=1000):
            total += int(self.client.llen(found))
        return total

    def _in_flight(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for raw in self.client.hvals(self.unacked_key):
            try:
                _message, _exchange, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            counts[str(routing_key)] = counts.get(str(routing_key), 0) + 1
        return counts

    def _scheduled(self) -> list[tuple[CeleryJob, dict[str, Any]]]:
        entries: list[tuple[CeleryJob, dict[str, Any]]] = []
        for key in (self.store.schedule_key, self.store.releasing_key):
            members: list[bytes] = self.client.zrange(key, 0, -1)  # type: ignore[assignment]
            entries.extend(self.store.decode(member) for member in members)
        return entries

    def _dead(self) -> list[tuple[CeleryJob, dict[str, Any]]]:
        return [self.store.decode(raw) for raw in self.client.hvals(self.store.dead_key)]

    def queues(self) -> list[QueueStats]:
        in_flight = self._in_flight()
        delayed: dict[str, int] = {}
        for job, _extra in self._scheduled():
            delayed[job.queue] = delayed.get(job.queue, 0) + 1
        dead: dict[str, int] = {}
        for job, _extra in self._dead():
            dead[job.queue] = dead.get(job.queue, 0) + 1
        names = self._queue_names() | set(in_flight) | set(delayed) | set(dead)
        return [
            QueueStats(
                name=name,
                ready=self._ready(name),
                delayed=delayed.get(name, 0),
                in_flight=in_flight.get(name, 0),
                dead=dead.get(name, 0),
            )
            for name in sorted(names)
        ]

    def workers(self) -> list[WorkerInfo]:
        try:
            active = self.app.control.inspect(timeout=CONTROL_TIMEOUT).active() or {}
        except Exception:  # no pidbox reachable: no worker known
            return []
        now = datetime.now(timezone.utc)
        return [
            WorkerInfo(id=str(name), last_heartbeat=now, in_flight=len(tasks or ()))
            for name, tasks in sorted(active.items())
        ]

    def retrying(self, *, limit: int | None = None) -> list[RetryingMessage]:
        found = [
            RetryingMessage(
                message_id=job.task_id,
                queue=job.queue,
                actor=job.name,
                retries=job.retries,
                eta=_at(extra.get("due")),
                last_error=extra.get("error") or None,
            )
            for job, extra in self._scheduled()
            # A job sent with a delay is scheduled too, but has not failed.
            if extra.get("error")
        ]
        found.sort(key=lambda r: r.eta or datetime.max.replace(tzinfo=timezone.utc))
        return found if limit is None else found[:limit]

    def dead_letters(
        self, queue: str | None = None, *, limit: int | None = None
    ) -> list[DeadLetter]:
        letters = [
            DeadLetter(
                message_id=job.task_id,
                queue=job.queue,
                actor=job.name,
                args=tuple(job.args),
                kwargs=dict(job.kwargs),
                retries=job.retries,
                traceback=extra.get("error"),
                died_at=_at(extra.get("died_at")),
            )
            for job, extra in self._dead()
            if queue is None or job.queue == queue
        ]
        letters.sort(key=lambda d: d.died_at or datetime.min.replace(tzinfo=timezone.utc))
        letters.reverse()
        return letters if limit is None else letters[:limit]

    # ------------------------------------------------------------------ repairing

    def requeue(self, message_ids: Iterable[str]) -> int:
        count = 0
        for task_id in dict.fromkeys(message_ids):
            raw = self.client.hget(self.store.dead_key, task_id)
            # HDEL succeeds for one caller only, so a racing requeue cannot double it.
            if raw is None or not self.client.hdel(self.store.dead_key, task_id):
                continue
            job, _extra = self.store.decode(raw)
            try:
                self._publish_again(job)
            except BaseException:
                self.client.hset(self.store.dead_key, task_id, raw)  # keep it dead, not lost
                raise
            self.client.zrem(self.store.died_key, task_id)
            count += 1
        return count

    def _publish_again(self, job: CeleryJob) -> None:
        """Publish a dead letter as a first attempt; a keyed one under a new number.

        Its old turn has passed, so it takes the key's next number: it runs
        after the jobs of its key sent before the requeue.
        """
        from ..runners.envelope import ordering_headers

        seq = None
        if job.ordering_key is not None and self.store.turns is not None:
            seq = self.store.turns.number(job.ordering_key)
        self.app.send_task(
            job.name, args=job.args, kwargs=job.kwargs, task_id=job.task_id,
            queue=job.queue, retries=0, headers=ordering_headers(job.ordering_key, seq),
        )  # fmt: skip

    def purge_dead(self, queue: str | None = None) -> int:
        doomed = [job.task_id for job, _extra in self._dead() if queue in (None, job.queue)]
        if not doomed:
            return 0
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.store.dead_key, *doomed)
            pipe.zrem(self.store.died_key, *doomed)
            removed = int(pipe.execute()[0])
        return removed
