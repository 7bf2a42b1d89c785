"""A kombu transport on :class:`~botkit_tasks.brokers.SqlBroker`'s tables: Celery on SQL.

URLs: ``botkit+postgresql://…`` and ``botkit+sqlite:///…`` (the part after
``botkit+`` is a SQLAlchemy URL).  Importing this module (or
:mod:`botkit_tasks.runners.celery`) registers the ``botkit`` alias with kombu.

Why not kombu's own ``sqla+`` transport: it hides a message when it is
fetched and never shows it again, so every message a worker had prefetched or
was running when it died is lost (``docs/celery.md`` has the measured numbers).
Here a message is a row of ``{prefix}messages`` exactly as for Dramatiq:

- a worker claims rows in batches with ``FOR UPDATE SKIP LOCKED`` (state
  ``consumed``, stamped with a worker id that heartbeats), PostgreSQL wakes
  idle workers with ``LISTEN/NOTIFY``;
- ``ack`` deletes the row; ``reject(requeue=True)`` and a warm shutdown put
  it back; ``reject(requeue=False)`` keeps it as a dead letter;
- a worker killed with ``SIGKILL`` stops heartbeating and its rows go back to
  their queue after ``heartbeat_timeout``;
- a message with a future ``eta`` (Celery's ``countdown``/``eta``, and the
  retries of :mod:`botkit_tasks.runners.celery`) waits in the ``X.DQ`` queue
  of the table, not in a worker's memory, and is delivered when due.

The claiming, heartbeats, grouped ack deletes and wake-ups are
:class:`~botkit_tasks.brokers.sql.SqlBroker`'s consumer: each queue a worker
consumes (and its delay queue) gets one consumer on its own thread, feeding
the kombu channel.  Rows hold a Dramatiq message (so ``monitor.inspect()``
and ``botkit-tasks dead …`` read them as usual) whose options carry either
the kombu message as published (``"kombu"``) or a job written by the Celery
runner (``"celery"``: task id and retries; args and kwargs are the message's).

Transport options (``broker_transport_options``): ``table_prefix``,
``poll_interval``, ``heartbeat_timeout``, ``dead_message_ttl`` as for
``SqlBroker``.
"""

from __future__ import annotations

import logging
import os
import queue as queue_module
import threading
import uuid
from typing import Any

import kombu.transport
import sqlalchemy as sa
from dramatiq.common import current_millis, dq_name, q_name
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message
from kombu.transport import virtual
from sqlalchemy.engine import Engine

from .._sql import transaction
from ..brokers.sql import SqlBroker
from ..errors import ConfigurationError
from .envelope import (
    ORDERING_HEADER,
    decoded_arguments,
    eta_delay_ms,
    ordering_key_of,
    row_payload,
)

__all__ = [
    "SCHEME",
    "Channel",
    "Transport",
    "broker_for",
    "close_brokers",
    "register",
    "share_engine",
]

logger = logging.getLogger(__name__)

#: The URL scheme prefix: ``botkit+postgresql://…``, ``botkit+sqlite:///…``.
SCHEME = "botkit"
#: Longest single wait of the channel for a message (s) when kombu gives no
#: timeout; kombu loops around it.
WAIT = 1.0
#: Prefetch of a queue's consumer when Celery has not set one.
DEFAULT_PREFETCH = 4
_OPTIONS = ("table_prefix", "poll_interval", "heartbeat_timeout", "dead_message_ttl", "listen")

_brokers: dict[tuple[int, str, tuple[tuple[str, Any], ...]], SqlBroker] = {}
_brokers_lock = threading.Lock()
# Database URL (as rendered by SQLAlchemy) -> the Engine its brokers use.
_shared_engines: dict[str, Engine] = {}


def _normal(url: str) -> str:
    try:
        return sa.make_url(url).render_as_string(hide_password=False)
    except sa.exc.ArgumentError:
        return url


def share_engine(url: str, engine: Engine | None) -> None:
    """Have this process's :func:`broker_for` brokers of ``url`` use ``engine`` (``None``: stop).

    ``config.from_env()`` shares the key-value store's engine, so that a
    task published inside ``botkit_tasks.atomic(engine)`` (the transactional
    outbox) commits with the block's key-value writes.
    """
    with _brokers_lock:
        if engine is None:
            _shared_engines.pop(_normal(url), None)
        else:
            _shared_engines[_normal(url)] = engine


def register() -> None:
    """Make ``botkit+…://`` URLs resolve to :class:`Transport` (idempotent)."""
    kombu.transport.TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")


