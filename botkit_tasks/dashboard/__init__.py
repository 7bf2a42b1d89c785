"""The operator's web dashboard: queues, retries, dead letters, remote hosts, metrics.

One server-rendered page for a :class:`~botkit_tasks.brokers.SqlBroker`
(PostgreSQL or SQLite) or Dramatiq's ``RedisBroker``: queue depths by state,
live workers, messages waiting for a retry with their last error, dead letters
with their traceback and *requeue*/*purge* buttons, the deliveries of the last
hour as a chart, and per remote host the hour's outcomes and its
unavailable mark (with a button to clear it).  The page refreshes its sections
in place every few seconds with a small script; without JavaScript it is the
same page, read-only until reloaded, and its forms still work.  ``/metrics``
serves the Prometheus metrics of :class:`botkit_tasks.metrics.BotkitCollector`.

History lives in the broker and the KV store, not in the dashboard: restart
it, or run several, and they show the same thing.

Run it with ``botkit-tasks dashboard`` (loopback by default), or mount the ASGI
app beside the bot's::

    from botkit_tasks.dashboard import app

    dashboard = app(broker, kv, token=os.environ["BOTKIT_DASHBOARD_TOKEN"])

Access: with ``token``, every request needs ``Authorization: Bearer <token>``
or the cookie a browser gets by signing in with the token; without it, only
loopback clients are answered.  Everything else gets 401 and changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .app import DashboardApp
from .server import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV, check_bind, serve

if TYPE_CHECKING:
    from ..kv.base import KvStore

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "TOKEN_ENV",
    "DashboardApp",
    "app",
    "check_bind",
    "serve",
]


def app(
    broker: Any,
    kv: KvStore | None = None,
    *,
    token: str | None = None,
    title: str = "botkit-tasks",
    refresh: float = 5.0,
    limit: int = 50,
) -> DashboardApp:
    """Build the dashboard's ASGI application.

    Parameters:
        broker: The broker to show: ``SqlBroker``, ``RedisBroker`` or a Celery
            app (whatever :func:`botkit_tasks.monitor.inspect` reads).
        kv: The bot's KV store, for delivery statistics and host records;
            without it those sections say so.
        token: Access token (at least 8 characters).  Without one, only
            loopback clients are answered.
        title: The page's heading.
        refresh: Seconds between live refreshes; ``0`` turns them off.
        limit: Retrying messages and dead letters listed at most.

    Raises:
        TypeError: for a broker :func:`botkit_tasks.monitor.inspect` does not support.
        ConfigurationError: (a ``ValueError``) for a short token, a negative
            ``refresh`` or a ``limit`` below 1.
    """
    return DashboardApp(broker, kv, token=token, title=title, refresh=refresh, limit=limit)
