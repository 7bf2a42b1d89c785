"""Outgoing HTTP: SSRF checks, the signed fetcher, and key fetches over real sockets.

Only loopback traffic is ever sent: non-loopback addresses appear as literals
that are classified without connecting, or behind ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _http_server import Reply, ScriptedServer, closed_port
from cryptography.hazmat.primitives.asymmetric import rsa

from botkit_tasks.federation import net
from botkit_tasks.federation.keys import (
    KeyResolver,
    generate_private_key,
    public_key_pem,
    verify_incoming,
)
from botkit_tasks.federation.net import (
    Fetcher,
    FetchError,
    UnsafeDestinationError,
    check_address,
    check_destination,
    guarded_transport,
)
from botkit_tasks.federation.signatures import sign_request, verify_request
from botkit_tasks.kv import MemoryKvStore

BOT_KEY_ID = "https://bot.example/users/bot#main-key"
JSON_HEADERS = {"Content-Type": "application/activity+json"}


@pytest.fixture(scope="module")
def bot_key() -> rsa.RSAPrivateKey:
    return generate_private_key()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as srv:
        yield srv


def fetcher(bot_key: rsa.RSAPrivateKey, **kwargs: Any) -> Fetcher:
    kwargs.setdefault("allow_private_addresses", True)
    return Fetcher(key_id=BOT_KEY_ID, private_key_provider=lambda: bot_key, **kwargs)


def json_reply(document: Any) -> Reply:
    return Reply(200, headers=JSON_HEADERS, body=json.dumps(document).encode())


# ---------------------------------------------------------------- SSRF checks


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "not-an-address",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(UnsafeDestinationError):
        check_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_accepted(address: str) -> None:
    check_address(address)  # does not raise


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/inbox",
        "https://10.0.0.7:8443/inbox",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/inbox",
        "https://[::ffff:127.0.0.1]/inbox",
        "https://localhost/inbox",
        "https://2130706433/inbox",  # 127.0.0.1 in decimal
    ],
)
def test_private_destinations_are_refused_by_default(url: str) -> None:
    with pytest.raises(UnsafeDestinationError, match="not a public address"):
        check_destination(url, allow_private_addresses=False)
    # With permission they pass (https and http alike)
    check_destination(url, allow_private_addresses=True)
    check_destination(url.replace("https:", "http:"), allow_private_addresses=True)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://8.8.8.8/inbox", False),
        ("ftp://8.8.8.8/inbox", True),
        ("file:///etc/passwd", True),
        ("https:///inbox", True),
        ("https://[::1/inbox", True),
        ("/relative/inbox", True),
    ],
)
def test_bad_schemes_and_urls_are_refused(url: str, allowed: bool) -> None:
    with pytest.raises(UnsafeDestinationError):
        check_destination(url, allow_private_addresses=allowed)


def test_public_literal_passes() -> None:
    check_destination("https://8.8.8.8/inbox", allow_private_addresses=False)


def test_any_private_address_among_several_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a host name resolving to a public and a private address
    def fake_getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        assert host == "mixed.example"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:10.0.0.1", port, 0, 0)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(UnsafeDestinationError, match=r"10\.0\.0\.1"):
        check_destination("https://mixed.example/inbox", allow_private_addresses=False)


def test_unresolvable_host_is_a_fetch_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(FetchError, match="cannot resolve"):
        check_destination("https://nowhere.example/inbox", allow_private_addresses=False)


def test_guarded_transport_refuses_at_connect_time(server: ScriptedServer) -> None:
    # Given a client that skips check_destination but uses the guarded transport
    server.script("/x", Reply(200))
    guarded = httpx.Client(transport=guarded_transport(allow_private_addresses=False))
    with guarded, pytest.raises(UnsafeDestinationError, match=r"127\.0\.0\.1"):
        guarded.get(server.url("/x"))
    # Then nothing reached the server
    assert server.requests() == []


def test_dns_rebinding_is_caught_at_connect_time(
    bot_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a name that resolves to a public address for the check, then to loopback
    answers = iter(["8.8.8.8", "127.0.0.1"])

    def rebinding(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    f = fetcher(bot_key, allow_private_addresses=False)
    with f, pytest.raises(UnsafeDestinationError, match=r"127\.0\.0\.1"):
        f.get_json("https://rebind.example/users/alice")


# ------------------------------------------------------------------- fetching


def test_get_json_sends_a_signed_get(bot_key: rsa.RSAPrivateKey, server: ScriptedServer) -> None:
    server.script("/users/alice?x=1", json_reply({"id": "alice"}))
    with fetcher(bot_key, user_agent="test-agent/1") as f:
        assert f.get_json(server.url("/users/alice?x=1")) == {"id": "alice"}

    (request,) = server.requests()
    headers = request.header_dict()
    assert request.method == "GET"
    assert headers["Accept"].startswith("application/activity+json")
    assert headers["User-Agent"] == "test-agent/1"
    assert headers["Host"] == f"127.0.0.1:{server.port}"
    result = verify_request(
        "GET", server.url(request.path), headers, b"", public_key=bot_key.public_key()
    )
    assert (result.key_id, result.scheme) == (BOT_KEY_ID, "draft-cavage")
    assert result.components == ("(request-target)", "host", "date", "accept")


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply(404), "HTTP 404"),
        (Reply(500), "HTTP 500"),
        (Reply(200, body=b"<html>"), "did not answer JSON"),
        (Reply(200, body=b"[1, 2]"), "not an object"),
        (Reply(200, body=b"[" * 100000), "did not answer JSON"),
        (Reply(200, body_size=(1 << 20) + 1), "1048577 bytes"),
    ],
)
def test_get_json_errors(
    bot_key: rsa.RSAPrivateKey, server: ScriptedServer, reply: Reply, message: str
) -> None:
    server.script("/doc", reply)
    with fetcher(bot_key) as f, pytest.raises(FetchError, match=message) as info:
        f.get_json(server.url("/doc"))
    assert info.value.status_code == (reply.status if reply.status != 200 else None)


def test_body_cap_applies_without_content_length(bot_key: rsa.RSAPrivateKey) -> None:
    # Given a server streaming an endless chunked body
    def endless() -> Iterator[bytes]:
        while True:
            yield b" " * 65536

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=endless()))
    with httpx.Client(transport=transport) as client:
        f = fetcher(bot_key, allow_private_addresses=False, client=client)
        with pytest.raises(FetchError, match="exceeds 1048576 bytes"):
            f.get_json("https://8.8.8.8/users/alice")


def test_redirects_are_followed_and_rechecked(
    bot_key: rsa.RSAPrivateKey, server: ScriptedServer
) -> None:
    server.script("/old", Reply(301, headers={"Location": "/new"}))
    server.script("/new", json_reply({"id": "new"}))
    server.script("/loop", Reply(302, headers={"Location": "/loop"}))
    server.script("/ftp", Reply(302, headers={"Location": "ftp://127.0.0.1/x"}))
    with fetcher(bot_key) as f:
        assert f.get_json(server.url("/old")) == {"id": "new"}
        with pytest.raises(FetchError, match="more than 3 redirects"):
            f.get_json(server.url("/loop"))
        with pytest.raises(UnsafeDestinationError, match="scheme"):
            f.get_json(server.url("/ftp"))
    assert len(server.requests("/loop")) == 4
    # Each hop is signed for its own URL
    (hop,) = server.requests("/new")
    assert verify_request(
        "GET", server.url("/new"), hop.header_dict(), b"", public_key=bot_key.public_key()
    )


def test_redirect_to_a_private_address_is_refused(bot_key: rsa.RSAPrivateKey) -> None:
    # Given a public server redirecting to the cloud metadata endpoint
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": "https://169.254.169.254/latest"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        f = fetcher(bot_key, allow_private_addresses=False, client=client)
        with pytest.raises(UnsafeDestinationError, match=r"169\.254\.169\.254"):
            f.get_json("https://8.8.8.8/users/alice")
    # Then the redirect was not followed
    assert seen == ["https://8.8.8.8/users/alice"]


def test_timeouts_and_refused_connections_are_fetch_errors(
    bot_key: rsa.RSAPrivateKey, server: ScriptedServer
) -> None:
    server.script("/slow", Reply(200, delay=5.0))
    with httpx.Client(timeout=0.3) as client:
        f = fetcher(bot_key, client=client)
        with pytest.raises(FetchError, match="timed out"):
            f.get_json(server.url("/slow"))
    with fetcher(bot_key) as f, pytest.raises(FetchError, match="failed"):
        f.get_json(f"http://127.0.0.1:{closed_port()}/users/alice")


def test_default_client_has_mastodons_timeouts(bot_key: rsa.RSAPrivateKey) -> None:
    f = fetcher(bot_key)
    timeout = f.client.timeout
    assert (timeout.connect, timeout.read) == (net.CONNECT_TIMEOUT, net.READ_TIMEOUT)
    assert (net.CONNECT_TIMEOUT, net.READ_TIMEOUT, net.TOTAL_TIMEOUT) == (5.0, 10.0, 30.0)
    assert net.MAX_RESPONSE_BYTES == 1 << 20
    f.close()
    f.close()  # idempotent


# ------------------------------------------- key fetching over a real socket


def test_keys_are_fetched_signed_and_rotation_is_picked_up(
    bot_key: rsa.RSAPrivateKey, server: ScriptedServer
) -> None:
    # Given a remote actor served on loopback
    actor_id = server.url("/users/alice")
    key_id = f"{actor_id}#main-key"
    old_key, new_key = generate_private_key(), generate_private_key()

    def document(key: rsa.RSAPrivateKey) -> Reply:
        return json_reply(
            {
                "id": actor_id,
                "type": "Person",
                "publicKey": {"id": key_id, "owner": actor_id, "publicKeyPem": public_key_pem(key)},
            }
        )

    server.script("/users/alice", document(old_key))
    with fetcher(bot_key) as f:
        resolver = KeyResolver(MemoryKvStore(), f, min_refresh_interval=0)
        inbox = "https://bot.example/users/bot/inbox"

        def deliver(key: rsa.RSAPrivateKey) -> str:
            headers = sign_request(
                "POST", inbox, JSON_HEADERS, b"{}", private_key=key, key_id=key_id
            )
            _, remote = verify_incoming("POST", inbox, headers, b"{}", resolver)
            return remote.owner

        # When it signs with its key, then rotates to a new one
        assert deliver(old_key) == actor_id
        assert deliver(old_key) == actor_id
        server.script("/users/alice", document(new_key))
        assert deliver(new_key) == actor_id

    # Then the key was fetched once, then once more after the rotation, with signed GETs
    fetches = server.requests("/users/alice")
    assert len(fetches) == 2
    for fetch in fetches:
        assert verify_request(
            "GET", actor_id, fetch.header_dict(), b"", public_key=bot_key.public_key()
        )


def test_key_fetch_refused_without_permission(
    bot_key: rsa.RSAPrivateKey, server: ScriptedServer
) -> None:
    server.script("/users/alice", Reply(200))
    with fetcher(bot_key, allow_private_addresses=False) as f:
        resolver = KeyResolver(MemoryKvStore(), f)
        assert resolver.resolve(server.url("/users/alice") + "#main-key") is None
    assert server.requests() == []


def test_total_deadline_bounds_a_trickling_body(bot_key: rsa.RSAPrivateKey) -> None:
    # Given a server that sends a small chunk every 0.1 s, never finishing
    def trickle() -> Iterator[bytes]:
        while True:
            time.sleep(0.1)
            yield b" "

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=trickle()))
    with httpx.Client(transport=transport) as client:
        f = fetcher(bot_key, allow_private_addresses=False, client=client, total_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(FetchError, match="total time limit"):
            f.get_json("https://8.8.8.8/users/alice")
    # Then the fetch gave up near the deadline, not at the per-read timeout
    assert time.monotonic() - started < 2.0