def broker_for(url: str, options: dict[str, Any] | None = None) -> SqlBroker:
    """The process's ``SqlBroker`` for database ``url`` with these transport options.

    One per process and settings: every kombu connection of a worker (and the
    Celery runner's retry writes) share its engine and its LISTEN thread.
    """
    chosen = {k: v for k, v in (options or {}).items() if k in _OPTIONS}
    url = _normal(url)
    key = (os.getpid(), url, tuple(sorted(chosen.items())))
    with _brokers_lock:
        broker = _brokers.get(key)
        if broker is None:
            # No middleware: the Celery runner, not Dramatiq's Retries, retries.
            target: str | Engine = _shared_engines.get(url, url)
            broker = _brokers[key] = SqlBroker(target, middleware=[], **chosen)
        return broker


def close_brokers(url: str) -> int:
    """Close this process's :func:`broker_for` brokers of database ``url``; return how many.

    For a process that is done with a Celery app (``Backends.close()``); a
    later :func:`broker_for` opens a new one.
    """
    url = _normal(url)
    with _brokers_lock:
        doomed = [key for key in _brokers if key[0] == os.getpid() and key[1] == url]
        brokers = [_brokers.pop(key) for key in doomed]
    for broker in brokers:
        broker.close()
    return len(brokers)


class _Pump(threading.Thread):
    """Runs one SqlBroker consumer and hands its messages to the channel."""

    def __init__(self, channel: Channel, queue_name: str, prefetch: int) -> None:
        super().__init__(name=f"botkit-kombu-{queue_name}", daemon=True)
        self.channel = channel
        self.queue_name = queue_name
        self.prefetch = prefetch
        self.consumer: Any = None
        self.stopping = threading.Event()

    def run(self) -> None:
        broker = self.channel.sql
        failures = 0
        while not self.stopping.is_set():
            try:
                if self.consumer is None:
                    self.consumer = broker.consume(
                        self.queue_name, prefetch=self.prefetch, timeout=int(WAIT * 1000)
                    )
                proxy = next(self.consumer)
                failures = 0
            except (ConnectionClosed, sa.exc.DBAPIError) as exc:
                failures += 1
                logger.warning("Consumer of %s lost its database: %s", self.queue_name, exc)
                self._close_consumer()
                self.stopping.wait(min(0.1 * 2**failures, 5.0))
                continue
            if proxy is not None:
                self.channel._ready.put((q_name(self.queue_name), self.consumer, proxy))

    def _close_consumer(self) -> None:
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            try:
                consumer.close()
            except Exception as exc:  # the rows come back through heartbeat expiry
                logger.warning("Could not close consumer of %s: %s", self.queue_name, exc)


class SqlQoS(virtual.QoS):  # type: ignore[misc]
    """Acks delete rows, rejects requeue or dead-letter them; nothing is restored by copy."""

    def ack(self, delivery_tag: str) -> None:
        entry = self.channel._inflight.pop(delivery_tag, None)
        if entry is not None:
            entry[0].ack(entry[1])
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        entry = self.channel._inflight.pop(delivery_tag, None)
        if entry is not None:
            consumer, proxy = entry
            if requeue:
                consumer.requeue([proxy])
            else:
                proxy.options.setdefault("traceback", "rejected by the worker (requeue=False)")
                consumer.nack(proxy)
        self._quick_ack(delivery_tag)

    def restore_unacked(self) -> list[Any]:
        self._flush()
        for tag in list(self._delivered):
            entry = self.channel._inflight.pop(tag, None)
            if entry is not None:
                entry[0].requeue([entry[1]])
        self._delivered.clear()
        return []


