"""Where the Celery runner keeps delayed retries and dead letters: durable, outside workers.

Celery's own ``countdown``/``eta`` leaves a delayed task in the memory of the
worker that fetched it (and on Redis hands it out again after the
``visibility_timeout``).  The runner never uses it: a retry is written here,
the current message is acked, and the retry is published when it is due.

- :class:`SqlJobStore` (``botkit+postgresql://``, ``botkit+sqlite:///``): a
  retry is a row of the ``X.DQ`` queue of ``{prefix}messages`` whose
  ``available_at`` is its due time; the transport's consumers deliver it
  then.  A dead letter is a ``dead`` row with its traceback.  Both are what
  ``monitor.inspect()`` reads for a Dramatiq ``SqlBroker``.
- :class:`RedisJobStore` (``redis://``): retries wait in a sorted set scored by
  due time; :meth:`RedisJobStore.release` (run by a thread in every worker)
  moves due ones to a "releasing" set with a lease, publishes them with
  ``send_task`` and then drops them, so a worker dying in between only makes
  the lease lapse and another worker publish them.  Dead letters are a hash.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from dramatiq.common import current_millis
from dramatiq.message import Message

from ..brokers._ordering import first_delivery_seq
from ..brokers._schema import now_ms
from ..brokers.ordering import KeyTurns
from ..brokers.sql import SqlBroker
from ..errors import ConfigurationError
from ..kv.redis import RedisKvStore

__all__ = ["CeleryJob", "JobStore", "RedisJobStore", "SqlJobStore", "store_for_url"]

#: Seconds a released retry may take to be published before another worker does it.
RELEASE_LEASE = 30.0
#: Most retries one :meth:`RedisJobStore.release` call publishes.
RELEASE_BATCH = 100
#: Seconds a dead letter is kept on Redis (as ``SqlBroker``'s default).
DEAD_TTL = 7 * 86400


@dataclasses.dataclass(frozen=True)
class CeleryJob:
    """One run of a task: what ``send_task`` needs to run it again."""

    name: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    task_id: str
    retries: int
    #: The job's ordering key (``envelope.ORDERING_HEADER``), kept across retries.
    ordering_key: str | None = None
    #: Its number under that key, where the runner orders (Redis, :class:`KeyTurns`).
    ordering_seq: int | None = None
    #: How often it found its key busy (its next wait doubles).
    ordering_defers: int = 0

    def message(self, error: str | None, queue: str | None = None) -> Message[Any]:
        """The job as a ``SqlBroker`` row's message (see ``runners.kombu_sql``)."""
        return Message(
            queue_name=queue or self.queue,
            actor_name=self.name,
            args=tuple(self.args),
            kwargs=self.kwargs,
            options={
                "celery": {"task_id": self.task_id, "retries": self.retries},
                "retries": self.retries,
                "traceback": error,
                **({} if self.ordering_key is None else {"ordering_key": self.ordering_key}),
            },
            message_id=self.task_id if len(self.task_id) <= 36 else str(uuid.uuid4()),
            message_timestamp=current_millis(),
        )


class JobStore(abc.ABC):
    """Durable delayed retries and dead letters of one Celery broker.

    Attributes:
        turns: The ordering-key records where the runner itself orders keyed
            jobs (Celery's Redis transport); ``None`` where the broker does
            (our SQL transport).
    """

    turns: KeyTurns | None = None

    @abc.abstractmethod
    def schedule(self, job: CeleryJob, delay: float, error: str) -> None:
        """Keep ``job`` until ``delay`` seconds from now, then have it published."""

    @abc.abstractmethod
    def dead(self, job: CeleryJob, error: str) -> None:
        """Keep ``job`` as a dead letter with its traceback ``error``."""

    def release(self, publish: Callable[[CeleryJob], None]) -> int:
        """Publish the retries that are due; return how many (no-op where the broker does it)."""
        return 0


class SqlJobStore(JobStore):
    """Retries and dead letters as rows of the transport's own table."""

    def __init__(self, broker: SqlBroker) -> None:
        self.broker = broker

    def schedule(self, job: CeleryJob, delay: float, error: str) -> None:
        # At least 1 ms: a delay puts the row in X.DQ, where retries are looked for.
        self.broker.enqueue(job.message(error), delay=max(int(delay * 1000), 1))

    def dead(self, job: CeleryJob, error: str) -> None:
        """Insert a dead row; a keyed one keeps its key and its place in the key's order.

        The place is the ``ordering_seq`` of the row being run (still there:
        it is acked after this), so a requeue puts the job back after its
        key's current head and before the jobs sent after it, as for a
        Dramatiq ``SqlBroker`` dead letter.
        """
        m, now = self.broker.messages, now_ms(self.broker.engine)
        message = job.message(error)
        keyed: dict[str, Any] = {}
        if job.ordering_key is not None:
            keyed = {
                "ordering_key": job.ordering_key,
                "ordering_seq": first_delivery_seq(m, message.message_id, job.ordering_key),
            }
        with self.broker.engine.begin() as conn:
            row_id = conn.execute(
                m.insert()
                .returning(m.c.id)
                .values(
                    **keyed,
                    message_id=message.message_id,
                    queue_name=job.queue,
                    actor_name=job.name,
                    state="dead",
                    available_at=now,
                    enqueued_at=now,
                    dead_at=now,
                    retries=job.retries,
                    last_error=error,
                    data=message.encode(),
                )
            ).scalar_one()
            if keyed:
                # No running row found (an id too long for the column): a place
                # after every job of the key sent so far.
                conn.execute(
                    m.update()
                    .where(m.c.id == row_id, m.c.ordering_seq.is_(None))
                    .values(ordering_seq=m.c.id)
                )


