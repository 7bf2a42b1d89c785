"""The bot's web side: a plain ASGI application, no framework.

=====================================================  ===========================================
``GET /.well-known/webfinger?resource=acct:u@host``    JRD (``application/jrd+json``) linking
                                                       ``rel=self`` to the actor; ``host`` is
                                                       ``base_url``'s authority, port included
``GET {actor}``                                        the actor document (a ``Service``)
``POST {actor}/inbox``, ``POST {base}/inbox``          the inbox (:attr:`Federation.inbox_app`)
``GET {actor}/followers[?page=…]``                     ``OrderedCollection`` with ``totalItems``;
                                                       ``?page=true`` the first
                                                       ``OrderedCollectionPage``, ``next`` links
                                                       carry an opaque cursor; no signature needed
``GET {actor}/following``, ``{actor}/outbox``          ``OrderedCollection`` (counts only)
``GET {actor}/notes/{key}[/activity]``                 a published public note, its ``Create``
=====================================================  ===========================================

Content negotiation: ActivityPub clients ask for ``application/activity+json``
or ``application/ld+json; profile="https://www.w3.org/ns/activitystreams"`` and
get JSON (in the type they preferred); a missing Accept, ``*/*`` and
``application/json`` get JSON too.  A browser (``text/html`` preferred) gets a
small HTML page for the actor and for notes; collections are JSON only.  An
Accept header that allows none of these gets 406.  Every response varies on
``Accept``.  ``HEAD`` is answered like ``GET`` without a body.

Key-value reads (and the first-use key generation) run in worker threads, off
the event loop.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import anyio.to_thread

from ..errors import StoreError
from ..federation.activities import is_public
from .documents import paragraphs

if TYPE_CHECKING:
    from ._protocols import BotCore

__all__ = [
    "ACTIVITY_JSON",
    "FOLLOWERS_PAGE_SIZE",
    "LD_JSON",
    "BotApp",
    "negotiate",
]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Media type of ActivityPub responses.
ACTIVITY_JSON = "application/activity+json"
#: The JSON-LD media type with the ActivityStreams profile.
LD_JSON = 'application/ld+json; profile="https://www.w3.org/ns/activitystreams"'
#: Followers listed per ``OrderedCollectionPage``.
FOLLOWERS_PAGE_SIZE = 50

_JSON = "json"
_LD = "ld"
_HTML = "html"


def negotiate(accept: str | None, offered: tuple[str, ...]) -> str | None:
    """Pick a representation for an ``Accept`` header.

    Args:
        accept: The header value; ``None`` when absent (then JSON).
        offered: Among ``"json"`` (``application/activity+json``), ``"ld"``
            (``application/ld+json`` with the ActivityStreams profile) and
            ``"html"``.

    Returns:
        The chosen representation, or ``None`` when nothing offered is
        acceptable (406).  Ties go to JSON: machines rarely send ``text/html``.
    """
    if accept is None or not accept.strip():
        return offered[0]
    scores: dict[str, tuple[float, int]] = {}
    for media_range in accept.split(","):
        fields = [f.strip() for f in media_range.split(";")]
        mtype = fields[0].lower()
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                # NaN would pass the clamp as 1.0
                q = max(0.0, min(1.0, q)) if q == q else 0.0
        matches: dict[str, int] = {}
        if mtype == "application/activity+json":
            matches = {_JSON: 3}
        elif mtype == "application/ld+json":
            matches = {_LD: 3}
        elif mtype == "application/json":
            matches = {_JSON: 2}
        elif mtype == "text/html":
            matches = {_HTML: 3}
        elif mtype == "application/*":
            matches = {_JSON: 1, _LD: 1}
        elif mtype == "text/*":
            matches = {_HTML: 1}
        elif mtype == "*/*":
            matches = {_JSON: 0, _LD: 0, _HTML: 0}
        for rep, specificity in matches.items():
            # The most specific range that matches decides a representation's q.
            if rep not in scores or specificity > scores[rep][1]:
                scores[rep] = (q, specificity)
    best: str | None = None
    best_q = 0.0
    for rep in offered:
        q = scores.get(rep, (0.0, -1))[0]
        if q > best_q:
            best, best_q = rep, q
    return best


class BotApp:
    """The ASGI application of one :class:`~botkit_tasks.bot.Bot` (any ``BotCore``)."""

    def __init__(self, bot: BotCore) -> None:
        self.bot = bot
        federation = bot.federation
        self._actor_path = urlsplit(bot.actor_id).path
        self._inbox = federation.inbox_app
        self._host = urlsplit(bot.base_url).netloc.lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._inbox(scope, receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path: str = scope.get("path") or "/"
        if path != "/" and path.endswith("/"):
            path = path.rstrip("/")
        if path in self._inbox.paths:
            await self._inbox(scope, receive, send)
            return
        method = scope.get("method", "GET")
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            await _send(send, 405, b"", "text/plain", head, [(b"allow", b"GET, HEAD")])
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
        accept = headers.get("accept")
        try:
            status, ctype, body = await anyio.to_thread.run_sync(self._route, path, query, accept)
        except StoreError:
            # The store is down: tell clients to come back, do not show a traceback.
            logger.exception("web: key-value store failed")
            status, ctype, body = 503, "text/plain; charset=utf-8", b"503 Service Unavailable\n"
        await _send(send, status, body, ctype, head, [(b"vary", b"Accept")])

    def _route(
        self, path: str, query: dict[str, list[str]], accept: str | None
    ) -> tuple[int, str, bytes]:
        """Answer one GET: ``(status, content type, body)``.  Runs in a worker thread."""
        if path == "/.well-known/webfinger":
            return self._webfinger(query)
        actor = self._actor_path
        if path == actor:
            return self._represent(accept, self.bot.actor_document, self._actor_html)
        if not path.startswith(actor + "/"):
            return _not_found()
        rest = path[len(actor) + 1 :]
        if rest == "followers":
            try:
                return self._json_only(accept, lambda: self._followers(query))
            except _BadCursor:
                return _json(400, {"error": "invalid page cursor"}, "application/json")
        if rest == "following":
            return self._json_only(accept, lambda: self._collection("following", 0))
        if rest == "outbox":
            return self._json_only(
                accept, lambda: self._collection("outbox", self.bot.note_count())
            )
        parts = rest.split("/")
        if parts[0] == "notes" and len(parts) in (2, 3) and parts[1]:
            try:
                record = self.bot.get_note(parts[1])
            except ValueError:
                return _not_found()  # not a legal key (NUL, too long): no such note
            if record is None or not _is_public(record.get("note")):
                # Direct messages are not served: their recipients already have them.
                return _not_found()
            if len(parts) == 2:
                note = {"@context": "https://www.w3.org/ns/activitystreams", **record["note"]}
                return self._represent(accept, lambda: note, lambda: _note_html(self.bot, note))
            if parts[2] == "activity":
                activity = record["activity"]
                return self._json_only(accept, lambda: activity)
        return _not_found()

    # ------------------------------------------------------------------ representations

    def _represent(
        self,
        accept: str | None,
        document: Callable[[], dict[str, Any]],
        page: Callable[[], str],
    ) -> tuple[int, str, bytes]:
        choice = negotiate(accept, (_JSON, _LD, _HTML))
        if choice is None:
            return _not_acceptable()
        if choice == _HTML:
            return 200, "text/html; charset=utf-8", page().encode("utf-8")
        return _json(200, document(), LD_JSON if choice == _LD else ACTIVITY_JSON)

    def _json_only(
        self, accept: str | None, document: Callable[[], dict[str, Any]]
    ) -> tuple[int, str, bytes]:
        choice = negotiate(accept, (_JSON, _LD))
        if choice is None:
            return _not_acceptable()
        return _json(200, document(), LD_JSON if choice == _LD else ACTIVITY_JSON)

    def _webfinger(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        resources = query.get("resource") or []
        if len(resources) != 1 or not resources[0]:
            return _json(400, {"error": "one resource parameter is required"}, "application/json")
        resource = resources[0].strip()
        bot = self.bot
        subject = f"acct:{bot.username}@{self._host}"
        if resource.lower().startswith("acct:"):
            user, _, host = resource[5:].lstrip("@").rpartition("@")
            matches = user == bot.username and host.lower() == self._host
        else:
            matches = resource == bot.actor_id
        if not matches:
            return _json(404, {"error": "no such account"}, "application/json")
        document = {
            "subject": subject,
            "aliases": [bot.actor_id],
            "links": [
                {"rel": "self", "type": ACTIVITY_JSON, "href": bot.actor_id},
                {
                    "rel": "http://webfinger.net/rel/profile-page",
                    "type": "text/html",
                    "href": bot.actor_id,
                },
            ],
        }
        return _json(200, document, "application/jrd+json")

    def _followers(self, query: dict[str, list[str]]) -> dict[str, Any]:
        bot = self.bot
        url = bot.followers_url
        followers = bot.federation.followers
        total = followers.count()
        pages = query.get("page")
        if not pages:
            return {
                "@context": "https://www.w3.org/ns/activitystreams",
                "id": url,
                "type": "OrderedCollection",
                "totalItems": total,
                "first": f"{url}?page=true",
            }
        page = pages[0]
        after = _decode_cursor(page)
        try:
            items, next_after = followers.page(after, FOLLOWERS_PAGE_SIZE)
        except ValueError:
            if after is None:
                raise
            raise _BadCursor(page) from None  # decodes to no legal key (NUL, too long)
        document: dict[str, Any] = {
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": f"{url}?page={page}",
            "type": "OrderedCollectionPage",
            "partOf": url,
            "totalItems": total,
            "orderedItems": [item["id"] for item in items],
        }
        if next_after is not None:
            document["next"] = f"{url}?page={_encode_cursor(next_after)}"
        return document

    def _collection(self, name: str, total: int) -> dict[str, Any]:
        return {
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": f"{self.bot.actor_id}/{name}",
            "type": "OrderedCollection",
            "totalItems": total,
        }

    def _actor_html(self) -> str:
        bot = self.bot
        name = html.escape(bot.name)
        body = (
            f"<h1>{name}</h1>\n<p>{html.escape(bot.handle)}</p>\n"
            f"{_paragraph_html(bot.summary)}"
            "<p>This is an ActivityPub bot. Follow it from your fediverse account by "
            f"searching for <code>{html.escape(bot.handle)}</code>.</p>\n"
        )
        return _page(name, body)


class _BadCursor(ValueError):
    pass


def _encode_cursor(after: str) -> str:
    return base64.urlsafe_b64encode(after.encode("utf-8")).decode("ascii").rstrip("=")


def _decode_cursor(page: str) -> str | None:
    """``None`` for the first page (``true``, ``1`` or empty), else the last id seen."""
    if page in ("", "true", "1"):
        return None
    try:
        padded = page + "=" * (-len(page) % 4)
        after = base64.b64decode(padded, altchars=b"-_", validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _BadCursor(page) from None
    if not after:
        raise _BadCursor(page)
    return after


def _is_public(note: Any) -> bool:
    return isinstance(note, dict) and is_public(note)


def _json(status: int, document: dict[str, Any], ctype: str) -> tuple[int, str, bytes]:
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if "charset" not in ctype and "profile" not in ctype:
        ctype = f"{ctype}; charset=utf-8"
    return status, ctype, body


def _not_found() -> tuple[int, str, bytes]:
    return _json(404, {"error": "not found"}, "application/json")


def _not_acceptable() -> tuple[int, str, bytes]:
    return (
        406,
        "text/plain; charset=utf-8",
        f"406 Not Acceptable: this resource is available as {ACTIVITY_JSON}\n".encode(),
    )


def _paragraph_html(text: str) -> str:
    return paragraphs(text) + "\n" if text else ""


def _note_html(bot: BotCore, note: dict[str, Any]) -> str:
    # Note content is HTML this bot produced from escaped text (see Bot.publish).
    body = (
        f'<p><a href="{html.escape(bot.actor_id, quote=True)}">{html.escape(bot.name)}</a> '
        f"<small>{html.escape(str(note.get('published', '')))}</small></p>\n"
        f"<article>{note.get('content', '')}</article>\n"
    )
    return _page(f"{html.escape(bot.name)}: note", body)


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title></head>\n<body>\n{body}</body></html>\n"
    )


async def _send(
    send: Send,
    status: int,
    body: bytes,
    ctype: str,
    head: bool,
    extra: list[tuple[bytes, bytes]],
) -> None:
    headers = [
        (b"content-type", ctype.encode("latin-1")),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"access-control-allow-origin", b"*"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
