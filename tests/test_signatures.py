"""HTTP Signatures: exact signing strings, digests, time windows and tampering.

The expected signing strings are written out by hand from the specifications
(draft-cavage-12 §2.3 as Mastodon fills it in, RFC 9421 §2.5) and checked
with ``cryptography`` directly, so these tests do not only show that the
signer agrees with its own verifier.
"""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from botkit_tasks.errors import BotkitError
from botkit_tasks.federation.signatures import (
    SignatureError,
    VerifiedSignature,
    precheck_request,
    sign_request,
    signature_key_id,
    verify_request,
)

NOW = 1795000000.0
DATE = "Wed, 18 Nov 2026 11:06:40 GMT"
KEY_ID = "https://bot.example/users/bot#main-key"
INBOX = "https://remote.example/users/alice/inbox"
BODY = b'{"type":"Follow","actor":"https://bot.example/users/bot"}'
EMPTY_SHA256 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
CT = {"Content-Type": "application/activity+json"}
ACCEPT = {"Accept": "application/activity+json"}


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64sha256(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


def rsa_sign(key: rsa.RSAPrivateKey, text: str) -> str:
    return base64.b64encode(key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


def rsa_verifies(key: rsa.RSAPrivateKey, signature_b64: str, text: str) -> bool:
    try:
        key.public_key().verify(
            base64.b64decode(signature_b64), text.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
    except Exception:
        return False
    return True


def cavage_params(header: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def signed(
    key: rsa.RSAPrivateKey,
    scheme: str = "draft-cavage",
    *,
    method: str = "POST",
    url: str = INBOX,
    body: bytes | None = BODY,
    headers: dict[str, str] | None = None,
    now: float = NOW,
) -> dict[str, str]:
    return sign_request(
        method,
        url,
        CT if headers is None else headers,
        body,
        private_key=key,
        key_id=KEY_ID,
        scheme=scheme,  # type: ignore[arg-type]
        now=now,
    )


def verify(
    key: rsa.RSAPrivateKey,
    headers: dict[str, str],
    *,
    method: str = "POST",
    url: str = INBOX,
    body: bytes | None = BODY,
    now: float = NOW,
    max_skew: float = 3600.0,
) -> VerifiedSignature:
    return verify_request(
        method, url, headers, body, public_key=key.public_key(), now=now, max_skew=max_skew
    )


# ------------------------------------------------------------- signing strings


def test_cavage_post_signs_mastodons_header_set(key: rsa.RSAPrivateKey) -> None:
    # Given a delivery signed at a fixed time
    headers = signed(key)

    # Then the headers are Mastodon's, and the signature covers exactly this string
    assert headers["Host"] == "remote.example"
    assert headers["Date"] == DATE
    assert headers["Digest"] == "SHA-256=" + b64sha256(BODY)
    params = cavage_params(headers["Signature"])
    assert params["keyId"] == KEY_ID
    assert params["algorithm"] == "rsa-sha256"
    assert params["headers"] == "(request-target) host date digest content-type"
    expected = (
        "(request-target): post /users/alice/inbox\n"
        "host: remote.example\n"
        f"date: {DATE}\n"
        f"digest: SHA-256={b64sha256(BODY)}\n"
        "content-type: application/activity+json"
    )
    assert rsa_verifies(key, params["signature"], expected)
    assert headers["Signature"].startswith(f'keyId="{KEY_ID}",algorithm="rsa-sha256",headers="')


def test_cavage_get_signs_request_target_host_date_accept(key: rsa.RSAPrivateKey) -> None:
    headers = signed(key, method="GET", url="https://remote.example/users/alice?a=1&b=2",
                     body=None, headers=ACCEPT)  # fmt: skip

    assert "Digest" not in headers
    params = cavage_params(headers["Signature"])
    assert params["headers"] == "(request-target) host date accept"
    expected = (
        "(request-target): get /users/alice?a=1&b=2\n"
        "host: remote.example\n"
        f"date: {DATE}\n"
        "accept: application/activity+json"
    )
    assert rsa_verifies(key, params["signature"], expected)


def test_digest_of_empty_body_is_the_known_sha256(key: rsa.RSAPrivateKey) -> None:
    assert signed(key, body=b"")["Digest"] == f"SHA-256={EMPTY_SHA256}"
    assert signed(key, "rfc9421", body=b"")["Content-Digest"] == f"sha-256=:{EMPTY_SHA256}:"


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://remote.example:443/inbox", "remote.example"),
        ("https://remote.example:8443/inbox", "remote.example:8443"),
        ("http://127.0.0.1:8080/inbox", "127.0.0.1:8080"),
        ("http://remote.example:80/inbox", "remote.example"),
    ],
)
def test_host_header_is_the_authority_without_default_port(
    key: rsa.RSAPrivateKey, url: str, host: str
) -> None:
    headers = signed(key, url=url)
    assert headers["Host"] == host
    assert verify(key, headers, url=url).scheme == "draft-cavage"


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
def test_signs_the_url_as_sent_on_the_wire(key: rsa.RSAPrivateKey, scheme: str) -> None:
    # Given a URL with a non-ASCII host, a space and a non-ASCII query
    headers = signed(key, scheme, url="https://bücher.example/a b?q=ü")
    # Then Host is IDNA-encoded and the signature covers the encoded target
    assert headers["Host"] == "xn--bcher-kva.example"
    wire = "https://xn--bcher-kva.example/a%20b?q=%C3%BC"
    assert verify(key, headers, url=wire).scheme == scheme


def test_rfc9421_post_signature_base(key: rsa.RSAPrivateKey) -> None:
    # Given an RFC 9421 delivery signed at a fixed time
    headers = signed(key, "rfc9421")

    # Then Content-Digest, Signature-Input and the signature base are as RFC 9421 says
    digest = f"sha-256=:{b64sha256(BODY)}:"
    assert headers["Content-Digest"] == digest
    params = (
        '("@method" "@target-uri" "@authority" "content-digest")'
        f';created={int(NOW)};keyid="{KEY_ID}";alg="rsa-v1_5-sha256"'
    )
    assert headers["Signature-Input"] == f"sig1={params}"
    base = (
        '"@method": POST\n'
        f'"@target-uri": {INBOX}\n'
        '"@authority": remote.example\n'
        f'"content-digest": {digest}\n'
        f'"@signature-params": {params}'
    )
    match = re.fullmatch(r"sig1=:([A-Za-z0-9+/=]+):", headers["Signature"])
    assert match is not None
    assert rsa_verifies(key, match.group(1), base)
    assert "Digest" not in headers  # the cavage header is not sent with RFC 9421


def test_rfc9421_get_covers_no_digest(key: rsa.RSAPrivateKey) -> None:
    url = "https://remote.example/users/alice?x=1"
    headers = signed(key, "rfc9421", method="GET", url=url, body=None, headers=ACCEPT)
    assert "Content-Digest" not in headers
    assert headers["Signature-Input"].startswith('sig1=("@method" "@target-uri" "@authority");')
    result = verify(key, headers, method="GET", url=url, body=b"")
    assert result == VerifiedSignature(KEY_ID, "rfc9421")
    assert result.created == NOW


def test_sign_request_replaces_stale_signature_headers(key: rsa.RSAPrivateKey) -> None:
    stale = {
        "host": "evil.example",
        "DATE": "Mon, 01 Jan 2001 00:00:00 GMT",
        "signature": "x",
        "Digest": "SHA-256=x",
        **CT,
    }
    headers = signed(key, headers=stale)
    assert {k.lower() for k in headers} == {
        "content-type",
        "host",
        "date",
        "digest",
        "signature",
    }
    assert headers["Host"] == "remote.example"
    assert verify(key, headers).key_id == KEY_ID


def test_sign_request_rejects_bad_input(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="scheme"):
        signed(key, "rfc9999")
    with pytest.raises(SignatureError, match="absolute"):
        signed(key, url="/relative/inbox")
    assert issubclass(SignatureError, BotkitError)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_round_trip(key: rsa.RSAPrivateKey, scheme: str, method: str) -> None:
    body = BODY if method == "POST" else None
    headers = signed(key, scheme, method=method, body=body)
    result = verify(key, headers, method=method, body=body)
    assert (result.key_id, result.scheme) == (KEY_ID, scheme)
    assert signature_key_id(headers) == KEY_ID


def test_verify_accepts_header_pairs_and_any_case(key: rsa.RSAPrivateKey) -> None:
    headers = signed(key)
    pairs = [(name.upper(), value) for name, value in headers.items()]
    assert verify_request("post", INBOX, pairs, BODY, public_key=key.public_key(), now=NOW)


def test_cavage_signed_without_query_is_accepted(key: rsa.RSAPrivateKey) -> None:
    # Given an older sender that left the query out of (request-target)
    url = "https://remote.example/inbox?page=2"
    headers = signed(key, url="https://remote.example/inbox")

    # Then it still verifies against the URL with the query (Mastodon does the same)
    assert verify(key, headers, url=url).scheme == "draft-cavage"


def test_cavage_signature_prefix_is_tolerated(key: rsa.RSAPrivateKey) -> None:
    headers = signed(key)
    headers["Signature"] = "Signature " + headers["Signature"]
    assert verify(key, headers).key_id == KEY_ID


def _manual_cavage(
    key: rsa.RSAPrivateKey,
    names: list[str],
    *,
    algorithm: str | None = "rsa-sha256",
    created: int | None = None,
    method: str = "POST",
    target: str = "/users/alice/inbox",
    body: bytes = BODY,
) -> dict[str, str]:
    headers = {
        "Host": "remote.example",
        "Date": DATE,
        "Digest": f"SHA-256={b64sha256(body)}",
        **CT,
    }
    values = {k.lower(): v for k, v in headers.items()}
    lines = []
    for name in names:
        if name == "(request-target)":
            lines.append(f"{name}: {method.lower()} {target}")
        elif name == "(created)":
            lines.append(f"{name}: {created}")
        else:
            lines.append(f"{name}: {values[name]}")
    parts = [f'keyId="{KEY_ID}"']
    if algorithm is not None:
        parts.append(f'algorithm="{algorithm}"')
    if created is not None:
        parts.append(f"created={created}")
    parts.append(f'headers="{" ".join(names)}"')
    parts.append(f'signature="{rsa_sign(key, chr(10).join(lines))}"')
    headers["Signature"] = ",".join(parts)
    return headers


def test_hs2019_with_created_is_accepted(key: rsa.RSAPrivateKey) -> None:
    names = ["(request-target)", "host", "(created)", "digest"]
    headers = _manual_cavage(key, names, algorithm="hs2019", created=int(NOW) - 10)
    result = verify(key, headers)
    assert result.components == tuple(names)
    assert result.created == NOW - 10
    # hs2019 is also the default when the algorithm parameter is absent
    headers = _manual_cavage(key, names, algorithm=None, created=int(NOW) - 10)
    assert verify(key, headers).scheme == "draft-cavage"


def test_hs2019_with_stale_created_is_rejected(key: rsa.RSAPrivateKey) -> None:
    names = ["(request-target)", "host", "(created)", "digest"]
    headers = _manual_cavage(key, names, algorithm="hs2019", created=int(NOW) - 4000)
    with pytest.raises(SignatureError, match="created parameter is 4000 s old"):
        verify(key, headers)


@pytest.mark.parametrize("created", ['"\u00b2"', "9999999999999999999999", '"-5"', '""'])
def test_created_must_be_a_plain_integer(key: rsa.RSAPrivateKey, created: str) -> None:
    headers = _manual_cavage(
        key, ["(request-target)", "host", "(created)", "digest"], algorithm="hs2019", created=1
    )
    headers["Signature"] = headers["Signature"].replace("created=1", f"created={created}")
    with pytest.raises(SignatureError, match="created parameter is not an integer"):
        verify(key, headers)


def test_created_is_only_allowed_with_hs2019(key: rsa.RSAPrivateKey) -> None:
    names = ["(request-target)", "host", "(created)", "digest"]
    headers = _manual_cavage(key, names, algorithm="rsa-sha256", created=int(NOW))
    with pytest.raises(SignatureError, match="only allowed with algorithm hs2019"):
        verify(key, headers)


# ------------------------------------------------------------------ time window


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
@pytest.mark.parametrize("offset", [-3599, 0, 3599])
def test_time_window_accepts_within_an_hour(
    key: rsa.RSAPrivateKey, scheme: str, offset: int
) -> None:
    headers = signed(key, scheme, now=NOW + offset)
    assert verify(key, headers).scheme == scheme


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
@pytest.mark.parametrize(("offset", "reason"), [(-3601, "old"), (3601, "in the future")])
def test_time_window_rejects_beyond_an_hour(
    key: rsa.RSAPrivateKey, scheme: str, offset: int, reason: str
) -> None:
    headers = signed(key, scheme, now=NOW + offset)
    with pytest.raises(SignatureError, match=reason):
        verify(key, headers)


def test_max_skew_is_configurable(key: rsa.RSAPrivateKey) -> None:
    headers = signed(key, now=NOW - 120)
    assert verify(key, headers, max_skew=300)
    with pytest.raises(SignatureError, match="120 s old"):
        verify(key, headers, max_skew=60)


def test_rfc9421_expired_signature_is_rejected(key: rsa.RSAPrivateKey) -> None:
    # Given a signature whose expires parameter lies more than the skew in the past
    headers = signed(key, "rfc9421")
    headers["Signature-Input"] += f";expires={int(NOW) - 3700}"
    with pytest.raises(SignatureError, match="expired"):
        verify(key, headers)


# -------------------------------------------------------------------- tampering


def test_unsigned_request_is_rejected(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(SignatureError, match="not signed"):
        verify(key, {"Host": "remote.example", **CT})
    assert signature_key_id({"Host": "remote.example"}) is None


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
def test_changed_body_is_rejected(key: rsa.RSAPrivateKey, scheme: str) -> None:
    headers = signed(key, scheme)
    with pytest.raises(SignatureError, match=r"(?i)digest does not match"):
        verify(key, headers, body=BODY.replace(b"Follow", b"Block"))


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
def test_changed_digest_is_rejected(key: rsa.RSAPrivateKey, scheme: str) -> None:
    # Given an attacker who replaces body and digest consistently
    other = b'{"type":"Delete"}'
    headers = signed(key, scheme)
    if scheme == "draft-cavage":
        headers["Digest"] = f"SHA-256={b64sha256(other)}"
    else:
        headers["Content-Digest"] = f"sha-256=:{b64sha256(other)}:"
    # Then the signature, which covers the digest, no longer verifies
    with pytest.raises(SignatureError, match=r"does not verify|rejected"):
        verify(key, headers, body=other)


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("POST", "https://remote.example/users/mallory/inbox"),
        ("POST", "https://remote.example/users/alice/inbox?page=3"),
        ("PUT", "https://remote.example/users/alice/inbox?page=2"),
        ("POST", "https://other.example/users/alice/inbox?page=2"),
    ],
)
def test_changed_target_is_rejected(
    key: rsa.RSAPrivateKey, scheme: str, method: str, url: str
) -> None:
    # Given a request signed for ?page=2 at remote.example
    headers = signed(key, scheme, url=INBOX + "?page=2")
    if scheme == "draft-cavage" and "other.example" in url:
        headers["Host"] = "other.example"  # the Host header is what cavage signs
    # When it arrives with another path, query, method or host, it is rejected
    with pytest.raises(SignatureError):
        verify(key, headers, method=method, url=url)


def test_rfc9421_changed_scheme_is_rejected(key: rsa.RSAPrivateKey) -> None:
    headers = signed(key, "rfc9421")
    with pytest.raises(SignatureError):
        verify(key, headers, url=INBOX.replace("https:", "http:"))


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Host", "other.example"),
        ("Content-Type", "text/plain"),
        ("Date", "Wed, 18 Nov 2026 11:06:41 GMT"),
    ],
)
def test_cavage_changed_signed_header_is_rejected(
    key: rsa.RSAPrivateKey, header: str, value: str
) -> None:
    headers = signed(key)
    headers[header] = value
    with pytest.raises(SignatureError, match="does not verify"):
        verify(key, headers)


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
def test_old_date_is_rejected(key: rsa.RSAPrivateKey, scheme: str) -> None:
    headers = signed(key, scheme, now=NOW - 2 * 86400)
    with pytest.raises(SignatureError, match="old"):
        verify(key, headers)


