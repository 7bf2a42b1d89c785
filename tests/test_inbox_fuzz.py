"""The inbox endpoint under fuzzing: never a 5xx, never an unverified activity enqueued.

Each example is either a validly signed request (draft-cavage or RFC 9421,
sometimes signed with the wrong key or for another actor) passed through a few
random mutations — headers dropped, replaced, duplicated or added, the body
flipped, truncated or extended, the signature or its key id altered, the path
or method changed, the body streamed in random pieces — or a request built from
random headers and bodies.  After every example the ``botkit.inbox`` queue may
only hold the exact activity that was validly signed by its own actor.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import pytest
from _http_server import ScriptedServer
from dramatiq.brokers.stub import StubBroker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_inbox import (
    _KEYS,
    BASE_URL,
    INBOX_PATH,
    USERNAME,
    RemoteActor,
    RemoteServer,
    asgi_call,
    queued,
    signed,
)

from botkit_tasks.federation import Federation
from botkit_tasks.kv.memory import MemoryKvStore

#: Examples per run; raise it locally with BOTKIT_FUZZ_EXAMPLES for a longer hunt.
EXAMPLES = int(os.environ.get("BOTKIT_FUZZ_EXAMPLES", "200"))
ALLOWED_STATUSES = {202, 400, 401, 404, 405, 413}


@dataclass
class World:
    federation: Federation
    remote: RemoteServer
    alice: RemoteActor
    bob: RemoteActor
    statuses: Counter[int] = field(default_factory=Counter)
    accepted_valid: int = 0


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with ScriptedServer() as server:
        remote = RemoteServer(server)
        alice = remote.add_actor("alice", key=_KEYS[0])
        bob = remote.add_actor("bob", key=_KEYS[1])
        federation = Federation(
            kv=MemoryKvStore(),
            broker=StubBroker(),
            base_url=BASE_URL,
            username=USERNAME,
            allow_private_addresses=True,
        )
        yield World(federation, remote, alice, bob)
        federation.close()
        federation.broker.close()


# --------------------------------------------------------------------------- strategies

latin1_text = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=80)
header_names = st.sampled_from(
    [
        "signature",
        "signature-input",
        "digest",
        "content-digest",
        "date",
        "host",
        "content-type",
        "content-length",
        "x-random",
        "(request-target)",
    ]
) | st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@dataclass
class Case:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    chunks: list[bytes] | None
    #: The activity that may be enqueued (validly signed by its own actor), if any.
    legit: dict[str, Any] | None
    mutated: bool
    legit_actor: str | None = None


def _key_ids(world: World) -> list[str]:
    port_url = world.remote.server.url("")
    return [
        world.alice.key_id,
        world.bob.key_id,
        f"{port_url}/users/nobody#main-key",
        f"{port_url}/users/alice",
        "acct:alice@127.0.0.1",
        "",
        "x" * 2000,
    ]


@st.composite
def signed_cases(draw: st.DrawFn, world: World) -> Case:
    alice, bob = world.alice, world.bob
    kind = draw(st.sampled_from(["Follow", "Create", "Undo", "Delete-self", "Like"]))
    claimed = draw(st.sampled_from([alice, alice, alice, bob]))
    activity: dict[str, Any] = {
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": f"{claimed.id}/activities/{draw(st.uuids())}",
        "type": "Delete" if kind == "Delete-self" else kind,
        "actor": draw(st.sampled_from([claimed.id, {"id": claimed.id}, [claimed.id]])),
        "object": claimed.id if kind == "Delete-self" else f"{BASE_URL}/users/{USERNAME}",
    }
    if draw(st.booleans()):
        activity["extra"] = draw(json_values)
    right_key = draw(st.sampled_from([True, True, True, False]))
    key = alice.private_key if right_key else _KEYS[2]
    scheme = draw(st.sampled_from(["draft-cavage", "rfc9421"]))
    path = INBOX_PATH if draw(st.booleans()) else "/inbox"
    headers_map, body = signed(alice, activity, scheme=scheme, url=f"{BASE_URL}{path}", key=key)
    headers = list(headers_map.items())
    method = "POST"
    chunks: list[bytes] | None = None
    mutated = False
    for _ in range(draw(st.integers(0, 3))):
        mutation = draw(
            st.sampled_from(
                [
                    "drop-header",
                    "replace-header",
                    "add-header",
                    "duplicate-header",
                    "flip-body",
                    "truncate-body",
                    "extend-body",
                    "signature-char",
                    "key-id",
                    "path",
                    "method",
                    "chunks",
                    "content-length",
                ]
            )
        )
        if mutation == "drop-header" and headers:
            headers.pop(draw(st.integers(0, len(headers) - 1)))
        elif mutation == "replace-header" and headers:
            i = draw(st.integers(0, len(headers) - 1))
            headers[i] = (headers[i][0], draw(latin1_text))
        elif mutation == "add-header":
            headers.append((draw(header_names), draw(latin1_text)))
        elif mutation == "duplicate-header" and headers:
            headers.append(headers[draw(st.integers(0, len(headers) - 1))])
        elif mutation == "flip-body" and body:
            i = draw(st.integers(0, len(body) - 1))
            body = body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1 :]
        elif mutation == "truncate-body":
            body = body[: draw(st.integers(0, len(body)))]
        elif mutation == "extend-body":
            body = body + draw(st.binary(min_size=1, max_size=20))
        elif mutation == "signature-char":
            names = [i for i, (n, _) in enumerate(headers) if n.lower() == "signature"]
            if names:
                i = names[0]
                value = headers[i][1]
                j = draw(st.integers(0, max(len(value) - 1, 0)))
                char = draw(st.characters(min_codepoint=32, max_codepoint=126))
                headers[i] = (headers[i][0], value[:j] + char + value[j + 1 :])
        elif mutation == "key-id":
            new_key_id = draw(st.sampled_from(_key_ids(world)))
            headers = [
                (n, v.replace(alice.key_id, new_key_id))
                if n.lower() in ("signature", "signature-input")
                else (n, v)
                for n, v in headers
            ]
        elif mutation == "path":
            path = draw(st.sampled_from(["/inbox", INBOX_PATH, "/users/other/inbox", "/"]))
        elif mutation == "method":
            method = draw(st.sampled_from(["GET", "PUT", "DELETE", "post"]))
        elif mutation == "content-length":
            headers.append(("content-length", str(draw(st.integers(0, 2 << 20)))))
        elif mutation == "chunks":
            cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
            edges = [0, *cuts, len(body)]
            chunks = [body[a:b] for a, b in itertools.pairwise(edges)]
            continue  # the content is unchanged
        mutated = True
    legit = activity if right_key and claimed is alice else None
    return Case(method, path, headers, body, chunks, legit, mutated, alice.id)


@st.composite
def random_cases(draw: st.DrawFn, world: World) -> Case:
    headers: list[tuple[str, str]] = draw(
        st.lists(st.tuples(header_names, latin1_text), max_size=8)
    )
    if draw(st.booleans()):
        key_id = draw(st.sampled_from(_key_ids(world)))
        params = draw(
            st.sampled_from(
                [
                    f'keyId="{key_id}",algorithm="rsa-sha256",headers="(request-target) host date'
                    f' digest",signature="{draw(st.binary(max_size=300)).hex()}"',
                    f'keyId="{key_id}",signature="AAAA"',
                    f'sig1=("@method" "@target-uri");created=1;keyid="{key_id}"',
                    f"keyId={key_id}",
                ]
            )
        )
        headers.append(("signature", params))
    body = draw(
        st.binary(max_size=300)
        | json_values.map(lambda v: json.dumps(v).encode())
        | st.fixed_dictionaries(
            {"type": st.sampled_from(["Delete", "Follow"]), "actor": st.just(world.alice.id)},
            optional={"object": st.just(world.alice.id), "id": latin1_text},
        ).map(lambda v: json.dumps(v).encode())
    )
    path = draw(st.sampled_from([INBOX_PATH, "/inbox", "/nope"]))
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET"]))
    return Case(method, path, headers, body, None, None, True)


# --------------------------------------------------------------------------- the property


@pytest.mark.timeout(600)
def test_inbox_fuzz(world: World) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=signed_cases(world) | random_cases(world))
    def check(case: Case) -> None:
        broker = world.federation.broker
        broker.flush_all()
        response = asyncio.run(
            asgi_call(
                world.federation.inbox_app,
                method=case.method,
                path=case.path,
                headers=case.headers,
                body=case.body,
                chunks=case.chunks,
            )
        )
        world.statuses[response.status] += 1
        # Never a server error, whatever the input
        assert response.status in ALLOWED_STATUSES, (response.status, response.body)
        jobs: list[dramatiq.Message[Any]] = queued(broker)
        # Never an activity that was not validly signed by its own actor
        if case.legit is None:
            assert jobs == [], case
        else:
            assert len(jobs) <= 1
            for job in jobs:
                assert job.args == (USERNAME, case.legit, case.legit_actor)
        if case.legit is not None and not case.mutated:
            # An untouched, validly signed request is always accepted
            assert response.status == 202
            world.accepted_valid += 1

    check()
    # The fuzzing reached every outcome, not only rejections
    assert world.accepted_valid > 0
    assert {400, 401, 202} <= set(world.statuses), world.statuses
    print(f"inbox fuzz: statuses {dict(world.statuses)}, {world.accepted_valid} valid accepted")
