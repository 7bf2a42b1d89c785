"""The long fault soak: 20,000 deliveries while workers are killed and connections cut.

A loopback fediverse of 2,000 inboxes (1 % of them hang, 5 % of deliveries
get one 503) receives 10 published activities, one delivery per (activity,
inbox), from four supervised ``dramatiq`` commands (one worker process each,
restarted when they exit, as systemd would) on PostgreSQL.  Meanwhile a chaos
thread SIGKILLs one worker process every 20 s and terminates every PostgreSQL
backend of the workers every 30 s.

Every delivery to an inbox that answers must arrive (counted by activity id
and inbox); duplicates are allowed (at-least-once) and reported; the dead
letters must be exactly the deliveries to the hanging inboxes.  The figures
are printed (and quoted in ``docs/deploying.md``).  Rerun with::

    .venv/bin/python -m pytest -q -s -m slow tests/test_soak.py
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from _broker_support import ROOT
from broker_apps.delivery_soak import soak_federation
from conftest import unique_name

from botkit_tasks._sql import create_engine
from botkit_tasks.brokers import SqlBroker
from botkit_tasks.demo.servers import Server, free_socket
from botkit_tasks.monitor import inspect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

INBOXES = 2_000
ACTIVITIES = 10
HANGING = {i for i in range(INBOXES) if i % 100 == 37}  # 1 %
# Supervised `dramatiq -p 1` commands x threads: about COMMANDS * (THREADS + 3)
# PostgreSQL connections, well under a default max_connections of 100 that
# other test runs share.
COMMANDS = 3
THREADS = 10
KILL_EVERY = 20.0
TERMINATE_EVERY = 30.0
SETTLE_DEADLINE = 270.0  # seconds after publishing


def flaky(activity_id: str, inbox: int) -> bool:
    """5 % of the deliveries get a 503 on their first attempt."""
    return zlib.crc32(f"{activity_id} {inbox}".encode()) % 100 < 5


@dataclass
class Fediverse:
    """An ASGI app answering ``POST /inbox/<n>``: 202, one scripted 503, or no answer at all."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    delivered: Counter[tuple[str, int]] = field(default_factory=Counter)
    attempts: Counter[tuple[str, int]] = field(default_factory=Counter)
    served_503: int = 0
    hanging_requests: int = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        inbox = int(scope["path"].rsplit("/", 1)[1])
        if inbox in HANGING:
            with self.lock:
                self.hanging_requests += 1
            # Never answer; return once the client gives up (its read timeout).
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        key = (str(json.loads(body)["id"]), inbox)
        with self.lock:
            self.attempts[key] += 1
            fail = flaky(*key) and self.attempts[key] == 1
            if fail:
                self.served_503 += 1
            else:
                self.delivered[key] += 1
        status = 503 if fail else 202
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