@pytest.mark.parametrize(
    ("scheme", "header", "reason"),
    [
        ("draft-cavage", "Content-Type", "'content-type' is in the signed list but missing"),
        ("draft-cavage", "Date", "Date header is missing"),
        ("draft-cavage", "Digest", "no SHA-256"),
        ("rfc9421", "Content-Digest", "content-digest"),
        ("rfc9421", "Signature", "Signature header is missing"),
    ],
)
def test_missing_signed_header_is_rejected(
    key: rsa.RSAPrivateKey, scheme: str, header: str, reason: str
) -> None:
    headers = signed(key, scheme)
    del headers[header]
    with pytest.raises(SignatureError, match=reason):
        verify(key, headers)


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        (["host", "date", "digest"], r"'\(request-target\)' must be signed"),
        (["(request-target)", "date", "digest"], "'host' must be signed"),
        (["(request-target)", "host", "digest"], "'date' or '\\(created\\)' must be signed"),
        (["(request-target)", "host", "date"], "'digest' must be signed"),
        (["(request-target)", "host", "date", "digest", "host"], "listed twice"),
    ],
)
def test_cavage_weak_header_lists_are_rejected(
    key: rsa.RSAPrivateKey, names: list[str], reason: str
) -> None:
    headers = _manual_cavage(key, names)
    with pytest.raises(SignatureError, match=reason):
        verify(key, headers)


