"""The bot: an ActivityPub actor whose work runs as Dramatiq jobs.

A :class:`Bot` is one local actor (``{base_url}/users/{username}``) on a
key-value store and a Dramatiq broker.  It builds a
:class:`~botkit_tasks.federation.Federation`, which declares the fan-out,
delivery and inbox actors on the broker, and registers the handlers every bot
needs:

* ``Follow`` of the bot: the follower is stored (one key-value entry per
  follower), a signed ``Accept`` embedding the ``Follow`` is delivered, then the
  ``@bot.on_follow`` handlers run;
* ``Undo`` of such a ``Follow`` (embedded, or by id only): the follower is
  removed, then the ``@bot.on_unfollow`` handlers run;
* ``Create`` of a ``Note``: ``@bot.on_message`` handlers run for every note
  delivered to the bot, ``@bot.on_mention`` handlers for notes that tag or
  address it;
* ``Accept``/``Reject`` of a ``Follow`` the bot sent with :meth:`Bot.follow`;
* ``Delete`` of a follower's own account (removes it) and ``Update`` of it
  (refreshes its inbox URLs).

Handlers run inside the ``botkit_inbox`` job, on a worker; an exception retries
the job, so a handler should be idempotent.

Key-value layout (beside the federation's keys)::

    ("botkit", username, "notes", note_key)        -> {"note": Note, "activity": Create}
    ("botkit", username, "notes-count")            -> number of public notes
    ("botkit", username, "follow-requests", id)    -> follower actor id (for Undo by id)
    ("botkit", username, "following", actor_id)    -> {"id", "inbox", "follow", "state"}
    ("botkit", username, "sent-follows", id)       -> followed actor id
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import html
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload
from urllib.parse import urlsplit

import dramatiq

from .federation import Federation, InboxContext
from .federation.activities import (
    PUBLIC,
    MalformedActivityError,
    embedded,
    first_id,
    has_type,
    mentions,
    recipients,
)

if TYPE_CHECKING:
    from .federation.delivery import DeliveryOptions
    from .kv.base import KvStore
    from .web import BotApp

__all__ = [
    "AS_CONTEXT",
    "SECURITY_CONTEXT",
    "Bot",
    "BotContext",
    "BotHandler",
]

logger = logging.getLogger(__name__)

#: The ActivityStreams JSON-LD context.
AS_CONTEXT = "https://www.w3.org/ns/activitystreams"
#: The security vocabulary context (``publicKey``).
SECURITY_CONTEXT = "https://w3id.org/security/v1"

#: Activity types whose object counts as a message for ``on_message``/``on_mention``.
_NOTE_TYPES = ("Note", "Article", "Question")

#: Numeric Dramatiq actor options (counts and milliseconds) that ``Bot.job`` checks.
_COUNT_OPTIONS = ("max_retries", "min_backoff", "max_backoff", "time_limit", "max_age")

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class BotContext:
    """What a bot handler gets besides the object it handles.

    Attributes:
        bot: The receiving :class:`Bot`.
        activity: The verified incoming activity, as received.
        actor: The sender's actor document (fetched and cached by the inbox job).
        actor_id: The sender's id; the HTTP signature was made with its key.
    """

    bot: Bot
    activity: dict[str, Any]
    actor: dict[str, Any]
    actor_id: str

    def reply(self, text: str) -> str:
        """Send ``text`` to the sender only, mentioning it; return the activity id.

        When the incoming activity is a ``Create`` of a note, the reply is
        ``inReplyTo`` that note.
        """
        note = embedded(self.activity.get("object")) if has_type(self.activity, "Create") else None
        in_reply_to = first_id(note.get("id")) if note is not None else None
        return self.bot.publish(text, to=[self.actor], in_reply_to=in_reply_to)


#: A handler registered with ``@bot.on_follow`` and friends: ``handler(ctx, obj)``.
BotHandler = Callable[[BotContext, dict[str, Any]], None]


class Bot:
    """An ActivityPub bot on a key-value store and a Dramatiq broker.

    Creating a bot declares its actors on ``broker`` and makes ``broker`` the
    global Dramatiq broker, so ``dramatiq mybot`` runs standard workers for a
    module that creates one.  Publishing only enqueues: a plain process that
    calls :meth:`publish` needs neither the web app nor a worker.

    Args:
        username: The local actor's name; its id is ``{base_url}/users/{username}``.
        base_url: The site's public absolute URL (``https://bot.example``).
        name: Display name.
        summary: A short plain-text description (escaped into HTML).
        kv: Any :class:`~botkit_tasks.kv.KvStore`.
        broker: The Dramatiq broker the bot's jobs run on.
        allow_private_addresses: Allow ``http://`` and loopback/private
            addresses (tests and loopback demos only).
        delivery_options: Retry and timeout policy of deliveries.
        user_agent: ``User-Agent`` of outgoing requests.
        set_global_broker: Make ``broker`` Dramatiq's global broker (default).
    """

    def __init__(
        self,
        username: str,
        *,
        base_url: str,
        name: str | None = None,
        summary: str | None = None,
        kv: KvStore,
        broker: dramatiq.Broker,
        allow_private_addresses: bool = False,
        delivery_options: DeliveryOptions | None = None,
        user_agent: str | None = None,
        set_global_broker: bool = True,
    ) -> None:
        from ._version import __version__

        for option, value in (("name", name), ("summary", summary), ("user_agent", user_agent)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{option} must be a string, not {value!r:.100}")
        if user_agent is not None and not user_agent.isprintable():
            raise ValueError(f"user_agent {user_agent!r:.100} must be one printable line")
        self.federation = Federation(
            kv=kv,
            broker=broker,
            base_url=base_url,
            username=username,
            allow_private_addresses=allow_private_addresses,
            delivery_options=delivery_options,
            # Like Mastodon's: software/version and the site to contact.
            user_agent=user_agent or f"botkit-tasks/{__version__} (+{base_url})",
        )
        self.username = self.federation.username
        self.name = name if name is not None else username
        self.summary = summary or ""
        self.kv = kv
        self.broker = broker
        self._follow: list[BotHandler] = []
        self._unfollow: list[BotHandler] = []
        self._mention: list[BotHandler] = []
        self._message: list[BotHandler] = []
        self.federation.on("Follow", self._handle_follow)
        self.federation.on("Undo", self._handle_undo)
        self.federation.on("Create", self._handle_create)
        self.federation.on("Accept", self._handle_accept)
        self.federation.on("Reject", self._handle_reject)
        self.federation.on("Delete", self._handle_delete)
        self.federation.on("Update", self._handle_update)
        if set_global_broker:
            dramatiq.set_broker(broker)

    def __repr__(self) -> str:
        return f"<Bot {self.actor_id}>"

    # ------------------------------------------------------------------ identity

    @property
    def base_url(self) -> str:
        """The site's URL without a trailing slash."""
        return self.federation.base_url

    @property
    def actor_id(self) -> str:
        """``{base_url}/users/{username}``."""
        return self.federation.actor_id

    @property
    def followers_url(self) -> str:
        """The followers collection, ``{actor_id}/followers``."""
        return f"{self.actor_id}/followers"

    @property
    def handle(self) -> str:
        """The fediverse handle, ``@username@host`` (host with its port, if any)."""
        return f"@{self.username}@{urlsplit(self.base_url).netloc}"

    def actor_document(self) -> dict[str, Any]:
        """The bot's actor document (a ``Service``), with its public key.

        Reads (and on first use creates) the key pair in the key-value store.
        """
        from .federation.keys import public_key_pem

        actor = self.actor_id
        return {
            "@context": [AS_CONTEXT, SECURITY_CONTEXT],
            "id": actor,
            "type": "Service",
            "preferredUsername": self.username,
            "name": self.name,
            "summary": _paragraphs(self.summary),
            "url": actor,
            "inbox": self.federation.inbox_url,
            "outbox": f"{actor}/outbox",
            "followers": self.followers_url,
            "following": f"{actor}/following",
            "endpoints": {"sharedInbox": self.federation.shared_inbox_url},
            "manuallyApprovesFollowers": False,
            "discoverable": True,
            "publicKey": {
                "id": self.federation.key_id,
                "owner": actor,
                "publicKeyPem": public_key_pem(self.federation.private_key),
            },
        }

    # ------------------------------------------------------------------ decorators

    def on_follow(self, handler: BotHandler) -> BotHandler:
        """Register ``handler(ctx, follow)``, called after a new follower is stored and accepted."""
        self._follow.append(_callable(handler))
        return handler

    def on_unfollow(self, handler: BotHandler) -> BotHandler:
        """Register ``handler(ctx, undo)``, called after a follower has been removed."""
        self._unfollow.append(_callable(handler))
        return handler

    def on_mention(self, handler: BotHandler) -> BotHandler:
        """Register ``handler(ctx, note)`` for notes that tag or directly address the bot."""
        self._mention.append(_callable(handler))
        return handler

    def on_message(self, handler: BotHandler) -> BotHandler:
        """Register ``handler(ctx, note)`` for every note delivered to the bot.

        That includes posts of the accounts the bot follows, and mentions
        (which also run the ``on_mention`` handlers).
        """
        self._message.append(_callable(handler))
        return handler

    @overload
    def job(self, fn: Callable[P, R]) -> dramatiq.Actor[P, R]: ...

    @overload
    def job(
        self, fn: None = None, **actor_options: Any
    ) -> Callable[[Callable[P, R]], dramatiq.Actor[P, R]]: ...

    def job(
        self, fn: Callable[P, R] | None = None, **actor_options: Any
    ) -> dramatiq.Actor[P, R] | Callable[[Callable[P, R]], dramatiq.Actor[P, R]]:
        """Turn a function into a Dramatiq actor on :attr:`broker`.

        Usable bare (``@bot.job``) or with Dramatiq actor options
        (``@bot.job(max_retries=3, queue_name="digests")``).  The queue is
        ``"default"`` unless ``queue_name`` is given.  Call ``.send(...)`` or
        ``.send_with_options(args=..., delay=ms)`` on the result to enqueue.
        """
        actor_options.setdefault("queue_name", "default")
        for option in _COUNT_OPTIONS:
            value = actor_options.get(option)
            if value is None:
                continue
            # Dramatiq takes any value here and fails later, in the worker's middleware.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{option} must be a number, not {value!r:.100}")
            if value < 0:
                raise ValueError(f"{option} must not be negative: {value!r}")

        def decorate(f: Callable[P, R]) -> dramatiq.Actor[P, R]:
            return dramatiq.actor(broker=self.broker, **actor_options)(_callable(f))

        if fn is not None:
            return decorate(fn)
        return decorate

    # ------------------------------------------------------------------ outgoing

    def publish(
        self,
        text: str,
        *,
        to: Sequence[Mapping[str, Any] | str] | None = None,
        in_reply_to: str | None = None,
    ) -> str:
        """Post a note; return the id of its ``Create`` activity.

        Without ``to`` the note is public (``to`` the public collection, ``cc``
        the followers) and one fan-out job delivers it to every follower's
        inbox.  With ``to`` (actor documents, or actor ids that are then
        fetched) it is a direct message that mentions them and goes to their
        inboxes only.  The note is stored first, so its id dereferences; on a
        SQL store and SQL broker sharing one engine, the note and the
        enqueued job commit in one transaction.

        Args:
            text: Plain text; it is HTML-escaped, blank lines make paragraphs.
            to: Recipients of a direct message.
            in_reply_to: Id of the note this one answers.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, not {type(text).__name__}")
        if not text.strip():
            raise ValueError("text must not be empty or only whitespace")
        if isinstance(to, (str, bytes)):
            raise TypeError("to= must be a list of recipients, not a single string")
        if in_reply_to is not None and not isinstance(in_reply_to, str):
            raise TypeError(f"in_reply_to must be a string id, not {type(in_reply_to).__name__}")
        actor = self.actor_id
        key = _sortable_id()
        note_id = f"{actor}/notes/{key}"
        published = _now()
        content = _paragraphs(text)
        tags: list[dict[str, Any]] = []
        direct: list[dict[str, Any]] = []
        if to is None:
            to_field: list[str] = [PUBLIC]
            cc_field: list[str] = [self.followers_url]
        else:
            direct = [self._recipient(r) for r in to]
            if not direct:
                raise ValueError("to= must name at least one recipient")
            to_field = [str(r["id"]) for r in direct]
            cc_field = []
            links = []
            for r in direct:
                name = _mention_name(r)
                tags.append({"type": "Mention", "href": r["id"], "name": name})
                url = html.escape(str(r["id"]), quote=True)
                label = html.escape(name.split("@")[1] if name.count("@") == 2 else name)
                links.append(
                    f'<span class="h-card"><a href="{url}" class="u-url mention">'
                    f"@<span>{label}</span></a></span>"
                )
            content = _prepend(" ".join(links), content)
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
        with self._atomic():
            self.kv.set(self._note_key(key), {"note": note, "activity": activity})
            if to is None:
                self._bump(("botkit", self.username, "notes-count"))
                self.federation.publish(activity)
            else:
                inboxes = [str(r["inbox"]) for r in direct if isinstance(r.get("inbox"), str)]
                self.federation.send(activity, inboxes)
        return str(activity["id"])

    def follow(self, target: Mapping[str, Any] | str) -> str:
        """Send a ``Follow`` to ``target`` (an actor document or id); return its id.

        An id is fetched (signed GET) to find the inbox.  :meth:`is_following`
        turns true when the ``Accept`` arrives.
        """
        remote = self._recipient(target)
        remote_id = str(remote["id"])
        follow_id = f"{self.actor_id}/follows/{_sortable_id()}"
        follow = {
            "@context": AS_CONTEXT,
            "id": follow_id,
            "type": "Follow",
            "actor": self.actor_id,
            "object": remote_id,
        }
        record = {
            "id": remote_id,
            "inbox": remote["inbox"],
            "follow": follow_id,
            "state": "pending",
        }
        with self._atomic():
            self.kv.set(("botkit", self.username, "sent-follows", follow_id), remote_id)
            self.kv.set(("botkit", self.username, "following", remote_id), record)
            self.federation.send(follow, [str(remote["inbox"])])
        return follow_id

    def unfollow(self, actor_id: str) -> str | None:
        """Send an ``Undo`` of the ``Follow`` sent to ``actor_id``; return the Undo's id.

        Returns ``None`` (and sends nothing) when the bot does not follow ``actor_id``.
        """
        key = ("botkit", self.username, "following", actor_id)
        record = self.kv.get(key)
        if not isinstance(record, dict):
            return None
        follow_id = str(record["follow"])
        undo = {
            "@context": AS_CONTEXT,
            "id": f"{follow_id}/undo",
            "type": "Undo",
            "actor": self.actor_id,
            "object": {
                "id": follow_id,
                "type": "Follow",
                "actor": self.actor_id,
                "object": actor_id,
            },
        }
        with self._atomic():
            self.kv.delete(key)
            self.kv.delete(("botkit", self.username, "sent-follows", follow_id))
            self.federation.send(undo, [str(record["inbox"])])
        return str(undo["id"])

    def is_following(self, actor_id: str) -> bool:
        """Whether a ``Follow`` the bot sent to ``actor_id`` has been accepted."""
        record = self.kv.get(("botkit", self.username, "following", actor_id))
        return isinstance(record, dict) and record.get("state") == "accepted"

    def get_note(self, key: str) -> dict[str, Any] | None:
        """The stored ``{"note", "activity"}`` record of ``{actor_id}/notes/{key}``, if any."""
        value = self.kv.get(self._note_key(key))
        return value if isinstance(value, dict) else None

    def note_count(self) -> int:
        """How many public notes the bot has published."""
        value = self.kv.get(("botkit", self.username, "notes-count"))
        return value if isinstance(value, int) else 0

    def close(self) -> None:
        """Close the HTTP clients the bot created; idempotent.

        The key-value store and the broker were handed in, so they stay open.
        """
        close = getattr(self.federation, "close", None)
        if close is not None:
            close()

    def asgi_app(self) -> BotApp:
        """The bot's ASGI application: WebFinger, actor, inboxes, collections and notes.

        See :mod:`botkit_tasks.web`.  Serve it with any ASGI server, e.g.
        ``uvicorn mybot:app`` after ``app = bot.asgi_app()``.
        """
        from .web import BotApp

        return BotApp(self)

    # ------------------------------------------------------------------ inbox handlers

    def _context(self, ictx: InboxContext) -> BotContext:
        return BotContext(
            bot=self, activity=ictx.activity, actor=ictx.actor, actor_id=ictx.actor_id
        )

    def _handle_follow(self, ictx: InboxContext, follow: dict[str, Any]) -> None:
        if first_id(follow.get("object")) != self.actor_id:
            logger.info("Ignoring a Follow of %r", first_id(follow.get("object")))
            return
        follow_id = follow.get("id")
        if not isinstance(follow_id, str) or not follow_id:
            raise MalformedActivityError("a Follow without an id cannot be accepted")
        inbox = ictx.actor_inbox
        if inbox is None:
            raise MalformedActivityError(f"follower {ictx.actor_id!r} has no inbox")
        try:
            self.federation.followers.add(ictx.actor)
        except ValueError as exc:
            raise MalformedActivityError(str(exc)) from exc
        self.kv.set(("botkit", self.username, "follow-requests", follow_id), ictx.actor_id)
        accept = {
            "@context": AS_CONTEXT,
            # Derived from the Follow's id, so a retried job re-sends the same Accept.
            "id": f"{self.actor_id}#accepts/{hashlib.sha256(follow_id.encode()).hexdigest()[:32]}",
            "type": "Accept",
            "actor": self.actor_id,
            "to": [ictx.actor_id],
            "object": {
                "id": follow_id,
                "type": "Follow",
                "actor": ictx.actor_id,
                "object": self.actor_id,
            },
        }
        self.federation.send(accept, [inbox])
        self._run(self._follow, ictx, follow)

    def _handle_undo(self, ictx: InboxContext, undo: dict[str, Any]) -> None:
        obj = undo.get("object")
        inner = embedded(obj)
        if inner is not None:
            if not has_type(inner, "Follow"):
                return  # Undo of a Like, Announce, ...: nothing a bot keeps
            if first_id(inner.get("actor")) not in (None, ictx.actor_id):
                logger.warning("Ignoring %s undoing someone else's Follow", ictx.actor_id)
                return
            if first_id(inner.get("object")) not in (None, self.actor_id):
                return
            follow_id = first_id(inner.get("id"))
        else:
            follow_id = first_id(obj)
            if follow_id is None:
                raise MalformedActivityError("Undo without an object")
            requester = self.kv.get(("botkit", self.username, "follow-requests", follow_id))
            if requester != ictx.actor_id:
                return  # not a Follow of ours by this actor (or long forgotten)
        self.federation.followers.remove(ictx.actor_id)
        if follow_id is not None:
            self.kv.delete(("botkit", self.username, "follow-requests", follow_id))
        self._run(self._unfollow, ictx, undo)

    def _handle_create(self, ictx: InboxContext, create: dict[str, Any]) -> None:
        note = embedded(create.get("object"))
        if note is None or not any(has_type(note, t) for t in _NOTE_TYPES):
            return
        author = first_id(note.get("attributedTo"))
        if author is not None and author != ictx.actor_id:
            # Only the author may deliver its note as a Create (no forwarding).
            logger.warning("Ignoring a note by %r sent by %r", author, ictx.actor_id)
            return
        self._run(self._message, ictx, note)
        if self.actor_id in mentions(note) or self.actor_id in recipients(note):
            self._run(self._mention, ictx, note)

    def _handle_delete(self, ictx: InboxContext, delete: dict[str, Any]) -> None:
        # An account deleting itself: forget it as a follower.  (Usually its key
        # is gone too and the inbox cannot verify the Delete; then the first
        # delivery answered 410 removes it instead.)
        if first_id(delete.get("object")) == ictx.actor_id:
            self.federation.followers.remove(ictx.actor_id)

    def _handle_update(self, ictx: InboxContext, update: dict[str, Any]) -> None:
        # An account updating itself may have moved its inboxes.
        document = embedded(update.get("object"))
        if (
            document is not None
            and first_id(document.get("id")) == ictx.actor_id
            and self.federation.followers.get(ictx.actor_id) is not None
        ):
            with contextlib.suppress(ValueError):  # a document without a usable inbox
                self.federation.followers.add(document)

    def _handle_accept(self, ictx: InboxContext, accept: dict[str, Any]) -> None:
        self._answer_follow(ictx, accept, "accepted")

    def _handle_reject(self, ictx: InboxContext, reject: dict[str, Any]) -> None:
        self._answer_follow(ictx, reject, "rejected")

    def _answer_follow(self, ictx: InboxContext, answer: dict[str, Any], state: str) -> None:
        follow_id = first_id(answer.get("object"))
        if follow_id is None:
            return
        target = self.kv.get(("botkit", self.username, "sent-follows", follow_id))
        if target != ictx.actor_id:
            return  # not an answer to one of our Follows, or from the wrong actor
        key = ("botkit", self.username, "following", ictx.actor_id)
        record = self.kv.get(key)
        if isinstance(record, dict) and record.get("follow") == follow_id:
            if state == "accepted":
                self.kv.set(key, {**record, "state": "accepted"})
            else:
                self.kv.delete(key)

    def _run(self, handlers: list[BotHandler], ictx: InboxContext, obj: dict[str, Any]) -> None:
        if not handlers:
            return
        ctx = self._context(ictx)
        for handler in handlers:
            handler(ctx, obj)

    # ------------------------------------------------------------------ helpers

    def _note_key(self, key: str) -> tuple[str, ...]:
        return ("botkit", self.username, "notes", key)

    def _recipient(self, target: Mapping[str, Any] | str) -> dict[str, Any]:
        from .federation.inbox import load_actor

        if isinstance(target, str):
            return load_actor(self.federation, target)
        if not isinstance(target, Mapping) or not isinstance(target.get("id"), str):
            raise ValueError(f"recipient must be an actor id or an actor document: {target!r:.100}")
        inbox = target.get("inbox")
        if not isinstance(inbox, str) or not inbox:
            return load_actor(self.federation, str(target["id"]))
        return dict(target)

    def _bump(self, key: tuple[str, ...]) -> None:
        for _ in range(100):
            current = self.kv.get(key)
            value = current if isinstance(current, int) else 0
            if self.kv.cas(key, current, value + 1):
                return

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        # The transactional outbox: when the store and the broker share one SQL
        # engine, the stored note and the enqueued job commit together.
        from sqlalchemy.engine import Engine

        engine = getattr(self.kv, "engine", None)
        shared = getattr(self.broker, "engine", None) is engine
        if shared and isinstance(engine, Engine):
            from ._sql import atomic

            with atomic(engine):
                yield
        else:
            yield


def _callable(fn: Callable[P, R]) -> Callable[P, R]:
    if not callable(fn):
        raise TypeError(f"a handler or job must be callable, not {fn!r:.100}")
    return fn


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _sortable_id() -> str:
    """A URL-safe id that sorts by creation time (milliseconds, then 64 random bits)."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def _paragraphs(text: str) -> str:
    """Plain text as HTML: escaped, blank lines separate paragraphs, newlines become <br>."""
    if not text:
        return ""
    parts = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    return "".join(f"<p>{html.escape(p.strip()).replace(chr(10), '<br>')}</p>" for p in parts)


def _prepend(prefix: str, content: str) -> str:
    if content.startswith("<p>"):
        return f"<p>{prefix} {content[3:]}"
    return f"<p>{prefix}</p>{content}"


def _mention_name(actor: Mapping[str, Any]) -> str:
    username = actor.get("preferredUsername")
    host = urlsplit(str(actor["id"])).netloc
    if isinstance(username, str) and username:
        return f"@{username}@{host}"
    return str(actor["id"])
