"""The shared SQL plumbing: engine configuration, ambient transactions, atomic()."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from botkit_tasks import ConfigurationError, atomic
from botkit_tasks._sql import create_engine, normalize_url, on_commit, transaction


def test_postgres_urls_use_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"


@pytest.mark.parametrize("url", ["not a url", "mysql://u@h/db", ""])
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        normalize_url(url)


def test_sqlite_engine_is_wal_with_busy_timeout(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    engine.dispose()


def _make_table(engine: sa.Engine) -> sa.Table:
    meta = sa.MetaData()
    table = sa.Table("atomic_probe", meta, sa.Column("v", sa.Integer))
    meta.create_all(engine)
    return table


def _values(engine: sa.Engine, table: sa.Table) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(table.c.v)).scalars())


def test_atomic_commits_and_rolls_back_together(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    table = _make_table(engine)
    # Given two writes inside one atomic block that then fails
    with pytest.raises(RuntimeError), atomic(engine):
        with transaction(engine) as conn:
            conn.execute(table.insert().values(v=1))
        with transaction(engine) as conn:
            conn.execute(table.insert().values(v=2))
        raise RuntimeError("boom")
    # Then neither exists
    assert _values(engine, table) == []
    # And when the block succeeds, both do
    with atomic(engine):
        with transaction(engine) as conn:
            conn.execute(table.insert().values(v=1))
        with transaction(engine) as conn:
            conn.execute(table.insert().values(v=2))
    assert _values(engine, table) == [1, 2]
    engine.dispose()


def test_nested_atomic_uses_a_savepoint(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    table = _make_table(engine)
    with atomic(engine) as outer:
        outer.execute(table.insert().values(v=1))
        with pytest.raises(ValueError), atomic(engine) as inner:
            assert inner is outer
            inner.execute(table.insert().values(v=2))
            raise ValueError("inner fails alone")
    assert _values(engine, table) == [1]
    engine.dispose()


def test_atomic_is_per_thread(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    table = _make_table(engine)
    seen: list[bool] = []
    with atomic(engine) as conn:
        conn.execute(table.insert().values(v=1))
        # Another thread does not join this transaction (it would deadlock on
        # SQLite's write lock if it did and wrote; it only checks).
        from botkit_tasks._sql import ambient_connection

        t = threading.Thread(target=lambda: seen.append(ambient_connection(engine) is None))
        t.start()
        t.join()
    assert seen == [True]
    engine.dispose()


def test_on_commit_runs_after_commit_only(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    table = _make_table(engine)
    calls: list[str] = []
    with pytest.raises(RuntimeError), atomic(engine) as conn:
        on_commit(conn, lambda: calls.append("rolled back"))
        raise RuntimeError
    with atomic(engine) as conn:
        conn.execute(table.insert().values(v=3))
        on_commit(conn, lambda: calls.append("committed"))
        assert calls == []
    assert calls == ["committed"]
    with transaction(engine) as conn:
        on_commit(conn, lambda: calls.append("plain"))
    assert calls == ["committed", "plain"]
    engine.dispose()


def test_atomic_rejects_non_engines() -> None:
    with pytest.raises(TypeError, match="Engine"), atomic("sqlite://"):  # type: ignore[arg-type]
        pass
