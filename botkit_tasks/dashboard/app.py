"""The dashboard as a plain ASGI application (no framework).

======================  ==========================================================================
``GET /``               the page: queues, deliveries chart, workers, retries, dead letters, hosts
``GET /snapshot.json``  the same data as JSON
``GET /chart.svg``      the deliveries chart alone
``GET /metrics``        Prometheus text format (:class:`botkit_tasks.metrics.BotkitCollector`)
``GET /static/…``       the stylesheet and the live-refresh script
``POST /login``         ``token=…``: sets the session cookie (when a token is configured)
``POST /dead/requeue``  ``id=…`` (repeatable) or ``all=1`` [``queue=…``]: back to their queue
``POST /dead/purge``    [``queue=…``]: delete dead letters
``POST /hosts/clear``   ``host=…``: clear a host's failure record (and its unavailable mark)
======================  ==========================================================================

Every POST but ``/login`` needs the page's CSRF token; each answers ``303`` back
to the page.  Broker and KV calls run in worker threads, off the event loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime, timezone
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlencode

import anyio.to_thread
import jinja2

from ..errors import ConfigurationError
from ..federation.delivery import reset_host
from ..kv.base import KvStore
from ..monitor import inspect
from .auth import COOKIE, Guard
from .views import Snapshot, read_snapshot

__all__ = ["DashboardApp"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_Response = tuple[int, list[tuple[str, str]], bytes]

_MAX_FORM = 64 * 1024
_MUTATIONS = ("/dead/requeue", "/dead/purge", "/hosts/clear")
_STATIC = {"dashboard.css": "text/css; charset=utf-8", "live.js": "text/javascript; charset=utf-8"}
_SECURITY_HEADERS = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    # Not "no-referrer": with it, browsers send "Origin: null" on form POSTs,
    # which the CSRF check rightly refuses.
    ("referrer-policy", "same-origin"),
    ("cache-control", "no-store"),
]
_NOTICES = {
    "requeued": "Requeued {n} dead letter(s).",
    "purged": "Purged {n} dead letter(s).",
    "cleared": "Cleared the failure record of {host}.",
    "nothing": "Nothing to do: no dead letter was selected.",
}


def _ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "-"
    seconds = (now - value).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 60:
        text = f"{seconds:.0f} s"
    elif seconds < 3600:
        text = f"{seconds / 60:.0f} min"
    elif seconds < 86400:
        text = f"{seconds / 3600:.1f} h"
    else:
        text = f"{seconds / 86400:.1f} d"
    return f"in {text}" if future else f"{text} ago"


def _utc(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("botkit_tasks.dashboard", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["utc"] = _utc
    env.filters["last_line"] = _last_line
    env.filters["json"] = lambda value: json.dumps(value, default=repr, ensure_ascii=False)
    return env


class DashboardApp:
    """An ASGI application showing one broker (and, optionally, the bot's KV store).

    Build it with :func:`botkit_tasks.dashboard.app`.
    """

    def __init__(
        self,
        broker: Any,  # a Dramatiq broker or a Celery app (see monitor.inspect)
        kv: KvStore | None = None,
        *,
        token: str | None = None,
        title: str = "botkit-tasks",
        refresh: float = 5.0,
        limit: int = 50,
    ) -> None:
        if refresh < 0:
            raise ConfigurationError(f"refresh must be >= 0 seconds, not {refresh!r}")
        if limit < 1:
            raise ConfigurationError(f"limit must be >= 1, not {limit!r}")
        self.broker = broker
        self.kv = kv
        self.inspector = inspect(broker)
        self.guard = Guard(token)
        self.title = title
        self.refresh = refresh
        self.limit = limit
        self._env = _environment()
        self._metrics: Any = None

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status, headers, body = await self._respond(scope, receive)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers + _SECURITY_HEADERS],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    async def _respond(self, scope: Scope, receive: Receive) -> _Response:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        root = scope.get("root_path", "")
        path = scope["path"]
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        method = scope["method"]
        client = scope.get("client")
        client_host = client[0] if client else None
        if path.startswith("/static/") and method in ("GET", "HEAD"):
            return self._static(path.removeprefix("/static/"))
        if path == "/login" and method == "POST":
            form = await _read_form(receive)
            if form is None:
                return _text(413, "form too large")
            return self._login(form, root)
        if not self.guard.allows(headers, client_host):
            return self._unauthorized(root)
        if method in ("GET", "HEAD"):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if path == "/":
                snap = await self._snapshot()
                return _html(200, self._page(snap, root, query))
            if path == "/snapshot.json":
                snap = await self._snapshot()
                body = json.dumps(snap.to_dict(), indent=2).encode()
                return 200, [("content-type", "application/json")], body
            if path == "/chart.svg":
                snap = await self._snapshot()
                return 200, [("content-type", "image/svg+xml")], snap.chart().encode()
            if path == "/metrics":
                return await anyio.to_thread.run_sync(self._metrics_text)
            if path in _MUTATIONS:
                return 405, [("allow", "POST"), *_text(405, "use POST")[1]], b"use POST\n"
            return _text(404, "not found")
        if method == "POST" and path in _MUTATIONS:
            form = await _read_form(receive)
            if form is None:
                return _text(413, "form too large")
            if not self.guard.csrf_ok(form, headers):
                return _text(403, "missing or wrong CSRF token (reload the page and try again)")
            return await self._mutate(path, form, root, client_host)
        return _text(405, "method not allowed")

    # ------------------------------------------------------------------ pages

    async def _snapshot(self) -> Snapshot:
        return await anyio.to_thread.run_sync(
            lambda: read_snapshot(self.inspector, self.kv, limit=self.limit)
        )

    def _page(self, snap: Snapshot, root: str, query: dict[str, list[str]]) -> str:
        notice = None
        done = query.get("done", [""])[0]
        if done in _NOTICES:
            n = query.get("n", ["0"])[0]
            notice = _NOTICES[done].format(
                n=int(n) if n.isdigit() else 0, host=query.get("host", [""])[0]
            )
        return self._env.get_template("page.html").render(
            snap=snap,
            root=root,
            title=self.title,
            refresh=self.refresh,
            csrf=self.guard.csrf_token,
            notice=notice,
            ago=lambda value: _ago(value, snap.taken_at),
            broker=type(self.broker).__name__,
        )

    def _unauthorized(self, root: str) -> _Response:
        body = self._env.get_template("login.html").render(
            root=root, title=self.title, has_token=self.guard.token is not None
        )
        status, headers, data = _html(401, body)
        headers.append(("www-authenticate", 'Bearer realm="botkit-tasks dashboard"'))
        return status, headers, data

    def _login(self, form: dict[str, list[str]], root: str) -> _Response:
        if not self.guard.check_login(form.get("token", [""])[0]):
            return self._unauthorized(root)
        cookie = (
            f"{COOKIE}={self.guard.session_cookie}; Path={root or '/'}; HttpOnly; SameSite=Strict"
        )
        return 303, [("location", f"{root}/"), ("set-cookie", cookie)], b""

    def _static(self, name: str) -> _Response:
        if name not in _STATIC:
            return _text(404, "not found")
        folder = resources.files("botkit_tasks.dashboard").joinpath("static")
        data = folder.joinpath(name).read_bytes()
        return 200, [("content-type", _STATIC[name])], data

    def _metrics_text(self) -> _Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        from ..metrics import BotkitCollector

        if self._metrics is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(BotkitCollector(self.broker, self.kv))
            self._metrics = registry
        return 200, [("content-type", CONTENT_TYPE_LATEST)], generate_latest(self._metrics)

    # ------------------------------------------------------------------ mutations

    async def _mutate(
        self, path: str, form: dict[str, list[str]], root: str, client: str | None
    ) -> _Response:
        queue = form.get("queue", [""])[0] or None
        if path == "/hosts/clear":
            host = form.get("host", [""])[0]
            if not host:
                return _text(400, "host is required")
            if self.kv is None:
                return _text(400, "this dashboard has no KV store, so no host records")
            kv = self.kv
            await anyio.to_thread.run_sync(lambda: reset_host(kv, host))
            logger.warning("Dashboard: cleared the failure record of %s (client %s)", host, client)
            return _back(root, "hosts", done="cleared", host=host)
        if path == "/dead/purge":
            n = await anyio.to_thread.run_sync(lambda: self.inspector.purge_dead(queue))
            logger.warning(
                "Dashboard: purged %d dead letters of %s (client %s)", n, queue or "all", client
            )
            return _back(root, "dead", done="purged", n=str(n))
        ids = [i for i in form.get("id", []) if i]
        every = form.get("all", [""])[0] == "1"
        if not ids and not every:
            return _back(root, "dead", done="nothing")

        def requeue() -> int:
            chosen = ids or [d.message_id for d in self.inspector.dead_letters(queue)]
            return self.inspector.requeue(chosen)

        n = await anyio.to_thread.run_sync(requeue)
        logger.warning("Dashboard: requeued %d dead letters (client %s)", n, client)
        return _back(root, "dead", done="requeued", n=str(n))


async def _read_form(receive: Receive) -> dict[str, list[str]] | None:
    """The url-encoded body, or ``None`` when it is over the limit."""
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > _MAX_FORM:
            return None
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def _back(root: str, anchor: str, **query: str) -> _Response:
    return 303, [("location", f"{root}/?{urlencode(query)}#{anchor}")], b""


def _html(status: int, text: str) -> _Response:
    return status, [("content-type", "text/html; charset=utf-8")], text.encode()


def _text(status: int, text: str) -> _Response:
    return status, [("content-type", "text/plain; charset=utf-8")], (text + "\n").encode()
