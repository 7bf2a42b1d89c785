"""``config.from_env()``: every variable combination, valid and malformed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import unique_name

from botkit_tasks.brokers.retry_guard import RetryGuard
from botkit_tasks.config import Backends, from_env, from_urls
from botkit_tasks.errors import ConfigurationError
from botkit_tasks.monitor.middleware import MonitorMiddleware


@pytest.fixture
def opened() -> Iterator[list[Backends]]:
    """Collects the backends a test opens and closes them afterwards."""
    backends: list[Backends] = []
    yield backends
    for b in backends:
        b.close()


def _drop_sql_tables(b: Backends) -> None:
    import sqlalchemy as sa

    assert b.engine is not None
    prefix = b.kv.table_name.removesuffix("kv")  # type: ignore[attr-defined]
    with b.engine.begin() as conn:
        for name in sa.inspect(conn).get_table_names():
            if name.startswith(prefix):
                conn.execute(sa.text(f'DROP TABLE "{name}"'))


# --- the embedded default ----------------------------------------------------------------


def test_nothing_set_uses_sqlite_file_in_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: list[Backends]
) -> None:
    # Given an empty environment, in some working directory
    monkeypatch.chdir(tmp_path)
    # When backends are chosen
    b = from_env({})
    opened.append(b)
    # Then both live in ./botkit.sqlite3 on one shared engine
    from botkit_tasks.brokers.sql import SqlBroker
    from botkit_tasks.kv.sql import SqlKvStore

    assert b.kind == "sqlite"
    assert isinstance(b.kv, SqlKvStore)
    assert isinstance(b.broker, SqlBroker)
    assert b.kv.engine is b.broker.engine is b.engine
    assert b.url == f"sqlite:///{tmp_path}/botkit.sqlite3"
    b.kv.set(("k",), 1)
    assert (tmp_path / "botkit.sqlite3").exists()
    # And it unpacks as (kv, broker)
    kv, broker = b
    assert kv is b.kv and broker is b.broker


def test_sqlite_path_variable(tmp_path: Path, opened: list[Backends]) -> None:
    path = tmp_path / "sub.sqlite3"
    b = from_env({"BOTKIT_SQLITE_PATH": str(path)})
    opened.append(b)
    b.kv.set(("a",), {"x": 1})
    assert b.kind == "sqlite" and path.exists()
    assert b.kv.get(("a",)) == {"x": 1}


def test_empty_values_count_as_unset(tmp_path: Path, opened: list[Backends]) -> None:
    path = tmp_path / "e.sqlite3"
    b = from_env(
        {
            "DATABASE_URL": "",
            "REDIS_URL": "",
            "REDIS_HOST": "",
            "BOTKIT_SQLITE_PATH": str(path),
        }
    )
    opened.append(b)
    assert b.kind == "sqlite"


def test_prefix_names_tables(tmp_path: Path, opened: list[Backends]) -> None:
    b = from_env({"BOTKIT_SQLITE_PATH": str(tmp_path / "p.sqlite3"), "BOTKIT_PREFIX": "mybot"})
    opened.append(b)
    assert b.kv.table_name == "mybot_kv"  # type: ignore[attr-defined]
    assert b.broker.table_prefix == "mybot_"  # type: ignore[attr-defined]


def test_database_url_sqlite(tmp_path: Path, opened: list[Backends]) -> None:
    b = from_env({"DATABASE_URL": f"sqlite:///{tmp_path}/d.sqlite3"})
    opened.append(b)
    assert b.kind == "sqlite"
    assert b.kv.engine is b.broker.engine  # type: ignore[attr-defined]
    # Workers record tracebacks of every failed attempt for the monitor, and a
    # retry that cannot be enqueued is dead-lettered, not lost
    assert any(isinstance(m, MonitorMiddleware) for m in b.broker.middleware)
    assert any(isinstance(m, RetryGuard) for m in b.broker.middleware)


# --- PostgreSQL --------------------------------------------------------------------------


def test_database_url_postgres_shares_one_engine(database_url: str, opened: list[Backends]) -> None:
    # Given DATABASE_URL in the plain postgresql:// form platforms hand out
    plain = database_url.replace("postgresql+psycopg://", "postgresql://")
    prefix = unique_name("cfg")
    # When backends are chosen
    b = from_env({"DATABASE_URL": plain, "BOTKIT_PREFIX": prefix})
    try:
        # Then KV and broker are SQL backends on one engine (so atomic() spans both)
        from botkit_tasks import atomic
        from botkit_tasks.brokers.sql import SqlBroker
        from botkit_tasks.kv.sql import SqlKvStore

        assert b.kind == "postgresql"
        assert isinstance(b.kv, SqlKvStore) and isinstance(b.broker, SqlBroker)
        assert b.kv.engine is b.broker.engine is b.engine
        assert b.engine is not None and b.engine.dialect.driver == "psycopg"
        with atomic(b.engine):
            b.kv.set(("k",), "v")
        assert b.kv.get(("k",)) == "v"
    finally:
        _drop_sql_tables(b)
        b.close()


def test_pg_listen_0_builds_a_broker_that_works_behind_pgbouncer(
    pgbouncer_url: str, opened: list[Backends]
) -> None:
    import dramatiq

    # Given DATABASE_URL pointing at PgBouncer in transaction mode, and BOTKIT_PG_LISTEN=0
    prefix = unique_name("cfg")
    b = from_env({"DATABASE_URL": pgbouncer_url, "BOTKIT_PG_LISTEN": "0", "BOTKIT_PREFIX": prefix})
    try:
        # Then the broker holds no session state
        assert b.broker.listen is False  # type: ignore[attr-defined]
        # And the store and the queue work through the pooler, past psycopg's
        # prepare threshold (a prepared statement would fail on another server)
        for i in range(20):
            b.kv.set(("k", str(i)), i)
            assert b.kv.get(("k", str(i))) == i
        seen: list[int] = []

        @dramatiq.actor(broker=b.broker, queue_name=unique_name("q"))
        def record(x: int) -> None:
            seen.append(x)

        for i in range(20):
            record.send(i)
        worker = dramatiq.Worker(b.broker, worker_timeout=100)
        worker.start()
        try:
            b.broker.join(record.queue_name, timeout=20_000)
        finally:
            worker.stop()
        assert sorted(seen) == list(range(20))
    finally:
        _drop_sql_tables(b)
        b.close()


def test_postgres_scheme_alias(database_url: str, opened: list[Backends]) -> None:
    # Heroku-style postgres:// is accepted
    url = database_url.replace("postgresql+psycopg://", "postgres://")
    b = from_env({"DATABASE_URL": url, "BOTKIT_PREFIX": unique_name("cfg")})
    try:
        assert b.kind == "postgresql"
    finally:
        _drop_sql_tables(b)
        b.close()


# --- Redis -------------------------------------------------------------------------------


def test_redis_url(redis_url: str, opened: list[Backends]) -> None:
    from dramatiq.brokers.redis import RedisBroker

    from botkit_tasks.kv.redis import RedisKvStore

    prefix = unique_name("cfg")
    b = from_env({"REDIS_URL": redis_url, "BOTKIT_PREFIX": prefix})
    opened.append(b)
    assert b.kind == "redis"
    assert isinstance(b.kv, RedisKvStore) and isinstance(b.broker, RedisBroker)
    assert b.broker.namespace == prefix
    # Workers register themselves and keep their final dead letters for the monitor
    assert any(isinstance(m, MonitorMiddleware) for m in b.broker.middleware)
    b.kv.set(("k",), [1, 2])
    try:
        assert b.kv.get(("k",)) == [1, 2]
    finally:
        b.kv.delete(("k",))
    assert b.engine is None


def test_redis_default_namespace_is_dramatiqs(redis_url: str, opened: list[Backends]) -> None:
    b = from_env({"REDIS_URL": redis_url})
    opened.append(b)
    assert b.broker.namespace == "dramatiq"  # type: ignore[attr-defined]


def test_redis_host_and_port(redis_url: str, opened: list[Backends]) -> None:
    # Given the BotKit-guide style variables pointing at the test server
    parts = urlsplit(redis_url)
    env = {
        "REDIS_HOST": parts.hostname or "127.0.0.1",
        "REDIS_PORT": str(parts.port or 6379),
        "REDIS_TLS": "false",
        "BOTKIT_PREFIX": unique_name("cfg"),
    }
    # When backends are chosen
    b = from_env(env)
    opened.append(b)
    # Then they reach that server
    assert b.kind == "redis"
    assert b.url == f"redis://{env['REDIS_HOST']}:{env['REDIS_PORT']}/0"
    b.kv.set(("ping",), True)
    try:
        assert b.kv.get(("ping",)) is True
    finally:
        b.kv.delete(("ping",))


@pytest.mark.parametrize(
    ("env", "url", "ssl", "password"),
    [
        ({"REDIS_HOST": "cache.internal"}, "redis://cache.internal:6379/0", False, None),
        (
            {"REDIS_HOST": "cache", "REDIS_PORT": "6380", "REDIS_PASSWORD": "s3cr/t@"},
            "redis://:***@cache:6380/0",
            False,
            "s3cr/t@",
        ),
        ({"REDIS_HOST": "cache", "REDIS_TLS": "TRUE"}, "rediss://cache:6379/0", True, None),
        ({"REDIS_HOST": "cache", "REDIS_TLS": "1"}, "rediss://cache:6379/0", True, None),
        ({"REDIS_HOST": "cache", "REDIS_TLS": "off"}, "redis://cache:6379/0", False, None),
        ({"REDIS_HOST": "::1"}, "redis://[::1]:6379/0", False, None),
    ],
)
def test_redis_parts_build_the_url(
    env: dict[str, str], url: str, ssl: bool, password: str | None, opened: list[Backends]
) -> None:
    # Nothing connects until first use, so unreachable hosts are fine here.
    b = from_env(env)
    opened.append(b)
    assert b.url == url
    kwargs = b.broker.client.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    assert kwargs.get("password") == password
    pool = b.broker.client.connection_pool  # type: ignore[attr-defined]
    assert ("SSL" in pool.connection_class.__name__) is ssl


def test_password_never_shown(opened: list[Backends]) -> None:
    b = from_env({"REDIS_URL": "redis://user:hunter2@cache:6379/1"})
    opened.append(b)
    assert "hunter2" not in b.url and "***" in b.url
    with pytest.raises(ConfigurationError) as info:
        from_env({"REDIS_URL": "redis://user:hunter2@cache:notaport/1"})
    assert "hunter2" not in str(info.value)


# --- both, and the explicit choice -------------------------------------------------------


def test_database_and_redis_without_choice_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="BOTKIT_BACKEND"):
        from_env({"DATABASE_URL": "sqlite:///x.sqlite3", "REDIS_URL": "redis://cache:6379/0"})
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        from_env({"DATABASE_URL": "sqlite:///x.sqlite3", "REDIS_HOST": "cache"})


def test_backend_choice_picks_one(tmp_path: Path, opened: list[Backends]) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/c.sqlite3", "REDIS_URL": "redis://cache:1/0"}
    b = from_env({**env, "BOTKIT_BACKEND": "postgres"})  # "postgres" = the DATABASE_URL
    opened.append(b)
    assert b.kind == "sqlite" and b.url.endswith("c.sqlite3")
    r = from_env({**env, "BOTKIT_BACKEND": "Redis"})
    opened.append(r)
    assert r.kind == "redis"
    s = from_env({**env, "BOTKIT_BACKEND": "sqlite", "BOTKIT_SQLITE_PATH": str(tmp_path / "s")})
    opened.append(s)
    assert s.kind == "sqlite" and s.url.endswith("/s")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"BOTKIT_BACKEND": "mongodb"}, "BOTKIT_BACKEND"),
        ({"BOTKIT_BACKEND": "redis"}, "BOTKIT_BACKEND"),
        ({"BOTKIT_BACKEND": "postgres"}, "BOTKIT_BACKEND"),
        ({"REDIS_URL": "redis://a:6379/0", "REDIS_HOST": "b"}, "REDIS_URL"),
    ],
)
def test_inconsistent_choices(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        from_env(env)
    assert str(info.value).startswith(variable)


# --- malformed values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DATABASE_URL": "not a url"}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite://"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:///:memory:"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://u@h:port/db"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://cache:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "cache:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache:port/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache:99999/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache:6379/zero"}, "REDIS_URL"),
        ({"REDIS_URL": "redis:///0"}, "REDIS_URL"),
        ({"REDIS_URL": "unix://"}, "REDIS_URL"),
        ({"REDIS_HOST": "cache", "REDIS_PORT": "six"}, "REDIS_PORT"),
        ({"REDIS_HOST": "cache", "REDIS_PORT": "0"}, "REDIS_PORT"),
        ({"REDIS_HOST": "cache", "REDIS_PORT": "70000"}, "REDIS_PORT"),
        ({"REDIS_HOST": "cache", "REDIS_PORT": "-1"}, "REDIS_PORT"),
        ({"REDIS_HOST": "cache", "REDIS_TLS": "maybe"}, "REDIS_TLS"),
        ({"REDIS_HOST": "cache", "REDIS_TLS": "2"}, "REDIS_TLS"),
        ({"REDIS_HOST": "user@cache"}, "REDIS_HOST"),
        ({"REDIS_HOST": "   "}, "REDIS_HOST"),
        ({"REDIS_PORT": "6379"}, "REDIS_PORT"),
        ({"REDIS_PASSWORD": "x"}, "REDIS_PASSWORD"),
        ({"REDIS_TLS": "true"}, "REDIS_TLS"),
        ({"BOTKIT_PREFIX": "has space"}, "BOTKIT_PREFIX"),
        ({"BOTKIT_PREFIX": "1abc"}, "BOTKIT_PREFIX"),
        ({"BOTKIT_PREFIX": "a" * 40}, "BOTKIT_PREFIX"),
        ({"BOTKIT_SQLITE_PATH": "bad\x00path"}, "BOTKIT_SQLITE_PATH"),
        ({"DATABASE_URL": "postgresql://u@h/db", "BOTKIT_PG_LISTEN": "maybe"}, "BOTKIT_PG_LISTEN"),
    ],
)
def test_malformed_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        from_env(env)
    assert str(info.value).startswith(f"{variable}:"), str(info.value)
    # ConfigurationError is a ValueError too, for callers that only know the builtin
    assert isinstance(info.value, ValueError)


def test_reads_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: list[Backends]
) -> None:
    for name in list(os.environ):
        if name.startswith(("REDIS_", "BOTKIT_")) or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("BOTKIT_SQLITE_PATH", str(tmp_path / "env.sqlite3"))
    b = from_env()
    opened.append(b)
    assert b.url.endswith("env.sqlite3")


def test_from_urls_overrides_environment(tmp_path: Path, opened: list[Backends]) -> None:
    env = {"REDIS_URL": "redis://cache:6379/0", "BOTKIT_BACKEND": "redis"}
    b = from_urls(database_url=f"sqlite:///{tmp_path}/o.sqlite3", environ=env)
    opened.append(b)
    assert b.kind == "sqlite"
    r = from_urls(redis_url="redis://other:6379/0", prefix="px", environ={"REDIS_HOST": "x"})
    opened.append(r)
    assert r.kind == "redis" and r.broker.namespace == "px"  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="one, not both"):
        from_urls(database_url="sqlite:///a", redis_url="redis://b")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://bot:s3cretpw@db.example:notaport/bot",
        "postgresql://bot:s3cretpw@[::1/bot",
        " postgresql://bot:s3cretpw@db.example/bot",
    ],
)
def test_unparsable_database_url_does_not_echo_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        from_env({"DATABASE_URL": url})
    assert str(info.value).startswith("DATABASE_URL:"), str(info.value)
    chain: BaseException | None = info.value
    while chain is not None:
        assert "s3cretpw" not in str(chain), str(chain)
        chain = chain.__cause__


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"REDIS_HOST": "cache", "REDIS_PORT": "²"}, "REDIS_PORT"),
        ({"REDIS_HOST": "cache:6379"}, "REDIS_HOST"),
        ({"REDIS_HOST": "cache\x00"}, "REDIS_HOST"),
        ({"REDIS_HOST": "ca\tche"}, "REDIS_HOST"),
        ({"DATABASE_URL": "postgresql+nosuchdriver://bot:s3cretpw@db.example/bot"}, "DATABASE_URL"),
    ],
)
def test_more_malformed_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        from_env(env)
    assert str(info.value).startswith(f"{variable}:"), str(info.value)
    assert "s3cretpw" not in str(info.value)


@pytest.mark.parametrize("where", ["missing-dir", "directory", "not-a-database"])
def test_sqlite_file_that_cannot_be_opened_names_the_variable(tmp_path: Path, where: str) -> None:
    if where == "missing-dir":
        path = tmp_path / "no" / "such" / "dir" / "bot.sqlite3"
    elif where == "directory":
        path = tmp_path
    else:
        path = tmp_path / "notes.txt"
        path.write_text("this is not a database\n" * 100)
    with pytest.raises(ConfigurationError) as info:
        from_env({"BOTKIT_SQLITE_PATH": str(path)})
    assert str(info.value).startswith("BOTKIT_SQLITE_PATH:"), str(info.value)
    with pytest.raises(ConfigurationError) as info:
        from_env({"DATABASE_URL": f"sqlite:///{path}"})
    assert str(info.value).startswith("DATABASE_URL:"), str(info.value)


def test_redis_url_with_a_malformed_option_names_the_variable() -> None:
    with pytest.raises(ConfigurationError) as info:
        from_env({"REDIS_URL": "redis://:s3cretpw@cache:6379/0?socket_timeout=soon"})
    assert str(info.value).startswith("REDIS_URL:"), str(info.value)
    assert "s3cretpw" not in str(info.value)


def test_sqlite_path_that_is_not_utf8_names_the_variable() -> None:
    # os.environ holds undecodable bytes as lone surrogates
    with pytest.raises(ConfigurationError) as info:
        from_env({"BOTKIT_SQLITE_PATH": "bot\udcff.sqlite3"})
    assert str(info.value).startswith("BOTKIT_SQLITE_PATH:"), str(info.value)


@pytest.mark.parametrize(
    "url",
    ["sqlite:///file:bot?mode=memory&cache=shared&uri=true", "sqlite:///file::memory:?uri=true"],
)
def test_in_memory_sqlite_uri_is_refused(url: str) -> None:
    # Each process (the web app, every worker) would get its own empty queue
    with pytest.raises(ConfigurationError, match=r"^DATABASE_URL: an in-memory"):
        from_env({"DATABASE_URL": url})


# --- BOTKIT_RUNNER -----------------------------------------------------------------------


def test_runner_defaults_to_dramatiq(tmp_path: Path, opened: list[Backends]) -> None:
    # Given no BOTKIT_RUNNER
    b = from_env({"BOTKIT_SQLITE_PATH": str(tmp_path / "d.sqlite3")})
    opened.append(b)
    # Then the runner is Dramatiq and there is no Celery app to have
    assert b.runner == "dramatiq" and b.celery_url is None
    with pytest.raises(ConfigurationError, match=r"^BOTKIT_RUNNER"):
        b.celery_app("bot")


@pytest.mark.parametrize("value", ["rq", "celery5", "dramatiq,celery", " "])
def test_bad_runner_names_the_variable_and_builds_nothing(tmp_path: Path, value: str) -> None:
    path = tmp_path / "never.sqlite3"
    with pytest.raises(ConfigurationError) as info:
        from_env({"BOTKIT_RUNNER": value, "BOTKIT_SQLITE_PATH": str(path)})
    assert str(info.value).startswith("BOTKIT_RUNNER")
    assert "dramatiq, celery" in str(info.value)
    assert not path.exists()


def _queued_rows(b: Backends, queue: str) -> int:
    import sqlalchemy as sa

    assert b.engine is not None
    table = sa.Table(f"{b.prefix}_messages", sa.MetaData(), autoload_with=b.engine)
    with b.engine.connect() as conn:
        query = sa.select(sa.func.count()).where(table.c.queue_name == queue)
        return int(conn.execute(query).scalar_one())


def _send(b: Backends, queue: str) -> int:
    """Send one task through ``b.celery_app()``; the queue's length seen by kombu."""
    app = b.celery_app("cfgbot")
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    app.send_task("cfg.noop", args=[1], queue=queue)
    if b.kind == "redis":
        # kombu keeps the queue under the bot's prefix (``global_keyprefix``);
        # its passive queue_declare does not apply that prefix to EXISTS, so
        # read the list directly, then drop what this test made.
        import redis

        client = redis.Redis.from_url(str(b.celery_url))
        keys = [
            f"{b.prefix}:kombu:{queue}",
            f"{b.prefix}:kombu:_kombu.binding.{queue}",
            f"{b.prefix}:kombu:_kombu.binding_permanent.{queue}",
        ]
        try:
            return int(client.llen(keys[0]))
        finally:
            client.delete(*keys)
            client.close()
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def test_celery_runner_on_sqlite_queues_into_the_prefixed_table(
    tmp_path: Path, opened: list[Backends]
) -> None:
    # Given BOTKIT_RUNNER=celery on the embedded SQLite file, with a prefix
    env = {
        "BOTKIT_RUNNER": "Celery",
        "BOTKIT_SQLITE_PATH": str(tmp_path / "c.sqlite3"),
        "BOTKIT_PREFIX": "cbot",
    }
    b = from_env(env)
    opened.append(b)
    assert b.runner == "celery"
    assert b.celery_url == f"botkit+sqlite:///{tmp_path}/c.sqlite3"
    # When a task is sent through the app it builds
    queue = unique_name("cq")
    # Then it is a row of cbot_messages, the table the Dramatiq broker uses
    assert _send(b, queue) == 1
    assert _queued_rows(b, queue) == 1


