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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload
from urllib.parse import urlsplit

import dramatiq

from ..federation import Federation
from ..federation.activities import embedded, first_id, has_type
from . import documents, outgoing
from .handlers import InboxHandlers
from .jobs import check_counts, declare_job

if TYPE_CHECKING:
    import celery

    from ..federation.delivery import DeliveryOptions
    from ..federation.inbox import InboxContext
    from ..kv.base import KvStore
    from ..runners.base import Runner
    from .web import BotApp

__all__ = ["Bot", "BotContext", "BotHandler"]

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
        broker: The Dramatiq broker the bot's jobs run on, or a
            ``celery.Celery`` app (its jobs are then Celery tasks; see
            :attr:`celery`).
        allow_private_addresses: Allow ``http://`` and loopback/private
            addresses (tests and loopback demos only).
        delivery_options: Retry and timeout policy of deliveries.
        user_agent: ``User-Agent`` of outgoing requests.
        set_global_broker: Make ``broker`` Dramatiq's global broker (default;
            ignored for a Celery app).
    """

    def __init__(
        self,
        username: str,
        *,
        base_url: str,
        name: str | None = None,
        summary: str | None = None,
        kv: KvStore,
        broker: Any,
        allow_private_addresses: bool = False,
        delivery_options: DeliveryOptions | None = None,
        user_agent: str | None = None,
        set_global_broker: bool = True,
    ) -> None:
        from .._version import __version__

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
        # The user's handlers, by the event InboxHandlers reports.
        self._handlers: dict[str, list[BotHandler]] = {
            event: [] for event in ("follow", "unfollow", "message", "mention")
        }
        InboxHandlers(self, self._run_handlers)
        if set_global_broker and isinstance(broker, dramatiq.Broker):
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
        return documents.actor_document(self)

    # ------------------------------------------------------------------ decorators

    def on_follow(self, handler: BotHandler) -> BotHandler:
        """Register ``handler(ctx, follow)``, called after a new follower is stored and accepted."""
        self._handlers["follow"].append(_callable(handler))
        return handler

    def on_unfollow(self, handler: BotHandler) -> BotHandler:
        """Register ``handler(ctx, undo)``, called after a follower has been removed."""
        self._handlers["unfollow"].append(_callable(handler))
        return handler

    def on_mention(self, handler: BotHandler) -> BotHandler:
        """Register ``handler(ctx, note)`` for notes that tag or directly address the bot."""
        self._handlers["mention"].append(_callable(handler))
        return handler

    def on_message(self, handler: BotHandler) -> BotHandler:
        """Register ``handler(ctx, note)`` for every note delivered to the bot.

        That includes posts of the accounts the bot follows, and mentions
        (which also run the ``on_mention`` handlers).
        """
        self._handlers["message"].append(_callable(handler))
        return handler

    @overload
    def job(self, fn: Callable[P, R]) -> Any: ...

    @overload
    def job(self, fn: None = None, **actor_options: Any) -> Callable[[Callable[P, R]], Any]: ...

    def job(
        self, fn: Callable[P, R] | None = None, **actor_options: Any
    ) -> Any | Callable[[Callable[P, R]], Any]:
        """Turn a function into a job of the bot's runner.

        Usable bare (``@bot.job``) or with Dramatiq actor options
        (``@bot.job(max_retries=3, queue_name="digests")``).  The queue is
        ``"default"`` unless ``queue_name`` is given.  On Dramatiq the result
        is a ``dramatiq.Actor``; on Celery a task declared with the
        at-least-once settings, which takes the same retry options (see
        :mod:`botkit_tasks.bot.jobs`).  Either way ``.send(...)`` and
        ``.send_with_options(args=..., delay=ms)`` enqueue it.
        """

        def decorate(f: Callable[P, R]) -> Any:
            return declare_job(self.federation.runner, f, dict(actor_options))

        if fn is not None:
            return decorate(fn)
        # Bad options fail at the decorator, not at the first call.
        check_counts(actor_options)
        return decorate

    @property
    def runner(self) -> Runner:
        """Declares and enqueues the bot's jobs; ``runner.kind`` names the runner."""
        return self.federation.runner

    @property
    def celery(self) -> celery.Celery:
        """The Celery app the bot's jobs are tasks of: what ``celery -A mybot worker`` finds.

        Raises:
            AttributeError: The bot runs on a Dramatiq broker.
        """
        if self.runner.kind != "celery":
            raise AttributeError(
                f"{self!r} runs on Dramatiq ({type(self.broker).__name__}); "
                "create it with broker=celery.Celery(...) for a Celery app"
            )
        app: celery.Celery = self.runner.target
        return app

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
        return outgoing.publish(self, text, to=to, in_reply_to=in_reply_to)

    def follow(self, target: Mapping[str, Any] | str) -> str:
        """Send a ``Follow`` to ``target`` (an actor document or id); return its id.

        An id is fetched (signed GET) to find the inbox.  :meth:`is_following`
        turns true when the ``Accept`` arrives.
        """
        return outgoing.follow(self, target)

    def unfollow(self, actor_id: str) -> str | None:
        """Send an ``Undo`` of the ``Follow`` sent to ``actor_id``; return the Undo's id.

        Returns ``None`` (and sends nothing) when the bot does not follow ``actor_id``.
        """
        return outgoing.unfollow(self, actor_id)

    def is_following(self, actor_id: str) -> bool:
        """Whether a ``Follow`` the bot sent to ``actor_id`` has been accepted."""
        record = self.kv.get(("botkit", self.username, "following", actor_id))
        return isinstance(record, dict) and record.get("state") == "accepted"

    def get_note(self, key: str) -> dict[str, Any] | None:
        """The stored ``{"note", "activity"}`` record of ``{actor_id}/notes/{key}``, if any."""
        value = self.kv.get(outgoing.note_key(self.username, key))
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

    def _run_handlers(self, ictx: InboxContext, obj: dict[str, Any], event: str) -> None:
        handlers = self._handlers[event]
        if not handlers:
            return
        ctx = BotContext(bot=self, activity=ictx.activity, actor=ictx.actor, actor_id=ictx.actor_id)
        for handler in handlers:
            handler(ctx, obj)


def _callable(fn: Callable[P, R]) -> Callable[P, R]:
    if not callable(fn):
        raise TypeError(f"a handler or job must be callable, not {fn!r:.100}")
    return fn
