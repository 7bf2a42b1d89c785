"""The inspector for Dramatiq's ``RedisBroker``, reading the keys ``dispatch.lua`` writes.

Layout (``ns`` is the broker's namespace, ``X`` a queue):

- ``ns:X`` — list of ids waiting to be fetched; ``ns:X.msgs`` — hash id → data,
  holding each message until it is acked (so it includes in-flight ones);
- ``ns:X.DQ`` / ``ns:X.DQ.msgs`` — the same for delayed messages (workers fetch
  them early and hold them in memory until their ``eta``);
- ``ns:X.XQ`` — sorted set of dead-letter ids scored by death time (ms) and
  ``ns:X.XQ.msgs`` their data;
- ``ns:__heartbeats__`` — sorted set worker id → last call (ms);
  ``ns:__acks__.<worker>.<queue>`` — ids that worker fetched and has not acked.

The ids in these structures are ``options["redis_message_id"]``, fresh on every
enqueue; the inspector reports Dramatiq's own ``message_id``.  Counts are read
in one ``MULTI`` block, so they are a consistent snapshot.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any, cast

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name, q_name, xq_name

from .base import (
    DeadLetter,
    Inspector,
    QueueStats,
    RetryingMessage,
    WorkerInfo,
    at_ms,
    from_ms,
    requeue_copy,
)
from .middleware import WORKERS_KEY

__all__ = ["RedisInspector"]

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _decode(data: bytes | str) -> dramatiq.Message[Any] | None:
    try:
        return dramatiq.Message.decode(data if isinstance(data, bytes) else data.encode())
    except Exception:
        return None


class RedisInspector(Inspector):
    """An :class:`~botkit_tasks.monitor.Inspector` over a ``RedisBroker``'s keys."""

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.client = broker.client
        self.namespace: str = broker.namespace

    def _key(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    def _queue_names(self) -> list[str]:
        """Declared queues plus every queue that has message data in Redis."""
        names = {q_name(q) for q in self.broker.get_declared_queues()}
        prefix = self._key("")
        pattern = _glob_escape(prefix) + "*.msgs"
        for key in self.client.scan_iter(match=pattern, count=1000):
            name = _text(key)[len(prefix) : -len(".msgs")]
            if not name.startswith("__"):
                names.add(q_name(name))
        return sorted(names)

    def queues(self) -> list[QueueStats]:
        names = self._queue_names()
        with self.client.pipeline(transaction=True) as pipe:
            for name in names:
                pipe.llen(self._key(name))
                pipe.hlen(self._key(f"{name}.msgs"))
                pipe.hlen(self._key(f"{dq_name(name)}.msgs"))
                pipe.zcard(self._key(xq_name(name)))
            replies = pipe.execute()
        stats = []
        for i, name in enumerate(names):
            ready, stored, delayed, dead = replies[4 * i : 4 * i + 4]
            stats.append(
                QueueStats(
                    name=name,
                    ready=int(ready),
                    delayed=int(delayed),
                    # X.msgs keeps a message until its ack: stored minus waiting = claimed.
                    in_flight=max(int(stored) - int(ready), 0),
                    dead=int(dead),
                )
            )
        return stats

    def workers(self) -> list[WorkerInfo]:
        """Worker processes whose heartbeat is within ``heartbeat_timeout``.

        ``RedisBroker`` refreshes the heartbeat on every command, enqueues
        included, so a heartbeat alone does not make a worker.  Listed are the
        broker instances registered by a booting worker's
        :class:`~botkit_tasks.monitor.middleware.MonitorMiddleware`, and any
        other instance holding fetched, unacked messages (a consumer without
        the middleware).  Processes that only enqueue are not listed.
        """
        now_ms = time.time() * 1000
        timeout_ms = float(getattr(self.broker, "heartbeat_timeout", 60_000))
        beats = cast(
            "list[tuple[bytes | str, float]]",
            self.client.zrangebyscore(
                self._key("__heartbeats__"), now_ms - timeout_ms, "+inf", withscores=True
            ),
        )
        live = {_text(raw_id): score for raw_id, score in beats}
        registered = self._registered_workers(live, now_ms - timeout_ms)
        workers = []
        for worker_id, score in live.items():
            ack_prefix = self._key(f"__acks__.{worker_id}.")
            ack_keys = [
                key
                for key in self.client.scan_iter(match=_glob_escape(ack_prefix) + "*", count=1000)
                # Delayed messages held in memory wait for their ETA; they are not being run.
                if not _text(key).endswith(".DQ")
            ]
            if worker_id not in registered and not ack_keys:
                continue  # a producer, or an idle consumer without the middleware
            in_flight = 0
            if ack_keys:
                with self.client.pipeline(transaction=False) as pipe:
                    for key in ack_keys:
                        pipe.scard(key)
                    in_flight = sum(int(n) for n in pipe.execute())
            workers.append(
                WorkerInfo(id=worker_id, last_heartbeat=at_ms(score), in_flight=in_flight)
            )
        return sorted(workers, key=lambda w: w.id)

    def _registered_workers(self, live: dict[str, float], stale_before_ms: float) -> set[str]:
        """Registered worker ids; forgets those killed without deregistering."""
        key = self._key(WORKERS_KEY)
        registered: set[str] = set()
        gone: list[str] = []
        for raw_id, raw in self.client.hgetall(key).items():
            worker_id = _text(raw_id)
            try:
                since = float(json.loads(raw).get("since", 0))
            except (ValueError, AttributeError):
                since = 0.0
            if worker_id in live:
                registered.add(worker_id)
            elif since < stale_before_ms:
                # No heartbeat for a whole timeout since it registered: it died
                # (kill -9).  A worker that just booted may not have beaten yet.
                gone.append(worker_id)
        if gone:
            self.client.hdel(key, *gone)
        return registered

    def retrying(self, *, limit: int | None = None) -> list[RetryingMessage]:
        found = []
        for name in self._queue_names():
            # HSCAN, not HVALS: a long delay queue is read in pages, not one reply.
            for _, data in self.client.hscan_iter(self._key(f"{dq_name(name)}.msgs"), count=500):
                message = _decode(data)
                if message is None or not message.options.get("retries"):
                    continue
                eta = message.options.get("eta")
                found.append(
                    RetryingMessage(
                        message_id=message.message_id,
                        queue=name,
                        actor=message.actor_name,
                        retries=int(message.options["retries"]),
                        eta=from_ms(eta) if isinstance(eta, (int, float)) else None,
                        last_error=message.options.get("traceback"),
                    )
                )
        found.sort(key=lambda r: (r.eta is None, r.eta.timestamp() if r.eta else 0.0, r.message_id))
        return found if limit is None else found[:limit]

    def _dead_entries(
        self, name: str, limit: int | None = None
    ) -> list[tuple[str, float, dramatiq.Message[Any] | None]]:
        """Dead letters of ``name``, most recent first (the newest ``limit`` only)."""
        xq = self._key(xq_name(name))
        if limit is not None and limit <= 0:
            return []
        entries = cast(
            "list[tuple[bytes | str, float]]",
            self.client.zrevrange(xq, 0, -1 if limit is None else limit - 1, withscores=True),
        )
        if not entries:
            return []
        datas = self.client.hmget(f"{xq}.msgs", [redis_id for redis_id, _ in entries])
        return [
            (_text(redis_id), float(score), _decode(data) if data is not None else None)
            for (redis_id, score), data in zip(entries, datas, strict=True)
        ]

    def dead_letters(
        self, queue: str | None = None, *, limit: int | None = None
    ) -> list[DeadLetter]:
        names = [q_name(queue)] if queue is not None else self._queue_names()
        letters = []
        for name in names:
            # The newest `limit` of each queue include the newest `limit` overall.
            for redis_id, score, message in self._dead_entries(name, limit):
                if message is None:
                    letters.append(DeadLetter(redis_id, name, "", (), {}, 0, None, from_ms(score)))
                    continue
                letters.append(
                    DeadLetter(
                        message_id=message.message_id,
                        queue=name,
                        actor=message.actor_name,
                        args=tuple(message.args),
                        kwargs=dict(message.kwargs),
                        retries=int(message.options.get("retries", 0)),
                        traceback=message.options.get("traceback"),
                        died_at=from_ms(score),
                    )
                )
        letters.sort(key=lambda d: d.died_at.timestamp() if d.died_at else 0.0, reverse=True)
        return letters if limit is None else letters[:limit]

    def requeue(self, message_ids: Iterable[str]) -> int:
        wanted = set(message_ids)
        if not wanted:
            return 0
        count = 0
        for name in self._queue_names():
            xq = self._key(xq_name(name))
            for redis_id, _score, message in self._dead_entries(name):
                if message is None or message.message_id not in wanted:
                    continue
                # ZREM succeeds for one caller only, so a racing requeue cannot double it.
                if self.client.zrem(xq, redis_id):
                    self.broker.enqueue(requeue_copy(message))
                    self.client.hdel(f"{xq}.msgs", redis_id)
                    count += 1
        return count

    def purge_dead(self, queue: str | None = None) -> int:
        names = [q_name(queue)] if queue is not None else self._queue_names()
        total = 0
        for name in names:
            xq = self._key(xq_name(name))
            with self.client.pipeline(transaction=True) as pipe:
                pipe.zcard(xq)
                pipe.delete(xq, f"{xq}.msgs")
                total += int(pipe.execute()[0])
        return total
