"""SSRF: addresses that wrap another address, and IPv4 literals in unusual spellings.

Each form is tried against the connect-time check (the guarded transport), both
as a URL literal and as a DNS answer, and against ``check_destination``.
Nothing leaves the machine: the socket connect underneath the guard is replaced
by one that records the address it was asked for and refuses.
"""

from __future__ import annotations

import socket
from typing import Any

import httpcore
import httpx
import pytest

from botkit_tasks.federation.net import (
    UnsafeDestinationError,
    check_address,
    check_destination,
    guarded_transport,
)

# (address, the address it wraps) — every one must be refused.
WRAPPED_PRIVATE = [
    ("::ffff:10.0.0.1", "10.0.0.1"),  # IPv4-mapped
    ("::ffff:127.0.0.1", "127.0.0.1"),
    ("::ffff:169.254.169.254", "169.254.169.254"),
    ("64:ff9b::10.0.0.1", "10.0.0.1"),  # NAT64 well-known prefix
    ("64:ff9b::7f00:1", "127.0.0.1"),
    ("64:ff9b::169.254.169.254", "169.254.169.254"),
    ("64:ff9b:1::a00:1", "64:ff9b:1::"),  # NAT64 local-use prefix: refused whole
    ("64:ff9b:1:ffff::808:808", "64:ff9b:1::"),
    ("2002:a00:1::1", "10.0.0.1"),  # 6to4
    ("2002:7f00:1::", "127.0.0.1"),
    ("2002:a9fe:a9fe::1", "169.254.169.254"),
    ("2002:c0a8:101:1::1", "192.168.1.1"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "10.0.0.1"),  # Teredo (client 10.0.0.1)
    ("2001:0:808:808:0:0:f7f7:f7f7", "8.8.8.8"),  # Teredo: refused whole
    ("::10.0.0.1", "10.0.0.1"),  # IPv4-compatible (deprecated)
    ("::ffff:0:10.0.0.1", "10.0.0.1"),  # IPv4-translated (SIIT)
    ("fec0::1", "fec0::"),  # site-local (deprecated, still routed inside sites)
    ("3fff::1", "3fff::"),  # documentation (RFC 9637)
]

# Forms whose wrapped address is public: a DNS64 resolver hands out NAT64
# addresses for every IPv4-only server, so refusing them would cut an
# IPv6-only instance off most of the fediverse.
WRAPPED_PUBLIC = ["64:ff9b::808:808", "64:ff9b::1.1.1.1", "2002:808:808::1"]

# IPv4 literals the URL parser and the resolver read as numbers
# (decimal, octal, hex, short forms): (host, the address it means).
NUMERIC_PRIVATE = [
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0x7F000001", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("0x7f.0.0.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("10.1", "10.0.0.1"),
    ("0xa.0.0.1", "10.0.0.1"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),
    ("0", "0.0.0.0"),
]

