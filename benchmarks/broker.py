"""Broker benchmark: SqlBroker (PostgreSQL, SQLite) against RedisBroker and dramatiq-postgres,
and Celery on botkit's SQL transport against Celery on Redis.

One run, the same no-op actor, the same Dramatiq default middleware, the same
``dramatiq <module> -p 2 -t 8`` workers for every Dramatiq broker; the Celery
rows (``celery-redis``, ``celery-pg``, ``celery-sqlite``) run a no-op task
declared with ``botkit_tasks.runners.celery.declare_task`` on the app that
``botkit_tasks.config.from_env`` builds with ``BOTKIT_RUNNER=celery`` (late
acks and the other at-least-once settings), on ``celery worker -c 8`` (prefork)
workers, measured the same way:

- **enqueue**: ``actor.send()`` (Celery: ``app.send_task()``) one message at a
  time, and ``enqueue_many`` in batches of 1,000 where the broker has it;
- **drain**: 20,000 pre-enqueued messages, from starting the workers to the
  queue being empty (worker boot included, as a deployment sees it);
- **pickup latency** on an idle queue: one message at a time carries its send
  time, the actor records when it ran (p50, p99);
- **worker CPU per message** during the drain (the whole ``dramatiq`` or
  ``celery`` process tree, boot included, divided by the messages);
- **idle CPU** of the whole waiting worker process tree (main process and
  every worker or pool process), from ``/proc``, over 10 s;
- **bloat**: the drain again after 200,000 messages have gone through the
  same tables, compared with the fresh drain (SQL brokers; ``--bloat-all`` for
  every broker).

Then it prints the table, the ratios against RedisBroker and dramatiq-postgres
(and Celery on PostgreSQL against Celery on Redis), and checks the targets.
Every broker works under its own random table prefix, Redis namespace or
schema, removed at the end.

Usage::

    .venv/bin/python benchmarks/broker.py                 # full run (~10 min)
    .venv/bin/python benchmarks/broker.py --quick         # smaller counts (~3 min)
    .venv/bin/python benchmarks/broker.py --only sql-pg,redis
    .venv/bin/python benchmarks/broker.py --repeat 3        # medians of 3 interleaved rounds
    .venv/bin/python benchmarks/broker.py --only celery-redis,celery-pg,celery-sqlite

Services: ``BOTKIT_BENCH_DATABASE_URL`` (default: the test database) and
``BOTKIT_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``).
dramatiq-postgres is optional (``pip install dramatiq-postgres``; it is not a
dependency of botkit-tasks); without it that column is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _broker_apps import celery_app  # noqa: E402
from _broker_apps.app import make  # noqa: E402

CELERY_KINDS = list(celery_app.KINDS)
KINDS = [
    "sql-pg",
    "sql-pg-ordered",
    "sql-pgbouncer",
    "sql-sqlite",
    "redis",
    "dramatiq-postgres",
    *CELERY_KINDS,
]
#: Distinct ordering keys of the sql-pg-ordered drain (messages spread round-robin).
ORDERING_KEYS = 50
LABELS = {
    "sql-pg": "SqlBroker-PostgreSQL",
    "sql-pg-ordered": "SqlBroker-PG-50-keys",
    "sql-pgbouncer": "SqlBroker-PgBouncer",
    "sql-sqlite": "SqlBroker-SQLite",
    "redis": "RedisBroker",
    "dramatiq-postgres": "dramatiq-postgres",
    "celery-redis": "Celery-Redis",
    "celery-pg": "Celery-botkit-PG",
    "celery-sqlite": "Celery-botkit-SQLite",
}
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sizes:
    single: int = 5_000
    many: int = 20_000
    drain: int = 20_000
    pings: int = 40
    idle_seconds: float = 10.0
    bloat: int = 200_000


QUICK = Sizes(single=1_000, many=5_000, drain=5_000, pings=15, idle_seconds=5.0, bloat=30_000)


@dataclass
class Result:
    """Samples of every metric for one broker; the table shows their medians."""

    kind: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, value: float) -> None:
        self.samples.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float | None:
        values = self.samples.get(metric)
        return statistics.median(values) if values else None

    @property
    def enqueue_one(self) -> float | None:
        return self.median("enqueue_one")

    @property
    def enqueue_many(self) -> float | None:
        return self.median("enqueue_many")

    @property
    def drain(self) -> float | None:
        return self.median("drain")

    @property
    def drain_cpu_us(self) -> float | None:
        return self.median("drain_cpu_us")

    @property
    def p50_ms(self) -> float | None:
        return self.median("p50_ms")

    @property
    def p99_ms(self) -> float | None:
        return self.median("p99_ms")

    @property
    def idle_cpu(self) -> float | None:
        return self.median("idle_cpu")

    @property
    def bloat_drain(self) -> float | None:
        return self.median("bloat_drain")

    @property
    def bloat_drop(self) -> float | None:
        if self.drain is None or self.bloat_drain is None:
            return None
        return 1.0 - self.bloat_drain / self.drain


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- one broker under test ------------------------------------------------------


class Target:
    """A broker under test: its URL, namespace, queue, counting and cleanup."""

    def __init__(self, kind: str, database_url: str, redis_url: str, workdir: Path) -> None:
        self.kind = kind
        self.queue = "bench"
        self.celery = kind in CELERY_KINDS
        tag = uuid.uuid4().hex[:8]
        self.latency_file = workdir / f"latency-{tag}.txt"
        # Dramatiq: the broker; Celery: the app (typed loosely: either has its own calls).
        self.broker: Any
        if self.celery:
            # BOTKIT_PREFIX: SQL tables bench{tag}_…, Redis keys bench{tag}:…
            self.prefix = f"bench{tag}"
            if kind == "celery-pg":
                self.url = database_url
            elif kind == "celery-sqlite":
                self.url = f"sqlite:///{workdir}/bench-{tag}.sqlite3"
            else:
                self.url = redis_url
            self.broker, self.noop, self.ping = celery_app.make(
                kind, self.url, self.prefix, self.queue
            )
            self._counter = self._make_celery_counter()
            return
        if kind in ("sql-pg", "sql-pg-ordered"):
            self.url, self.prefix = database_url, f"bench{tag}_"
        elif kind == "sql-pgbouncer":
            self.url, self.prefix = pgbouncer_url(database_url), f"bench{tag}_"
        elif kind == "sql-sqlite":
            self.url, self.prefix = f"sqlite:///{workdir}/bench-{tag}.sqlite3", f"bench{tag}_"
        elif kind == "redis":
            self.url, self.prefix = redis_url, f"botkit-bench-{tag}"
        else:
            # dramatiq-postgres speaks plain libpq URLs and keeps its tables in a schema.
            self.url = database_url.replace("postgresql+psycopg://", "postgresql://")
            self.prefix = f"botkit_bench_{tag}"
            self._init_dramatiq_postgres_schema()
        self.broker, self.noop, self.ping = make(kind, self.url, self.prefix, self.queue)
        self._counter = self._make_counter()
        self._sent = 0  # single sends so far (their keys go round-robin)

    def _init_dramatiq_postgres_schema(self) -> None:
        import psycopg
        from dramatiq_postgres.schema import init

        with psycopg.connect(self.url) as conn, conn.cursor() as cur:
            init(cur, schema=self.prefix)

    def _make_counter(self) -> Callable[[], int]:
        queues = (self.queue, f"{self.queue}.DQ")
        if self.kind.startswith("sql-"):
            import sqlalchemy as sa

            engine = self.broker.engine
            table = sa.table(f"{self.prefix}messages", sa.column("queue_name"), sa.column("state"))
            query = (
                sa.select(sa.func.count())
                .select_from(table)
                .where(
                    table.c.queue_name.in_(queues),
                    table.c.state.in_(["queued", "consumed", "waiting"]),
                )
            )

            def count_sql() -> int:
                with engine.connect() as conn:
                    if engine.dialect.name == "sqlite":
                        conn = conn.execution_options(sqlite_begin="DEFERRED")
                    return int(conn.execute(query).scalar_one())

            return count_sql
        if self.kind == "redis":
            client = self.broker.client
            keys = [f"{self.prefix}:{q}.msgs" for q in queues]

            def count_redis() -> int:
                return sum(int(client.hlen(k)) for k in keys)

            return count_redis
        import psycopg

        conn = psycopg.connect(self.url, autocommit=True)
        sql = (
            f'SELECT count(*) FROM "{self.prefix}".queue '
            "WHERE queue_name = ANY(%s) AND state IN ('queued', 'consumed')"
        )

        def count_pg() -> int:
            row = conn.execute(sql, (list(queues),)).fetchone()
            return int(row[0]) if row else 0

        return count_pg

    def _make_celery_counter(self) -> Callable[[], int]:
        """Messages queued or delivered and not acked yet, on the Celery transport."""
        if self.kind == "celery-redis":
            import redis

            client = redis.Redis.from_url(self.url)
            keyprefix = self.broker.conf.broker_transport_options["global_keyprefix"]
            # kombu's priority sub-queues of the queue, and its unacked hash.
            queues = [f"{keyprefix}{self.queue}"] + [
                f"{keyprefix}{self.queue}\x06\x16{step}" for step in range(1, 10)
            ]
            unacked = f"{keyprefix}unacked"

            def count_redis() -> int:
                with client.pipeline() as pipe:
                    for key in queues:
                        pipe.llen(key)
                    pipe.hlen(unacked)
                    return sum(int(n) for n in pipe.execute())

            return count_redis
        import sqlalchemy as sa

        from botkit_tasks._sql import create_engine

        engine = create_engine(self.url)
        self._celery_engine = engine
        table = sa.table(f"{self.prefix}_messages", sa.column("queue_name"), sa.column("state"))
        query = (
            sa.select(sa.func.count())
            .select_from(table)
            .where(
                table.c.queue_name.in_((self.queue, f"{self.queue}.DQ")),
                table.c.state.in_(["queued", "consumed", "waiting"]),
            )
        )

        def count_sql() -> int:
            with engine.connect() as conn:
                if engine.dialect.name == "sqlite":
                    conn = conn.execution_options(sqlite_begin="DEFERRED")
                return int(conn.execute(query).scalar_one())

        return count_sql

    def remaining(self) -> int:
        return self._counter()

    @property
    def has_enqueue_many(self) -> bool:
        return not self.celery and hasattr(self.broker, "enqueue_many")

    def send_noop(self, producer: Any = None) -> None:
        """One no-op message: ``actor.send()``, or ``send_task`` as the Celery runner does."""
        if self.celery:
            self.broker.send_task(
                celery_app.NOOP,
                args=[],
                kwargs={},
                queue=self.queue,
                headers={},
                producer=producer,
            )
        else:
            self.broker.enqueue(self.noop_message(self._sent))
            self._sent += 1

    def noop_message(self, i: int) -> Any:
        """The ``i``-th no-op message of a Dramatiq target (keyed round-robin
        over :data:`ORDERING_KEYS` keys for ``sql-pg-ordered``)."""
        if self.kind == "sql-pg-ordered":
            return self.noop.message_with_options(ordering_key=f"k{i % ORDERING_KEYS}")
        return self.noop.message()

    def send_ping(self, sent: float) -> None:
        if self.celery:
            self.broker.send_task(
                celery_app.PING, args=[sent], kwargs={}, queue=self.queue, headers={}
            )
        else:
            self.ping.send(sent)

    def analyze(self) -> None:
        """On PostgreSQL, ``ANALYZE`` the queue table (untimed).

        Autovacuum does it within a minute of the first traffic in production;
        a table created seconds ago has no statistics, and the planner's guess
        for it makes the claims of keyed messages several times slower.
        """
        from botkit_tasks.brokers import SqlBroker

        broker = self.broker
        if isinstance(broker, SqlBroker) and broker.is_postgres:
            with broker.engine.begin() as conn:
                conn.exec_driver_sql(f'ANALYZE "{broker.messages.name}"')

    def fill(self, n: int, batch: int = 1_000) -> None:
        """Enqueue ``n`` no-op messages as fast as this broker allows (untimed)."""
        if self.celery:
            # One producer for all, as the Celery runner's enqueue_many.
            with self.broker.producer_or_acquire() as producer:
                for _ in range(n):
                    self.send_noop(producer)
        elif self.has_enqueue_many:
            for start in range(0, n, batch):
                self.broker.enqueue_many(
                    [self.noop_message(i) for i in range(start, min(start + batch, n))]
                )
        else:
            for _ in range(n):
                self.noop.send()

    def empty(self) -> None:
        """Drop every message of the benchmark queue."""
        if self.kind == "celery-redis":
            import redis

            keyprefix = self.broker.conf.broker_transport_options["global_keyprefix"]
            with redis.Redis.from_url(self.url) as client:
                for key in client.scan_iter(match=f"{keyprefix}*", count=1000):
                    if not key.decode().startswith(f"{keyprefix}_kombu.binding."):
                        client.delete(key)
        elif self.celery:
            import sqlalchemy as sa

            table = sa.table(f"{self.prefix}_messages", sa.column("queue_name"))
            with self._celery_engine.begin() as conn:
                conn.execute(
                    table.delete().where(table.c.queue_name.in_((self.queue, f"{self.queue}.DQ")))
                )
        elif self.kind == "dramatiq-postgres":
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(f'DELETE FROM "{self.prefix}".queue')
        else:
            self.broker.flush(self.queue)

    def cleanup(self) -> None:
        try:
            self.broker.close()
            if self.celery and self.kind != "celery-redis":
                from botkit_tasks.runners.kombu_sql import close_brokers

                close_brokers(self.url)
                self._celery_engine.dispose()
        except Exception as exc:
            log(f"{self.kind}: close failed: {exc}")
        if self.kind in ("sql-pg", "sql-pg-ordered", "sql-pgbouncer", "celery-pg"):
            import sqlalchemy as sa

            from botkit_tasks._sql import create_engine

            engine = create_engine(self.url)
            with engine.begin() as conn:
                rows = conn.execute(
                    sa.text("SELECT tablename FROM pg_tables WHERE tablename LIKE :p"),
                    {"p": self.prefix + "%"},
                ).all()
                for (name,) in rows:
                    conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}" CASCADE'))
            engine.dispose()
        elif self.kind in ("redis", "celery-redis"):
            import redis

            client = redis.Redis.from_url(self.url)
            for key in client.scan_iter(match=f"{self.prefix}:*", count=1000):
                client.delete(key)
            client.close()
        elif self.kind == "dramatiq-postgres":
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.prefix}" CASCADE')


# --- worker processes -----------------------------------------------------------


class Workers:
    """``dramatiq _broker_apps.app -p 2 -t 8`` (Celery: ``celery -A
    _broker_apps.celery_app worker -c 8``) for one target, in its own session."""

    def __init__(self, target: Target, args: argparse.Namespace) -> None:
        env = dict(os.environ)
        env.update(
            BENCH_KIND=target.kind,
            BENCH_URL=target.url,
            BENCH_PREFIX=target.prefix,
            BENCH_QUEUE=target.queue,
            BENCH_LATENCY_FILE=str(target.latency_file),
            PYTHONUNBUFFERED="1",
        )
        if target.celery:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
            command = [
                str(Path(sys.executable).with_name("celery")),
                "-A",
                "_broker_apps.celery_app",
                "worker",
                "--pool",
                "prefork",
                "-c",
                str(args.celery_concurrency),
                "-Q",
                target.queue,
                "-l",
                "warning",
                "-n",
                f"{target.prefix}@%h",
                # Cluster chatter (events, start-up sync with other workers): off,
                # as in the tests; none of it carries tasks.
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
            ]
        else:
            command = [
                str(Path(sys.executable).with_name("dramatiq")),
                "--path",
                str(HERE),
                "-p",
                str(args.processes),
                "-t",
                str(args.threads),
                "_broker_apps.app",
            ]
        self.log_path = target.latency_file.with_suffix(".log")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def tree_pids(self) -> list[int]:
        """This process and its descendants, from ``/proc``."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children.get(pid, []))
        return pids

    @staticmethod
    def cpu_seconds(pids: list[int]) -> float:
        total = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        return total / CLK_TCK

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only
                self.proc.wait()
        self._log.close()