def test_cavage_get_must_sign_host(key: rsa.RSAPrivateKey) -> None:
    headers = _manual_cavage(key, ["(request-target)", "date"], method="GET", target="/a")
    with pytest.raises(SignatureError, match="'host' must be signed"):
        verify(key, headers, method="GET", url="https://remote.example/a", body=None)


def test_rfc9421_must_cover_method_and_target_uri(key: rsa.RSAPrivateKey) -> None:
    headers = signed(key, "rfc9421")
    headers["Signature-Input"] = headers["Signature-Input"].replace('"@target-uri" ', "")
    with pytest.raises(SignatureError, match="'@target-uri' must be covered"):
        verify(key, headers)
    headers = signed(key, "rfc9421")
    headers["Signature-Input"] = headers["Signature-Input"].replace(' "content-digest"', "")
    with pytest.raises(SignatureError, match="'content-digest' must be covered"):
        verify(key, headers)


@pytest.mark.parametrize("scheme", ["draft-cavage", "rfc9421"])
def test_wrong_key_is_rejected(
    key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey, scheme: str
) -> None:
    headers = signed(key, scheme)
    with pytest.raises(SignatureError, match=r"does not verify|rejected"):
        verify(other_key, headers)


def test_non_rsa_key_is_rejected(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(SignatureError, match="not an RSA public key"):
        verify_request("POST", INBOX, signed(key), BODY, public_key=b"pem?", now=NOW)


@pytest.mark.parametrize("algorithm", ["hmac-sha256", "rsa-sha512", "ecdsa-sha256", ""])
def test_cavage_algorithm_mismatch_is_rejected(key: rsa.RSAPrivateKey, algorithm: str) -> None:
    headers = signed(key)
    headers["Signature"] = headers["Signature"].replace("rsa-sha256", algorithm)
    with pytest.raises(SignatureError, match="unsupported signature algorithm"):
        verify(key, headers)


@pytest.mark.parametrize("alg", ["rsa-pss-sha512", "ed25519", "hmac-sha256"])
def test_rfc9421_algorithm_mismatch_is_rejected(key: rsa.RSAPrivateKey, alg: str) -> None:
    headers = signed(key, "rfc9421")
    headers["Signature-Input"] = headers["Signature-Input"].replace("rsa-v1_5-sha256", alg)
    with pytest.raises(SignatureError, match="unsupported signature algorithm"):
        verify(key, headers)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        'keyId="a"',
        'keyId="a",signature="!!!not-base64!!!",headers="(request-target) host date digest"',
        'keyId="a" signature="b"',
        'keyId="a",,signature="b"',
        'keyId=a,signature="b"',
        'keyId="a",signature="b",',
        'keyId="unterminated,signature="b"',
        'keyId="a",headers="",signature="b"',
        'keyId="a",created=abc,signature="b"',
        "x" * 10000,
    ],
)
def test_malformed_cavage_header_is_rejected(key: rsa.RSAPrivateKey, value: str) -> None:
    headers = signed(key)
    headers["Signature"] = value
    with pytest.raises(SignatureError):
        verify(key, headers)
    assert signature_key_id(headers) in (None, "a")