class Channel(virtual.Channel):  # type: ignore[misc]
    """A kombu channel whose queues are SqlBroker queues (see the module docstring)."""

    QoS = SqlQoS
    do_restore = True

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._ready: queue_module.Queue[tuple[str, Any, Any]] = queue_module.Queue()
        self._pumps: dict[str, _Pump] = {}
        self._inflight: dict[str, tuple[Any, Any]] = {}
        self._pumps_lock = threading.Lock()
        self._single: list[Any] = []

    @property
    def sql(self) -> SqlBroker:
        """The process's broker on this connection's database."""
        client = self.connection.client
        return broker_for(client.hostname, client.transport_options)

    # -- publishing --------------------------------------------------------------

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        headers = message.get("headers") or {}
        props = message.get("properties") or {}
        task_id = str(headers.get("id") or props.get("correlation_id") or uuid.uuid4())
        if len(task_id) > 36:
            task_id = str(uuid.uuid4())  # the column's width; the envelope keeps the real id
        args, kw = decoded_arguments(message)
        retries = headers.get("retries", 0)
        options: dict[str, Any] = {
            "kombu": message,
            "retries": retries if isinstance(retries, int) else 0,
        }
        # A job sent with an ordering key is a keyed row: SqlBroker runs the
        # rows of one key one at a time, in enqueue order (retries included).
        if (key := ordering_key_of(headers.get(ORDERING_HEADER))) is not None:
            options["ordering_key"] = key
        stored: Message[Any] = Message(
            queue_name=queue,
            actor_name=str(headers.get("task") or "kombu")[:255],
            args=tuple(args),
            kwargs=kw,
            options=options,
            message_id=task_id,
            message_timestamp=current_millis(),
        )
        self.sql.enqueue(stored, delay=eta_delay_ms(headers.get("eta")))

    # -- consuming ----------------------------------------------------------------

    def _ensure_pumps(self, queues: list[str]) -> None:
        prefetch = int(self.qos.prefetch_count or DEFAULT_PREFETCH)
        with self._pumps_lock:
            for name in queues:
                for stored in (q_name(name), dq_name(name)):
                    if stored not in self._pumps:
                        self.sql.declare_queue(q_name(name))
                        pump = self._pumps[stored] = _Pump(self, stored, prefetch)
                        pump.start()

    def _get_many(self, queues: list[str], timeout: float | None = None) -> None:
        self._ensure_pumps(queues)
        # The whole timeout (Celery's worker loop asks for 2 s): kombu sleeps its
        # polling interval after every empty wait shorter than that, and a
        # message arriving during that sleep waits for it.
        wait = WAIT if timeout is None else max(timeout, 0.0)
        try:
            name, consumer, proxy = self._ready.get(timeout=wait)
        except queue_module.Empty:
            raise virtual.Empty() from None
        payload = row_payload(proxy._message, name)
        self._inflight[payload["properties"]["delivery_tag"]] = (consumer, proxy)
        self.connection._deliver(payload, name)

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        # basic_get: claim one row with a consumer of its own, closed with the channel.
        consumer = self.sql.consume(q_name(queue), prefetch=1, timeout=0)
        proxy = None
        try:
            proxy = next(consumer)
        finally:
            if proxy is None:
                consumer.close()
        if proxy is None:
            raise virtual.Empty()
        self._single.append(consumer)
        payload = row_payload(proxy._message, q_name(queue))
        self._inflight[payload["properties"]["delivery_tag"]] = (consumer, proxy)
        return payload

    def _size(self, queue: str) -> int:
        m = self.sql.messages
        # In the caller's atomic() block when there is one (a publish declares
        # its queue first); else a read that takes no SQLite write lock.
        with transaction(self.sql.engine, read_only=True) as conn:
            count = conn.execute(
                sa.select(sa.func.count())
                .select_from(m)
                .where(m.c.queue_name == queue, m.c.state == "queued")
            ).scalar_one()
        return int(count)

    def _purge(self, queue: str) -> int:
        m = self.sql.messages
        with transaction(self.sql.engine) as conn:
            result = conn.execute(
                m.delete().where(
                    m.c.queue_name.in_([q_name(queue), dq_name(queue)]), m.c.state == "queued"
                )
            )
        return int(result.rowcount)

    def close(self) -> None:
        with self._pumps_lock:
            pumps, self._pumps = list(self._pumps.values()), {}
        for pump in pumps:
            pump.stopping.set()
        for pump in pumps:
            pump.join(WAIT * 3)
        # Handed out by a consumer but never delivered to Celery: back to the queue.
        while True:
            try:
                _name, consumer, proxy = self._ready.get_nowait()
            except queue_module.Empty:
                break
            consumer.requeue([proxy])
        super().close()  # restores (requeues) what Celery holds unacked
        for pump in pumps:
            pump._close_consumer()
        for consumer in self._single:
            consumer.close()


class Transport(virtual.Transport):  # type: ignore[misc]
    """kombu transport for ``botkit+<SQLAlchemy URL>`` (see the module docstring)."""

    Channel = Channel
    # The channel waits for rows itself (NOTIFY or the consumers' due timers);
    # this only paces the loop while Celery's prefetch limit is reached.
    polling_interval = 0.05
    default_port = 0
    driver_type = "sql"
    driver_name = "botkit"
    can_parse_url = True
    connection_errors = (
        *virtual.Transport.connection_errors,
        ConnectionClosed,
        sa.exc.OperationalError,
    )
    channel_errors = (*virtual.Transport.channel_errors, sa.exc.DBAPIError)

    def __init__(self, client: Any, **kwargs: Any) -> None:
        hostname = client.hostname or ""
        if not hostname.startswith(("postgresql", "postgres", "sqlite")):
            raise ConfigurationError(
                f"broker URL {SCHEME}+{hostname!r}: expected {SCHEME}+postgresql://… "
                f"or {SCHEME}+sqlite:///…"
            )
        super().__init__(client, **kwargs)

    def driver_version(self) -> str:
        return sa.__version__


register()
