"""Who may see the dashboard, and which POSTs are the dashboard's own.

* With a token, a request is allowed when it carries ``Authorization: Bearer
  <token>`` (scripts, Prometheus) or the session cookie set by ``POST /login``
  (browsers).  The cookie holds an HMAC of the token, never the token itself.
* Without a token, only loopback clients are allowed: the dashboard is meant to
  be reached through an SSH tunnel or on the machine itself.  (Behind a reverse
  proxy every client looks like loopback, so set a token there.)
* Every mutation is a POST whose form carries the CSRF token of the pages
  (an HMAC of the secret, so another site cannot know it), and whose
  ``Origin``, when the browser sends one, names this host.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from ..errors import ConfigurationError

__all__ = ["COOKIE", "Guard", "is_loopback"]

#: The session cookie's name.
COOKIE = "botkit_dashboard"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _cookies(header: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            found.setdefault(name, value)
    return found


class Guard:
    """Checks requests for one dashboard.

    Parameters:
        token: The access token, or ``None`` for loopback clients only.
        secret: Key for the CSRF token and the cookie; derived from the token
            when there is one (so several processes agree), else random.
    """

    def __init__(self, token: str | None, *, secret: bytes | None = None) -> None:
        if token is not None and (not isinstance(token, str) or len(token) < 8):
            raise ConfigurationError(
                "the dashboard token must be a string of at least 8 characters"
            )
        self.token = token
        if secret is None:
            secret = (
                hashlib.sha256(b"botkit-dashboard\0" + token.encode()).digest()
                if token is not None
                else secrets.token_bytes(32)
            )
        self._secret = secret

    def _mac(self, purpose: str) -> str:
        return hmac.new(self._secret, purpose.encode(), hashlib.sha256).hexdigest()

    @property
    def csrf_token(self) -> str:
        """The value every mutating form must send back as ``csrf``."""
        return self._mac("csrf")

    @property
    def session_cookie(self) -> str:
        """The cookie value that stands for a valid token."""
        return self._mac("session")

    def allows(self, headers: Mapping[str, str], client_host: str | None) -> bool:
        """Whether a request with these (lower-case) headers, from this client, may proceed."""
        if self.token is None:
            return is_loopback(client_host)
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self.token.encode()
        ):
            return True
        cookie = _cookies(headers.get("cookie", "")).get(COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self.session_cookie.encode())

    def check_login(self, offered: str) -> bool:
        """Whether ``offered`` (the login form's field) is the token."""
        return self.token is not None and hmac.compare_digest(offered.encode(), self.token.encode())

    def same_origin(self, headers: Mapping[str, str]) -> bool:
        """Whether the request's ``Origin`` (when sent) is this dashboard's host."""
        origin = headers.get("origin")
        if origin is None:
            return True
        if origin == "null":
            return False
        return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()

    def csrf_ok(self, form: Mapping[str, list[str]], headers: Mapping[str, str]) -> bool:
        """Whether a mutating POST carries the CSRF token and comes from this origin."""
        sent = form.get("csrf", [""])[0]
        return self.same_origin(headers) and hmac.compare_digest(
            sent.encode(), self.csrf_token.encode()
        )
