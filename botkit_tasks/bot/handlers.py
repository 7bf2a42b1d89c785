"""The activities every bot answers, run inside the ``botkit_inbox`` job.

:class:`InboxHandlers` registers one federation handler per activity type and,
after the bookkeeping (followers, follow requests, sent follows), hands the
object to the user's ``@bot.on_*`` handlers through the ``run`` callback.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..federation.activities import (
    MalformedActivityError,
    embedded,
    first_id,
    has_type,
    mentions,
    recipients,
)
from .documents import AS_CONTEXT, NOTE_TYPES

if TYPE_CHECKING:
    from ..federation.inbox import InboxContext
    from ._protocols import BotCore

__all__ = ["InboxHandlers", "RunHandlers"]

logger = logging.getLogger("botkit_tasks.bot")

#: ``run(event, ictx, obj)``: call the user's handlers of ``event``
#: (``"follow"``, ``"unfollow"``, ``"message"`` or ``"mention"``).
RunHandlers = Callable[["InboxContext", dict[str, Any], str], None]


class InboxHandlers:
    """The built-in handling of ``Follow``, ``Undo``, ``Create``, ``Accept``/``Reject``,
    ``Delete`` and ``Update`` for one bot."""

    def __init__(self, bot: BotCore, run: RunHandlers) -> None:
        self.bot = bot
        self._run = run
        federation = bot.federation
        federation.on("Follow", self.follow)
        federation.on("Undo", self.undo)
        federation.on("Create", self.create)
        federation.on("Accept", self.accept)
        federation.on("Reject", self.reject)
        federation.on("Delete", self.delete)
        federation.on("Update", self.update)

    def follow(self, ictx: InboxContext, follow: dict[str, Any]) -> None:
        """Store the follower, deliver a signed ``Accept``, then run ``on_follow``."""
        bot = self.bot
        if first_id(follow.get("object")) != bot.actor_id:
            logger.info("Ignoring a Follow of %r", first_id(follow.get("object")))
            return
        follow_id = follow.get("id")
        if not isinstance(follow_id, str) or not follow_id:
            raise MalformedActivityError("a Follow without an id cannot be accepted")
        inbox = ictx.actor_inbox
        if inbox is None:
            raise MalformedActivityError(f"follower {ictx.actor_id!r} has no inbox")
        try:
            bot.federation.followers.add(ictx.actor)
        except ValueError as exc:
            raise MalformedActivityError(str(exc)) from exc
        bot.kv.set(("botkit", bot.username, "follow-requests", follow_id), ictx.actor_id)
        accept = {
            "@context": AS_CONTEXT,
            # Derived from the Follow's id, so a retried job re-sends the same Accept.
            "id": f"{bot.actor_id}#accepts/{hashlib.sha256(follow_id.encode()).hexdigest()[:32]}",
            "type": "Accept",
            "actor": bot.actor_id,
            "to": [ictx.actor_id],
            "object": {
                "id": follow_id,
                "type": "Follow",
                "actor": ictx.actor_id,
                "object": bot.actor_id,
            },
        }
        bot.federation.send(accept, [inbox])
        self._run(ictx, follow, "follow")

    def undo(self, ictx: InboxContext, undo: dict[str, Any]) -> None:
        """Forget a follower whose ``Follow`` is undone, then run ``on_unfollow``."""
        bot = self.bot
        obj = undo.get("object")
        inner = embedded(obj)
        if inner is not None:
            if not has_type(inner, "Follow"):
                return  # Undo of a Like, Announce, ...: nothing a bot keeps
            if first_id(inner.get("actor")) not in (None, ictx.actor_id):
                logger.warning("Ignoring %s undoing someone else's Follow", ictx.actor_id)
                return
            if first_id(inner.get("object")) not in (None, bot.actor_id):
                return
            follow_id = first_id(inner.get("id"))
        else:
            follow_id = first_id(obj)
            if follow_id is None:
                raise MalformedActivityError("Undo without an object")
            requester = bot.kv.get(("botkit", bot.username, "follow-requests", follow_id))
            if requester != ictx.actor_id:
                return  # not a Follow of ours by this actor (or long forgotten)
        bot.federation.followers.remove(ictx.actor_id)
        if follow_id is not None:
            bot.kv.delete(("botkit", bot.username, "follow-requests", follow_id))
        self._run(ictx, undo, "unfollow")

    def create(self, ictx: InboxContext, create: dict[str, Any]) -> None:
        """Run ``on_message`` for a note from its author, and ``on_mention`` if it names the bot."""
        note = embedded(create.get("object"))
        if note is None or not any(has_type(note, t) for t in NOTE_TYPES):
            return
        author = first_id(note.get("attributedTo"))
        if author is not None and author != ictx.actor_id:
            # Only the author may deliver its note as a Create (no forwarding).
            logger.warning("Ignoring a note by %r sent by %r", author, ictx.actor_id)
            return
        self._run(ictx, note, "message")
        actor_id = self.bot.actor_id
        if actor_id in mentions(note) or actor_id in recipients(note):
            self._run(ictx, note, "mention")

    def delete(self, ictx: InboxContext, delete: dict[str, Any]) -> None:
        """An account deleting itself: forget it as a follower."""
        # Usually its key is gone too and the inbox cannot verify the Delete;
        # then the first delivery answered 410 removes it instead.
        if first_id(delete.get("object")) == ictx.actor_id:
            self.bot.federation.followers.remove(ictx.actor_id)

    def update(self, ictx: InboxContext, update: dict[str, Any]) -> None:
        """A follower updating its own actor: refresh its inbox URLs."""
        followers = self.bot.federation.followers
        document = embedded(update.get("object"))
        if (
            document is not None
            and first_id(document.get("id")) == ictx.actor_id
            and followers.get(ictx.actor_id) is not None
        ):
            with contextlib.suppress(ValueError):  # a document without a usable inbox
                followers.add(document)

    def accept(self, ictx: InboxContext, accept: dict[str, Any]) -> None:
        """An ``Accept`` of a ``Follow`` the bot sent: the follow is now accepted."""
        self._answer_follow(ictx, accept, "accepted")

    def reject(self, ictx: InboxContext, reject: dict[str, Any]) -> None:
        """A ``Reject`` of a ``Follow`` the bot sent: the follow is forgotten."""
        self._answer_follow(ictx, reject, "rejected")

    def _answer_follow(self, ictx: InboxContext, answer: dict[str, Any], state: str) -> None:
        bot = self.bot
        follow_id = first_id(answer.get("object"))
        if follow_id is None:
            return
        target = bot.kv.get(("botkit", bot.username, "sent-follows", follow_id))
        if target != ictx.actor_id:
            return  # not an answer to one of our Follows, or from the wrong actor
        key = ("botkit", bot.username, "following", ictx.actor_id)
        record = bot.kv.get(key)
        if isinstance(record, dict) and record.get("follow") == follow_id:
            if state == "accepted":
                bot.kv.set(key, {**record, "state": "accepted"})
            else:
                bot.kv.delete(key)
