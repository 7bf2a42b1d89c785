"""Cross-process wake-ups for :class:`~botkit_tasks.brokers.sql.SqlBroker` on SQLite.

SQLite has no ``LISTEN/NOTIFY``.  Instead every process that consumes binds
one UDP socket on the loopback interface and records its port in the
``{prefix}wakeups`` table of the same database file.  After an enqueue
commits, the producer sends one datagram (the queue name) to every registered
port; the receiving process wakes its consumers of that queue, which then
claim as usual.

A datagram carries no data the consumer relies on: the rows in the database
are the truth, and each consumer still polls every ``poll_interval``.  A lost,
late or duplicated datagram therefore costs at most one poll interval of
latency, never a message.  Idle receivers block in ``recv`` (no polling).

Stale registrations (a ``kill -9`` leaves its row behind) are pruned when a
process registers, by checking whether the recorded pid is alive; a datagram
sent to a dead port is simply dropped by the kernel.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

logger = logging.getLogger(__name__)

#: Seconds a producer reuses its list of registered ports before reading it again.
PORTS_TTL = 1.0
#: Seconds one blocking ``recv`` lasts before the stop flag is looked at.
RECV_SLICE = 5.0
#: Longest queue name a datagram carries (Dramatiq queue names are short).
MAX_DATAGRAM = 1024
#: The first bytes of every datagram: anything else arriving on the port is ignored.
MAGIC = b"botkit1:"


def wakeups_table(prefix: str) -> sa.Table:
    """The registry of listening ports: one row per consuming process."""
    return sa.Table(
        f"{prefix}wakeups",
        sa.MetaData(),
        sa.Column("port", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("registered_at", sa.Float, nullable=False),
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class WakeupSender:
    """Sends wake-up datagrams to the ports registered in ``table``.

    Thread-safe; one per broker.  Never raises: a failed send only means the
    receiver notices the message at its next poll.
    """

    def __init__(self, engine: Engine, table: sa.Table) -> None:
        self.engine = engine
        self.table = table
        self._lock = threading.Lock()
        self._ports: list[int] = []
        self._read_at = -PORTS_TTL
        self._sock: socket.socket | None = None
        self._pid = os.getpid()

    def forget_ports(self) -> None:
        """Re-read the registry at the next send (a receiver joined or left here)."""
        with self._lock:
            self._read_at = -PORTS_TTL

    def _current_ports(self) -> list[int]:
        now = time.monotonic()
        with self._lock:
            if now - self._read_at < PORTS_TTL:
                return self._ports
        try:
            with self.engine.connect() as conn:
                # A plain read: no BEGIN IMMEDIATE, so it never waits for a writer.
                conn = conn.execution_options(sqlite_begin="DEFERRED")
                ports = list(conn.execute(sa.select(self.table.c.port)).scalars())
        except sa.exc.DBAPIError as exc:
            logger.debug("could not read the wake-up registry: %s", exc)
            ports = self._ports
        with self._lock:
            self._ports, self._read_at = ports, now
        return ports

    def _socket(self) -> socket.socket:
        if self._sock is None or self._pid != os.getpid():
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
            self._pid = os.getpid()
        return self._sock

    def send(self, queues: Iterable[str], *, skip_port: int | None = None) -> None:
        """Wake the consumers of ``queues`` in every registered process."""
        ports = [port for port in self._current_ports() if port != skip_port]
        if not ports:
            return
        payloads = [MAGIC + queue.encode()[:MAX_DATAGRAM] for queue in queues]
        with self._lock:
            sock = self._socket()
            for port in ports:
                for payload in payloads:
                    try:
                        sock.sendto(payload, ("127.0.0.1", port))
                    except OSError as exc:
                        # A full socket buffer (EAGAIN) means a wake-up is already
                        # pending there; anything else is for the poll to cover.
                        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                            logger.debug("wake-up to port %d failed: %s", port, exc)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None and self._pid == os.getpid():
                self._sock.close()
            self._sock = None


class WakeupReceiver:
    """Binds a loopback UDP port, registers it, and calls ``on_wake(queue)`` per datagram.

    Args:
        engine: The broker's engine (the registry lives in its database).
        table: The registry table (see :func:`wakeups_table`).
        on_wake: Called on the receiver thread with each queue name.
    """

    def __init__(self, engine: Engine, table: sa.Table, on_wake: Callable[[str], None]) -> None:
        self.engine = engine
        self.table = table
        self.on_wake = on_wake
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(RECV_SLICE)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._run, name=f"botkit-wakeup-{self.port}", daemon=True
        )

    def start(self) -> None:
        """Register the port (pruning dead processes' rows) and start receiving."""
        t = self.table
        with self.engine.begin() as conn:
            t.metadata.create_all(conn, checkfirst=True)
            for port, pid in conn.execute(sa.select(t.c.port, t.c.pid)).all():
                if pid != self.pid and not _alive(pid):
                    conn.execute(t.delete().where(t.c.port == port))
            conn.execute(t.delete().where(t.c.port == self.port))
            conn.execute(t.insert().values(port=self.port, pid=self.pid, registered_at=time.time()))
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(MAX_DATAGRAM + len(MAGIC))
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            if not data.startswith(MAGIC) or self._stop.is_set():
                continue
            try:
                self.on_wake(data[len(MAGIC) :].decode(errors="replace"))
            except Exception:  # keep receiving whatever a callback does
                logger.exception("wake-up callback failed")

    def stop(self) -> None:
        """Unregister, stop the thread and close the socket (in the owning process only)."""
        if self.pid != os.getpid():
            return
        self._stop.set()
        try:
            with self.engine.begin() as conn:
                conn.execute(self.table.delete().where(self.table.c.port == self.port))
        except sa.exc.DBAPIError as exc:
            logger.debug("could not unregister wake-up port %d: %s", self.port, exc)
        try:  # end the blocking recv at once
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as poke:
                poke.sendto(b"", ("127.0.0.1", self.port))
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(RECV_SLICE + 1.0)
        self._sock.close()


class SqliteWakeups:
    """The broker's side of cross-process wake-ups: one sender, one receiver per process.

    The receiver starts with the first consumer of the process (lazily, so a
    ``dramatiq`` master that only imports the broker before forking binds
    nothing) and is replaced after ``fork()``, whose child inherits neither
    the thread nor, usefully, the socket.
    """

    def __init__(self, engine: Engine, prefix: str) -> None:
        self.table = wakeups_table(prefix)
        self.sender = WakeupSender(engine, self.table)
        self.engine = engine
        self._lock = threading.Lock()
        self._receiver: WakeupReceiver | None = None

    def ensure_receiving(self, on_wake: Callable[[str], None]) -> None:
        """Start this process's receiver if it has none yet."""
        with self._lock:
            receiver = self._receiver
            if receiver is not None and receiver.pid == os.getpid():
                return
            receiver = WakeupReceiver(self.engine, self.table, on_wake)
            try:
                receiver.start()
            except (OSError, sa.exc.DBAPIError) as exc:
                # Wake-ups are an optimisation: without them consumers poll.
                logger.warning("cross-process wake-ups unavailable (%s); polling only", exc)
                receiver._sock.close()
                return
            self._receiver = receiver
        self.sender.forget_ports()

    def announce(self, queues: Iterable[str]) -> None:
        """Tell the other processes' consumers of ``queues`` to claim."""
        receiver = self._receiver
        own = receiver.port if receiver is not None and receiver.pid == os.getpid() else None
        self.sender.send(queues, skip_port=own)

    def close(self) -> None:
        with self._lock:
            receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.stop()
        self.sender.close()