def wait_empty(target: Target, workers: Workers, timeout: float) -> float:
    """Seconds from the workers' start until the queue is empty."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if target.remaining() == 0:
            return time.perf_counter() - workers.started
        if not workers.alive():
            raise RuntimeError(f"workers exited; see {workers.log_path}")
        time.sleep(0.05)
    raise TimeoutError(
        f"{target.kind}: {target.remaining()} message(s) still queued or in flight after "
        f"{timeout:.0f} s; worker log: {workers.log_path}"
    )


# --- measurements ---------------------------------------------------------------


def measure_enqueue(target: Target, sizes: Sizes, result: Result) -> None:
    started = time.perf_counter()
    for _ in range(sizes.single):
        target.send_noop()
    result.add("enqueue_one", sizes.single / (time.perf_counter() - started))
    if target.has_enqueue_many:
        messages = [target.noop_message(i) for i in range(sizes.many)]
        started = time.perf_counter()
        for start in range(0, sizes.many, 1_000):
            target.broker.enqueue_many(messages[start : start + 1_000])
        result.add("enqueue_many", sizes.many / (time.perf_counter() - started))
    target.empty()


def measure_latency(target: Target, sizes: Sizes, result: Result, workers: Workers) -> None:
    target.latency_file.write_text("")
    time.sleep(1.0)  # let every consumer fall idle
    for i in range(sizes.pings):
        target.send_ping(time.time())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if target.latency_file.read_text().count("\n") > i:
                break
            time.sleep(0.002)
        else:
            result.notes.append(f"ping {i} not received within 10 s")
        time.sleep(random.uniform(0.05, 0.3))  # an idle queue between pings
    samples = []
    for line in target.latency_file.read_text().splitlines():
        sent, received = map(float, line.split())
        samples.append((received - sent) * 1000)
    if samples:
        samples.sort()
        result.add("p50_ms", statistics.median(samples))
        result.add("p99_ms", samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))])


def measure_idle_cpu(sizes: Sizes, result: Result, workers: Workers) -> None:
    time.sleep(1.0)
    pids = workers.tree_pids()
    before, t0 = Workers.cpu_seconds(pids), time.perf_counter()
    time.sleep(sizes.idle_seconds)
    after, t1 = Workers.cpu_seconds(pids), time.perf_counter()
    result.add("idle_cpu", 100.0 * (after - before) / (t1 - t0))


def drain(target: Target, n: int, args: argparse.Namespace) -> tuple[float, float, Workers]:
    """Fill ``n`` messages, start workers, wait until empty.

    Returns:
        ``(messages per second, worker CPU microseconds per message, workers)``;
        the CPU is the whole process tree's, boot included.
    """
    target.fill(n)
    assert target.remaining() == n, f"{target.kind}: expected {n} queued"
    target.analyze()
    workers = Workers(target, args)
    try:
        seconds = wait_empty(target, workers, timeout=max(120.0, n / 100))
        cpu = Workers.cpu_seconds(workers.tree_pids())
    except BaseException:
        workers.stop()  # never leave a worker tree behind, even on Ctrl-C
        raise
    return n / seconds, cpu / n * 1e6, workers


def measure_bloat(target: Target, sizes: Sizes, result: Result, args: argparse.Namespace) -> None:
    workers = Workers(target, args)
    try:
        # The bloat volume flows through while the workers run, as in production.
        target.fill(sizes.bloat)
        wait_empty(target, workers, timeout=max(300.0, sizes.bloat / 100))
    finally:
        workers.stop()
    rate, _cpu, workers = drain(target, sizes.drain, args)
    workers.stop()
    result.add("bloat_drain", rate)


def run_round(target: Target, args: argparse.Namespace, sizes: Sizes, result: Result) -> None:
    """Enqueue, drain, idle latency and idle CPU: one sample of each."""
    label = LABELS[target.kind]
    try:
        log(f"{label}: enqueue")
        measure_enqueue(target, sizes, result)
        log(f"{label}: drain of {sizes.drain:,}")
        rate, cpu_us, workers = drain(target, sizes.drain, args)
        result.add("drain", rate)
        result.add("drain_cpu_us", cpu_us)
        try:
            log(f"{label}: idle pickup latency")
            measure_latency(target, sizes, result, workers)
            log(f"{label}: idle CPU over {sizes.idle_seconds:.0f} s")
            measure_idle_cpu(sizes, result, workers)
        finally:
            workers.stop()
    except Exception as exc:
        result.notes.append(f"failed: {exc!r}")
        log(f"{label}: FAILED {exc!r}")
        try:
            target.empty()
        except Exception as cleanup_exc:  # the broker may be what failed
            log(f"{label}: could not empty the queue: {cleanup_exc!r}")


def run_all(
    kinds: list[str], args: argparse.Namespace, sizes: Sizes, workdir: Path
) -> dict[str, Result]:
    results = {kind: Result(kind) for kind in kinds}
    targets: dict[str, Target] = {}
    try:
        for kind in kinds:
            log(f"{LABELS[kind]}: setting up")
            targets[kind] = Target(kind, args.database_url, args.redis_url, workdir)
        # Interleaved rounds (A B C D, B C D A, ...), so that a burst of load
        # from elsewhere on the machine does not land on one broker only.
        for round_no in range(args.repeat):
            shift = round_no % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                log(f"round {round_no + 1}/{args.repeat}")
                run_round(targets[kind], args, sizes, results[kind])
        for kind in kinds:
            if kind.startswith("sql-") or args.bloat_all:
                log(f"{LABELS[kind]}: {sizes.bloat:,} messages through, then the drain again")
                try:
                    measure_bloat(targets[kind], sizes, results[kind], args)
                except Exception as exc:
                    results[kind].notes.append(f"bloat run failed: {exc!r}")
                    log(f"{LABELS[kind]}: FAILED {exc!r}")
    finally:
        for target in targets.values():
            target.cleanup()
    return results


_PGBOUNCER: list[Any] = []


def pgbouncer_url(database_url: str) -> str:
    """Start PgBouncer (transaction mode) in front of the database once; its URL."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from _pgbouncer import running_pgbouncer

    if not _PGBOUNCER:
        manager = running_pgbouncer(database_url, pool_size=40)
        _PGBOUNCER.append((manager, manager.__enter__()))
    return str(_PGBOUNCER[0][1])


