"""SQLite cross-process wake-ups: a worker in another process picks a message up at once.

The worker process polls only every 30 s, so a fast pickup can only come from
the wake-up datagram; when datagrams are lost (the registry is emptied under
the producer) the poll still delivers every message.
"""

from __future__ import annotations

import socket
import statistics
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from _broker_support import dramatiq_cli, wait_until
from conftest import unique_name
from dramatiq.message import Message

from botkit_tasks.brokers import SqlBroker
from botkit_tasks.brokers._wakeup import MAGIC, WakeupReceiver, wakeups_table

pytestmark = pytest.mark.timeout(120)


def ping(queue: str) -> Message[object]:
    return Message(queue_name=queue, actor_name="ping", args=(time.time(),), kwargs={}, options={})


def pickups(path: Path) -> list[float]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [float(b) - float(a) for a, b in (line.split() for line in lines)]


def registered_ports(broker: SqlBroker) -> list[int]:
    table = wakeups_table(broker.table_prefix)
    with broker.engine.connect() as conn:
        if not sa.inspect(conn).has_table(table.name):
            return []
        return list(conn.execute(sa.select(table.c.port)).scalars())


def test_worker_in_another_process_wakes_at_once_and_polls_when_datagrams_are_lost(
    sqlite_url: str, tmp_path: Path
) -> None:
    # Given a dramatiq worker process on a SQLite file that polls only every 30 s
    prefix, queue = unique_name("wk") + "_", unique_name("q")
    pickup_file = tmp_path / "pickups.txt"
    env = {
        "BOTKIT_BROKER_URL": sqlite_url,
        "BOTKIT_BROKER_PREFIX": prefix,
        "BOTKIT_BROKER_QUEUE": queue,
        "BOTKIT_POLL_INTERVAL": "30",
        "BOTKIT_PICKUP_FILE": str(pickup_file),
    }
    producer = SqlBroker(sqlite_url, table_prefix=prefix)
    try:
        with dramatiq_cli("tests.broker_apps.pickup", env, "-p", "1", "-t", "2"):
            assert wait_until(lambda: len(registered_ports(producer)) == 1, 30)
            time.sleep(1.5)  # the worker's first polls are over: it is idle

            # When the producer (this process, no consumer here) sends messages one by one
            for i in range(20):
                producer.enqueue(ping(queue))
                assert wait_until(lambda i=i: len(pickups(pickup_file)) > i, 10)
                time.sleep(0.05)

            # Then each ran within milliseconds, not at the next 30 s poll
            latencies = sorted(pickups(pickup_file))
            assert statistics.median(latencies) < 0.1, latencies
            assert latencies[-1] < 1.0, latencies

            # When the registry is emptied, so the producer's datagrams go nowhere
            table = wakeups_table(prefix)
            with producer.engine.begin() as conn:
                conn.execute(table.delete())
            producer.hub.wakeups.sender.forget_ports()  # type: ignore[union-attr]
            producer.enqueue(ping(queue))

            # Then the message still runs, at the worker's next poll (within 30 s)
            assert wait_until(lambda: len(pickups(pickup_file)) == 21, 40)
    finally:
        producer.drop_tables()
        producer.close()


def test_a_dead_process_registration_is_pruned_and_a_stray_datagram_ignored(
    sqlite_url: str,
) -> None:
    # Given a registry row left by a process that no longer exists
    engine = sa.create_engine(sqlite_url)
    table = wakeups_table(unique_name("wk") + "_")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert().values(port=1, pid=2**22 + 12345, registered_at=0.0))
    woken: list[str] = []

    # When a process starts receiving
    receiver = WakeupReceiver(engine, table, woken.append)
    receiver.start()
    try:
        with engine.connect() as conn:
            ports = list(conn.execute(sa.select(table.c.port)).scalars())
        # Then the dead row is gone and its own port is registered
        assert ports == [receiver.port]

        # When something else sends it a datagram without the marker, then a real one
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"not for us", ("127.0.0.1", receiver.port))
            sock.sendto(MAGIC + b"q1", ("127.0.0.1", receiver.port))
        # Then only the real one wakes anything
        assert wait_until(lambda: woken == ["q1"], 5)
    finally:
        receiver.stop()
    with engine.connect() as conn:
        assert list(conn.execute(sa.select(table.c.port)).scalars()) == []
    engine.dispose()
