"""Serving the dashboard with uvicorn, and the rule about where it may listen.

It binds to loopback by default.  Any other address needs a token (``--token``
or ``BOTKIT_DASHBOARD_TOKEN``): a dashboard that can requeue and purge is
never put on a network without one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from .auth import is_loopback

if TYPE_CHECKING:
    from .app import DashboardApp

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "TOKEN_ENV", "check_bind", "serve", "token_from_env"]

#: Where the dashboard listens unless told otherwise.
DEFAULT_HOST = "127.0.0.1"
#: Its default port.
DEFAULT_PORT = 8765
#: The environment variable holding the access token.
TOKEN_ENV = "BOTKIT_DASHBOARD_TOKEN"


def token_from_env(explicit: str | None = None) -> str | None:
    """``explicit`` when given, else ``$BOTKIT_DASHBOARD_TOKEN`` (empty counts as unset)."""
    if explicit:
        return explicit
    return os.environ.get(TOKEN_ENV) or None


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen on a non-loopback ``host`` without a token.

    Raises:
        ConfigurationError: naming the address and how to give a token.
    """
    if token is None and not is_loopback(host):
        raise ConfigurationError(
            f"the dashboard would listen on {host}, which is not loopback, without a token: "
            f"pass --token or set {TOKEN_ENV} (or bind to 127.0.0.1)"
        )


def serve(app: DashboardApp, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve ``app`` with uvicorn until interrupted (checks the bind rule first)."""
    check_bind(host, app.guard.token)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", lifespan="on")
