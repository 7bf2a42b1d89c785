"""A retry that cannot be enqueued dead-letters the message instead of losing it."""

from __future__ import annotations

import time
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from botkit_tasks.brokers.retry_guard import RetryGuard, install_retry_guard

pytestmark = pytest.mark.timeout(30)


class RefusingRetries(StubBroker):
    """A stub broker whose delayed enqueues (the retries) fail, as a refused connection does."""

    def enqueue(self, message: Any, *, delay: int | None = None) -> Any:
        if delay is not None:
            raise ConnectionError("test: the queue refuses connections")
        return super().enqueue(message, delay=delay)


@pytest.mark.parametrize("guarded", [True, False])
def test_a_lost_retry_becomes_a_dead_letter(guarded: bool) -> None:
    broker = RefusingRetries()
    if guarded:
        install_retry_guard(broker)
        install_retry_guard(broker)  # idempotent
        assert sum(isinstance(m, RetryGuard) for m in broker.middleware) == 1
    broker.emit_after("process_boot")
    calls: list[int] = []

    @dramatiq.actor(broker=broker, max_retries=5, min_backoff=10)
    def flaky() -> None:
        calls.append(1)
        raise ValueError("boom")

    flaky.send()
    worker = dramatiq.Worker(broker, worker_timeout=50)
    worker.start()
    try:
        broker.join(flaky.queue_name, timeout=10_000, fail_fast=False)
        time.sleep(0.1)
    finally:
        worker.stop()
    # Given a retry that could not be enqueued, the message is a dead letter
    # when guarded, and simply gone (Dramatiq's behaviour) when not
    assert calls == [1]
    dead = broker.dead_letters_by_queue[flaky.queue_name]
    assert len(dead) == (1 if guarded else 0)
