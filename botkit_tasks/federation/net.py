"""Outgoing HTTP for federation: SSRF checks and signed, bounded JSON fetches.

Remote servers choose the URLs we fetch (actor ids, key ids, inboxes), so every
destination is checked: ``https`` only, and every address the host resolves
to must be a public one.  :func:`guarded_transport` re-checks at connect time
and connects to the very address it checked, so a DNS answer that changes
between the check and the connection (DNS rebinding) cannot reach a private
address either.  ``allow_private_addresses=True`` (tests and loopback demos)
also permits ``http``.

:class:`Fetcher` performs signed GETs (draft-cavage, as Mastodon's
authorized-fetch mode requires) with Mastodon's limits: connect 5 s, read 10 s,
30 s in total, at most 1 MiB of body, at most 3 redirects, each re-checked.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from .._version import __version__
from ..errors import BotkitError
from .addresses import UnsafeDestinationError, check_address, check_host_spelling
from .signatures import SignatureError, sign_request

__all__ = [
    "ACTIVITY_ACCEPT",
    "CONNECT_TIMEOUT",
    "DEFAULT_USER_AGENT",
    "MAX_REDIRECTS",
    "MAX_RESPONSE_BYTES",
    "READ_TIMEOUT",
    "TOTAL_TIMEOUT",
    "FetchError",
    "Fetcher",
    "UnsafeDestinationError",
    "check_address",
    "check_destination",
    "guarded_transport",
]

#: Seconds to establish a TCP (and TLS) connection.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for each read (and write) on the socket.
READ_TIMEOUT = 10.0
#: Seconds a whole fetch may take, redirects and body included.
TOTAL_TIMEOUT = 30.0
#: Largest response body read, in bytes (1 MiB).
MAX_RESPONSE_BYTES = 1 << 20
#: Redirects followed by :meth:`Fetcher.get_json` (Mastodon follows 3).
MAX_REDIRECTS = 3
#: The Accept header of ActivityPub fetches (the two media types the spec names).
ACTIVITY_ACCEPT = 'application/activity+json, application/ld+json; profile="https://www.w3.org/ns/activitystreams"'
#: The User-Agent of fetches.
DEFAULT_USER_AGENT = f"botkit-tasks/{__version__}"

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class FetchError(BotkitError):
    """A fetch failed: network error, timeout, HTTP error status, oversized or non-JSON body.

    Attributes:
        url: The URL that failed.
        status_code: The HTTP status when the server answered, else ``None``.
    """

    def __init__(self, message: str, *, url: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status_code = status_code


# ---------------------------------------------------------------- SSRF checks


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise FetchError(f"cannot resolve {host!r}: {exc}", url=host) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise FetchError(f"{host!r} has no address", url=host)
    return addresses


def _checked_addresses(host: str, port: int) -> list[str]:
    check_host_spelling(host)
    addresses = _resolve(host, port)
    # Refuse if ANY address is private: a client may pick any of them.
    for address in addresses:
        try:
            check_address(address)
        except UnsafeDestinationError as exc:
            raise UnsafeDestinationError(f"{host!r} resolves to {address}: {exc}") from None
    return addresses


def check_destination(url: str, *, allow_private_addresses: bool) -> None:
    """Refuse a URL we must not send requests to.

    Args:
        url: The URL about to be fetched or posted to.
        allow_private_addresses: Permit ``http://`` and any address (tests, demos).

    Raises:
        UnsafeDestinationError: Not an absolute ``https`` URL (``http`` too when
            allowed), or, unless allowed, a host that resolves to any
            non-public address.
        FetchError: The host name does not resolve (a network error, retryable).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise UnsafeDestinationError(f"invalid URL {url!r}: {exc}") from exc
    schemes = ("https", "http") if allow_private_addresses else ("https",)
    if parts.scheme not in schemes:
        raise UnsafeDestinationError(
            f"refusing {url!r}: the scheme must be {' or '.join(schemes)}"
            + ("" if allow_private_addresses else " (http needs allow_private_addresses)")
        )
    if not host:
        raise UnsafeDestinationError(f"refusing {url!r}: no host")
    if allow_private_addresses:
        return
    try:
        _checked_addresses(host, port or 443)
    except UnsafeDestinationError as exc:
        raise UnsafeDestinationError(f"refusing {url!r}: {exc}") from None


