"""The Redis URL of the environment: ``REDIS_URL`` or ``REDIS_HOST`` and its parts."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

from ..errors import ConfigurationError

#: Default port of ``REDIS_HOST`` when ``REDIS_PORT`` is not set.
DEFAULT_REDIS_PORT = 6379

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_REDIS_PARTS = ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_TLS")


def _redis_url_from_env(env: Mapping[str, str]) -> str | None:
    url = env.get("REDIS_URL")
    parts = [name for name in _REDIS_PARTS if name in env]
    if url is not None:
        if parts:
            raise ConfigurationError(
                f"REDIS_URL: cannot be combined with {', '.join(parts)}; use one or the other"
            )
        _check_redis_url(url)
        return url
    if not parts:
        return None
    if "REDIS_HOST" not in env:
        raise ConfigurationError(f"{parts[0]}: is set but REDIS_HOST is not")
    host = env["REDIS_HOST"].strip()
    if not host or any(c in host for c in "/@?# ") or not host.isprintable():
        raise ConfigurationError(f"REDIS_HOST: {host!r} is not a host name or address")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ConfigurationError(
                f"REDIS_HOST: {host!r} is not a host name or address (put the port in REDIS_PORT)"
            ) from None
    port = DEFAULT_REDIS_PORT
    if "REDIS_PORT" in env:
        raw = env["REDIS_PORT"].strip()
        if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < 65536:
            raise ConfigurationError(f"REDIS_PORT: {raw!r} is not a port number (1-65535)")
        port = int(raw)
    tls = False
    if "REDIS_TLS" in env:
        flag = env["REDIS_TLS"].strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ConfigurationError(
                f"REDIS_TLS: {env['REDIS_TLS']!r} is not a boolean "
                "(true/false, 1/0, yes/no, on/off)"
            )
        tls = flag in _TRUE
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 address
    auth = f":{quote(env['REDIS_PASSWORD'], safe='')}@" if "REDIS_PASSWORD" in env else ""
    return f"{'rediss' if tls else 'redis'}://{auth}{host}:{port}/0"


def _check_redis_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        raise ConfigurationError(f"REDIS_URL: malformed URL {_redact(url)!r} ({exc})") from exc
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"REDIS_URL: unsupported scheme {parts.scheme!r} in {_redact(url)!r}; "
            "use redis://, rediss:// or unix://"
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigurationError(f"REDIS_URL: {_redact(url)!r} has no socket path")
        return
    if not parts.hostname:
        raise ConfigurationError(f"REDIS_URL: {_redact(url)!r} has no host")
    if port == 0:
        raise ConfigurationError(f"REDIS_URL: port 0 in {_redact(url)!r}")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ConfigurationError(f"REDIS_URL: database {db!r} in {_redact(url)!r} is not a number")


def _redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc[2]}").geturl()
