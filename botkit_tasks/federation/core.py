"""The :class:`Federation` facade and :func:`get_federation`.

Re-exported by :mod:`botkit_tasks.federation`, which describes what creating
one declares on the broker.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast, overload
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from ..runners.base import Runner
from ..runners.select import runner_for
from . import _registry
from .base import Handler
from .delivery import DELIVER_ACTOR_NAME, DeliveryOptions, declare_delivery_actors
from .fanout import FANOUT_ACTOR_NAME, declare_fanout_actor, enqueue_fanout
from .fanout import send as fanout_send
from .followers import Followers
from .inbox import InboxApp, declare_inbox_actor
from .keys import KeyResolver, load_or_create_keypair
from .net import Fetcher

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

    from ..kv.base import KvStore

__all__ = ["Federation", "get_federation"]

#: Usernames become URL path segments and key-value key parts: keep them boring.
_USERNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9_])?")

#: Characters RFC 3986 does not allow anywhere in a URL (beside non-ASCII).
_URL_UNSAFE = re.compile(r'[\x00-\x20\x7f\\<>"{}|^`]')


def _normalise_base_url(base_url: object, *, allow_private_addresses: bool) -> str:
    if not isinstance(base_url, str):
        raise ConfigurationError(f"base_url must be a string, not {base_url!r}")
    bad = _URL_UNSAFE.search(base_url)
    if bad is not None:
        # urlsplit() would drop some of these silently and keep others in ids.
        raise ConfigurationError(
            f"base_url {base_url!r} contains {bad.group()!r}, which a URL cannot hold "
            "(spaces, control characters, backslashes and quotes must be percent-encoded)"
        )
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigurationError(f"base_url {base_url!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"base_url {base_url!r} must be an absolute http(s) URL")
    if parts.scheme == "http" and not allow_private_addresses:
        raise ConfigurationError(
            f"base_url {base_url!r} uses http://; use https:// "
            "(plain http is only allowed with allow_private_addresses=True)"
        )
    if parts.username is not None or parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        raise ConfigurationError(
            f"base_url {parts.scheme}://…@{host} must not contain credentials (user:password@)"
        )
    if "%" in parts.path:
        # ASGI servers hand the app the decoded path: routes would never match.
        raise ConfigurationError(
            f"base_url {base_url!r} must not have percent-encoded characters in its path"
        )
    if parts.query or parts.fragment or base_url.endswith(("?", "#")):
        raise ConfigurationError(f"base_url {base_url!r} must not have a query or fragment")
    # "https://bot.example/" and "https://bot.example" name the same site.
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def get_federation(broker: object, username: str) -> Federation:
    """Return the :class:`Federation` declared on ``broker`` (or Celery app) for ``username``.

    Jobs carry only the username; this is how an actor finds its federation.

    Raises:
        LookupError: when no federation for ``username`` was created on ``broker``
            in this process (the worker did not import the bot's module).
    """
    # Only Federation registers itself (in __init__), so every entry is one.
    return cast("Federation", _registry.lookup(broker, username))


class Federation:
    """The federation side of one local actor: keys, followers, jobs and the inbox.

    Args:
        kv: where keys, followers, remote-key caches and de-duplication marks live.
        broker: the Dramatiq broker the federation's jobs are declared on as
            actors, or a ``celery.Celery`` app they are declared on as tasks
            (:mod:`botkit_tasks.runners`).
        base_url: the site's absolute URL, e.g. ``"https://bot.example"``; a
            trailing slash is ignored.  ``http://`` only with
            ``allow_private_addresses``.
        username: the local actor's name (letters, digits, ``_``, ``.``, ``-``).
        allow_private_addresses: allow ``http://`` and loopback/private
            destinations for fetches and deliveries (tests and demos only).
        delivery_options: retry, timeout and size settings for deliveries.
        user_agent: the ``User-Agent`` of outgoing requests.
    """

    def __init__(
        self,
        *,
        kv: KvStore,
        broker: Any,
        base_url: str,
        username: str,
        allow_private_addresses: bool = False,
        delivery_options: DeliveryOptions | None = None,
        user_agent: str | None = None,
    ) -> None:
        if not isinstance(username, str) or not _USERNAME.fullmatch(username):
            raise ConfigurationError(
                f"username {username!r} must be 1-64 letters, digits, '_', '.' or '-' "
                "and must not start or end with '.' or '-'"
            )
        # TypeError for anything but a dramatiq.Broker or a celery.Celery app.
        self.runner: Runner = runner_for(broker)
        if not isinstance(allow_private_addresses, bool):
            # bool("false") is True: a string from the environment would turn SSRF checks off.
            raise TypeError(
                "allow_private_addresses must be True or False, "
                f"not {allow_private_addresses!r:.100}"
            )
        if delivery_options is not None and not isinstance(delivery_options, DeliveryOptions):
            raise TypeError(
                f"delivery_options must be a DeliveryOptions, not {delivery_options!r:.100}"
            )
        self.kv = kv
        self.broker = broker
        self.username = username
        self.allow_private_addresses = bool(allow_private_addresses)
        self.base_url = _normalise_base_url(
            base_url, allow_private_addresses=self.allow_private_addresses
        )
        self.actor_id = f"{self.base_url}/users/{username}"
        self.key_id = f"{self.actor_id}#main-key"
        self.inbox_url = f"{self.actor_id}/inbox"
        self.shared_inbox_url = f"{self.base_url}/inbox"
        self.delivery_options = delivery_options or DeliveryOptions()
        self.user_agent = user_agent

        self._load_keypair = load_or_create_keypair
        self._private_key: RSAPrivateKey | None = None
        self._key_lock = threading.Lock()
        self._handlers: dict[str, list[Handler]] = {}

        fetcher_options: dict[str, Any] = {}
        if user_agent is not None:
            fetcher_options["user_agent"] = user_agent
        self.fetcher: Fetcher = Fetcher(
            key_id=self.key_id,
            private_key_provider=lambda: self.private_key,
            allow_private_addresses=self.allow_private_addresses,
            **fetcher_options,
        )
        # Create the HTTP client now: Fetcher creates it lazily without a lock, and
        # the inbox's first burst of concurrent key fetches would each build one.
        self.fetcher.client  # noqa: B018
        self.keys: KeyResolver = KeyResolver(kv, self.fetcher)
        self.followers: Followers = Followers(kv, username)
        self.inbox_app: InboxApp = InboxApp(self)

        # Register before declaring: the jobs look the federation up by username.
        _registry.register(broker, username, self)
        # The first declaration serves every federation on the broker (jobs
        # carry the username), so later federations reuse it.
        if not self.runner.is_declared(DELIVER_ACTOR_NAME):
            declare_delivery_actors(self)
        if not self.runner.is_declared(FANOUT_ACTOR_NAME):
            declare_fanout_actor(self)
        declare_inbox_actor(self)

    def __repr__(self) -> str:
        return f"<Federation {self.actor_id}>"

    def close(self) -> None:
        """Close the HTTP client used for key and actor fetches; idempotent.

        The key-value store and the broker were handed in, so they stay open.
        """
        self.fetcher.close()

    @property
    def private_key(self) -> RSAPrivateKey:
        """The local actor's RSA key, created once and kept in the key-value store."""
        key = self._private_key
        if key is None:
            with self._key_lock:
                key = self._private_key
                if key is None:
                    key = self._private_key = self._load_keypair(self.kv, self.username)
        return key

    def publish(self, activity: dict[str, Any]) -> None:
        """Send ``activity`` to every follower: store it once and enqueue one fan-out job.

        Returns at once; the fan-out and the deliveries run on workers.
        """
        enqueue_fanout(self, activity)

    def send(self, activity: dict[str, Any], inboxes: Iterable[str]) -> None:
        """Deliver ``activity`` to each of ``inboxes``: one delivery job per distinct inbox.

        For replies to one actor, such as the ``Accept`` of a ``Follow``.  The
        jobs sign at send time and retry like fan-out deliveries; they are not
        skipped for hosts marked unavailable.

        Raises:
            ValueError: the activity has no string ``id``.
            TypeError: ``inboxes`` is a single string rather than an iterable of URLs.
        """
        if isinstance(inboxes, (str, bytes)):
            raise TypeError("inboxes must be an iterable of inbox URLs, not a single string")
        urls = list(inboxes)
        for url in urls:
            if not isinstance(url, str) or not url:
                raise ValueError(f"inbox URL must be a non-empty string: {url!r}")
        fanout_send(self, activity, urls)

    @overload
    def on(self, activity_type: str) -> Callable[[Handler], Handler]: ...

    @overload
    def on(self, activity_type: str, handler: Handler) -> Handler: ...

    def on(
        self, activity_type: str, handler: Handler | None = None
    ) -> Handler | Callable[[Handler], Handler]:
        """Register ``handler`` for incoming activities of ``activity_type`` (e.g. ``"Follow"``).

        Handlers run in the inbox job, on a worker, as ``handler(ctx, activity)``,
        in registration order.  An exception retries the job (handlers should be
        idempotent), except :class:`MalformedActivityError`, which drops it.
        Usable as a decorator: ``@federation.on("Follow")``.
        """
        if not isinstance(activity_type, str) or not activity_type:
            raise ConfigurationError(f"activity_type must be a non-empty string: {activity_type!r}")

        def register(fn: Handler) -> Handler:
            if not callable(fn):
                raise ConfigurationError(f"handler must be callable, not {fn!r}")
            self._handlers.setdefault(activity_type, []).append(fn)
            return fn

        if handler is None:
            return register
        return register(handler)

    def handlers_for(self, activity_type: str) -> list[Handler]:
        """Return the handlers registered for ``activity_type``, in registration order."""
        return list(self._handlers.get(activity_type, ()))
