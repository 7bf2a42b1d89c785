"""The dashboard in a real headless Chromium, driven with Selenium.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them).
Locally a missing browser skips; under ``CI`` it fails.  The first test saves
the screenshot shown in ``docs/monitoring.md``.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _dashboard_support import Backend, backend, message, populate, serving

from botkit_tasks.dashboard import app
from botkit_tasks.federation import stats
from botkit_tasks.federation.delivery import record_host_failure
from botkit_tasks.monitor import inspect

pytestmark = pytest.mark.timeout(180)

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "dashboard.png"
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _find(paths: tuple[str, ...], name: str) -> str | None:
    for path in paths:
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def _driver(*, javascript: bool = True) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _find(CHROMIUM, "chromium"), _find(DRIVER, "chromedriver")
    if binary is None or driver is None:
        reason = (
            "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the browser test must not skip")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1700")
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    return webdriver.Chrome(options=options, service=Service(driver))


def _wait(condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # the page is being replaced under us
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _traceback(last: str) -> str:
    return (
        "Traceback (most recent call last):\n"
        '  File "dramatiq/worker.py", line 512, in process_message\n'
        "    res = actor(*message.args, **message.kwargs)\n"
        f"{last}"
    )


def _fill(b: Backend) -> dict[str, list[str]]:
    """Queues, dead letters, a worker and an hour of delivery history, as a bot would have."""
    broker = b.broker
    errors = [
        _traceback(f"dramatiq.errors.Retry: https://{host}/inbox: {why}")
        for host, why in [
            ("slow.example", "HTTP 503"),
            ("down.example", "ConnectTimeout after 5.0 s"),
            ("strict.example", "HTTP 502"),
        ]
    ]
    dead = {
        "botkit.outbox": populate(
            broker, "botkit.outbox", dead=3, actor="botkit_deliver", errors=errors
        )
    }
    for queue in ("botkit.fanout", "botkit.inbox", "default"):
        broker.declare_queue(queue)
    for n in range(7):
        broker.enqueue(message("botkit.inbox", n))
    broker.enqueue(message("default", 1), delay=300_000)
    dead["default"] = populate(
        broker,
        "default",
        dead=1,
        actor="refresh_feed",
        errors=[_traceback("ConnectionError: https://feeds.example/news.xml is down")],
    )
    # An hour of deliveries: steady traffic, a burst of retries twenty minutes ago
    now = time.time()
    clock = [now]
    recorder = stats.DeliveryStats(b.kv, flush_interval=3600, clock=lambda: clock[0])
    rng = random.Random(11)
    hosts = ["mastodon.example", "fosstodon.example", "misskey.example", "pleroma.example"]
    for minutes_ago in range(59, -1, -1):
        clock[0] = now - minutes_ago * 60
        for _ in range(rng.randint(4, 12)):
            recorder.record(rng.choice(hosts), "delivered")
        if 18 <= minutes_ago <= 24:
            for _ in range(rng.randint(3, 8)):
                recorder.record("slow.example", "retry")
        if minutes_ago % 13 == 0:
            recorder.record("gone.example", "gone")
            recorder.record("strict.example", "permanent")
    recorder.flush()
    for day in range(3):
        record_host_failure(b.kv, "down.example", now=now - day * 86400)
    record_host_failure(b.kv, "slow.example", now=now)
    return dead


@pytest.fixture
def filled(
    request: pytest.FixtureRequest, tmp_path: Any
) -> Iterator[tuple[Backend, dict[str, list[str]]]]:
    with backend(request, "sqlite", tmp_path) as b:
        dead = _fill(b)
        # A consumer registers as a live worker
        consumer = b.broker.consume("botkit.fanout", timeout=100)
        next(consumer)
        try:
            yield b, dead
        finally:
            consumer.close()


def _cell(driver: Any, queue: str, state: str) -> int:
    from selenium.webdriver.common.by import By

    cell = driver.find_element(
        By.CSS_SELECTOR, f'tr[data-queue="{queue}"] td[data-state="{state}"]'
    )
    return int(cell.text)


def test_counts_live_refresh_requeue_and_screenshot(
    filled: tuple[Backend, dict[str, list[str]]],
) -> None:
    from selenium.webdriver.common.by import By

    b, dead = filled
    insp = inspect(b.broker)
    driver = _driver()
    try:
        with serving(app(b.broker, b.kv, title="greetbot · botkit-tasks", refresh=1)) as url:
            driver.get(url + "/")
            # Then every count shown equals the monitor's
            for q in insp.queues():
                for state in ("ready", "delayed", "in_flight", "dead"):
                    assert _cell(driver, q.name, state) == getattr(q, state), (q.name, state)
            assert _cell(driver, "botkit.outbox", "dead") == 3
            shown = driver.find_elements(By.CSS_SELECTOR, "#dead tbody tr[data-message]")
            assert {r.get_attribute("data-message") for r in shown} == {
                d.message_id for d in insp.dead_letters()
            }
            workers = driver.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
            assert len(workers) == len(insp.workers()) >= 1
            bars = driver.find_elements(By.CSS_SELECTOR, "#deliveries svg g.bar")
            assert len(bars) == 60
            assert (
                driver.find_element(By.CSS_SELECTOR, 'tr[data-host="down.example"]').get_attribute(
                    "class"
                )
                == "unavailable"
            )
            # Screenshot for the docs: the page as an operator first sees it
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            driver.set_window_size(
                1280, driver.execute_script("return document.body.scrollHeight") + 40
            )
            assert driver.save_screenshot(str(SCREENSHOT))
            assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            # When a message is enqueued, the page updates in place (no reload)
            driver.execute_script("window.__sameDocument = true;")
            before = _cell(driver, "botkit.inbox", "ready")
            b.broker.enqueue(message("botkit.inbox", 99))
            _wait(lambda: _cell(driver, "botkit.inbox", "ready") == before + 1, "a live update")
            assert driver.execute_script("return window.__sameDocument === true;")
            assert "live" in driver.find_element(By.ID, "live-status").text

            # When requeue is clicked on a dead letter
            victim = dead["botkit.outbox"][0]
            button = driver.find_element(
                By.CSS_SELECTOR, f'#dead tr[data-message="{victim}"] button.requeue'
            )
            button.click()
            # Then the page comes back with a notice, and the letter has left the dead list
            notice = _wait(
                lambda: driver.find_element(By.CSS_SELECTOR, ".notice").text, "the notice"
            )
            assert notice == "Requeued 1 dead letter(s)."
            assert not driver.find_elements(By.CSS_SELECTOR, f'#dead tr[data-message="{victim}"]')
            assert victim not in {d.message_id for d in insp.dead_letters()}
            assert _cell(driver, "botkit.outbox", "dead") == 2
    finally:
        driver.quit()


def test_without_javascript_the_page_reads_and_its_forms_work(
    filled: tuple[Backend, dict[str, list[str]]],
) -> None:
    from selenium.webdriver.common.by import By

    b, dead = filled
    insp = inspect(b.broker)
    driver = _driver(javascript=False)
    try:
        with serving(app(b.broker, b.kv, refresh=1)) as url:
            driver.get(url + "/")
            # The live script never ran: its status stays empty
            assert driver.find_element(By.ID, "live-status").text == ""
            assert _cell(driver, "default", "dead") == 1
            # Clearing the unavailable host is a plain form POST
            driver.find_element(
                By.CSS_SELECTOR, 'tr[data-host="down.example"] button.clear'
            ).click()
            _wait(lambda: "Cleared the failure record" in driver.page_source, "the notice")
            assert not driver.find_elements(
                By.CSS_SELECTOR, 'tr[data-host="down.example"].unavailable'
            )
            # Purge all dead letters
            driver.find_element(By.CSS_SELECTOR, '#dead button[name="purge-all"]').click()
            _wait(lambda: "No dead letters." in driver.page_source, "the purge")
            assert insp.dead_letters() == []
            assert dead  # the fixture had made some
    finally:
        driver.quit()
