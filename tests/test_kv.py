"""Key-value store conformance: one body of tests, run against every backend.

Each test takes the ``kv`` fixture, parametrized over ``memory``, ``sqlite``
(a temporary file), ``postgres`` and ``redis`` (real services from the conftest
fixtures, isolated by a random table name / key prefix that is removed
afterwards).  The semantics checked are those of DESIGN §1 and ``docs/kv.md``.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import random
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import kv_race_worker
import pytest
import redis
import sqlalchemy as sa
from conftest import unique_name
from hypothesis import given, settings
from hypothesis import strategies as st

from botkit_tasks import StoreError, atomic
from botkit_tasks._sql import create_engine
from botkit_tasks.kv import KvStore, MemoryKvStore, RedisKvStore, SqlKvStore
from botkit_tasks.kv import sql as kv_sql

BACKENDS = ["memory", "sqlite", "postgres", "redis"]


@dataclass
class Backend:
    name: str
    store: KvStore
    #: Another store on the same data (the same object for memory).
    reopen: Callable[[], KvStore]
    #: How a child process opens the same data; None for memory.
    spec: tuple[str, str, str] | None


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from _open_backend(request.param, request)


@pytest.fixture(params=[b for b in BACKENDS if b != "memory"])
def shared_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The backends that several processes can share (all but memory)."""
    yield from _open_backend(request.param, request)


def _open_backend(name: str, request: pytest.FixtureRequest) -> Iterator[Backend]:
    if name == "memory":
        store = MemoryKvStore()
        yield Backend(name, store, lambda: store, None)
        store.close()
    elif name in ("sqlite", "postgres"):
        url = request.getfixturevalue("sqlite_url" if name == "sqlite" else "database_url")
        table = unique_name("kv_")
        engine = create_engine(url)
        # Stores built on this engine share it; the test's store is on a URL of its own.
        sql_store = SqlKvStore(url, table_name=table)
        yield Backend(
            name,
            sql_store,
            lambda: SqlKvStore(engine, table_name=table),
            (name, url, table),
        )
        sql_store.close()
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{table}"')
        engine.dispose()
    else:
        url = request.getfixturevalue("redis_url")
        prefix = unique_name("botkit-test:") + ":"
        # The main store gets a shared client that decodes responses, the
        # harder case; reopened ones own bytes clients.
        client = redis.Redis.from_url(url, decode_responses=True)
        redis_store = RedisKvStore(client, key_prefix=prefix)
        yield Backend(
            name,
            redis_store,
            lambda: RedisKvStore(url, key_prefix=prefix),
            (name, url, prefix),
        )
        redis_store.close()
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
        client.close()


@pytest.fixture
def kv(backend: Backend) -> KvStore:
    return backend.store


