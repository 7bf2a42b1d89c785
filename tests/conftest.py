"""Shared fixtures: real PostgreSQL and Redis, isolated per test run.

Services come from ``BOTKIT_TEST_DATABASE_URL`` and ``BOTKIT_TEST_REDIS_URL``
(defaults: loopback).  When one is unreachable its tests skip with the reason,
except under ``CI``, where they fail: CI must never silently skip a backend.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect ``slow`` tests for a quick local run; CI (or BOTKIT_SLOW=1) runs them all."""
    if os.environ.get("CI") or os.environ.get("BOTKIT_SLOW") or config.getoption("-m"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def unique_name(prefix: str = "t") -> str:
    """A short random identifier usable as a table prefix or key prefix."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def _unavailable(what: str, reason: str) -> None:
    message = f"{what} unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so backends must not be skipped)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def database_url() -> str:
    """URL of a reachable PostgreSQL database (skips or fails when there is none)."""
    url = os.environ.get("BOTKIT_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    import sqlalchemy as sa

    from botkit_tasks._sql import create_engine

    try:
        engine = create_engine(url)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        _unavailable(f"PostgreSQL at {url}", str(exc).splitlines()[0])
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a reachable Redis or Valkey server (skips or fails when there is none)."""
    url = os.environ.get("BOTKIT_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:
        _unavailable(f"Redis at {url}", str(exc))
    return url


@pytest.fixture(scope="session")
def pgbouncer_url(database_url: str) -> Iterator[str]:
    """URL of the test database through a PgBouncer in transaction mode, started here."""
    from _pgbouncer import find_pgbouncer, running_pgbouncer

    if find_pgbouncer() is None:
        _unavailable("PgBouncer", "the pgbouncer executable is not installed")
    with running_pgbouncer(database_url) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: object) -> Iterator[str]:
    """URL of a fresh SQLite file in the test's temporary directory."""
    yield f"sqlite:///{tmp_path}/botkit.sqlite3"
