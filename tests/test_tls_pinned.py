"""TLS through the pinned (guarded) transport, against a real HTTPS server on loopback.

The guarded transport resolves the host, checks the address and connects to
that address itself; TLS must still be verified against the URL's host name
(SNI and certificate), not against the address.  The certificates come from a
test CA made here with ``cryptography``; ``fedi.test`` resolves to 127.0.0.1
through a patched resolver, and 127.0.0.1 stands in for a public address.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from _http_server import Reply, ScriptedServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from botkit_tasks.federation import net
from botkit_tasks.federation.delivery import Outcome, deliver_once
from botkit_tasks.federation.keys import generate_private_key
from botkit_tasks.federation.net import Fetcher, FetchError, guarded_transport

KEY_ID = "https://bot.example/users/bot#main-key"
BODY = json.dumps({"id": "https://bot.example/activities/1", "type": "Create"}).encode()


@dataclass(frozen=True)
class Authority:
    """A test certificate authority: its certificate and its key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, host: str, directory: Path) -> tuple[Path, Path]:
        """A server certificate for ``host`` (DNS name only, no IP): (cert file, key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
        cert = (
            _builder(subject, self.cert.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        stem = directory / f"{host}-{cert.serial_number}"
        cert_file, key_file = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )


@pytest.fixture(scope="module")
def trusted() -> Authority:
    return Authority.create("botkit test CA")


@pytest.fixture(scope="module")
def rogue() -> Authority:
    return Authority.create("rogue CA")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Authority, str], tuple[ScriptedServer, list[str]]]]:
    """Start an HTTPS server with a certificate for a host from an authority.

    Returns the server and the SNI names it received.
    """
    servers: list[ScriptedServer] = []

    def start(authority: Authority, host: str) -> tuple[ScriptedServer, list[str]]:
        cert_file, key_file = authority.issue(host, tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        names: list[str] = []
        context.sni_callback = lambda sock, name, ctx: names.append(name or "")
        server = ScriptedServer(tls=context)
        server.script("/inbox", Reply(202))
        server.script("/users/alice", Reply(200, body=b'{"id": "alice"}'))
        servers.append(server)
        return server, names

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names looked up; every ``*.test`` name resolves to 127.0.0.1, here a "public" address."""
    real_getaddrinfo = socket.getaddrinfo
    real_check = net.check_address
    names: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        names.append(str(host))
        if str(host).endswith(".test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    def check_address(address: str) -> None:
        if address != "127.0.0.1":
            real_check(address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(net, "check_address", check_address)
    return names


def client_trusting(authority: Authority) -> httpx.Client:
    context = ssl.create_default_context(cadata=authority.pem())
    return httpx.Client(
        transport=guarded_transport(allow_private_addresses=False, ssl_context=context),
        follow_redirects=False,
        trust_env=False,
        timeout=5.0,
    )


def deliver(url: str, client: httpx.Client) -> Any:
    return deliver_once(url, BODY, key_id=KEY_ID, private_key=generate_private_key(), client=client)


def wait_for_tls_failure(server: ScriptedServer) -> None:
    deadline = time.monotonic() + 5
    while server.tls_failures == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.tls_failures >= 1, "the server saw no failed handshake"


def test_https_delivery_verifies_the_host_name_at_the_pinned_address(
    trusted: Authority, serve: Any, lookups: list[str]
) -> None:
    # Given an HTTPS inbox whose certificate names fedi.test only (no IP address)
    server, sni = serve(trusted, "fedi.test")
    url = f"https://fedi.test:{server.port}/inbox"
    # When we deliver to it through the guarded transport
    with client_trusting(trusted) as client:
        result = deliver(url, client)
    # Then it is delivered, TLS having been checked against fedi.test
    assert result.outcome is Outcome.DELIVERED, result.reason
    (request,) = server.requests("/inbox")
    assert request.body == BODY
    assert request.headers["Host"] == f"fedi.test:{server.port}"
    assert sni == ["fedi.test"]
    # and the socket went to the checked address: the name was resolved by the
    # check and by the transport, never by the socket layer behind it
    assert lookups.count("fedi.test") == 2
    assert "127.0.0.1" in lookups


def test_wrong_host_name_fails_retryable_and_sends_nothing(
    trusted: Authority, serve: Any, lookups: list[str]
) -> None:
    # Given a trusted certificate for fedi.test, served for other.test
    server, sni = serve(trusted, "fedi.test")
    with client_trusting(trusted) as client:
        result = deliver(f"https://other.test:{server.port}/inbox", client)
    # Then the delivery is retryable and no request reached the server
    assert result.outcome is Outcome.RETRY
    assert "CERTIFICATE_VERIFY_FAILED" in result.reason
    assert "other.test" in result.reason
    wait_for_tls_failure(server)
    assert server.requests() == []
    assert sni == ["other.test"]


def test_untrusted_authority_fails_retryable_and_sends_nothing(
    trusted: Authority, rogue: Authority, serve: Any, lookups: list[str]
) -> None:
    # Given a certificate for the right name, from an authority we do not trust
    server, _ = serve(rogue, "fedi.test")
    with client_trusting(trusted) as client:
        result = deliver(f"https://fedi.test:{server.port}/inbox", client)
    assert result.outcome is Outcome.RETRY
    assert "CERTIFICATE_VERIFY_FAILED" in result.reason
    wait_for_tls_failure(server)
    assert server.requests() == []


def test_default_context_does_not_trust_the_test_authority(
    trusted: Authority, serve: Any, lookups: list[str]
) -> None:
    # Given the transport's default trust store (the test CA is not in it)
    server, _ = serve(trusted, "fedi.test")
    transport = guarded_transport(allow_private_addresses=False)
    with httpx.Client(transport=transport, trust_env=False, timeout=5.0) as client:
        result = deliver(f"https://fedi.test:{server.port}/inbox", client)
    assert result.outcome is Outcome.RETRY
    assert "CERTIFICATE_VERIFY_FAILED" in result.reason
    assert server.requests() == []


def test_signed_fetches_verify_tls_the_same_way(
    trusted: Authority, rogue: Authority, serve: Any, lookups: list[str]
) -> None:
    good, _ = serve(trusted, "fedi.test")
    bad, _ = serve(rogue, "fedi.test")
    key = generate_private_key()
    with client_trusting(trusted) as client:
        fetcher = Fetcher(key_id=KEY_ID, private_key_provider=lambda: key, client=client)
        assert fetcher.get_json(f"https://fedi.test:{good.port}/users/alice") == {"id": "alice"}
        with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
            fetcher.get_json(f"https://fedi.test:{bad.port}/users/alice")
    assert bad.requests() == []