@pytest.mark.parametrize("param", ["keyId", "signature", "headers", "algorithm"])
def test_duplicate_cavage_parameter_is_rejected(key: rsa.RSAPrivateKey, param: str) -> None:
    headers = signed(key)
    value = cavage_params(headers["Signature"])[param]
    headers["Signature"] += f',{param}="{value}"'
    with pytest.raises(SignatureError, match=f"duplicate '{param}'"):
        verify(key, headers)


@pytest.mark.parametrize(
    ("header", "mutate"),
    [
        ("Signature-Input", lambda v: v + ", " + v),  # the same label twice
        ("Signature-Input", lambda v: v + ';created=1"'),
        ("Signature-Input", lambda v: v + f";created={int(NOW)}"),  # duplicate parameter
        ("Signature-Input", lambda v: v.replace("sig1=(", "sig1=")),
        ("Signature-Input", lambda v: v + ", sig2=" + v.partition("=")[2]),  # two signatures
        ("Signature-Input", lambda v: "sig1=1"),
        ("Signature-Input", lambda v: v.replace(";keyid=", ";key=")),
        ("Signature-Input", lambda v: v.replace(f"created={int(NOW)}", "created=x")),
        ("Signature-Input", lambda v: "\u00e9" + v),
        ("Signature", lambda v: v.replace("sig1", "sig2")),
        ("Signature", lambda v: v.replace(":", "")),
        ("Signature", lambda v: v + ", " + v),
        ("Signature", lambda v: "sig1=:AAAA:"),
    ],
)
def test_malformed_rfc9421_headers_are_rejected(
    key: rsa.RSAPrivateKey, header: str, mutate: object
) -> None:
    headers = signed(key, "rfc9421")
    headers[header] = mutate(headers[header])  # type: ignore[operator]
    with pytest.raises(SignatureError):
        verify(key, headers)


