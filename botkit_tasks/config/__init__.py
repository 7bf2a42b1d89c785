"""Pick the key-value store and the broker from environment variables.

The rules follow BotKit's deployment guide, translated to this library's
backends.  Empty variables count as unset (``DATABASE_URL=`` in a compose file
means "no database").

============================================  ==========================================
Environment                                   Backends
============================================  ==========================================
``DATABASE_URL=postgresql://…``               ``SqlKvStore`` + ``SqlBroker`` on PostgreSQL
                                              (one shared engine, so ``atomic()`` works)
``DATABASE_URL=sqlite:///path``               the same on a SQLite file
``REDIS_URL=redis://…`` (or ``rediss://``,    ``RedisKvStore`` + Dramatiq's ``RedisBroker``
``unix://``)
``REDIS_HOST`` [+ ``REDIS_PORT``,             the same, URL built from the parts
``REDIS_PASSWORD``, ``REDIS_TLS``]
nothing                                       embedded SQLite file ``BOTKIT_SQLITE_PATH``
                                              (default ``./botkit.sqlite3``)
============================================  ==========================================

``BOTKIT_PREFIX`` (default ``botkit``) names everything the backends create, so
several bots can share one database or Redis: SQL tables ``{prefix}_kv``,
``{prefix}_messages`` and ``{prefix}_workers``; Redis keys under ``{prefix}:`` and
the Dramatiq namespace ``{prefix}`` (``dramatiq``, Dramatiq's own default, when
``BOTKIT_PREFIX`` is not set).

When both ``DATABASE_URL`` and a Redis setting are present (platforms often set
both when both add-ons are attached), ``BOTKIT_BACKEND`` must say which one holds
the bot's state and queue: ``postgres``, ``redis`` or ``sqlite``.  Guessing would
silently put the queue somewhere the operator does not look.

``BOTKIT_PG_LISTEN=0`` (or ``false``/``no``/``off``) builds the PostgreSQL
``SqlBroker`` with ``listen=False``, for a ``DATABASE_URL`` that points at a
transaction pooler (PgBouncer in ``transaction`` mode, RDS Proxy, Supabase's
pooler): no ``LISTEN``, no session state, no prepared statements; workers in
other processes poll every second.  It has no effect on SQLite.

``BOTKIT_RUNNER`` (default ``dramatiq``) names the task runner: ``dramatiq``
or ``celery``.  With ``celery``, :attr:`Backends.broker` is a Celery app named
``BOTKIT_CELERY_APP`` (default: the prefix) on the same database (our
``botkit+…`` transport on the ``{prefix}_messages`` table) or Redis, with the
at-least-once settings of :mod:`botkit_tasks.runners.celery`, so
``Bot(..., broker=backends.broker)`` runs its jobs on Celery;
:meth:`Backends.celery_app` builds further apps.

Every malformed value raises :class:`~botkit_tasks.errors.ConfigurationError`
whose message starts with the variable's name.  Passwords never appear in
messages or in :attr:`Backends.url`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigurationError, StoreError
from .redis_url import _FALSE, _REDIS_PARTS, _TRUE, _redact, _redis_url_from_env

if TYPE_CHECKING:
    import celery
    import dramatiq
    from sqlalchemy.engine import Engine

    from ..kv.base import KvStore

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SQLITE_PATH",
    "RUNNERS",
    "BackendKind",
    "Backends",
    "Runner",
    "from_env",
    "from_urls",
]

#: SQLite file used when neither ``DATABASE_URL`` nor a Redis variable is set.
DEFAULT_SQLITE_PATH = "botkit.sqlite3"

#: Name prefix of tables and keys when ``BOTKIT_PREFIX`` is not set.
DEFAULT_PREFIX = "botkit"


BackendKind = Literal["sqlite", "postgresql", "redis"]
Runner = Literal["dramatiq", "celery"]
#: The values ``BOTKIT_RUNNER`` accepts, the default first.
RUNNERS: tuple[Runner, ...] = ("dramatiq", "celery")

_PREFIX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,30}")
#: The variables that choose the backend (the CLI clears them before it sets its own).
BACKEND_VARIABLES = ("DATABASE_URL", "REDIS_URL", "BOTKIT_BACKEND", *_REDIS_PARTS)
_BACKEND_NAMES: dict[str, BackendKind] = {
    "postgres": "postgresql",
    "postgresql": "postgresql",
    "redis": "redis",
    "valkey": "redis",
    "sqlite": "sqlite",
}


@dataclass(frozen=True)
class Backends:
    """The key-value store and broker chosen by :func:`from_env`.

    Unpacks as a pair, so ``kv, broker = from_env()`` works.

    Attributes:
        kv: The key-value store.
        broker: What ``Bot(broker=…)`` takes: the Dramatiq broker (``SqlBroker``
            or ``RedisBroker``), or with ``BOTKIT_RUNNER=celery`` a configured
            Celery app on the same backend (``monitor.inspect()`` reads either).
        kind: ``"sqlite"``, ``"postgresql"`` or ``"redis"``.
        url: The URL in use, password hidden (for logs and ``botkit-tasks status``).
        engine: The SQLAlchemy engine shared by ``kv`` and ``broker`` (SQL backends
            only): pass it to :func:`botkit_tasks.atomic`.
        runner: ``"dramatiq"`` or ``"celery"`` (``BOTKIT_RUNNER``).
        celery_url: The Celery broker URL on the same backend (password included,
            so never logged): ``botkit+<database URL>`` or the Redis URL.
    """

    kv: KvStore
    broker: dramatiq.Broker | celery.Celery
    kind: BackendKind
    url: str
    engine: Engine | None = field(default=None, repr=False)
    runner: Runner = "dramatiq"
    celery_url: str | None = field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX
    #: ``BOTKIT_PG_LISTEN``: whether the PostgreSQL queue may use LISTEN.
    pg_listen: bool = field(default=True, repr=False)

    def celery_app(self, name: str) -> celery.Celery:
        """A Celery app named ``name`` whose broker is this backend's queue.

        Configured by :func:`botkit_tasks.runners.celery.configure` (late acks,
        durable retries).  On SQL its transport uses the ``{prefix}_`` tables.

        Raises:
            ConfigurationError: ``BOTKIT_RUNNER`` is not ``celery``.
        """
        if self.runner != "celery" or self.celery_url is None:
            raise ConfigurationError(
                f"BOTKIT_RUNNER: is {self.runner!r}; set it to 'celery' for a Celery app"
            )
        from celery import Celery

        from ..runners.celery import configure

        app = Celery(name, broker=self.celery_url)
        if self.kind != "redis":
            from ..runners.kombu_sql import share_engine

            options: dict[str, Any] = {"table_prefix": f"{self.prefix}_"}
            if not self.pg_listen:
                options["listen"] = False
            app.conf.broker_transport_options = options
            # The transport writes through the store's engine: a task sent in
            # ``atomic(backends.engine)`` commits with the block's KV writes.
            share_engine(self.celery_url.removeprefix("botkit+"), self.engine)
        else:
            # Everything under the prefix: kombu's queues and unacked hash (so
            # bots sharing one Redis never consume each other's tasks) and the
            # runner's retry schedule and dead letters.
            app.conf.broker_transport_options = {
                "global_keyprefix": f"{self.prefix}:kombu:",
                "botkit_key_prefix": f"{self.prefix}:celery:",
            }
        return configure(app)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.kv, self.broker))

    def close(self) -> None:
        """Close the broker and the store, then dispose the shared engine.

        For a Celery app on the ``botkit+…`` transport, this process's
        transport connections to the database are closed too.
        """
        self.broker.close()
        if self.runner == "celery" and self.celery_url and self.kind != "redis":
            from ..runners.kombu_sql import close_brokers, share_engine

            close_brokers(self.celery_url.removeprefix("botkit+"))
            share_engine(self.celery_url.removeprefix("botkit+"), None)
        self.kv.close()
        if self.engine is not None:
            self.engine.dispose()


def from_env(environ: Mapping[str, str] | None = None) -> Backends:
    """Build the key-value store and broker that the environment asks for.

    Args:
        environ: The variables to read; ``os.environ`` when ``None``.

    Returns:
        The chosen :class:`Backends`.  Nothing is connected yet beyond what the
        backends do on construction (the SQL backends create their tables).

    Raises:
        ConfigurationError: A variable is malformed or the combination is
            ambiguous; the message names the variable.
    """
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if v != ""}
    runner = _runner(env)
    backends = _backends(env)
    if runner == "dramatiq":
        return backends
    with_celery = replace(backends, runner=runner, celery_url=_celery_url(backends, env))
    try:
        app = with_celery.celery_app(env.get("BOTKIT_CELERY_APP", backends.prefix))
    finally:
        # The Celery transport keeps its own queue connections.
        backends.broker.close()
    return replace(with_celery, broker=app)


def _runner(env: Mapping[str, str]) -> Runner:
    """``BOTKIT_RUNNER``, checked before anything is built."""
    raw = env.get("BOTKIT_RUNNER", "dramatiq")
    name = raw.strip().lower()
    for runner in RUNNERS:
        if name == runner:
            break
    else:
        raise ConfigurationError(f"BOTKIT_RUNNER: {raw!r} is not one of {', '.join(RUNNERS)}")
    if runner == "celery" and importlib.util.find_spec("celery") is None:
        raise ConfigurationError(
            "BOTKIT_RUNNER: 'celery' needs Celery; install the extra botkit-tasks[celery]"
        )
    return runner


def _celery_url(backends: Backends, env: Mapping[str, str]) -> str:
    """The Celery broker URL of ``backends``, password kept."""
    if backends.kind == "redis":
        url = _redis_url_from_env(env) or ""
        return "redis+socket://" + url.removeprefix("unix://") if url.startswith("unix:") else url
    assert backends.engine is not None
    return "botkit+" + backends.engine.url.render_as_string(hide_password=False)


def _backends(env: Mapping[str, str]) -> Backends:
    prefix = _prefix(env)
    database_url = env.get("DATABASE_URL")
    redis_url = _redis_url_from_env(env)
    choice = env.get("BOTKIT_BACKEND")
    if choice is not None:
        kind = _BACKEND_NAMES.get(choice.strip().lower())
        if kind is None:
            raise ConfigurationError(
                f"BOTKIT_BACKEND: {choice!r} is not one of postgres, redis, sqlite"
            )
        if kind == "postgresql":
            if database_url is None:
                raise ConfigurationError("BOTKIT_BACKEND: 'postgres' needs DATABASE_URL to be set")
            return _sql_backends(database_url, "DATABASE_URL", prefix, _pg_listen(env))
        if kind == "redis":
            if redis_url is None:
                raise ConfigurationError(
                    "BOTKIT_BACKEND: 'redis' needs REDIS_URL or REDIS_HOST to be set"
                )
            return _redis_backends(redis_url, prefix)
        return _sql_backends(_sqlite_url(env), "BOTKIT_SQLITE_PATH", prefix, True)
    if database_url is not None and redis_url is not None:
        raise ConfigurationError(
            "DATABASE_URL and REDIS_URL/REDIS_HOST are both set: set BOTKIT_BACKEND to "
            "'postgres' or 'redis' to choose where the bot's state and queue live"
        )
    if database_url is not None:
        return _sql_backends(database_url, "DATABASE_URL", prefix, _pg_listen(env))
    if redis_url is not None:
        return _redis_backends(redis_url, prefix)
    return _sql_backends(_sqlite_url(env), "BOTKIT_SQLITE_PATH", prefix, True)


def _pg_listen(env: Mapping[str, str]) -> bool:
    """``BOTKIT_PG_LISTEN``: whether the PostgreSQL broker may hold session state."""
    raw = env.get("BOTKIT_PG_LISTEN")
    if raw is None:
        return True
    flag = raw.strip().lower()
    if flag not in _TRUE | _FALSE:
        raise ConfigurationError(
            f"BOTKIT_PG_LISTEN: {raw!r} is not a boolean (true/false, 1/0, yes/no, on/off); "
            "set it to 0 behind a transaction pooler such as PgBouncer"
        )
    return flag in _TRUE


def from_urls(
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    prefix: str | None = None,
    runner: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Backends:
    """:func:`from_env` with explicit URLs taking the place of the environment's.

    Used by the command line's ``--database-url``, ``--redis-url``,
    ``--prefix`` and ``--runner`` (which replaces ``BOTKIT_RUNNER``).  A given
    URL replaces every backend variable of ``environ`` (``DATABASE_URL``,
    ``REDIS_*``, ``BOTKIT_BACKEND``); with neither URL, ``environ`` decides as
    in :func:`from_env`.
    """
    if database_url is not None and redis_url is not None:
        raise ConfigurationError("--database-url and --redis-url: give one, not both")
    env = dict(os.environ if environ is None else environ)
    if database_url is not None or redis_url is not None:
        for name in BACKEND_VARIABLES:
            env.pop(name, None)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    if prefix is not None:
        env["BOTKIT_PREFIX"] = prefix
    if runner is not None:
        env["BOTKIT_RUNNER"] = runner
    return from_env(env)


def _prefix(env: Mapping[str, str]) -> str | None:
    prefix = env.get("BOTKIT_PREFIX")
    if prefix is None:
        return None
    if not _PREFIX_RE.fullmatch(prefix):
        raise ConfigurationError(
            f"BOTKIT_PREFIX: {prefix!r} must be a letter or underscore followed by up to "
            "30 letters, digits or underscores"
        )
    return prefix


def _sqlite_url(env: Mapping[str, str]) -> str:
    path = env.get("BOTKIT_SQLITE_PATH", DEFAULT_SQLITE_PATH)
    if "\x00" in path:
        raise ConfigurationError("BOTKIT_SQLITE_PATH: contains a NUL character")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(f"BOTKIT_SQLITE_PATH: {path!r} is not valid UTF-8") from None
    return f"sqlite:///{os.path.abspath(path)}"


def _sql_backends(url: str, variable: str, prefix: str | None, listen: bool) -> Backends:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError, NoSuchModuleError

    from .._sql import create_engine, normalize_url

    try:
        parsed = normalize_url(url)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{variable}: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite" and (
        parsed.database in (None, "", ":memory:")
        or ":memory:" in (parsed.database or "")
        or parsed.query.get("mode") == "memory"
    ):
        # Workers and the web app must see the same queue: a private in-memory
        # database per connection would silently lose every message.
        raise ConfigurationError(f"{variable}: an in-memory SQLite database cannot hold a queue")
    from ..brokers.retry_guard import install_retry_guard
    from ..brokers.sql import SqlBroker
    from ..kv.sql import SqlKvStore
    from ..monitor.middleware import MonitorMiddleware

    prefix = prefix or DEFAULT_PREFIX
    # Behind a transaction pooler the next transaction may run on another server
    # connection, which never saw a statement psycopg prepared on this one.
    pooled = {"connect_args": {"prepare_threshold": None}} if not listen else {}
    try:
        engine = create_engine(parsed, **(pooled if backend == "postgresql" else {}))
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigurationError(
            f"{variable}: cannot load the database driver {parsed.drivername!r} ({exc})"
        ) from exc
    try:
        kv = SqlKvStore(engine, table_name=f"{prefix}_kv")
        broker = SqlBroker(engine, table_prefix=f"{prefix}_", listen=listen)
        broker.add_middleware(MonitorMiddleware())
        install_retry_guard(broker)
    except BaseException as exc:
        engine.dispose()
        cause = getattr(exc, "orig", None) or exc.__cause__ or exc
        if (
            backend == "sqlite"
            and isinstance(exc, (DBAPIError, StoreError))
            and not any(word in str(cause).lower() for word in ("locked", "busy"))
        ):
            # A path in a missing directory, a directory, a file that is no database.
            raise ConfigurationError(
                f"{variable}: cannot open the SQLite database {parsed.database!r}: {cause}"
            ) from exc
        raise
    shown = make_url(parsed).render_as_string(hide_password=True)
    kind: BackendKind = "sqlite" if backend == "sqlite" else "postgresql"
    return Backends(
        kv=kv,
        broker=broker,
        kind=kind,
        url=shown,
        engine=engine,
        prefix=prefix,
        pg_listen=listen,
    )


def _redis_backends(url: str, prefix: str | None) -> Backends:
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.middleware import Retries

    from ..brokers.ordering import OrderingKeys
    from ..brokers.retry_guard import install_retry_guard
    from ..kv.redis import RedisKvStore
    from ..monitor.middleware import MonitorMiddleware

    try:
        kv = RedisKvStore(url, key_prefix=f"{prefix or DEFAULT_PREFIX}:")
    except ConfigurationError:
        raise
    except ValueError as exc:  # redis-py refuses an option of the URL's query string
        raise ConfigurationError(f"REDIS_URL: {exc} ({_redact(url)!r})") from exc
    try:
        broker = RedisBroker(url=url, namespace=prefix or "dramatiq")  # type: ignore[no-untyped-call]
        broker.add_middleware(MonitorMiddleware())
        # Ordering keys (the deliveries of one object to one inbox run in
        # order): RedisBroker has none, the middleware keeps them in the KV.
        broker.add_middleware(OrderingKeys(kv), before=Retries)
        install_retry_guard(broker)
    except BaseException:
        kv.close()
        raise
    return Backends(
        kv=kv, broker=broker, kind="redis", url=_redact(url), prefix=prefix or DEFAULT_PREFIX
    )