# Moves due retries (and retries whose release lease lapsed) to "releasing"
# with a fresh lease, atomically, and returns them.
_RELEASE = """
local now = tonumber(ARGV[1])
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[3])
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), member)
end
for _, member in ipairs(lapsed) do
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), member)
  table.insert(due, member)
end
return due
"""


class RedisJobStore(JobStore):
    """Retries in a sorted set, dead letters in a hash, under ``key_prefix``."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        key_prefix: str = "botkit:celery:",
        turns: KeyTurns | None = None,
    ) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.turns = turns
        self.schedule_key = f"{key_prefix}schedule"
        self.releasing_key = f"{key_prefix}releasing"
        self.dead_key = f"{key_prefix}dead"
        self.died_key = f"{key_prefix}dead-at"
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def _encode(job: CeleryJob, error: str, **extra: Any) -> str:
        return json.dumps({**dataclasses.asdict(job), "error": error, **extra}, sort_keys=True)

    @staticmethod
    def decode(raw: bytes | str) -> tuple[CeleryJob, dict[str, Any]]:
        """A stored entry as its job and the rest of its fields (``error``, ``due``, …)."""
        fields = json.loads(raw)
        names = {f.name for f in dataclasses.fields(CeleryJob)}
        job = CeleryJob(**{k: v for k, v in fields.items() if k in names})
        return job, {k: v for k, v in fields.items() if k not in names}

    def schedule(self, job: CeleryJob, delay: float, error: str) -> None:
        due = time.time() + delay
        # A unique member: the same task id may be scheduled again later.
        member = self._encode(job, error, due=due, entry=uuid.uuid4().hex)
        self.client.zadd(self.schedule_key, {member: due * 1000})

    def dead(self, job: CeleryJob, error: str) -> None:
        now = time.time()
        pipe = self.client.pipeline()
        pipe.hset(self.dead_key, job.task_id, self._encode(job, error, died_at=now))
        pipe.zadd(self.died_key, {job.task_id: now})
        expired = self.client.zrangebyscore(self.died_key, "-inf", now - DEAD_TTL)
        if expired:
            pipe.hdel(self.dead_key, *expired)
            pipe.zrem(self.died_key, *expired)
        pipe.execute()

    def release(self, publish: Callable[[CeleryJob], None]) -> int:
        members = self._release(
            keys=[self.schedule_key, self.releasing_key],
            args=[int(time.time() * 1000), int(RELEASE_LEASE * 1000), RELEASE_BATCH],
        )
        for member in members:
            job, _ = self.decode(member)
            publish(job)
            # Dropped only once published: a crash before this republishes it.
            self.client.zrem(self.releasing_key, member)
        return len(members)


_stores: dict[tuple[int, str, str], JobStore] = {}
_stores_lock = threading.Lock()


def store_for_url(url: str, transport_options: dict[str, Any]) -> JobStore:
    """The process's job store for a Celery broker URL.

    Raises:
        ConfigurationError: The broker is neither ``botkit+…`` nor Redis.
    """
    key = (os.getpid(), url, json.dumps(transport_options, sort_keys=True, default=repr))
    with _stores_lock:
        store = _stores.get(key)
        if store is not None:
            return store
        scheme = url.partition("://")[0]
        if scheme.startswith("botkit+"):
            from .kombu_sql import broker_for

            store = SqlJobStore(broker_for(url.removeprefix("botkit+"), transport_options))
        elif scheme in ("redis", "rediss"):
            prefix = str(transport_options.get("botkit_key_prefix", "botkit:celery:"))
            # Redis lists cannot hold a job back: the runner orders keyed jobs
            # itself, with turn records under {prefix}ordering:.
            turns = KeyTurns(RedisKvStore(url, key_prefix=f"{prefix}ordering:"))
            store = RedisJobStore(redis.Redis.from_url(url), key_prefix=prefix, turns=turns)
        else:
            raise ConfigurationError(
                f"the Celery runner needs a botkit+postgresql://, botkit+sqlite:/// or "
                f"redis:// broker, not {scheme}://"
            )
        _stores[key] = store
        return store