# Public addresses in the same spellings are refused too: resolvers disagree
# about them, and no ActivityPub server is named that way.
NUMERIC_PUBLIC = [
    ("134744072", "8.8.8.8"),
    ("0x08080808", "8.8.8.8"),
    ("0x8.0x8.0x8.0x8", "8.8.8.8"),
    ("010.010.010.010", "8.8.8.8"),
    ("8.8.2056", "8.8.8.8"),
    ("8.8.8.8.", "8.8.8.8"),
]


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The addresses the guarded transport tried to open a socket to."""
    attempts: list[str] = []

    def refuse(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        attempts.append(host)
        raise httpcore.ConnectError(f"test: no network ({host})")

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", refuse)
    return attempts


def resolve_to(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """Make every name resolve to ``address`` (a DNS answer chosen by the remote)."""

    def answer(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if ":" in address:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", answer)


def guarded_get(url: str) -> None:
    with httpx.Client(transport=guarded_transport(allow_private_addresses=False)) as client:
        client.get(url)


# ------------------------------------------------------ addresses wrapping others


@pytest.mark.parametrize(("address", "wrapped"), WRAPPED_PRIVATE)
def test_wrapped_private_address_is_refused(address: str, wrapped: str) -> None:
    with pytest.raises(UnsafeDestinationError, match="not a public address") as info:
        check_address(address)
    # The error names what the address stands for
    assert wrapped in str(info.value)


@pytest.mark.parametrize(("address", "wrapped"), WRAPPED_PRIVATE)
def test_wrapped_private_literal_is_refused_at_connect_time(
    address: str, wrapped: str, connects: list[str]
) -> None:
    # Given a URL naming the address literally, sent without check_destination
    with pytest.raises(UnsafeDestinationError, match="not a public address") as info:
        guarded_get(f"https://[{address}]:8443/inbox")
    # Then no socket was opened
    assert connects == []
    assert wrapped in str(info.value)


@pytest.mark.parametrize(("address", "wrapped"), WRAPPED_PRIVATE)
def test_wrapped_private_dns_answer_is_refused_at_connect_time(
    address: str, wrapped: str, connects: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a host name whose DNS answer is the wrapping address
    resolve_to(monkeypatch, address)
    with pytest.raises(UnsafeDestinationError, match="not a public address") as info:
        guarded_get("https://wrapped.example/inbox")
    assert connects == []
    assert wrapped in str(info.value)
    # and check_destination refuses it the same way
    with pytest.raises(UnsafeDestinationError, match="not a public address"):
        check_destination("https://wrapped.example/inbox", allow_private_addresses=False)


@pytest.mark.parametrize("address", WRAPPED_PUBLIC)
def test_wrapped_public_address_is_connected_to(
    address: str, connects: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a DNS64 answer (or a 6to4 address) wrapping a public IPv4 address
    check_address(address)
    resolve_to(monkeypatch, address)
    check_destination("https://dns64.example/inbox", allow_private_addresses=False)
    # When the guarded transport connects, it goes to that very address
    with pytest.raises(httpx.ConnectError, match="no network"):
        guarded_get("https://dns64.example/inbox")
    assert connects == [address]


# ------------------------------------------------------ numeric IPv4 spellings


# httpx itself rejects four dotted parts with leading zeros (before any connect).
HTTPX_REFUSES = {"0177.0.0.1", "010.010.010.010"}


@pytest.mark.parametrize(("host", "meaning"), NUMERIC_PRIVATE + NUMERIC_PUBLIC)
def test_numeric_ipv4_spelling_is_refused_at_connect_time(
    host: str, meaning: str, connects: list[str]
) -> None:
    expected = httpx.InvalidURL if host in HTTPX_REFUSES else UnsafeDestinationError
    with pytest.raises(expected) as info:
        guarded_get(f"https://{host}/inbox")
    assert connects == []
    # The error says which address the spelling stands for
    assert expected is httpx.InvalidURL or meaning in str(info.value)


@pytest.mark.parametrize(("host", "meaning"), NUMERIC_PRIVATE)
def test_numeric_private_spelling_is_refused_as_private(host: str, meaning: str) -> None:
    with pytest.raises(UnsafeDestinationError, match="not a public address") as info:
        check_destination(f"https://{host}/inbox", allow_private_addresses=False)
    assert meaning in str(info.value)


@pytest.mark.parametrize(("host", "meaning"), NUMERIC_PUBLIC)
def test_numeric_public_spelling_is_refused_as_ambiguous(host: str, meaning: str) -> None:
    with pytest.raises(UnsafeDestinationError, match=f"write it as {meaning}"):
        check_destination(f"https://{host}/inbox", allow_private_addresses=False)


@pytest.mark.parametrize(
    "host", ["8.8.8.8", "1.1.1.1", "8-8-8-8.example", "0x.example", "1.example"]
)
def test_canonical_addresses_and_names_pass(
    host: str, connects: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given names that only look numeric, resolving to a public address
    resolve_to(monkeypatch, "8.8.8.8")
    check_destination(f"https://{host}/inbox", allow_private_addresses=False)
    with pytest.raises(httpx.ConnectError, match="no network"):
        guarded_get(f"https://{host}/inbox")
    assert connects == ["8.8.8.8"]
