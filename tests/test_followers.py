"""Followers: one KV entry each, keyset pages, counter, drop by inbox."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import sqlalchemy as sa
from conftest import unique_name

from botkit_tasks._sql import create_engine
from botkit_tasks.federation.followers import Followers
from botkit_tasks.kv import RedisKvStore, SqlKvStore
from botkit_tasks.kv.base import JsonValue, KvKey, KvStore
from botkit_tasks.kv.memory import MemoryKvStore


def actor(n: int, *, shared: str | None = None, host: str = "remote.example") -> dict[str, object]:
    doc: dict[str, object] = {
        "id": f"https://{host}/users/u{n:06d}",
        "type": "Person",
        "inbox": f"https://{host}/users/u{n:06d}/inbox",
    }
    if shared is not None:
        doc["endpoints"] = {"sharedInbox": shared}
    return doc


def test_add_reads_actor_documents_and_records() -> None:
    # Given an empty follower list
    followers = Followers(MemoryKvStore(), "bot")
    # When an actor document with a shared inbox and a bare record are added
    first = followers.add(actor(1, shared="https://remote.example/inbox"))
    second = followers.add({"id": "https://b.example/u", "inbox": "https://b.example/u/inbox"})
    # Then both are stored as records, the shared inbox kept, the counter at 2
    assert first["sharedInbox"] == "https://remote.example/inbox"
    assert "sharedInbox" not in second
    assert isinstance(first["followedAt"], str)
    assert followers.get("https://b.example/u") == second
    assert followers.count() == 2
    assert "https://remote.example/users/u000001" in followers


def test_readding_keeps_followed_at_and_does_not_double_count() -> None:
    followers = Followers(MemoryKvStore(), "bot")
    first = followers.add({**actor(1), "followedAt": "2020-01-01T00:00:00+00:00"})
    again = followers.add({**actor(1), "inbox": "https://remote.example/new-inbox"})
    assert again["followedAt"] == first["followedAt"]
    assert again["inbox"] == "https://remote.example/new-inbox"
    assert followers.count() == 1


def test_remove_and_invalid_input() -> None:
    followers = Followers(MemoryKvStore(), "bot")
    followers.add(actor(1))
    assert followers.remove(str(actor(1)["id"])) is True
    assert followers.remove(str(actor(1)["id"])) is False
    assert followers.count() == 0
    with pytest.raises(ValueError):
        followers.add({"id": "https://x.example/u"})
    with pytest.raises(ValueError):
        followers.add({"id": "not a url", "inbox": "https://x.example/inbox"})


def test_followers_of_different_users_are_separate() -> None:
    kv = MemoryKvStore()
    Followers(kv, "a").add(actor(1))
    assert Followers(kv, "b").count() == 0
    assert list(Followers(kv, "b").iter()) == []


def test_drop_inbox_removes_followers_behind_a_shared_or_personal_inbox() -> None:
    # Given three followers behind one shared inbox and one with only a personal inbox
    followers = Followers(MemoryKvStore(), "bot")
    for n in range(3):
        followers.add(actor(n, shared="https://gone.example/inbox", host="gone.example"))
    followers.add(actor(9, host="other.example"))
    # When the shared inbox is reported gone
    dropped = followers.drop_inbox("https://gone.example/inbox")
    # Then exactly those three are removed
    assert dropped == 3
    assert [f["id"] for f in followers.iter()] == ["https://other.example/users/u000009"]
    # And a personal inbox can be dropped the same way
    assert followers.drop_inbox("https://other.example/users/u000009/inbox") == 1
    assert followers.count() == 0


@pytest.mark.slow
def test_one_hundred_thousand_followers_page_by_page() -> None:
    # Given 100,000 followers, each its own KV entry
    kv = MemoryKvStore()
    followers = Followers(kv, "bot")
    total = 100_000
    for n in range(total):
        followers.add(actor(n))
    assert followers.count() == total
    # When they are read page by page with the keyset cursor
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        items, after = followers.page(after, 5_000)
        seen.extend(str(item["id"]) for item in items)
        pages += 1
        if after is None:
            break
    # Then every follower appears once, in order, and recount agrees
    assert pages == 20
    assert len(seen) == total
    assert seen == sorted(seen)
    assert len(set(seen)) == total
    assert followers.recount() == total


def test_page_cursor_is_stable_under_concurrent_adds() -> None:
    followers = Followers(MemoryKvStore(), "bot")
    for n in range(10):
        followers.add(actor(n))
    first, after = followers.page(None, 4)
    assert [f["id"] for f in first] == [actor(n)["id"] for n in range(4)]
    assert after == actor(3)["id"]
    # A follower sorting before the cursor appears in no later page; others still do.
    followers.add(actor(0, host="a.example"))
    rest: list[object] = []
    while after is not None:
        items, after = followers.page(after, 4)
        rest.extend(f["id"] for f in items)
    assert rest == [actor(n)["id"] for n in range(4, 10)]
    empty, cursor = Followers(MemoryKvStore(), "x").page(None, 10)
    assert (empty, cursor) == ([], None)


class _CountingKv(MemoryKvStore):
    """A memory store that counts the entries ``list()`` hands out."""

    def __init__(self) -> None:
        super().__init__()
        self.listed = 0

    def list(self, prefix=(), *, start_after=None):  # type: ignore[no-untyped-def]
        for item in super().list(prefix, start_after=start_after):
            self.listed += 1
            yield item


def test_a_deep_page_reads_only_that_page() -> None:
    # Given 2,000 followers
    kv = _CountingKv()
    followers = Followers(kv, "bot")
    for i in range(2000):
        followers.add(actor(i))
    # When reading page after page
    cursor = None
    for _ in range(30):
        _, cursor = followers.page(cursor, limit=40)
    kv.listed = 0
    page, _ = followers.page(cursor, limit=40)
    # Then the 31st page reads its 40 entries (and one to know there is more),
    # not the 1,200 before it
    assert len(page) == 40
    assert kv.listed <= 41


# ------------------------------------------------ drop_inbox through the inbox index


class _ReadCountingKv:
    """Wraps any store and counts the entries read from it (get, cas, each listed entry)."""

    def __init__(self, inner: KvStore) -> None:
        self.inner = inner
        self.reads = 0
        self.writes = 0

    def get(self, key: KvKey) -> JsonValue | None:
        self.reads += 1
        return self.inner.get(key)

    def set(self, key: KvKey, value: JsonValue, *, ttl: float | None = None) -> None:
        self.writes += 1
        self.inner.set(key, value, ttl=ttl)

    def delete(self, key: KvKey) -> None:
        self.writes += 1
        self.inner.delete(key)

    def cas(
        self, key: KvKey, expected: JsonValue | None, new: JsonValue | None, *, ttl: Any = None
    ) -> bool:
        self.reads += 1
        self.writes += 1
        return self.inner.cas(key, expected, new, ttl=ttl)

    def list(
        self, prefix: KvKey = (), *, start_after: KvKey | None = None
    ) -> Iterator[tuple[KvKey, JsonValue]]:
        for item in self.inner.list(prefix, start_after=start_after):
            self.reads += 1
            yield item

    def close(self) -> None:
        self.inner.close()


def test_drop_inbox_reads_only_the_followers_behind_it() -> None:
    # Given 100,000 followers, 50 of them behind one shared inbox
    kv = _ReadCountingKv(MemoryKvStore())
    followers = Followers(cast(KvStore, kv), "bot")
    total, behind = 100_000, 50
    gone = "https://gone.example/inbox"
    for n in range(total - behind):
        followers.add(actor(n, shared="https://remote.example/inbox"))
    for n in range(behind):
        followers.add(actor(n, shared=gone, host="gone.example"))
    # When that inbox answers 410 and its followers are dropped
    kv.reads = kv.writes = 0
    started = time.perf_counter()
    dropped = followers.drop_inbox(gone)
    elapsed = time.perf_counter() - started
    # Then exactly they are removed, reading O(50) entries, not 100,000
    assert dropped == behind
    print(f"drop_inbox: {kv.reads} reads, {kv.writes} writes, {elapsed * 1000:.1f} ms")
    assert kv.reads <= 6 * behind + 10, kv.reads
    assert kv.writes <= 6 * behind + 10, kv.writes
    assert elapsed < 1.0
    assert followers.count() == total - behind
    assert followers.get(str(actor(0, host="gone.example")["id"])) is None
    assert followers.get(str(actor(0)["id"])) is not None
    # And the inbox is forgotten: a second 410 reads next to nothing
    kv.reads = 0
    assert followers.drop_inbox(gone) == 0
    assert kv.reads <= 2


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
def any_kv(request: pytest.FixtureRequest) -> Iterator[KvStore]:
    if request.param == "memory":
        yield MemoryKvStore()
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
        redis_store = RedisKvStore(url, key_prefix=unique_name("botkit-test:") + ":")
        yield redis_store
        for key, _ in list(redis_store.list()):
            redis_store.delete(key)
        redis_store.close()
    else:
        url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "database_url")
        engine = create_engine(url)
        table = unique_name("kv_")
        sql_store = SqlKvStore(engine, table_name=table)
        yield sql_store
        sql_store.close()
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        engine.dispose()


def test_a_moved_inbox_is_reindexed(any_kv: KvStore) -> None:
    # Given a follower whose shared inbox moved from old to new
    followers = Followers(any_kv, "bot")
    followers.add(actor(1, shared="https://remote.example/old-inbox"))
    followers.add(actor(2, shared="https://remote.example/old-inbox"))
    followers.add(actor(1, shared="https://remote.example/new-inbox"))
    # When the old inbox is gone, only the follower still behind it goes
    assert followers.drop_inbox("https://remote.example/old-inbox") == 1
    assert [f["id"] for f in followers.iter()] == [actor(1)["id"]]
    # and the new inbox and the personal inbox find the one that moved
    assert followers.drop_inbox("https://remote.example/new-inbox") == 1
    assert followers.count() == 0
    followers.add(actor(3))
    assert followers.drop_inbox(str(actor(3)["inbox"])) == 1
    # Nothing is left behind: no record, no index entry
    assert [key for key, _ in any_kv.list(("botkit", "bot", "follower-inboxes"))] == []


def test_index_entries_left_by_a_crash_are_skipped_and_cleaned(any_kv: KvStore) -> None:
    # Given a follower whose record vanished without its index entry
    # (a process that died between the two writes of remove())
    followers = Followers(any_kv, "bot")
    followers.add(actor(1, shared="https://remote.example/inbox"))
    followers.add(actor(2, shared="https://remote.example/inbox"))
    any_kv.delete(("botkit", "bot", "followers", str(actor(1)["id"])))
    # When the inbox is dropped, the stale entry counts for nothing and is removed
    assert followers.drop_inbox("https://remote.example/inbox") == 1
    index = ("botkit", "bot", "follower-inboxes")
    assert list(any_kv.list((*index, "https://remote.example/inbox"))) == []
    # as is the one under its personal inbox, when that is dropped
    assert followers.drop_inbox(str(actor(1)["inbox"])) == 0
    assert list(any_kv.list(index)) == []


def test_followers_stored_before_the_index_are_found() -> None:
    # Given follower records written without an index (by an older version)
    kv = _ReadCountingKv(MemoryKvStore())
    for n in range(200):
        record = {"id": actor(n)["id"], "inbox": actor(n)["inbox"], "followedAt": "2024-01-01"}
        kv.set(("botkit", "bot", "followers", str(actor(n)["id"])), record)
    kv.set(("botkit", "bot", "followers-count"), 200)
    followers = Followers(cast(KvStore, kv), "bot")
    # When an inbox is dropped, the index is built once, then used
    assert followers.drop_inbox(str(actor(7)["inbox"])) == 1
    kv.reads = 0
    assert followers.drop_inbox(str(actor(8)["inbox"])) == 1
    assert kv.reads <= 12
    assert followers.count() == 198
