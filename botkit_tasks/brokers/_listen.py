"""PostgreSQL helper threads of a :class:`SqlBroker`: ``LISTEN`` and ``VACUUM``.

One thread per broker (in practice per worker process) holds one dedicated
connection, opened outside the engine's pool so that pool recycling and
``pool_pre_ping`` never touch it, and turns notifications into wake-ups of the
in-process consumers.  When the connection is lost it reconnects with backoff
and then wakes every consumer, because notifications sent while it was away
are gone and the queues must be polled at once.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Engine

logger = logging.getLogger(__name__)

# A private generator: jitter must not consume or reseed the application's
# global random state (tests and users may seed it).
_random = random.Random()

#: How long one wait for notifications lasts before the stop flag is checked (s).
WAIT_SLICE = 1.0
#: Longest pause between reconnection attempts (s).
MAX_RECONNECT_DELAY = 5.0


class PgListener:
    """Listen on ``channel`` and call ``on_notify(payload)`` for each notification.

    Args:
        engine: Engine whose URL and connection arguments are used for the
            dedicated connection.
        channel: Channel name (at most 63 bytes, Postgres' identifier limit).
        on_notify: Called on the listener thread with each payload.
        on_connect: Called after every successful (re)connection, once
            ``LISTEN`` is in effect; used to poll the queues at once.
    """

    def __init__(
        self,
        engine: Engine,
        channel: str,
        on_notify: Callable[[str], None],
        on_connect: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.on_notify = on_notify
        self.on_connect = on_connect
        self.pid = os.getpid()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._raw: Any = None
        self._thread = threading.Thread(
            target=self._run, name=f"botkit-listen-{channel}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = WAIT_SLICE + 1.0) -> None:
        """Ask the thread to finish and wait up to ``timeout`` seconds for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _connect(self) -> psycopg.Connection[Any]:
        # Detached from the pool: the pool never recycles, pings or hands out
        # this connection (closing it really closes it), yet it is made with
        # the engine's own connect arguments and hooks.
        raw = self.engine.raw_connection()
        conn: psycopg.Connection[Any] = raw.driver_connection  # type: ignore[assignment]
        raw.detach()
        self._raw = raw
        conn.rollback()
        conn.autocommit = True
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        return conn

    def _run(self) -> None:
        delay = 0.05
        while not self._stop.is_set():
            try:
                self._conn = self._connect()
                self.connected.set()
                delay = 0.05
                self.on_connect()
                while not self._stop.is_set():
                    for notify in self._conn.notifies(timeout=WAIT_SLICE):
                        if self._stop.is_set():
                            break
                        if notify.payload:
                            self.on_notify(notify.payload)
            except (psycopg.Error, sa.exc.DBAPIError) as exc:
                if not self._stop.is_set():
                    logger.warning("LISTEN connection lost (%s); reconnecting", exc)
            except Exception:  # keep the wake-ups alive whatever a callback does
                logger.exception("unexpected error in the LISTEN thread")
            finally:
                self.connected.clear()
                raw, self._raw, self._conn = self._raw, None, None
                if raw is not None:
                    try:
                        raw.close()
                    except Exception:
                        logger.debug("closing the LISTEN connection failed", exc_info=True)
            self._stop.wait(delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY)


#: Dead row versions in the messages table that trigger a VACUUM.
VACUUM_DEAD_ROWS = 20_000
#: Seconds between two looks at the dead-row count.
VACUUM_CHECK_INTERVAL = 2.0


class PgVacuum:
    """Vacuum the messages table when deletes and claims have left dead rows.

    Every claim and every ack leaves a dead row version behind, and their
    index entries sit at the head of the ready index that each claim scans,
    so claims slow down as they pile up.  Autovacuum clears them when it is
    on and keeps up; this thread makes sure it happens when it is off or too
    slow (its default thresholds scale with the table, a queue needs a
    constant one).  A session advisory lock keeps workers from vacuuming
    the same table at once; with ``session_lock=False`` (behind a transaction
    pooler, where a session lock may outlive its client) ``VACUUM (SKIP_LOCKED)``
    skips the table instead while another worker vacuums it.
    """

    def __init__(
        self, engine: Engine, table_name: str, lock_key: int, *, session_lock: bool = True
    ) -> None:
        self.engine = engine
        self.session_lock = session_lock
        self.table = engine.dialect.identifier_preparer.quote(table_name)
        self.lock_key = lock_key
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="botkit-vacuum", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(VACUUM_CHECK_INTERVAL * _random.uniform(0.8, 1.2)):
            try:
                self.check()
            except Exception as exc:  # the database may be away; try again later
                logger.debug("vacuum check failed: %s", exc)

    def check(self) -> bool:
        """Vacuum if enough dead rows piled up; returns whether it vacuumed."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            dead = conn.execute(
                sa.text("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = to_regclass(:t)"),
                {"t": self.table},
            ).scalar()
            if dead is None or dead < VACUUM_DEAD_ROWS:
                return False
            if not self.session_lock:
                conn.exec_driver_sql(f"VACUUM (SKIP_LOCKED) {self.table}")
                return True
            locked = conn.execute(sa.select(sa.func.pg_try_advisory_lock(self.lock_key))).scalar()
            if not locked:
                return False
            try:
                started = time.monotonic()
                conn.exec_driver_sql(f"VACUUM {self.table}")
                logger.debug(
                    "vacuumed %s (%d dead rows) in %.2fs",
                    self.table,
                    dead,
                    time.monotonic() - started,
                )
            finally:
                conn.execute(sa.select(sa.func.pg_advisory_unlock(self.lock_key)))
            conn.commit()
        return True
