"""The dashboard over HTTP, on populated SQLite, PostgreSQL and Redis brokers.

The app is served by uvicorn on loopback and spoken to with httpx; requests
from another address go through httpx's ASGI transport with a chosen client.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import unescape
from typing import Any

import anyio
import httpx
import pytest
from _dashboard_support import Backend, backend, populate, serving
from conftest import unique_name

from botkit_tasks.dashboard import DashboardApp, app, check_bind
from botkit_tasks.errors import ConfigurationError
from botkit_tasks.federation import stats
from botkit_tasks.federation.delivery import is_host_available, record_host_failure
from botkit_tasks.monitor import inspect

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-token-for-tests"
PAGES = ["/", "/snapshot.json", "/chart.svg", "/metrics"]


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def populated(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[Backend, str]]:
    with backend(request, request.param, tmp_path) as b:
        queue = unique_name("q")
        populate(b.broker, queue, dead=3)
        recorder = stats.DeliveryStats(b.kv, flush_interval=0)
        for _ in range(4):
            recorder.record("mastodon.example", "delivered")
        recorder.record("slow.example", "retry")
        recorder.record("gone.example", "gone")
        for day in range(3):
            record_host_failure(b.kv, "down.example", now=1_900_000_000 + day * 86400)
        yield b, queue


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, "the page has no CSRF field"
    return found.group(1)


def _cell(page: str, queue: str, state: str) -> int:
    row = re.search(rf'<tr data-queue="{re.escape(queue)}">(.*?)</tr>', page, re.S)
    assert row, f"no row for {queue}"
    cell = re.search(rf'data-state="{state}">(\d+)<', row.group(1))
    assert cell
    return int(cell.group(1))


def test_the_page_shows_what_the_monitor_sees(populated: tuple[Backend, str]) -> None:
    b, queue = populated
    insp = inspect(b.broker)
    with serving(app(b.broker, b.kv)) as url:
        page = httpx.get(url + "/").text
        snapshot = httpx.get(url + "/snapshot.json").json()
        svg = httpx.get(url + "/chart.svg")
    # Then every queue count on the page equals the monitor's
    (stats_q,) = [q for q in insp.queues() if q.name == queue]
    for state in ("ready", "delayed", "in_flight", "dead"):
        assert _cell(page, queue, state) == getattr(stats_q, state), state
    assert (stats_q.ready, stats_q.delayed, stats_q.dead) == (3, 2, 3)
    # And every dead letter and the retrying message are listed, with their errors
    for letter in insp.dead_letters():
        assert f'data-message="{letter.message_id}"' in page
    (retrying,) = insp.retrying()
    assert f'data-message="{retrying.message_id}"' in page
    assert "ValueError: boom" in page
    # And the JSON snapshot agrees
    assert [q for q in snapshot["queues"] if q["name"] == queue] == [stats_q.to_dict()]
    assert len(snapshot["dead_letters"]) == 3
    assert snapshot["deliveries"]["last_hour"] == {
        "delivered": 4,
        "retry": 1,
        "permanent": 0,
        "gone": 1,
    }
    # And the hosts: the unavailable one first, with its clear button
    hosts = [h["host"] for h in snapshot["hosts"]]
    assert hosts[0] == "down.example" and snapshot["hosts"][0]["unavailable"]
    assert set(hosts) == {"down.example", "mastodon.example", "slow.example", "gone.example"}
    assert re.search(r'data-host="down.example" class="unavailable"', page)
    # And the chart is an SVG picture whose bars carry the counts
    assert svg.headers["content-type"] == "image/svg+xml"
    assert svg.text.startswith("<svg") and 'data-series="delivered" data-count="4"' in svg.text
    assert "<svg" in page  # inlined
    # And the page is usable without JavaScript: forms post, no script is inline
    assert "<script>" not in page and 'src="/static/live.js"' in page


def test_requeue_purge_and_clear_a_host(populated: tuple[Backend, str]) -> None:
    b, queue = populated
    insp = inspect(b.broker)
    first, *_ = [d.message_id for d in insp.dead_letters()]
    with serving(app(b.broker, b.kv)) as url, httpx.Client(base_url=url) as client:
        csrf = _csrf(client.get("/").text)
        # When one dead letter is requeued
        r = client.post("/dead/requeue", data={"csrf": csrf, "id": first})
        assert r.status_code == 303 and r.headers["location"].startswith("/?done=requeued&n=1")
        # Then it left the dead letters and is ready again
        assert first not in [d.message_id for d in insp.dead_letters()]
        (q,) = [q for q in insp.queues() if q.name == queue]
        assert (q.ready, q.dead) == (4, 2)
        assert "Requeued 1 dead letter(s)." in client.get(r.headers["location"]).text
        # When the rest are purged
        r = client.post("/dead/purge", data={"csrf": csrf, "queue": queue})
        assert r.status_code == 303 and "n=2" in r.headers["location"]
        assert insp.dead_letters() == []
        # When the unavailable host's mark is cleared
        assert not is_host_available(b.kv, "down.example")
        r = client.post("/hosts/clear", data={"csrf": csrf, "host": "down.example"})
        assert r.status_code == 303
        assert is_host_available(b.kv, "down.example")
        assert "down.example" not in [h.host for h in stats.host_records(b.kv)]


def test_requeue_all(populated: tuple[Backend, str]) -> None:
    b, queue = populated
    with serving(app(b.broker, b.kv)) as url, httpx.Client(base_url=url) as client:
        csrf = _csrf(client.get("/").text)
        r = client.post("/dead/requeue", data={"csrf": csrf, "all": "1"})
        assert "n=3" in r.headers["location"]
    (q,) = [q for q in inspect(b.broker).queues() if q.name == queue]
    assert (q.ready, q.dead) == (6, 0)


def test_mutations_need_the_csrf_token_and_this_origin(populated: tuple[Backend, str]) -> None:
    b, _ = populated
    insp = inspect(b.broker)
    ids = [d.message_id for d in insp.dead_letters()]
    with serving(app(b.broker, b.kv)) as url, httpx.Client(base_url=url) as client:
        csrf = _csrf(client.get("/").text)
        attempts = [
            ("/dead/requeue", {"id": ids[0]}, {}),
            ("/dead/requeue", {"id": ids[0], "csrf": "0" * 64}, {}),
            ("/dead/purge", {"csrf": csrf}, {"origin": "https://evil.example"}),
            ("/hosts/clear", {"host": "down.example"}, {}),
        ]
        for path, form, headers in attempts:
            r = client.post(path, data=form, headers=headers)
            assert r.status_code == 403, (path, form)
        # A GET never changes anything
        assert client.get("/dead/purge").status_code == 405
    assert [d.message_id for d in insp.dead_letters()] == ids
    assert not is_host_available(b.kv, "down.example")


def _asgi(dashboard: DashboardApp, client: str, method: str, path: str, **kw: Any) -> Any:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=dashboard, client=(client, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://dash") as c:
            return await c.request(method, path, **kw)

    return anyio.run(go)


def test_with_a_token_nothing_answers_or_changes_without_it(
    populated: tuple[Backend, str],
) -> None:
    b, _ = populated
    insp = inspect(b.broker)
    ids = [d.message_id for d in insp.dead_letters()]
    dashboard = app(b.broker, b.kv, token=TOKEN)
    csrf = dashboard.guard.csrf_token  # even a leaked CSRF token is not enough
    with serving(dashboard) as url, httpx.Client(base_url=url) as client:
        # Then every page answers 401, with a sign-in form
        for path in PAGES:
            r = client.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert 'action="/login"' in client.get("/").text
        # And no mutation runs
        for path in ("/dead/requeue", "/dead/purge", "/hosts/clear"):
            data = {"csrf": csrf, "id": ids[0], "all": "1", "host": "down.example"}
            assert client.post(path, data=data).status_code == 401
        assert client.get("/", headers={"authorization": "Bearer wrong-token"}).status_code == 401
        assert client.post("/login", data={"token": "wrong-token"}).status_code == 401
        assert [d.message_id for d in insp.dead_letters()] == ids
        assert not is_host_available(b.kv, "down.example")
        # With the bearer token every page answers
        for path in PAGES:
            assert client.get(path, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        # And a browser signs in once, then its cookie is enough
        r = client.post("/login", data={"token": TOKEN})
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        page = client.get("/")
        assert page.status_code == 200
        r = client.post("/dead/requeue", data={"csrf": _csrf(page.text), "id": ids[0]})
        assert r.status_code == 303
    assert ids[0] not in [d.message_id for d in insp.dead_letters()]


def test_without_a_token_only_loopback_clients_are_answered(
    populated: tuple[Backend, str],
) -> None:
    b, _ = populated
    insp = inspect(b.broker)
    dashboard = app(b.broker, b.kv)
    before = [d.message_id for d in insp.dead_letters()]
    # A client on another address gets 401 everywhere and changes nothing
    for path in PAGES:
        assert _asgi(dashboard, "203.0.113.9", "GET", path).status_code == 401
    data = {"csrf": dashboard.guard.csrf_token, "all": "1"}
    r = _asgi(dashboard, "203.0.113.9", "POST", "/dead/purge", data=data)
    assert r.status_code == 401
    assert "answers clients on this machine only" in unescape(r.text)
    assert [d.message_id for d in insp.dead_letters()] == before
    # And a loopback client (IPv4 or IPv6) is answered
    assert _asgi(dashboard, "127.0.0.1", "GET", "/").status_code == 200
    assert _asgi(dashboard, "::1", "GET", "/snapshot.json").status_code == 200


def test_binding_beyond_loopback_needs_a_token() -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.0.2.10", "dash.example"):
        with pytest.raises(ConfigurationError, match="BOTKIT_DASHBOARD_TOKEN"):
            check_bind(host, None)
        check_bind(host, TOKEN)


def test_bad_settings_are_refused(populated: tuple[Backend, str]) -> None:
    b, _ = populated
    with pytest.raises(ValueError, match="at least 8"):
        app(b.broker, token="short")
    with pytest.raises(ValueError, match="refresh"):
        app(b.broker, refresh=-1)
    with pytest.raises(ValueError, match="limit"):
        app(b.broker, limit=0)
    from dramatiq.brokers.stub import StubBroker

    with pytest.raises(TypeError, match="cannot inspect a StubBroker"):
        app(StubBroker())


def test_without_a_kv_store_the_broker_sections_still_work(
    populated: tuple[Backend, str],
) -> None:
    b, queue = populated
    with serving(app(b.broker)) as url:
        page = httpx.get(url + "/").text
        snapshot = httpx.get(url + "/snapshot.json").json()
        metrics = httpx.get(url + "/metrics").text
    assert _cell(page, queue, "dead") == 3
    assert "No KV store given" in page
    assert snapshot["hosts"] is None and snapshot["deliveries"] is None
    assert "botkit_queue_messages" in metrics and "botkit_deliveries" not in metrics


def test_mounted_under_a_root_path_links_stay_under_it(populated: tuple[Backend, str]) -> None:
    b, _ = populated
    dashboard = app(b.broker, b.kv)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=dashboard, root_path="/ops")
        async with httpx.AsyncClient(transport=transport, base_url="http://dash") as c:
            return await c.get("/ops/")

    page = anyio.run(go).text
    assert 'action="/ops/dead/requeue"' in page and 'href="/ops/static/dashboard.css"' in page