def test_celery_runner_on_postgres_keeps_the_password_out_of_repr(
    database_url: str, opened: list[Backends]
) -> None:
    prefix = unique_name("cfgc")
    b = from_env({"BOTKIT_RUNNER": "celery", "DATABASE_URL": database_url, "BOTKIT_PREFIX": prefix})
    try:
        assert b.runner == "celery" and b.kind == "postgresql"
        assert b.celery_url is not None and b.celery_url.startswith("botkit+postgresql")
        assert b.celery_url not in repr(b)
        queue = unique_name("cq")
        assert _send(b, queue) == 1
        assert _queued_rows(b, queue) == 1
    finally:
        _drop_sql_tables(b)
        b.close()


def test_celery_runner_on_redis(redis_url: str, opened: list[Backends]) -> None:
    b = from_env({"BOTKIT_RUNNER": "celery", "REDIS_URL": redis_url})
    opened.append(b)
    assert b.runner == "celery" and b.kind == "redis" and b.celery_url == redis_url
    assert _send(b, unique_name("cq")) == 1


def test_a_celery_worker_runs_the_app_from_env(
    tmp_path: Path, redis_url: str, opened: list[Backends]
) -> None:
    # Given BOTKIT_RUNNER=celery on a SQLite file, and a real `celery -A` worker
    # whose app module calls from_env() (tests/celery_apps/envbot.py)
    import redis
    from _celery_support import celery_worker, wait_until

    queue, key = unique_name("envq"), unique_name("envkey-")
    env = {
        "BOTKIT_RUNNER": "celery",
        "BOTKIT_SQLITE_PATH": str(tmp_path / "bot.sqlite3"),
        "BOTKIT_PREFIX": "envbot",
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "CELERY_TEST_QUEUE": queue,
        "CELERY_TEST_KEY": key,
        "CELERY_TEST_REDIS": redis_url,
    }
    b = from_env(env)
    opened.append(b)
    client = redis.Redis.from_url(redis_url)
    try:
        with celery_worker("celery_apps.envbot", queue, env, concurrency=2):
            # When the web side sends a task through its own from_env() app
            b.celery_app("web").send_task("envbot.record", args=["hello"], queue=queue)
            # Then the worker runs it, and the row is gone from envbot_messages
            assert wait_until(lambda: client.lrange(key, 0, -1) == [b"hello"], 30)
            assert wait_until(lambda: _queued_rows(b, queue) == 0, 10)
    finally:
        client.delete(key)
        client.close()