def commit_rate(database_url: str, seconds: float = 1.0) -> float | None:
    """Single-row INSERT transactions per second on the database right now.

    The one-at-a-time enqueue rate of a durable SQL broker cannot beat this;
    it shows how busy the disk is during the run.
    """
    try:
        import psycopg
    except ImportError:
        return None
    table = f"botkit_bench_probe_{uuid.uuid4().hex[:8]}"
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{table}" (id bigserial PRIMARY KEY, v text)')
        try:
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                conn.execute(f'INSERT INTO "{table}" (v) VALUES (%s)', ("x",))
                count += 1
            return count / (time.perf_counter() - started)
        finally:
            conn.execute(f'DROP TABLE "{table}"')


# --- report ---------------------------------------------------------------------


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "—" if value is None else format(value, spec)


def metric(result: Result | None, name: str) -> float | None:
    """The median of ``name`` in ``result``; ``None`` without the broker or samples."""
    return None if result is None else result.median(name)


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def report(
    results: dict[str, Result],
    sizes: Sizes,
    repeat: int,
    probes: list[float | None],
    args: argparse.Namespace,
) -> int:
    header = (
        f"{'broker':<22} {'enqueue/s':>10} {'enq_many/s':>11} {'drain/s':>9} {'CPU us':>7} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'idle CPU':>9} {'drain/s':>9} {'drop':>7}"
    )
    print()
    print(
        f"median of {repeat} interleaved round(s); drain: {sizes.drain:,} no-op messages, "
        f"dramatiq -p {args.processes} -t {args.threads} "
        f"(Celery: celery worker -c {args.celery_concurrency}, prefork, late acks), "
        f"worker boot included; bloat: after {sizes.bloat:,} messages"
    )
    if all(p is not None for p in probes):
        print(
            "PostgreSQL single-row commits/s now (disk load): "
            + " -> ".join(f"{p:,.0f}" for p in probes if p is not None)
            + " (before -> after the run)"
        )
    print(header)
    print(
        f"{'':<22} {'':>10} {'':>11} {'(fresh)':>9} {'/msg':>7} {'':>8} {'':>8} {'(tree)':>9} "
        f"{'(bloat)':>9} {'':>7}"
    )
    print("-" * len(header))
    for kind, r in results.items():
        drop = r.bloat_drop
        cpu = "—" if r.idle_cpu is None else f"{r.idle_cpu:.2f}%"
        drop_text = "—" if drop is None else f"{100 * drop:.1f}%"
        print(
            f"{LABELS[kind]:<22} {fmt(r.enqueue_one):>10} {fmt(r.enqueue_many):>11} "
            f"{fmt(r.drain):>9} {fmt(r.drain_cpu_us):>7} "
            f"{fmt(r.p50_ms, '.1f'):>8} {fmt(r.p99_ms, '.1f'):>8} "
            f"{cpu:>9} {fmt(r.bloat_drain):>9} {drop_text:>7}"
        )
        for note in r.notes:
            print(f"    note: {note}")
    redis, dpg = results.get("redis"), results.get("dramatiq-postgres")
    print()
    ordered, plain = results.get("sql-pg-ordered"), results.get("sql-pg")
    if ordered is not None and plain is not None:
        print(
            f"ordering keys ({ORDERING_KEYS} keys) on PostgreSQL: drain "
            f"{ratio(ordered.drain, plain.drain)} unordered (target >= 0.80x)"
        )
    for kind in ("sql-pg", "sql-sqlite"):
        row = results.get(kind)
        if row is None:
            continue
        print(
            f"{LABELS[kind]}: drain {ratio(row.drain, metric(redis, 'drain'))} RedisBroker, "
            f"{ratio(row.drain, metric(dpg, 'drain'))} dramatiq-postgres; "
            f"enqueue {ratio(row.enqueue_one, metric(redis, 'enqueue_one'))} RedisBroker, "
            f"{ratio(row.enqueue_one, metric(dpg, 'enqueue_one'))} dramatiq-postgres"
        )
    celery_pg, celery_redis = results.get("celery-pg"), results.get("celery-redis")
    for kind in ("celery-pg", "celery-sqlite"):
        row = results.get(kind)
        if row is None:
            continue
        print(
            f"{kind} drain / celery-redis drain: "
            f"{ratio(row.drain, metric(celery_redis, 'drain'))}; "
            f"enqueue {ratio(row.enqueue_one, metric(celery_redis, 'enqueue_one'))}; "
            f"idle pickup p50 {fmt(row.p50_ms, '.1f')} ms against "
            f"{fmt(metric(celery_redis, 'p50_ms'), '.1f')} ms"
        )
    pg = results.get("sql-pg")
    if celery_pg is not None and pg is not None:
        print(
            f"celery-pg drain / sql-pg (Dramatiq, same tables) drain: "
            f"{ratio(celery_pg.drain, pg.drain)}"
        )
    failures = 0
    if celery_pg is not None and celery_redis is not None:
        a, b = celery_pg.drain, celery_redis.drain
        ok = None if a is None or b is None else a >= b
        status = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        failures += ok is False
        print(f"\ntargets (Celery-botkit-PG):\n  [{status}] drain >= 1.0x Celery-Redis")
    if pg is not None:
        print("\ntargets (SqlBroker-PostgreSQL):")
        checks: list[tuple[str, bool | None]] = [
            (
                "drain >= 1.0x RedisBroker",
                None
                if redis is None or None in (pg.drain, redis.drain)
                else pg.drain >= redis.drain,  # type: ignore[operator]
            ),
            (
                "drain >= 2x dramatiq-postgres",
                None if dpg is None or None in (pg.drain, dpg.drain) else pg.drain >= 2 * dpg.drain,  # type: ignore[operator]
            ),
            (
                "enqueue_many >= 20,000 msg/s",
                None if pg.enqueue_many is None else pg.enqueue_many >= 20_000,
            ),
            ("idle pickup p50 <= 10 ms", None if pg.p50_ms is None else pg.p50_ms <= 10),
            ("idle worker tree < 2% CPU", None if pg.idle_cpu is None else pg.idle_cpu < 2),
            (
                "<= 20% drain drop after bloat",
                None if pg.bloat_drop is None else pg.bloat_drop <= 0.20,
            ),
        ]
        for name, ok in checks:
            status = "n/a " if ok is None else ("PASS" if ok else "FAIL")
            failures += ok is False
            print(f"  [{status}] {name}")
    print(
        "\nNote: client, workers and servers share this machine's cores; numbers taken while "
        "other work runs are noisy. Rerun for a median."
    )
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (about 3 minutes)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(KINDS)}")
    parser.add_argument("--bloat-all", action="store_true", help="bloat run for every broker")
    parser.add_argument("--bloat", type=int, help="messages to push through before re-draining")
    parser.add_argument("--drain", type=int, help="messages in each drain")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds (median)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--celery-concurrency", type=int, default=8, help="pool processes of celery worker -c"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BOTKIT_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("BOTKIT_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.bloat is not None:
        sizes.bloat = args.bloat
    if args.drain is not None:
        sizes.drain = args.drain
    kinds = [k.strip() for k in args.only.split(",") if k.strip()] or list(KINDS)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown broker(s) {sorted(unknown)}; choose from {KINDS}")
    if "dramatiq-postgres" in kinds and importlib.util.find_spec("dramatiq_postgres") is None:
        print(
            "dramatiq-postgres is not installed: skipping its column "
            "(pip install dramatiq-postgres to include it)",
            file=sys.stderr,
        )
        kinds.remove("dramatiq-postgres")
    workdir = Path(tempfile.mkdtemp(prefix="botkit-bench-"))
    probes = [commit_rate(args.database_url)]
    results = run_all(kinds, args, sizes, workdir)
    if any(r.notes for r in results.values()):
        print(f"worker logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    probes.append(commit_rate(args.database_url))
    for manager, _url in _PGBOUNCER:
        manager.__exit__(None, None, None)
    return report(results, sizes, args.repeat, probes, args)


if __name__ == "__main__":
    sys.exit(main())
