"""The inbox under a flood: 2,000 signed POSTs from 20 hosts over real HTTP.

Eighteen hosts behave (5 activities a second each), one floods (as fast as
eight connections go) and one has a key server that never answers.  The
well-behaved hosts' activities must all be accepted and enqueued, the flooder
gets 429s with ``Retry-After``, nobody gets a 5xx, and the process's memory
stays bounded.  The inbox runs under uvicorn with its default limits, on a
``SqlBroker`` and ``SqlKvStore`` sharing one SQLite file.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _http_server import Reply, ScriptedServer

from botkit_tasks._sql import create_engine
from botkit_tasks.brokers import SqlBroker
from botkit_tasks.demo.servers import Server, free_socket
from botkit_tasks.federation import Federation
from botkit_tasks.federation.inbox import INBOX_QUEUE, InboxLimits
from botkit_tasks.federation.keys import generate_private_key, public_key_pem
from botkit_tasks.federation.signatures import sign_request
from botkit_tasks.kv import SqlKvStore
from botkit_tasks.monitor import inspect

pytestmark = pytest.mark.timeout(180)

GOOD_HOSTS, GOOD_POSTS, GOOD_RATE = 18, 50, 5.0
FLOOD_POSTS, HANGING_POSTS = 1_000, 100
JSON = {"Content-Type": "application/activity+json"}


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Remote:
    """One remote host: a loopback server with an actor whose key it serves (or hangs on)."""

    def __init__(self, name: str, *, hangs: bool = False) -> None:
        self.name = name
        self.server = ScriptedServer()
        self.key = generate_private_key()
        self.actor = self.server.url("/users/a")
        document = {
            "id": self.actor,
            "type": "Person",
            "inbox": f"{self.actor}/inbox",
            "publicKey": {
                "id": f"{self.actor}#main-key",
                "owner": self.actor,
                "publicKeyPem": public_key_pem(self.key),
            },
        }
        reply = Reply(200, headers=JSON, body=json.dumps(document).encode())
        self.server.script("/users/a", Reply(200, delay=60.0) if hangs else reply)
        self.statuses: Counter[int] = Counter()
        self.retry_after: list[str] = []
        self.lock = threading.Lock()

    def post(self, client: httpx.Client, inbox: str, n: int) -> None:
        activity = {
            "id": f"{self.actor}/activities/{n}",
            "type": "Like",
            "actor": self.actor,
            "object": "https://bot.example/notes/1",
        }
        body = json.dumps(activity).encode()
        headers = sign_request(
            "POST", inbox, JSON, body, private_key=self.key, key_id=f"{self.actor}#main-key"
        )
        response = client.post(inbox, headers=headers, content=body)
        with self.lock:
            self.statuses[response.status_code] += 1
            if response.status_code == 429:
                self.retry_after.append(response.headers.get("retry-after", ""))


@pytest.fixture
def bot(tmp_path: Path) -> Iterator[tuple[Federation, str]]:
    engine = create_engine(f"sqlite:///{tmp_path}/bot.sqlite3")
    kv = SqlKvStore(engine)
    broker = SqlBroker(engine)
    sock = free_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    federation = Federation(
        kv=kv, broker=broker, base_url=base, username="bot", allow_private_addresses=True
    )
    server = Server(federation.inbox_app, [sock], "flood-inbox")
    server.start()
    yield federation, federation.inbox_url
    server.stop()
    federation.close()
    broker.close()
    kv.close()
    engine.dispose()


def test_a_flood_and_a_hanging_key_server_do_not_hurt_well_behaved_hosts(
    bot: tuple[Federation, str], capsys: pytest.CaptureFixture[str]
) -> None:
    federation, inbox = bot
    limits = federation.inbox_app.limits
    assert limits == InboxLimits()  # the defaults are what is tested
    good = [Remote(f"good{i}") for i in range(GOOD_HOSTS)]
    flooder, hanging = Remote("flooder"), Remote("hanging", hangs=True)
    remotes = [*good, flooder, hanging]
    before = rss_kib()
    peak = [before]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            peak[0] = max(peak[0], rss_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        with httpx.Client(timeout=30.0, limits=httpx.Limits(max_connections=64)) as client:

            def paced(remote: Remote, count: int) -> None:
                for n in range(count):
                    due = started + n / GOOD_RATE
                    time.sleep(max(due - time.monotonic(), 0.0))
                    remote.post(client, inbox, n)

            with ThreadPoolExecutor(GOOD_HOSTS + 2 + 8) as pool:
                # When the well-behaved hosts post at their pace, the flooder as
                # fast as it can and the host with the hanging key server too
                jobs = [pool.submit(paced, r, GOOD_POSTS) for r in good]
                jobs.append(pool.submit(paced, hanging, HANGING_POSTS // 2))
                jobs.append(
                    pool.submit(lambda: [hanging.post(client, inbox, 1000 + n) for n in range(50)])
                )
                jobs += [
                    pool.submit(
                        lambda k=k: [
                            flooder.post(client, inbox, n) for n in range(k, FLOOD_POSTS, 8)
                        ]
                    )
                    for k in range(8)
                ]
                for job in jobs:
                    job.result()
    finally:
        sampling.set()
        sampler.join()
        for remote in remotes:
            remote.server.close()
    elapsed = time.monotonic() - started

    total = Counter[int]()
    for remote in remotes:
        total.update(remote.statuses)
    (queue,) = [q for q in inspect(federation.broker).queues() if q.name == INBOX_QUEUE]
    growth_mib = (peak[0] - before) / 1024
    with capsys.disabled():
        print(
            f"\nflood: {sum(total.values()):,} POSTs in {elapsed:.1f} s: "
            f"statuses {dict(sorted(total.items()))}; well-behaved "
            f"{sum(r.statuses[202] for r in good)}/{GOOD_HOSTS * GOOD_POSTS} accepted; "
            f"flooder {dict(flooder.statuses)}; hanging-key host {dict(hanging.statuses)}; "
            f"enqueued {queue.ready}; peak requests in progress "
            f"{federation.inbox_app.rate.peak_in_progress}; RSS {before / 1024:.0f} MiB -> "
            f"peak {peak[0] / 1024:.0f} MiB (+{growth_mib:.0f})"
        )
    # Then every well-behaved host's activity was accepted and enqueued
    for remote in good:
        assert remote.statuses == Counter({202: GOOD_POSTS}), (remote.name, remote.statuses)
    assert queue.ready == total[202]
    # the flooder was told to slow down, with a Retry-After
    assert flooder.statuses[429] >= FLOOD_POSTS // 2
    assert flooder.retry_after and all(v.isdigit() and int(v) >= 1 for v in flooder.retry_after)
    # the hanging key server cost at most one budget, then its host was throttled
    assert hanging.statuses[202] == 0
    assert set(hanging.statuses) <= {429, 401}
    # nobody got a 5xx
    assert not [status for status in total if status >= 500]
    # and memory and concurrency stayed bounded
    assert federation.inbox_app.rate.peak_in_progress <= limits.max_concurrent
    assert growth_mib < 100
    # a flood of 1,000 at 20/s does not stretch the test: limits answer at once
    assert elapsed < 60
