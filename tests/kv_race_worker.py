"""Child-process side of the key-value race tests (imported by spawned workers)."""

from __future__ import annotations

from typing import Any

from botkit_tasks.kv import KvStore, RedisKvStore, SqlKvStore


def open_store(spec: tuple[str, str, str]) -> KvStore:
    """Open the store described by ``(backend, url, table_name_or_key_prefix)``."""
    backend, url, name = spec
    if backend == "redis":
        return RedisKvStore(url, key_prefix=name)
    return SqlKvStore(url, table_name=name)


def race_create(
    spec: tuple[str, str, str], key: list[str], token: str, barrier: Any, results: Any
) -> None:
    """Wait for every racer, try to create ``key`` with ``token``, report ``(token, won)``."""
    store = open_store(spec)
    try:
        barrier.wait(timeout=60)
        results.put((token, store.cas(tuple(key), None, token)))
    except BaseException as exc:
        results.put((token, repr(exc)))
        raise
    finally:
        store.close()


def increment(
    spec: tuple[str, str, str], key: list[str], times: int, barrier: Any, results: Any
) -> None:
    """Add 1 to the integer under ``key`` ``times`` times with a cas loop; report retries."""
    store = open_store(spec)
    retries = 0
    try:
        barrier.wait(timeout=60)
        for _ in range(times):
            while True:
                current = store.get(tuple(key))
                assert isinstance(current, int)
                if store.cas(tuple(key), current, current + 1):
                    break
                retries += 1
        results.put(retries)
    except BaseException as exc:
        results.put(repr(exc))
        raise
    finally:
        store.close()