def test_precheck_needs_no_key(key: rsa.RSAPrivateKey) -> None:
    # Everything that can be checked before fetching a key is checked
    for scheme in ("draft-cavage", "rfc9421"):
        headers = signed(key, scheme)
        assert precheck_request("POST", INBOX, headers, BODY, now=NOW) == KEY_ID
        with pytest.raises(SignatureError, match=r"(?i)digest"):
            precheck_request("POST", INBOX, headers, b"{}", now=NOW)
        with pytest.raises(SignatureError, match="old"):
            precheck_request("POST", INBOX, headers, BODY, now=NOW + 7200)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    signature=st.text(max_size=300),
    signature_input=st.one_of(st.none(), st.text(max_size=300)),
    date=st.text(max_size=40),
    body=st.one_of(st.none(), st.binary(max_size=64)),
    method=st.sampled_from(["GET", "POST", "get", "", "\x00"]),
)
def test_hostile_headers_only_raise_signature_error(
    signature: str, signature_input: str | None, date: str, body: bytes | None, method: str
) -> None:
    headers = {"Signature": signature, "Date": date, "Host": "remote.example"}
    if signature_input is not None:
        headers["Signature-Input"] = signature_input
    signature_key_id(headers)  # never raises
    with pytest.raises(SignatureError):
        verify_request(method, INBOX, headers, body, public_key=None, now=NOW)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_valid_signatures_only_raise_signature_error(
    key: rsa.RSAPrivateKey, data: st.DataObject
) -> None:
    # Given a valid signed request whose signature header is mutated at random
    scheme = data.draw(st.sampled_from(["draft-cavage", "rfc9421"]))
    headers = signed(key, scheme, now=NOW)
    name = data.draw(st.sampled_from(sorted(headers)))
    value = headers[name]
    position = data.draw(st.integers(0, len(value)))
    insert = data.draw(st.text(max_size=5))
    cut = data.draw(st.integers(0, 5))
    headers[name] = value[:position] + insert + value[position + cut :]
    # Then verification raises SignatureError, or succeeds for the key id it reports
    try:
        result = verify(key, headers)
    except SignatureError:
        return
    assert result.key_id == signature_key_id(headers)