def _noop() -> None:
    return None


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_celery_tasks_join_the_transactional_outbox(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, opened: list[Backends]
) -> None:
    # Given BOTKIT_RUNNER=celery on SQL: the transport writes through the store's engine
    from botkit_tasks import atomic
    from botkit_tasks.runners import Job, JobSpec
    from botkit_tasks.runners.select import runner_for

    env = {"BOTKIT_RUNNER": "celery", "BOTKIT_PREFIX": unique_name("ob")}
    if kind == "sqlite":
        env["BOTKIT_SQLITE_PATH"] = str(tmp_path / "ob.sqlite3")
    else:
        env["DATABASE_URL"] = request.getfixturevalue("database_url")
    b = from_env(env)
    opened.append(b)
    runner = runner_for(b.broker)
    runner.declare(JobSpec(name="outbox.job", queue="outbox", body=_noop))
    assert b.engine is not None and runner.engine is b.engine
    try:
        # When a block writes the store and sends a task, then fails
        with pytest.raises(RuntimeError), atomic(b.engine):
            b.kv.set(("post", "1"), "draft")
            runner.enqueue(Job("outbox.job"))
            raise RuntimeError("the block failed")
        # Then neither the write nor the task exists
        assert b.kv.get(("post", "1")) is None and _queued_rows(b, "outbox") == 0
        # When it succeeds, both do
        with atomic(b.engine):
            b.kv.set(("post", "1"), "sent")
            runner.enqueue(Job("outbox.job"))
        assert b.kv.get(("post", "1")) == "sent" and _queued_rows(b, "outbox") == 1
        # And a batch is one transaction: a bad job in it stores none of it
        with pytest.raises(TypeError):
            runner.enqueue_many([Job("outbox.job"), Job("outbox.job", ordering_key=7)])  # type: ignore[arg-type]
        assert _queued_rows(b, "outbox") == 1
        runner.enqueue_many([Job("outbox.job") for _ in range(5)])
        assert _queued_rows(b, "outbox") == 6
    finally:
        if kind == "postgres":
            _drop_sql_tables(b)
