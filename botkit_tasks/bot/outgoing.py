"""What a bot sends: notes, follows and unfollows, each stored and enqueued together.

Every function takes the bot (a :class:`~botkit_tasks.bot._protocols.BotCore`)
first; :class:`~botkit_tasks.bot.Bot` exposes them as methods.  Nothing here
talks HTTP: the activity is enqueued, and the federation's fan-out and
delivery jobs send it.
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..federation.activities import PUBLIC
from .documents import AS_CONTEXT, mention_name, now_iso, paragraphs, prepend, sortable_id

if TYPE_CHECKING:
    from ..kv.base import KvStore
    from ._protocols import BotCore

__all__ = ["atomic", "follow", "note_key", "publish", "recipient", "unfollow"]


def publish(
    bot: BotCore,
    text: str,
    *,
    to: Sequence[Mapping[str, Any] | str] | None = None,
    in_reply_to: str | None = None,
) -> str:
    """Store a note and enqueue its ``Create``; see :meth:`botkit_tasks.bot.Bot.publish`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, not {type(text).__name__}")
    if not text.strip():
        raise ValueError("text must not be empty or only whitespace")
    if isinstance(to, (str, bytes)):
        raise TypeError("to= must be a list of recipients, not a single string")
    if in_reply_to is not None and not isinstance(in_reply_to, str):
        raise TypeError(f"in_reply_to must be a string id, not {type(in_reply_to).__name__}")
    actor = bot.actor_id
    key = sortable_id()
    note_id = f"{actor}/notes/{key}"
    published = now_iso()
    content = paragraphs(text)
    tags: list[dict[str, Any]] = []
    direct: list[dict[str, Any]] = []
    if to is None:
        to_field: list[str] = [PUBLIC]
        cc_field: list[str] = [bot.followers_url]
    else:
        direct = [recipient(bot, r) for r in to]
        if not direct:
            raise ValueError("to= must name at least one recipient")
        to_field = [str(r["id"]) for r in direct]
        cc_field = []
        links = []
        for r in direct:
            name = mention_name(r)
            tags.append({"type": "Mention", "href": r["id"], "name": name})
            url = html.escape(str(r["id"]), quote=True)
            label = html.escape(name.split("@")[1] if name.count("@") == 2 else name)
            links.append(
                f'<span class="h-card"><a href="{url}" class="u-url mention">'
                f"@<span>{label}</span></a></span>"
            )
        content = prepend(" ".join(links), content)
    note: dict[str, Any] = {
        "id": note_id,
        "type": "Note",
        "attributedTo": actor,
        "content": content,
        "published": published,
        "to": to_field,
        "cc": cc_field,
        "url": note_id,
    }
    if tags:
        note["tag"] = tags
    if in_reply_to is not None:
        note["inReplyTo"] = in_reply_to
    activity: dict[str, Any] = {
        "@context": AS_CONTEXT,
        "id": f"{note_id}/activity",
        "type": "Create",
        "actor": actor,
        "published": published,
        "to": to_field,
        "cc": cc_field,
        "object": note,
    }
    with atomic(bot):
        bot.kv.set(note_key(bot.username, key), {"note": note, "activity": activity})
        if to is None:
            _bump(bot.kv, ("botkit", bot.username, "notes-count"))
            bot.federation.publish(activity)
        else:
            inboxes = [str(r["inbox"]) for r in direct if isinstance(r.get("inbox"), str)]
            bot.federation.send(activity, inboxes)
    return str(activity["id"])


def follow(bot: BotCore, target: Mapping[str, Any] | str) -> str:
    """Store and enqueue a ``Follow`` of ``target``; see :meth:`botkit_tasks.bot.Bot.follow`."""
    remote = recipient(bot, target)
    remote_id = str(remote["id"])
    follow_id = f"{bot.actor_id}/follows/{sortable_id()}"
    activity = {
        "@context": AS_CONTEXT,
        "id": follow_id,
        "type": "Follow",
        "actor": bot.actor_id,
        "object": remote_id,
    }
    record = {
        "id": remote_id,
        "inbox": remote["inbox"],
        "follow": follow_id,
        "state": "pending",
    }
    with atomic(bot):
        bot.kv.set(("botkit", bot.username, "sent-follows", follow_id), remote_id)
        bot.kv.set(("botkit", bot.username, "following", remote_id), record)
        bot.federation.send(activity, [str(remote["inbox"])])
    return follow_id


def unfollow(bot: BotCore, actor_id: str) -> str | None:
    """Enqueue an ``Undo`` of the bot's ``Follow`` of ``actor_id``; ``None`` if it has none."""
    key = ("botkit", bot.username, "following", actor_id)
    record = bot.kv.get(key)
    if not isinstance(record, dict):
        return None
    follow_id = str(record["follow"])
    undo = {
        "@context": AS_CONTEXT,
        "id": f"{follow_id}/undo",
        "type": "Undo",
        "actor": bot.actor_id,
        "object": {
            "id": follow_id,
            "type": "Follow",
            "actor": bot.actor_id,
            "object": actor_id,
        },
    }
    with atomic(bot):
        bot.kv.delete(key)
        bot.kv.delete(("botkit", bot.username, "sent-follows", follow_id))
        bot.federation.send(undo, [str(record["inbox"])])
    return str(undo["id"])


def note_key(username: str, key: str) -> tuple[str, ...]:
    """The key-value key of the note ``{actor_id}/notes/{key}``."""
    return ("botkit", username, "notes", key)


def recipient(bot: BotCore, target: Mapping[str, Any] | str) -> dict[str, Any]:
    """An actor document with an inbox for ``target``, fetched when only its id is known."""
    from ..federation.inbox import load_actor

    if isinstance(target, str):
        return load_actor(bot.federation, target)
    if not isinstance(target, Mapping) or not isinstance(target.get("id"), str):
        raise ValueError(f"recipient must be an actor id or an actor document: {target!r:.100}")
    inbox = target.get("inbox")
    if not isinstance(inbox, str) or not inbox:
        return load_actor(bot.federation, str(target["id"]))
    return dict(target)


@contextlib.contextmanager
def atomic(bot: BotCore) -> Iterator[None]:
    """One transaction around the block when the bot's store and broker share a SQL engine.

    The transactional outbox: the stored note and the enqueued job commit
    together.  Otherwise the block runs as it is.
    """
    from sqlalchemy.engine import Engine

    engine = getattr(bot.kv, "engine", None)
    shared = engine is not None and bot.federation.runner.engine is engine
    if shared and isinstance(engine, Engine):
        from .._sql import atomic as sql_atomic

        with sql_atomic(engine):
            yield
    else:
        yield


def _bump(kv: KvStore, key: tuple[str, ...]) -> None:
    for _ in range(100):
        current = kv.get(key)
        value = current if isinstance(current, int) else 0
        if kv.cas(key, current, value + 1):
            return