def same(a: Any, b: Any) -> bool:
    """Equality with JSON types: True is not 1, 1 is not 1.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.copysign(1, a) != math.copysign(1, b):
        return False
    return bool(a == b)


def wait_past(seconds: float) -> None:
    time.sleep(seconds + 0.05)


# -- values -------------------------------------------------------------------

ROUND_TRIP_VALUES: list[Any] = [
    0,
    -1,
    2**200,
    -(2**70),
    1.5,
    0.1,
    1e300,
    -1e-300,
    -0.0,
    1.0,
    "",
    "héllo ✓ 😀 \U0010ffff",
    "\x01 \t \n \\ \" ' %_*?[]",
    True,
    False,
    [],
    {},
    [1, "a", None, [True, 2.5]],
    {"a": None},
    {"nested": {"x": [1, {"y": 2.5}], "z": "é"}, "b": [], "a": {}},
    {"": "empty key", "é": 1, "😀": 2},
    ["x" * 10_000],
]


def test_values_round_trip_with_their_json_types(kv: KvStore) -> None:
    # Given every kind of JSON value stored under its own key
    for i, value in enumerate(ROUND_TRIP_VALUES):
        kv.set(("values", str(i)), value)
    # Then get() and list() return each with the same JSON types
    for i, value in enumerate(ROUND_TRIP_VALUES):
        got = kv.get(("values", str(i)))
        assert same(got, value), (value, got)
    listed = dict(kv.list(("values",)))
    assert len(listed) == len(ROUND_TRIP_VALUES)
    for i, value in enumerate(ROUND_TRIP_VALUES):
        assert same(listed[("values", str(i))], value)


def test_missing_stored_overwritten_and_deleted(kv: KvStore) -> None:
    key = ("users", "alice")
    assert kv.get(key) is None
    kv.set(key, {"n": 1})
    assert kv.get(key) == {"n": 1}
    kv.set(key, [2])
    assert kv.get(key) == [2]
    # A list key is the same key as the tuple
    assert kv.get(["users", "alice"]) == [2]
    kv.delete(key)
    assert kv.get(key) is None
    # Deleting what is not there is not an error
    kv.delete(key)
    kv.delete(("never", "there"))
    assert list(kv.list()) == []


def test_values_are_copied_in_and_out(kv: KvStore) -> None:
    value: dict[str, Any] = {"a": [1]}
    kv.set(("k",), value)
    value["a"].append(2)
    got = kv.get(("k",))
    assert got == {"a": [1]}
    assert isinstance(got, dict)
    got["a"].append(3)
    assert kv.get(("k",)) == {"a": [1]}
    (_, listed), *_ = kv.list()
    assert isinstance(listed, dict)
    listed["b"] = 1
    assert kv.get(("k",)) == {"a": [1]}


def test_stores_on_the_same_data_see_each_other(backend: Backend) -> None:
    backend.store.set(("shared",), 1)
    other = backend.reopen()
    try:
        assert other.get(("shared",)) == 1
        other.set(("shared",), 2)
        assert backend.store.get(("shared",)) == 2
    finally:
        if other is not backend.store:
            other.close()


# -- TTL ----------------------------------------------------------------------


def test_ttl_zero_expires_at_once(kv: KvStore) -> None:
    kv.set(("k",), 1, ttl=0)
    kv.set(("k2",), 1, ttl=timedelta(0))
    # Under half a millisecond rounds to zero
    kv.set(("k3",), 1, ttl=0.0004)
    assert kv.get(("k",)) is None
    assert kv.get(("k2",)) is None
    assert kv.get(("k3",)) is None
    assert list(kv.list()) == []
    # ttl=0 on an existing key removes it
    kv.set(("k",), 1)
    kv.set(("k",), 2, ttl=0)
    assert kv.get(("k",)) is None


def test_millisecond_ttl_expires(kv: KvStore) -> None:
    kv.set(("short",), "v", ttl=0.5)
    assert kv.get(("short",)) == "v"
    kv.set(("long",), "v", ttl=3600)
    kv.set(("longer",), "v", ttl=timedelta(days=365))
    wait_past(0.5)
    # Then the short one is invisible to get, list and cas; the long ones stay
    assert kv.get(("short",)) is None
    assert [k for k, _ in kv.list()] == [("long",), ("longer",)]
    assert kv.cas(("short",), "v", "w") is False
    assert kv.get(("long",)) == "v"
    assert kv.get(("longer",)) == "v"


def test_reset_restarts_the_clock_and_no_ttl_clears_it(kv: KvStore) -> None:
    kv.set(("refreshed",), 1, ttl=0.8)
    kv.set(("cleared",), 1, ttl=0.8)
    time.sleep(0.5)
    # Re-set with a new TTL restarts the clock; without a TTL, removes the expiry
    kv.set(("refreshed",), 2, ttl=0.8)
    kv.set(("cleared",), 2)
    time.sleep(0.5)
    # 1 s after the first set: both would have expired without the re-set
    assert kv.get(("refreshed",)) == 2
    assert kv.get(("cleared",)) == 2
    wait_past(0.8)
    assert kv.get(("refreshed",)) is None
    assert kv.get(("cleared",)) == 2


# -- cas ----------------------------------------------------------------------


def test_cas_create_if_absent(kv: KvStore) -> None:
    assert kv.cas(("lock",), None, "me") is True
    assert kv.cas(("lock",), None, "you") is False
    assert kv.get(("lock",)) == "me"


def test_cas_swaps_only_on_a_match(kv: KvStore) -> None:
    kv.set(("k",), {"v": 1})
    assert kv.cas(("k",), {"v": 2}, {"v": 3}) is False
    assert kv.cas(("k",), None, {"v": 3}) is False
    assert kv.get(("k",)) == {"v": 1}
    assert kv.cas(("k",), {"v": 1}, {"v": 2}) is True
    assert kv.get(("k",)) == {"v": 2}
    # A missing key never matches a value
    assert kv.cas(("missing",), {"v": 2}, 1) is False
    assert kv.get(("missing",)) is None


def test_cas_equality_is_structural_json_equality(kv: KvStore) -> None:
    # Dict key order does not matter
    kv.set(("d",), {"a": 1, "b": [1, {"x": None, "y": 2}]})
    assert kv.cas(("d",), {"b": [1, {"y": 2, "x": None}], "a": 1}, "swapped") is True
    assert kv.get(("d",)) == "swapped"
    # List order does
    kv.set(("l",), [1, 2])
    assert kv.cas(("l",), [2, 1], "x") is False
    # JSON types count: true is not 1, 1 is not 1.0
    kv.set(("t",), True)
    assert kv.cas(("t",), 1, "x") is False
    assert kv.cas(("t",), True, "x") is True
    kv.set(("i",), 1)
    assert kv.cas(("i",), True, "x") is False
    assert kv.cas(("i",), 1.0, "x") is False
    assert kv.get(("i",)) == 1
    assert kv.cas(("i",), 1, "x") is True


def test_cas_treats_expired_as_absent(kv: KvStore) -> None:
    kv.set(("k",), "old", ttl=0.5)
    assert kv.cas(("k",), None, "new") is False
    wait_past(0.5)
    assert kv.cas(("k",), "old", "x") is False
    assert kv.cas(("k",), None, "new") is True
    assert kv.get(("k",)) == "new"


def test_cas_new_none_deletes_on_match(kv: KvStore) -> None:
    kv.set(("k",), [1])
    assert kv.cas(("k",), [2], None) is False
    assert kv.get(("k",)) == [1]
    assert kv.cas(("k",), [1], None) is True
    assert kv.get(("k",)) is None
    assert list(kv.list()) == []


def test_cas_none_none(kv: KvStore) -> None:
    # On a missing key: "absent -> absent" holds
    assert kv.cas(("k",), None, None) is True
    assert kv.get(("k",)) is None
    # On a live key it does not, and nothing changes
    kv.set(("k",), 1)
    assert kv.cas(("k",), None, None) is False
    assert kv.get(("k",)) == 1


def test_cas_ttl(kv: KvStore) -> None:
    # ttl=0: the swap happens and leaves nothing
    kv.set(("k",), 1)
    assert kv.cas(("k",), 1, 2, ttl=0) is True
    assert kv.get(("k",)) is None
    assert kv.cas(("k",), None, 2, ttl=0) is True
    assert kv.get(("k",)) is None
    assert kv.cas(("k",), 5, 2, ttl=0) is False
    # A TTL applies to the new value
    assert kv.cas(("k",), None, "v", ttl=0.5) is True
    assert kv.get(("k",)) == "v"
    assert kv.cas(("k",), "v", "w", ttl=timedelta(milliseconds=500)) is True
    wait_past(0.5)
    assert kv.get(("k",)) is None
    # Without a TTL the swapped value does not expire
    kv.set(("p",), "a", ttl=0.5)
    assert kv.cas(("p",), "a", "b") is True
    wait_past(0.5)
    assert kv.get(("p",)) == "b"


def test_threads_racing_create_if_absent_have_one_winner(backend: Backend) -> None:
    racers = 8
    stores = [backend.store if i % 2 else backend.reopen() for i in range(racers)]
    barrier = threading.Barrier(racers)
    results: list[bool] = [False] * racers

    def race(i: int) -> None:
        barrier.wait(timeout=30)
        results[i] = stores[i].cas(("race",), None, f"racer-{i}")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert results.count(True) == 1
        assert backend.store.get(("race",)) == f"racer-{results.index(True)}"
    finally:
        for s in stores:
            if s is not backend.store:
                s.close()


def test_threads_incrementing_with_cas_lose_no_update(backend: Backend) -> None:
    backend.store.set(("counter",), 0)
    threads, times = 4, 25
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            _increment_counter(backend.store, times, barrier)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(90)
    assert errors == []
    assert backend.store.get(("counter",)) == threads * times


def _increment_counter(store: KvStore, times: int, barrier: threading.Barrier) -> None:
    barrier.wait(timeout=30)
    for _ in range(times):
        while True:
            current = store.get(("counter",))
            assert isinstance(current, int)
            if store.cas(("counter",), current, current + 1):
                break


def test_processes_racing_create_if_absent_have_one_winner(shared_backend: Backend) -> None:
    backend = shared_backend
    assert backend.spec is not None
    # The table does not exist yet: the processes also race to create it.
    racers = 4
    ctx = multiprocessing.get_context("spawn")

    def run(target: Callable[..., None], args: Callable[[int], tuple[Any, ...]]) -> list[Any]:
        barrier, results = ctx.Barrier(racers), ctx.Queue()
        procs = [
            ctx.Process(target=target, args=(*args(i), barrier, results)) for i in range(racers)
        ]
        for p in procs:
            p.start()
        try:
            return [results.get(timeout=90) for _ in procs]
        finally:
            for p in procs:
                p.join(30)

    outcomes = dict(
        run(
            kv_race_worker.race_create,
            lambda i: (backend.spec, ["race", "proc"], f"process-{i}"),
        )
    )
    winners = [token for token, won in outcomes.items() if won is True]
    assert len(winners) == 1, outcomes
    assert all(won is False for token, won in outcomes.items() if token not in winners)
    assert backend.store.get(("race", "proc")) == winners[0]
    # And increments from several processes lose nothing
    backend.store.set(["count"], 0)
    retries = run(kv_race_worker.increment, lambda i: (backend.spec, ["count"], 10))
    assert all(isinstance(r, int) for r in retries), retries
    assert backend.store.get(("count",)) == racers * 10


# -- list ---------------------------------------------------------------------


def test_list_prefix_is_element_wise_and_includes_the_exact_key_once(kv: KvStore) -> None:
    for key in [("p",), ("p", "a"), ("p", "b"), ("p", "n", "c"), ("pa",), ("q",), ("o", "p")]:
        kv.set(key, "/".join(key))
    assert [k for k, _ in kv.list(("p",))] == [("p",), ("p", "a"), ("p", "b"), ("p", "n", "c")]
    assert list(kv.list(["p", "n"])) == [(("p", "n", "c"), "p/n/c")]
    assert list(kv.list(("p", "a"))) == [(("p", "a"), "p/a")]
    assert list(kv.list(("p", "z"))) == []
    # ("a",) does not match ("ab",)
    kv.set(("a",), 1)
    kv.set(("ab",), 2)
    assert list(kv.list(("a",))) == [(("a",), 1)]
    # The empty prefix lists everything
    assert len(list(kv.list())) == 9
    assert len(list(kv.list([]))) == 9


METACHARACTER_PARTS = [
    "%", "_", "\\", "*", "?", "[", "]", ":", "/", '"', "", "a*", "[ab]", "x%y", "x_y",
    "a", "ab", "b", "xzy", "\\*", "::", "é", "😀", "\uffff", "\x01", "'", " ", "a\x01",
]  # fmt: skip


def test_list_with_metacharacters_and_unicode_in_keys(kv: KvStore) -> None:
    for part in METACHARACTER_PARTS:
        kv.set((part,), part)
        kv.set((part, "child"), part)
        kv.set((part, part, part), part)
    for part in METACHARACTER_PARTS:
        # Then each prefix matches its own keys only, however the part looks
        expected = sorted([((part,), part), ((part, part, part), part), ((part, "child"), part)])
        assert list(kv.list((part,))) == expected, part
        assert kv.get((part, part, part)) == part


def test_list_orders_by_code_point_like_python_tuples(kv: KvStore) -> None:
    keys = [(p,) for p in METACHARACTER_PARTS] + [
        ("a", ""),
        ("a", "b"),
        ("a", "b", ""),
        ("a\x01",),
        ("\U0001f600",),
        ("\U00010000",),
        ("\ufb01",),
        ("z",),
        ("Z",),
        ("é", "e"),
        ("e",),
    ]
    shuffled = list(keys)
    random.Random(7).shuffle(shuffled)
    for key in shuffled:
        kv.set(key, 0)
    listed = [k for k, _ in kv.list()]
    assert listed == sorted(set(keys))
    # Astral characters after the whole BMP, unlike UTF-16 order
    assert listed.index(("\uffff",)) < listed.index(("\U00010000",))


def test_list_start_after_resumes_in_key_order(kv: KvStore) -> None:
    # Given keys under a prefix, some with descendants, and one outside it
    keys = [("f", "a"), ("f", "b"), ("f", "b", "x"), ("f", "b", ""), ("f", "c"), ("f", "é")]
    for key in keys:
        kv.set(key, list(key))
    kv.set(("g", "a"), 0)
    ordered = sorted(keys)
    # When listing after each key in turn
    for i, key in enumerate(ordered):
        # Then exactly the later keys of the prefix come back, descendants included
        assert [k for k, _ in kv.list(("f",), start_after=key)] == ordered[i + 1 :]
    # A cursor that is not itself stored still works, and one before the prefix is a no-op
    assert [k for k, _ in kv.list(("f",), start_after=("f", "bb"))] == [("f", "c"), ("f", "é")]
    assert [k for k, _ in kv.list(("f",), start_after=("e",))] == ordered
    assert list(kv.list(("f",), start_after=("g",))) == []
    # Paging by cursor over more than one internal page visits everything once
    for i in range(1200):
        kv.set(("p", f"{i:05d}"), i)
    seen: list[int] = []
    cursor: tuple[str, ...] | None = None
    while True:
        page = list(itertools.islice(kv.list(("p",), start_after=cursor), 250))
        if not page:
            break
        seen.extend(int(v) for _, v in page)  # type: ignore[arg-type]
        cursor = page[-1][0]
    assert seen == list(range(1200))
    with pytest.raises(TypeError):
        kv.list(("f",), start_after="f")  # type: ignore[arg-type]


def test_list_while_writing_yields_every_stable_entry_exactly_once(kv: KvStore) -> None:
    total = 1100  # more than two pages of every paginated backend
    for i in range(total):
        kv.set(("it", f"{i:05d}"), i)
    kv.set(("itx",), "outside")
    seen: list[tuple[str, ...]] = []
    for n, (key, _value) in enumerate(kv.list(("it",))):
        seen.append(key)
        # Meanwhile: delete odd entries (ahead of and behind the cursor) and add new ones
        if n % 3 == 0:
            victim = (n * 7) % total
            if victim % 2:
                kv.delete(("it", f"{victim:05d}"))
            kv.set(("it", f"{victim:05d}", "new"), n)
    stable = {("it", f"{i:05d}") for i in range(0, total, 2)}
    assert len(seen) == len(set(seen)), "an entry was yielded twice"
    assert stable <= set(seen), "a stable entry was skipped"
    assert seen == sorted(seen)
    assert ("itx",) not in seen


def test_list_excludes_expired(kv: KvStore) -> None:
    kv.set(("e", "gone"), 1, ttl=0.05)
    kv.set(("e", "kept"), 2)
    kv.set(("e",), 3, ttl=0.05)
    wait_past(0.05)
    assert list(kv.list(("e",))) == [(("e", "kept"), 2)]


# -- bad input ----------------------------------------------------------------

BAD_KEYS: list[tuple[Any, type[Exception]]] = [
    ("a", TypeError),
    (b"a", TypeError),
    (None, TypeError),
    (123, TypeError),
    ((), ValueError),
    ([], ValueError),
    (("a", 1), TypeError),
    ((b"a",), TypeError),
    (("a", None), TypeError),
    (("a\x00",), ValueError),
    (("ok", "\ud800"), ValueError),
    (("x" * 1100,), ValueError),
    (("é" * 600,), ValueError),
    (tuple("x" * 513), ValueError),
]

BAD_VALUES: list[tuple[Any, type[Exception]]] = [
    (None, ValueError),
    ((1, 2), TypeError),
    ({1, 2}, TypeError),
    (b"bytes", TypeError),
    ({1: "a"}, TypeError),
    ({None: "a"}, TypeError),
    ({"a": (1,)}, TypeError),
    ([{"a": {2}}], TypeError),
    (object(), TypeError),
    (Decimal("1.5"), TypeError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    ([float("-inf")], ValueError),
    ("a\x00b", ValueError),
    ("\udc80", ValueError),
    ({"k\x00": 1}, ValueError),
    ({"\ud800": 1}, ValueError),
    ({"a": ["ok", "\x00"]}, ValueError),
]

BAD_TTLS: list[tuple[Any, type[Exception]]] = [
    (True, TypeError),
    ("5", TypeError),
    ([1], TypeError),
    (-1, ValueError),
    (-0.001, ValueError),
    (timedelta(seconds=-1), ValueError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
]


def test_bad_keys_raise_and_write_nothing(kv: KvStore) -> None:
    for key, error in BAD_KEYS:
        with pytest.raises(error):
            kv.set(key, 1)
        with pytest.raises(error):
            kv.get(key)
        with pytest.raises(error):
            kv.delete(key)
        with pytest.raises(error):
            kv.cas(key, None, 1)
        if key not in ((), []):  # the empty prefix is legal
            with pytest.raises(error):
                kv.list(key)
    assert list(kv.list()) == []
    # The limit is inclusive: 1024 packed bytes is fine
    kv.set(("x" * 1023,), 1)
    assert kv.get(("x" * 1023,)) == 1


def test_bad_values_raise_and_write_nothing(kv: KvStore) -> None:
    kv.set(("existing",), "before")
    for value, error in BAD_VALUES:
        with pytest.raises(error):
            kv.set(("k",), value)
        with pytest.raises(error):
            kv.set(("existing",), value)
        if value is not None:
            with pytest.raises(error):
                kv.cas(("k",), None, value)
            with pytest.raises(error):
                kv.cas(("existing",), value, "x")
            with pytest.raises(error):
                kv.cas(("existing",), "before", value)
    assert list(kv.list()) == [(("existing",), "before")]


def test_bad_ttls_raise_and_write_nothing(kv: KvStore) -> None:
    kv.set(("existing",), "before")
    for ttl, error in BAD_TTLS:
        with pytest.raises(error):
            kv.set(("k",), 1, ttl=ttl)
        with pytest.raises(error):
            kv.set(("existing",), 1, ttl=ttl)
        with pytest.raises(error):
            kv.cas(("existing",), "before", 1, ttl=ttl)
    assert list(kv.list()) == [(("existing",), "before")]


def test_error_messages_name_the_problem(kv: KvStore) -> None:
    with pytest.raises(TypeError, match="tuple"):
        kv.set("users", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="None"):
        kv.set(("k",), None)
    with pytest.raises(TypeError, match="set"):
        kv.set(("k",), {1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        kv.set(("k",), 1, ttl=-5)
    with pytest.raises(ValueError, match="1024"):
        kv.set(("k" * 2000,), 1)


def test_close_is_idempotent(backend: Backend) -> None:
    other = backend.reopen()
    other.set(("c",), 1)
    other.close()
    other.close()
    assert backend.store.get(("c",)) == 1


# -- SQL specifics ------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(
        "sqlite_url" if request.param == "sqlite" else "database_url"
    )
    return url


@pytest.fixture
def sql_engine(sql_url: str) -> Iterator[tuple[sa.Engine, str]]:
    engine = create_engine(sql_url)
    table = unique_name("kv_")
    yield engine, table
    with engine.begin() as conn:
        conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{table}"')
    engine.dispose()


def test_sql_missing_table_without_create_table_is_a_clear_error(
    sql_engine: tuple[sa.Engine, str],
) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table, create_table=False)
    with pytest.raises(StoreError, match=table):
        store.get(("k",))
    with pytest.raises(StoreError, match="create_table"):
        store.set(("k",), 1)
    # Once the table exists, the same store works
    SqlKvStore(engine, table_name=table).set(("k",), 1)
    assert store.get(("k",)) == 1


def test_sql_shared_engine_is_not_disposed(sql_engine: tuple[sa.Engine, str]) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table)
    store.set(("k",), 1)
    assert store.engine is engine
    assert store.table_name == table
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get(("k",))
    # The engine still works, and so does another store on it
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    assert SqlKvStore(engine, table_name=table).get(("k",)) == 1


def test_sql_atomic_commits_or_rolls_back_with_the_enclosing_transaction(
    sql_engine: tuple[sa.Engine, str],
) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table)
    # Given writes inside atomic() that then fails
    with pytest.raises(RuntimeError), atomic(engine):
        store.set(("posts", "1"), {"text": "hi"})
        assert store.cas(("lock",), None, "me") is True
        # Reads inside the block see the block's writes
        assert store.get(("posts", "1")) == {"text": "hi"}
        assert [k for k, _ in store.list(("posts",))] == [("posts", "1")]
        raise RuntimeError("boom")
    # Then none of them happened
    assert store.get(("posts", "1")) is None
    assert store.get(("lock",)) is None
    # And a block that completes commits them all
    with atomic(engine):
        store.set(("posts", "2"), 2)
        store.delete(("posts", "1"))
        assert store.cas(("lock",), None, "me") is True
    assert store.get(("posts", "2")) == 2
    assert store.get(("lock",)) == "me"
    # Nested blocks roll back to their savepoint
    with atomic(engine):
        store.set(("outer",), 1)
        with pytest.raises(RuntimeError), atomic(engine):
            store.set(("inner",), 1)
            raise RuntimeError("inner")
    assert store.get(("outer",)) == 1
    assert store.get(("inner",)) is None


def test_sql_table_created_inside_a_rolled_back_atomic_is_created_again(
    sql_engine: tuple[sa.Engine, str],
) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table)
    with pytest.raises(RuntimeError), atomic(engine):
        store.set(("k",), 1)
        raise RuntimeError("boom")
    # On PostgreSQL the DDL was rolled back too; the store notices nothing
    store.set(("k",), 2)
    assert store.get(("k",)) == 2


def test_sql_stores_json_text_that_round_trips_exactly(
    sql_engine: tuple[sa.Engine, str],
) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table)
    store.set(("f",), {"b": 1e300, "a": 0.1})
    with engine.connect() as conn:
        raw = conn.exec_driver_sql(f'SELECT value FROM "{table}"').scalar()
    # Canonical JSON: sorted keys, no spaces; 1e300 stays a float (no jsonb)
    assert raw == '{"a":0.1,"b":1e+300}'
    assert same(store.get(("f",)), {"a": 0.1, "b": 1e300})


def test_sql_expired_rows_are_reclaimed_by_later_writes(
    sql_engine: tuple[sa.Engine, str],
) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table)
    for i in range(300):
        store.set(("tmp", str(i)), i, ttl=0.01)
    time.sleep(0.1)
    # When the table keeps being written to
    for i in range(600):
        store.set(("live",), i)
    # Then the expired rows are (mostly) gone, without any sweeper
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f'SELECT count(*) FROM "{table}"').scalar()
    assert rows is not None and rows < 100


def test_sql_prefix_listing_is_an_index_range_scan(sql_engine: tuple[sa.Engine, str]) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table)
    store.set(("a", "b"), 1)
    sql = store._sql["list"]
    params = {"lo": b"a\x00", "hi": b"a\x01", "n": 500}
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # A tiny table would be scanned sequentially anyway; ask whether an index *can* serve.
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql, params))
            assert "Index" in plan and "pkey" in plan, plan
        else:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()
            plan = "\n".join(str(r[-1]) for r in rows)
            assert "SEARCH" in plan and "PRIMARY KEY" in plan, plan
            assert "TEMP B-TREE" not in plan, plan  # already in key order


def test_sql_rejects_bad_table_names(sql_url: str) -> None:
    from botkit_tasks.errors import ConfigurationError

    for name in ["", "1abc", 'a"b', "a b", "x" * 52, "drop;table"]:
        with pytest.raises(ConfigurationError):
            SqlKvStore(sql_url, table_name=name)
    with pytest.raises(ConfigurationError):
        SqlKvStore("mysql://localhost/db")
    for memory_url in ["sqlite://", "sqlite:///:memory:"]:
        with pytest.raises(ConfigurationError, match="in-memory"):
            SqlKvStore(memory_url)
    with pytest.raises(TypeError):
        SqlKvStore(42)  # type: ignore[arg-type]


# -- SQL: per-thread connections outside atomic() ------------------------------


def _thread_connection(store: SqlKvStore) -> Any:
    """The DBAPI connection the calling thread holds for ``store`` (white box)."""
    slot = store._threads.slot
    assert slot is not None, "this thread has no connection of its own"
    return slot.connection


def _is_closed(connection: Any) -> bool:
    if isinstance(connection, sqlite3.Connection):
        try:
            connection.execute("SELECT 1")
        except sqlite3.ProgrammingError:
            return True
        return False
    return bool(connection.closed)


def _checked_out(engine: sa.Engine) -> int:
    pool: Any = engine.pool  # a QueuePool: file SQLite and PostgreSQL
    return int(pool.checkedout())


def _drop_table(engine: sa.Engine, table: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{table}"')


def test_sql_operations_outside_atomic_do_not_take_pool_connections(sql_url: str) -> None:
    # Given an engine whose pool holds one connection, and 16 threads using one store
    engine = create_engine(sql_url, pool_size=1, max_overflow=0, pool_timeout=2)
    table = unique_name("kv_")
    store = SqlKvStore(engine, table_name=table)
    store.set(("warm",), 0)  # creates the table, in a pooled transaction
    checkouts: list[object] = []
    sa.event.listen(engine, "checkout", lambda *args: checkouts.append(args))
    threads, rounds = 16, 10
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            for j in range(rounds):
                key = ("t", str(i), str(j))
                store.set(key, j)
                assert store.get(key) == j
                assert store.cas(key, j, j + 1) is True
            assert len(list(store.list(("t", str(i))))) == rounds
            # All threads hold their connections at once here.
            barrier.wait(timeout=30)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    try:
        for t in workers:
            t.start()
        for t in workers:
            t.join(90)
        # Then every operation ran, and none of them touched the pool
        assert errors == []
        assert checkouts == []
        assert _checked_out(engine) == 0
        assert len(list(store.list(("t",)))) == threads * rounds
    finally:
        store.close()
        _drop_table(engine, table)
        engine.dispose()


def test_sql_a_thread_that_ends_closes_its_connection(
    sql_engine: tuple[sa.Engine, str],
) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table)
    store.set(("k",), 1)
    seen: list[Any] = []

    def work() -> None:
        assert store.get(("k",)) == 1
        seen.append(_thread_connection(store))

    # When a thread uses the store and ends
    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    # Then its connection is closed and the store holds nothing for it
    assert len(seen) == 1
    assert _is_closed(seen[0])
    assert store._slots == {}
    # And the store goes on in other threads
    assert store.get(("k",)) == 1
    assert len(store._slots) == 1
    store.close()
    assert store._slots == {}


def test_sql_close_closes_the_connections_of_every_thread(
    sql_engine: tuple[sa.Engine, str],
) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table)
    store.set(("k",), 1)
    assert store.get(("k",)) == 1
    connections = [_thread_connection(store)]
    threads = 4
    opened = threading.Barrier(threads + 1)
    finish = threading.Event()
    after_close: list[BaseException] = []

    def work() -> None:
        assert store.get(("k",)) == 1
        connections.append(_thread_connection(store))
        opened.wait(timeout=30)
        finish.wait(timeout=30)
        try:
            store.get(("k",))
        except StoreError as exc:
            after_close.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    opened.wait(timeout=30)
    # When the store is closed while its threads are still alive
    store.close()
    finish.set()
    for t in workers:
        t.join(30)
    # Then every thread's connection is closed, and later calls fail clearly
    assert len(connections) == threads + 1
    assert all(_is_closed(c) for c in connections)
    assert len(after_close) == threads
    assert all("closed" in str(exc) for exc in after_close)
    with pytest.raises(StoreError, match="closed"):
        store.set(("k",), 2)
    # The engine, which the store did not create, still works
    assert SqlKvStore(engine, table_name=table).get(("k",)) == 1


def test_sql_atomic_joins_even_when_the_thread_has_its_own_connection(
    sql_engine: tuple[sa.Engine, str],
) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table)
    # Given a thread that already runs operations on a connection of its own
    store.set(("k",), "before")
    assert store.get(("k",)) == "before"
    own = _thread_connection(store)
    seen_outside: list[Any] = []
    # When it writes inside an atomic() block that fails
    with pytest.raises(RuntimeError), atomic(engine):
        store.set(("k",), "inside")
        store.set(("new",), 1)
        assert store.cas(("new",), 1, 2) is True
        assert store.get(("k",)) == "inside"
        assert dict(store.list()) == {("k",): "inside", ("new",): 2}
        # Another thread does not see the uncommitted writes
        t = threading.Thread(target=lambda: seen_outside.append(store.get(("k",))))
        t.start()
        t.join(30)
        raise RuntimeError("boom")
    # Then the writes were part of the block and rolled back with it
    assert seen_outside == ["before"]
    assert store.get(("k",)) == "before"
    assert store.get(("new",)) is None
    # And the thread's own connection was left as it was
    assert _thread_connection(store) is own
    store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sql_a_forked_child_opens_its_own_connection(
    sql_engine: tuple[sa.Engine, str],
) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table)
    store.set(("k",), 1)
    assert store.get(("k",)) == 1
    parent_slot = store._threads.slot
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() while other threads (of other tests)
        # run; the child here only runs this store's code.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any cleanup
        try:
            got = store.get(("k",))
            store.set(("child",), os.getpid())
            fresh = store._threads.slot is not parent_slot
            store.close()
            os.write(write_end, b"ok" if got == 1 and fresh else b"wrong")
        except BaseException as exc:
            os.write(write_end, repr(exc).encode()[:500])
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        report = os.read(read_end, 1000)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    # Then the child used a connection of its own
    assert report == b"ok"
    # And the parent's connection was neither used nor closed by the child: it
    # is still there (a closed PostgreSQL session would have been replaced)
    assert store.get(("child",)) == pid
    assert store._threads.slot is parent_slot
    assert not _is_closed(_thread_connection(store))
    store.close()


def _terminate_backend(admin: Any, application_name: str) -> int:
    """Kill the one session named ``application_name``; return its backend pid."""
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
    ).fetchall()
    assert len(rows) == 1, rows
    pid: int = rows[0][0]
    # With a timeout, pg_terminate_backend waits until the backend is gone.
    assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()[0]
    return pid


def test_sql_postgres_session_killed_by_the_server_is_replaced(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    # Given an engine with connect_args, which the store's own connections carry too
    name = unique_name("botkit-kv-test-")
    engine = create_engine(database_url, connect_args={"application_name": name})
    table = unique_name("kv_")
    store = SqlKvStore(engine, table_name=table)
    admin_url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    admin = psycopg.connect(admin_url, autocommit=True)
    try:
        store.set(("k",), 1)
        assert store.get(("k",)) == 1
        # Only the store's own connection remains once the pool is emptied
        engine.dispose()
        first = _thread_connection(store).info.backend_pid
        # When the server terminates that session
        assert _terminate_backend(admin, name) == first
        # Then the socket shows it at once (the server's FATAL message and EOF),
        # so the next call notices before sending anything, and reconnects
        slot = store._threads.slot
        assert slot is not None and slot.poll is not None
        assert slot.poll.poll(1000)
        assert store.get(("k",)) == 1
        second = _thread_connection(store).info.backend_pid
        assert second != first
        # When a session dies unnoticed (the poll before use is switched off),
        # get, set and list are run again on a new session
        ops: list[Callable[[], object]] = [
            lambda: store.get(("k",)),
            lambda: store.set(("k",), 1),
            lambda: list(store.list()),
        ]
        for op in ops:
            slot = store._threads.slot
            assert slot is not None
            slot.poll = None
            _terminate_backend(admin, name)
            op()
            assert store._threads.slot is not slot
        assert list(store.list()) == [(("k",), 1)]
        # But a swapping cas is not: it may or may not have happened
        monkeypatch.setattr(kv_sql, "RECLAIM_EVERY", 10**30)  # no reclaim statement first
        slot = store._threads.slot
        assert slot is not None
        slot.poll = None
        _terminate_backend(admin, name)
        with pytest.raises(StoreError, match="unknown") as info:
            store.cas(("k",), 1, 2)
        assert isinstance(info.value.__cause__, sa.exc.OperationalError)
        assert isinstance(info.value.__cause__.__cause__, psycopg.Error)
        assert store.get(("k",)) == 1  # here it did not: the session was gone
        # Unless the loss shows on the statement run before it (a reclaim):
        # then the swap was never sent, and it is run on a new session
        monkeypatch.setattr(kv_sql, "RECLAIM_EVERY", 1)
        slot = store._threads.slot
        assert slot is not None
        slot.poll = None
        _terminate_backend(admin, name)
        assert store.cas(("k",), 1, 2) is True
        assert store.get(("k",)) == 2
        assert _checked_out(engine) == 0
    finally:
        store.close()
        admin.execute(f'DROP TABLE IF EXISTS "{table}"')
        admin.close()
        engine.dispose()


def test_sql_errors_on_the_own_connection_are_chained_like_pooled_ones(
    sql_engine: tuple[sa.Engine, str],
) -> None:
    engine, table = sql_engine
    store = SqlKvStore(engine, table_name=table, create_table=True)
    store.set(("k",), 1)
    assert store.get(("k",)) == 1  # the thread's own connection from now on
    # When the table disappears under the store
    _drop_table(engine, table)
    with pytest.raises(StoreError, match=table) as info:
        store.get(("k",))
    # Then the error chains SQLAlchemy's wrapper, then the driver's exception
    assert isinstance(info.value.__cause__, sa.exc.DBAPIError)
    assert isinstance(info.value.__cause__.__cause__, engine.dialect.loaded_dbapi.Error)
    store.close()


# -- Redis specifics ----------------------------------------------------------


@pytest.mark.parametrize("decode_responses", [False, True])
def test_redis_shared_client_either_decoding_is_not_closed(
    redis_url: str, decode_responses: bool
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=decode_responses)
    prefix = unique_name("botkit-test:") + ":*?["
    store = RedisKvStore(client, key_prefix=prefix)
    try:
        store.set(("a", "é"), {"x": [1, 2.5]}, ttl=60)
        assert store.get(("a", "é")) == {"x": [1, 2.5]}
        assert list(store.list(("a",))) == [(("a", "é"), {"x": [1, 2.5]})]
        assert store.cas(("a", "é"), {"x": [1, 2.5]}, "y") is True
        # Stored as canonical JSON under the prefix, with a millisecond expiry
        name = prefix.encode() + "a\x00é\x00".encode()
        raw = client.get(name)
        assert raw in ('"y"', b'"y"')
        assert client.pttl(name) == -1
        store.close()
        store.close()
        assert client.ping() is True
    finally:
        client.delete(prefix.encode() + "a\x00é\x00".encode())
        client.close()


def test_redis_prefixes_with_glob_characters_do_not_leak(redis_url: str) -> None:
    base = unique_name("botkit-test:")
    star = RedisKvStore(redis_url, key_prefix=base + "*")
    plain = RedisKvStore(redis_url, key_prefix=base + "x")
    try:
        plain.set(("k",), 1)
        star.set(("k",), 2)
        assert list(star.list()) == [(("k",), 2)]
        assert list(plain.list()) == [(("k",), 1)]
    finally:
        star.delete(("k",))
        plain.delete(("k",))
        star.close()
        plain.close()


def test_redis_owned_client_is_closed_and_rediss_urls_are_accepted(redis_url: str) -> None:
    store = RedisKvStore(redis_url, key_prefix=unique_name("botkit-test:"))
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get(("k",))
    # A TLS URL makes a TLS client (no connection is made until first use)
    tls = RedisKvStore("rediss://127.0.0.1:6380/0")
    assert tls.client.connection_pool.connection_class.__name__ == "SSLConnection"
    tls.close()
    with pytest.raises(TypeError):
        RedisKvStore(42)  # type: ignore[arg-type]


def test_redis_errors_are_store_errors(redis_url: str) -> None:
    store = RedisKvStore(
        "redis://127.0.0.1:1/0?socket_connect_timeout=0.5", key_prefix="botkit-test:"
    )
    with pytest.raises(StoreError) as info:
        store.get(("k",))
    assert isinstance(info.value.__cause__, redis.RedisError)
    store.close()


def test_sql_driver_errors_are_store_errors() -> None:
    store = SqlKvStore("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    with pytest.raises(StoreError) as info:
        store.get(("k",))
    assert isinstance(info.value.__cause__, sa.exc.DBAPIError)
    store.close()


def test_json_canonical_form_is_shared() -> None:
    from botkit_tasks.kv._codec import encode_value

    assert encode_value({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'
    assert json.loads(encode_value(2**100)) == 2**100


_part = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8
)
_key = st.lists(_part, min_size=1, max_size=4).map(tuple)


@given(a=_key, b=_key)
@settings(max_examples=300, deadline=None)
def test_packed_keys_sort_and_nest_like_python_tuples(
    a: tuple[str, ...], b: tuple[str, ...]
) -> None:
    from botkit_tasks.kv._codec import pack_key, pack_prefix, unpack_key

    pa, pb = pack_key(a), pack_key(b)
    assert unpack_key(pa) == a
    # Byte order is tuple order, parts compared by code point
    assert (pa < pb) == (a < b)
    # An element-wise prefix is exactly a byte prefix
    assert pb.startswith(pack_prefix(a)) == (b[: len(a)] == a)


_json_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _json_text,
    lambda children: st.lists(children) | st.dictionaries(_json_text, children),
    max_leaves=20,
).filter(lambda v: v is not None)


@given(value=_json_values)
@settings(max_examples=300, deadline=None)
def test_canonical_json_is_sorted_compact_json(value: Any) -> None:
    from botkit_tasks.kv._codec import decode_value, encode_value

    text = encode_value(value)
    assert text == json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    assert same(decode_value(text), value)
