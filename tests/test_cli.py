"""The ``botkit-tasks`` command against populated brokers (SQLite, PostgreSQL, Redis)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from conftest import unique_name

from botkit_tasks.cli import main
from botkit_tasks.config import Backends, from_env
from botkit_tasks.monitor import inspect

HOUR_MS = 3_600_000


@dataclass
class Populated:
    """A broker holding: 3 ready, 1 delayed, 1 waiting for a retry and 2 dead messages."""

    args: list[str]  # the global options that select it
    broker: Any  # a Dramatiq broker or a Celery app


def _populate(broker: dramatiq.Broker) -> None:
    # One quick retry: Dramatiq records the traceback when it schedules a retry.
    @dramatiq.actor(broker=broker, queue_name="jobs", max_retries=1, min_backoff=1, max_backoff=1)
    def boom(n: int) -> None:
        raise RuntimeError(f"boom {n}")

    @dramatiq.actor(
        broker=broker, queue_name="jobs", max_retries=5, min_backoff=HOUR_MS, max_backoff=HOUR_MS
    )
    def flaky() -> None:
        raise RuntimeError("try again later")

    @dramatiq.actor(broker=broker, queue_name="jobs")
    def fine() -> None: ...

    boom.send(1)
    boom.send(2)
    flaky.send()
    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=50)
    worker.start()
    try:
        insp = inspect(broker)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(insp.dead_letters()) == 2 and len(insp.retrying()) == 1:
                break
            time.sleep(0.05)
        else:
            pytest.fail(
                "broker did not reach the populated state: "
                f"{insp.queues()} {insp.retrying()} {insp.dead_letters()}"
            )
    finally:
        worker.stop(timeout=10_000)
    # Sent after the worker stopped, so they stay queued
    for _ in range(3):
        fine.send()
    fine.send_with_options(delay=HOUR_MS)


def _populate_celery(backends: Backends, env: dict[str, str]) -> None:
    """The same state on the Celery app ``backends.broker`` (``from_env(env)``).

    Its jobs run in a real ``celery worker`` process.
    """
    from _celery_support import celery_worker

    from botkit_tasks.runners import Job

    app = backends.broker
    # The jobs the worker declares, declared here too (the sending side)
    from celery_apps.clijobs import declare

    runner = declare(app)
    # No -Q: a worker consumes the queues of the app's declared jobs by itself
    with celery_worker("celery_apps.clijobs", None, env, concurrency=2) as worker:
        runner.enqueue_many([Job("boom", (1,)), Job("boom", (2,)), Job("flaky")])
        insp = inspect(app)
        deadline = time.monotonic() + 60  # a loaded machine starts workers slowly
        while time.monotonic() < deadline:
            settled = all(q.in_flight == 0 for q in insp.queues())  # the last ack done
            if len(insp.dead_letters()) == 2 and len(insp.retrying()) == 1 and settled:
                break
            time.sleep(0.05)
        else:
            pytest.fail(
                "app did not reach the populated state: "
                f"{insp.queues()} {insp.retrying()} {insp.dead_letters()}\n{worker.output()}"
            )
    # Sent after the worker stopped, so they stay queued
    runner.enqueue_many([Job("fine") for _ in range(3)])
    runner.enqueue(Job("fine", delay=HOUR_MS / 1000))


def _drop_prefixed_tables(url: str, prefix: str) -> None:
    import sqlalchemy as sa

    from botkit_tasks._sql import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        for (table,) in conn.execute(
            sa.text("SELECT tablename FROM pg_tables WHERE tablename LIKE :p"),
            {"p": prefix.replace("_", r"\_") + r"\_%"},
        ):
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}" CASCADE'))
    engine.dispose()


DRAMATIQ = ["sqlite", "postgres", "redis"]
CELERY = ["celery-sqlite", "celery-postgres", "celery-redis"]
# Each Celery case starts a worker: the smaller tests run on one of them.
FEWER = pytest.mark.parametrize("populated", [*DRAMATIQ, "celery-redis"], indirect=True)


@pytest.fixture(params=DRAMATIQ + CELERY)
def populated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Populated]:
    prefix = unique_name("cli_")
    if request.param.startswith("celery-"):
        # The same commands on a Celery bot: --runner celery
        kind = request.param.removeprefix("celery-")
        env = {"BOTKIT_RUNNER": "celery", "BOTKIT_PREFIX": prefix, "DATABASE_URL": ""}
        env["REDIS_URL"] = ""
        if kind == "redis":
            url = env["REDIS_URL"] = request.getfixturevalue("redis_url")
            option = "--redis-url"
        else:
            url = env["DATABASE_URL"] = (
                f"sqlite:///{tmp_path}/cli.sqlite3"
                if kind == "sqlite"
                else request.getfixturevalue("database_url")
            )
            option = "--database-url"
        backends = from_env(env)
        try:
            _populate_celery(backends, env)
            yield Populated(
                [option, url, "--prefix", prefix, "--runner", "celery"], backends.broker
            )
        finally:
            backends.close()
            if kind == "redis":
                import redis

                client = redis.Redis.from_url(url)
                keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                if keys:
                    client.delete(*keys)
                client.close()
            elif kind == "postgres":
                _drop_prefixed_tables(url, prefix)
        return
    if request.param == "redis":
        from dramatiq.brokers.redis import RedisBroker

        url = request.getfixturevalue("redis_url")
        redis_broker = RedisBroker(url=url, namespace=prefix)
        _populate(redis_broker)
        yield Populated(["--redis-url", url, "--prefix", prefix], redis_broker)
        client = redis_broker.client
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        redis_broker.close()
        return

    from botkit_tasks.brokers.sql import SqlBroker

    url = (
        f"sqlite:///{tmp_path}/cli.sqlite3"
        if request.param == "sqlite"
        else request.getfixturevalue("database_url")
    )
    sql_broker = SqlBroker(url, table_prefix=f"{prefix}_", poll_interval=0.1)
    _populate(sql_broker)
    yield Populated(["--database-url", url, "--prefix", prefix], sql_broker)
    import sqlalchemy as sa

    sql_broker.drop_tables()
    with sql_broker.engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{prefix}_kv"'))
    sql_broker.close()  # disposes the engine it created


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), stdout=out)
    return code, out.getvalue()


def _row(text: str, first: str) -> list[str]:
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{text}")


def test_status_table_and_json(populated: Populated) -> None:
    code, text = _run(*populated.args, "status")
    assert code == 0, text
    # QUEUE READY DELAYED IN-FLIGHT DEAD: the retry waits as "delayed"
    assert _row(text, "jobs") == ["jobs", "3", "2", "0", "2"]
    assert "flaky" in text and "try again later" in text
    assert "RuntimeError: boom" in text

    code, raw = _run(*populated.args, "status", "--json")
    assert code == 0
    snapshot = json.loads(raw)
    (jobs,) = [q for q in snapshot["queues"] if q["name"] == "jobs"]
    assert jobs == {"name": "jobs", "ready": 3, "delayed": 2, "in_flight": 0, "dead": 2}
    assert [r["actor"] for r in snapshot["retrying"]] == ["flaky"]
    assert sorted(d["args"] for d in snapshot["dead_letters"]) == [[1], [2]]
    assert snapshot["backend"]["kind"] in ("sqlite", "postgresql", "redis")


def test_dead_list_show_requeue_purge(populated: Populated) -> None:
    args = populated.args
    code, raw = _run(*args, "dead", "list", "--json")
    assert code == 0
    dead = json.loads(raw)
    assert len(dead) == 2 and {d["actor"] for d in dead} == {"boom"}
    first = dead[0]["message_id"]

    code, text = _run(*args, "dead", "list")
    assert code == 0 and len([ln for ln in text.splitlines() if " boom " in ln]) == 2

    # show accepts a unique prefix of the id and prints the traceback
    code, text = _run(*args, "dead", "show", first[:13])
    assert code == 0
    assert first in text and "Traceback" in text and "RuntimeError: boom" in text
    assert _run(*args, "dead", "show", "no-such-id")[0] == 1

    # requeue one: back to its queue
    code, text = _run(*args, "dead", "requeue", first)
    assert (code, text.strip()) == (0, "Requeued 1 dead letter.")
    queue = {q.name: q for q in inspect(populated.broker).queues()}["jobs"]
    assert (queue.ready, queue.dead) == (4, 1)
    # an id that is not a dead letter (any more) is a failure
    assert _run(*args, "dead", "requeue", first)[0] == 1
    # neither ids nor --all is a usage error
    assert _run(*args, "dead", "requeue")[0] == 2

    code, text = _run(*args, "dead", "purge")
    assert (code, text.strip()) == (0, "Purged 1 dead letter.")
    code, text = _run(*args, "dead", "requeue", "--all")
    assert (code, text.strip()) == (0, "Requeued 0 dead letters.")
    assert json.loads(_run(*args, "dead", "list", "--json")[1]) == []


@FEWER
def test_requeue_all(populated: Populated) -> None:
    code, text = _run(*populated.args, "dead", "requeue", "--all", "--queue", "jobs")
    assert (code, text.strip()) == (0, "Requeued 2 dead letters.")
    queue = {q.name: q for q in inspect(populated.broker).queues()}["jobs"]
    assert (queue.ready, queue.dead) == (5, 0)


@FEWER
def test_options_after_the_subcommand(populated: Populated) -> None:
    code, text = _run("status", *populated.args)
    assert code == 0 and _row(text, "jobs")[4] == "2"


def test_migrate_creates_tables(tmp_path: Path) -> None:
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path}/m.sqlite3"
    code, text = _run("--database-url", url, "migrate")
    assert code == 0, text
    engine = sa.create_engine(url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"botkit_kv", "botkit_messages", "botkit_workers"} <= tables
    # Running it again is fine
    assert _run("--database-url", url, "migrate")[0] == 0


def test_migrate_postgres(database_url: str) -> None:
    import sqlalchemy as sa

    from botkit_tasks._sql import create_engine

    prefix = unique_name("mig_")
    code, text = _run("--database-url", database_url, "--prefix", prefix, "migrate")
    engine = create_engine(database_url)
    try:
        assert code == 0, text
        tables = set(sa.inspect(engine).get_table_names())
        assert {f"{prefix}_kv", f"{prefix}_messages", f"{prefix}_workers"} <= tables
    finally:
        with engine.begin() as conn:
            for name in (f"{prefix}_kv", f"{prefix}_messages", f"{prefix}_workers"):
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))
        engine.dispose()


def test_migrate_redis_has_nothing_to_do(redis_url: str) -> None:
    code, text = _run("--redis-url", redis_url, "--prefix", unique_name("mig"), "migrate")
    assert code == 0 and "nothing to do" in text


def test_environment_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "REDIS_HOST", "BOTKIT_PREFIX", "BOTKIT_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BOTKIT_SQLITE_PATH", str(tmp_path / "env.sqlite3"))
    code, text = _run("status")
    assert code == 0 and "env.sqlite3" in text and "(no queues)" in text


def test_errors_have_clear_messages_and_exit_codes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A malformed setting is a configuration error (2), naming the variable
    monkeypatch.setenv("REDIS_URL", "redis://cache:notaport/0")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert _run("status")[0] == 2
    assert "REDIS_URL" in capsys.readouterr().err
    assert _run("--database-url", "mysql://u@h/db", "status")[0] == 2
    assert "unsupported database" in capsys.readouterr().err
    # An unreachable database is a failure (1) with the reason, not a traceback
    code, _ = _run("--database-url", "postgresql://nobody@127.0.0.1:1/none", "status")
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("botkit-tasks: error:") and "Traceback" not in err
    # Usage errors come from argparse (2)
    assert _run("dead")[0] == 2
    assert _run("frobnicate")[0] == 2
    assert _run("--version")[0] == 0


@pytest.mark.parametrize("argv", [["dead", "list", "--limit", "-5"], ["status", "--limit", "0"]])
def test_limit_below_one_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # It used to be taken as 0, which lists nothing and says "No dead letters."
    assert _run(*argv)[0] == 2
    err = capsys.readouterr().err
    assert "--limit" in err and "Traceback" not in err


@pytest.mark.parametrize("populated", ["celery-sqlite", "celery-redis"], indirect=True)
def test_the_dashboard_shows_a_celery_app(populated: Populated) -> None:
    # The dashboard reads a Celery app as it reads a Dramatiq broker
    import httpx
    from _dashboard_support import serving

    from botkit_tasks.dashboard import app as dashboard_app

    insp = inspect(populated.broker)
    with serving(dashboard_app(populated.broker)) as url:
        page = httpx.get(url + "/").text
        snapshot = httpx.get(url + "/snapshot.json").json()
    (jobs,) = [q for q in snapshot["queues"] if q["name"] == "jobs"]
    assert jobs == {"name": "jobs", "ready": 3, "delayed": 2, "in_flight": 0, "dead": 2}
    for letter in insp.dead_letters():
        assert f'data-message="{letter.message_id}"' in page
    (retrying,) = insp.retrying()
    assert f'data-message="{retrying.message_id}"' in page and "try again later" in page