class Supervisor:
    """Keeps ``COMMANDS`` ``dramatiq`` commands running, restarting any that exits."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * COMMANDS
        self.restarts = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _start(self, slot: int) -> None:
        self.procs[slot] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dramatiq",
                "tests.broker_apps.delivery_soak:broker",
                "--processes",
                "1",
                "--threads",
                str(THREADS),
                "--worker-shutdown-timeout",
                "3000",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )

    def start(self) -> None:
        for slot in range(COMMANDS):
            self._start(slot)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopping.wait(0.2):
            with self.lock:
                for slot, proc in enumerate(self.procs):
                    if proc is not None and proc.poll() is not None and not self.stopping.is_set():
                        # A worker died (SIGKILL): Dramatiq's parent stops the
                        # rest and exits; start the command again.
                        self.restarts += 1
                        self._start(slot)

    def kill_a_worker(self, n: int) -> int | None:
        """SIGKILL the worker process (not the parent) of command ``n % COMMANDS``."""
        with self.lock:
            proc = self.procs[n % COMMANDS]
            if proc is None or proc.poll() is not None:
                return None
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                try:
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(stat[1]) == proc.pid:  # its parent is the dramatiq command
                    os.kill(pid, signal.SIGKILL)
                    return pid
        return None

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        with self.lock:
            for proc in self.procs:
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.procs:
                if proc is None:
                    continue
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.log.close()


@dataclass
class Chaos:
    """Every 20 s a worker SIGKILLed, every 30 s every worker backend terminated."""

    supervisor: Supervisor
    admin: sa.Engine
    app_name: str
    stop: threading.Event = field(default_factory=threading.Event)
    kills: int = 0
    terminations: int = 0
    backends_terminated: int = 0
    failed_cuts: list[str] = field(default_factory=list)

    def run(self) -> None:
        started = time.monotonic()
        next_kill, next_cut = KILL_EVERY, TERMINATE_EVERY
        while not self.stop.wait(0.2):
            elapsed = time.monotonic() - started
            if elapsed >= next_kill:
                next_kill += KILL_EVERY
                if self.supervisor.kill_a_worker(self.kills) is not None:
                    self.kills += 1
                else:
                    next_kill -= KILL_EVERY - 1.0  # restarting: try again in a second
            if elapsed >= next_cut:
                try:
                    with self.admin.begin() as conn:
                        killed = conn.execute(
                            sa.text(
                                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE application_name = :app AND pid <> pg_backend_pid()"
                            ),
                            {"app": self.app_name},
                        ).scalar()
                except sa.exc.OperationalError as exc:
                    # the server refused us (say, every slot taken while the
                    # workers reconnect at once): try again shortly
                    self.failed_cuts.append(str(exc.orig or exc).strip())
                    next_cut += 1.0
                    continue
                next_cut += TERMINATE_EVERY
                self.terminations += 1
                self.backends_terminated += int(killed or 0)


@pytest.fixture
def admin(database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def test_twenty_thousand_deliveries_survive_killed_workers_and_connections(
    database_url: str, admin: sa.Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = unique_name("soak") + "_"
    app_name = unique_name("botkit_soak_")
    worker_url = str(sa.make_url(database_url).update_query_dict({"application_name": app_name}))
    fediverse = Fediverse()
    sock = free_socket()
    remote = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = Server(fediverse, [sock], "soak-fediverse")
    server.start()
    base_url = "http://127.0.0.1:9/bot"  # never fetched: the fediverse does not verify
    federation = soak_federation(database_url, prefix, base_url)
    supervisor = Supervisor(
        {
            **os.environ,
            "SOAK_DATABASE_URL": worker_url,
            "SOAK_PREFIX": prefix,
            "SOAK_BASE_URL": base_url,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        },
        tmp_path / "workers.log",
    )
    chaos = Chaos(supervisor, admin, app_name)
    chaos_thread = threading.Thread(target=chaos.run, daemon=True)
    try:
        # Given 2,000 followers, each behind its own inbox, 20 of which hang
        federation.private_key  # noqa: B018 - one key pair, made before the workers start
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: federation.followers.add(
                        {"id": f"{remote}/users/{i}", "inbox": f"{remote}/inbox/{i}"}
                    ),
                    range(INBOXES),
                )
            )
        assert federation.followers.count() == INBOXES
        insp = inspect(federation.broker)
        supervisor.start()
        deadline = time.monotonic() + 60
        while len(insp.workers()) < COMMANDS:
            assert time.monotonic() < deadline, "the dramatiq workers did not start"
            time.sleep(0.2)

        # When ten activities are published while the chaos runs
        chaos_thread.start()
        started = time.monotonic()
        ids = [f"{base_url}/activities/{n}" for n in range(ACTIVITIES)]
        for activity_id in ids:
            federation.publish({"id": activity_id, "type": "Create", "actor": federation.actor_id})
        expected = {(a, i) for a in ids for i in range(INBOXES) if i not in HANGING}
        doomed = {(a, f"{remote}/inbox/{i}") for a in ids for i in HANGING}

        def settled() -> bool:
            with fediverse.lock:
                arrived = len(expected.intersection(fediverse.delivered))
            if arrived < len(expected):
                return False
            stats = [q for q in insp.queues() if q.name in ("botkit.outbox", "botkit.fanout")]
            outbox_dead = sum(q.dead for q in stats)
            busy = sum(q.ready + q.delayed + q.in_flight for q in stats)
            return busy == 0 and outbox_dead >= len(doomed)

        last_report = 0.0
        while not settled() and time.monotonic() - started < SETTLE_DEADLINE:
            time.sleep(1.0)
            if time.monotonic() - last_report >= 15:
                last_report = time.monotonic()
                with fediverse.lock:
                    arrived_now = len(expected.intersection(fediverse.delivered))
                queues = {q.name: q for q in insp.queues()}
                with capsys.disabled():
                    print(
                        f"  [{last_report - started:5.0f} s] arrived {arrived_now:,}, "
                        + ", ".join(
                            f"{name} r{q.ready}/d{q.delayed}/f{q.in_flight}/x{q.dead}"
                            for name, q in sorted(queues.items())
                        )
                        + f", kills {chaos.kills}, cuts {chaos.terminations}",
                        flush=True,
                    )
        elapsed = time.monotonic() - started
        chaos.stop.set()
        chaos_thread.join(timeout=10)
        letters = insp.dead_letters()
    finally:
        chaos.stop.set()
        supervisor.stop()
        server.stop()

    try:
        with fediverse.lock:
            delivered = Counter(fediverse.delivered)
        arrived = expected.intersection(delivered)
        lost = expected - arrived
        unexpected = set(delivered) - expected
        duplicates = sum(n - 1 for n in delivered.values() if n > 1)
        dead = {(d.args[1], d.args[2]) for d in letters if d.actor == "botkit_deliver"}
        other_dead = [d for d in letters if d.actor != "botkit_deliver"]
        # A worker killed between a retry's enqueue and the ack of the attempt
        # leaves two copies; both may die: counted, as duplicates are.
        n_dead_rows = len(letters) - len(other_dead)
        figures = [
            f"soak: {len(expected) + len(doomed):,} deliveries ({len(expected):,} to answering "
            f"inboxes, {len(doomed)} to {len(HANGING)} hanging ones) in {elapsed:.0f} s "
            f"({len(expected) / elapsed:.0f} arrivals/s)",
            f"  arrived {len(arrived):,} of {len(expected):,}, lost {len(lost)}, "
            f"duplicates {duplicates} ({100 * duplicates / max(len(expected), 1):.2f} %)",
            f"  503s served {fediverse.served_503}, requests to hanging inboxes "
            f"{fediverse.hanging_requests}",
            f"  dead letters {len(dead)} (expected {len(doomed)}; "
            f"{n_dead_rows - len(dead)} of them dead-lettered twice, at-least-once), "
            f"other dead letters {len(other_dead)}",
            f"  chaos: {chaos.kills} workers SIGKILLed, {chaos.terminations} rounds of "
            f"pg_terminate_backend ({chaos.backends_terminated} backends), "
            f"{supervisor.restarts} dramatiq restarts ({COMMANDS} commands x {THREADS} threads)",
        ]
        with capsys.disabled():
            print("\n" + "\n".join(figures))
        # Then nothing is lost, nothing unexpected arrived, and the dead letters
        # are exactly the deliveries to the hanging inboxes
        for key in sorted(lost)[:10]:
            url = f"{remote}/inbox/{key[1]}"
            states = [
                (d.retries, d.traceback) for d in letters if tuple(d.args[1:3]) == (key[0], url)
            ]
            print(f"lost {key}: attempts {fediverse.attempts[key]}, dead letter {states}")
        assert not lost, f"{len(lost)} deliveries lost, e.g. {sorted(lost)[:3]}"
        assert not unexpected
        assert dead == doomed
        assert other_dead == []
        # and the chaos really happened
        assert chaos.kills >= int(elapsed // KILL_EVERY) - 1 >= 1
        # every cut that came due happened (a refused one was retried a
        # second later), and each found worker backends to terminate
        due = max(1, int(elapsed // TERMINATE_EVERY) - 1)
        assert chaos.terminations >= due, chaos.failed_cuts
        assert chaos.backends_terminated >= 1
        assert elapsed < SETTLE_DEADLINE
    finally:
        broker = cast(SqlBroker, federation.broker)
        broker.drop_tables()
        broker.close()
        federation.kv.close()
        federation.close()
        broker.engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{prefix}kv"'))