class _GuardedBackend(httpcore.NetworkBackend):
    """Resolves, checks and connects to the checked address (no DNS rebinding window)."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        last: Exception | None = None
        for address in _checked_addresses(host, port):
            try:
                # TLS still verifies the certificate against the URL's host name:
                # httpcore passes the origin's host as server_hostname.
                return self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise UnsafeDestinationError("Unix sockets are not federation destinations")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def guarded_transport(
    *, allow_private_addresses: bool, ssl_context: ssl.SSLContext | None = None
) -> httpx.HTTPTransport:
    """An httpx transport that refuses non-public addresses at connect time.

    With ``allow_private_addresses=True`` it is a plain ``httpx.HTTPTransport``.
    Use it for every client that talks to remote servers::

        httpx.Client(transport=guarded_transport(allow_private_addresses=False))

    Connections to a refused address raise :class:`UnsafeDestinationError`
    (not an ``httpx`` error).  Proxies from the environment are not used by
    such a client (the check would otherwise apply to the proxy).

    TLS is verified against the URL's host name (SNI and certificate) although
    the socket goes to the address that was checked.

    Args:
        allow_private_addresses: Permit any address (tests, loopback demos).
        ssl_context: How servers are verified (e.g. a private CA); default:
            httpx's (the ``certifi`` roots).  A failed verification is an
            ``httpx.ConnectError``, sent before any byte of the request.
    """
    context = ssl_context if ssl_context is not None else httpx.create_ssl_context()
    transport = httpx.HTTPTransport(retries=0, verify=context)
    if not allow_private_addresses:
        # httpx has no public hook for the network backend, so the pool is
        # rebuilt with the same TLS context and the guarded backend.
        transport._pool = httpcore.ConnectionPool(
            ssl_context=context,
            network_backend=_GuardedBackend(),
        )
    return transport


# ------------------------------------------------------------------- fetching


def _read_capped(response: httpx.Response, limit: int, deadline: float, url: str) -> bytes:
    # iter_bytes() yields decoded bytes, so the cap also bounds what a small
    # gzip body inflates to.
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise FetchError(f"{url!r}: the response is {declared} bytes (limit {limit})", url=url)
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise FetchError(f"{url!r}: the response exceeds {limit} bytes", url=url)
        if time.monotonic() > deadline:
            raise FetchError(f"{url!r}: the fetch exceeded its total time limit", url=url)
        chunks.append(chunk)
    return b"".join(chunks)


class Fetcher:
    """Fetches ActivityPub documents with signed GETs.

    Args:
        key_id: Our key id (``{actor}#main-key``), named in the signatures.
        private_key_provider: Returns our private key (called per request, so
            the key is loaded lazily).
        allow_private_addresses: Permit ``http`` and non-public addresses.
        user_agent: The ``User-Agent`` header.
        client: An ``httpx.Client`` to use (not closed by :meth:`close`); when
            omitted one is created with the timeouts above and
            :func:`guarded_transport`.
        max_redirects: Redirects followed, each destination re-checked.
        max_bytes: Largest response body accepted, in bytes.
        total_timeout: Seconds a whole fetch may take.
    """

    def __init__(
        self,
        *,
        key_id: str,
        private_key_provider: Callable[[], RSAPrivateKey],
        allow_private_addresses: bool = False,
        user_agent: str = DEFAULT_USER_AGENT,
        client: httpx.Client | None = None,
        max_redirects: int = MAX_REDIRECTS,
        max_bytes: int = MAX_RESPONSE_BYTES,
        total_timeout: float = TOTAL_TIMEOUT,
    ) -> None:
        self.key_id = key_id
        self.private_key_provider = private_key_provider
        self.allow_private_addresses = allow_private_addresses
        self.user_agent = user_agent
        self.max_redirects = max_redirects
        self.max_bytes = max_bytes
        self.total_timeout = total_timeout
        self._owns_client = client is None
        self._client = client
        # Worker threads share one fetcher: without the lock, racing first
        # fetches would each build a client and leak all but one.
        self._client_lock = threading.Lock()

    @property
    def client(self) -> httpx.Client:
        """The HTTP client (created on first use when none was given)."""
        with self._client_lock:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def _new_client(self) -> httpx.Client:
        return httpx.Client(
            transport=guarded_transport(allow_private_addresses=self.allow_private_addresses),
            timeout=httpx.Timeout(
                connect=CONNECT_TIMEOUT,
                read=READ_TIMEOUT,
                write=READ_TIMEOUT,
                pool=CONNECT_TIMEOUT,
            ),
            follow_redirects=False,
            trust_env=False,
        )

    def close(self) -> None:
        """Close the client if this fetcher created it; idempotent."""
        with self._client_lock:
            if self._owns_client and self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def get_json(self, url: str) -> dict[str, Any]:
        """GET ``url`` (signed) and return its JSON object.

        Raises:
            UnsafeDestinationError: ``url`` or a redirect target is refused.
            FetchError: Network error, timeout, non-2xx status (``status_code``
                set), too many redirects, body over ``max_bytes``, not a JSON object.
        """
        deadline = time.monotonic() + self.total_timeout
        current = url
        for _ in range(self.max_redirects + 1):
            if time.monotonic() > deadline:
                raise FetchError(
                    f"{url!r}: the fetch took longer than {self.total_timeout} s", url=url
                )
            check_destination(current, allow_private_addresses=self.allow_private_addresses)
            try:
                headers = sign_request(
                    "GET",
                    current,
                    {"Accept": ACTIVITY_ACCEPT, "User-Agent": self.user_agent},
                    None,
                    private_key=self.private_key_provider(),
                    key_id=self.key_id,
                )
            except SignatureError as exc:
                raise FetchError(
                    f"cannot sign a request to {current!r}: {exc}", url=current
                ) from exc
            try:
                with self.client.stream(
                    "GET", current, headers=headers, follow_redirects=False
                ) as response:
                    location = response.headers.get("location")
                    if response.status_code in _REDIRECT_STATUSES and location:
                        # Never followed blindly: the loop re-checks the target.
                        current = urljoin(current, location)
                        continue
                    if not 200 <= response.status_code < 300:
                        raise FetchError(
                            f"{current!r} answered HTTP {response.status_code}",
                            url=current,
                            status_code=response.status_code,
                        )
                    body = _read_capped(response, self.max_bytes, deadline, current)
            except httpx.TimeoutException as exc:
                raise FetchError(
                    f"{current!r} timed out ({type(exc).__name__})", url=current
                ) from exc
            except httpx.HTTPError as exc:
                raise FetchError(f"{current!r} failed: {exc}", url=current) from exc
            return _parse_object(body, current)
        raise FetchError(f"{url!r}: more than {self.max_redirects} redirects", url=url)


def _parse_object(body: bytes, url: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise FetchError(f"{url!r} did not answer JSON: {exc}", url=url) from exc
    if not isinstance(document, dict):
        raise FetchError(f"{url!r} answered JSON that is not an object", url=url)
    return document
