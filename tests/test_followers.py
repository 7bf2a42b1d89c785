"""Followers: one KV entry each, keyset pages, counter, drop by inbox."""

from __future__ import annotations

import pytest

from botkit_tasks.federation.followers import Followers
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
