"""Real ``celery worker`` processes for the Celery tests: start, wait, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class CeleryWorker:
    """One ``celery -A app worker`` process group, started in its own session."""

    def __init__(
        self, app: str, queues: str | None, env: Mapping[str, str], *, concurrency: int = 4
    ) -> None:
        self.log = open(  # noqa: SIM115 - closed in stop()
            ROOT / f".celery-worker-{os.getpid()}-{time.monotonic_ns()}.log", "w+b"
        )
        command = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "-c", str(concurrency), "-l", "info",
            "--without-heartbeat", "--without-mingle", "--without-gossip",
            "-n", f"w{time.monotonic_ns()}@%h",
        ]  # fmt: skip
        if queues is not None:  # None: the queues the app's declared jobs use
            command += ["-Q", queues]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT / "tests",
            env={**os.environ, **env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() reaches the pool too
        )

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once (a crashed host)."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self._close_log()

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown, then SIGKILL if it does not end in ``timeout``.

        SIGTERM goes to the main process only, which finishes (and acks) what
        its pool runs; a pool process sent SIGTERM itself would die mid-task.
        """
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-6000:]

    def _close_log(self) -> None:
        if not self.log.closed:
            path = Path(self.log.name)
            self.log.close()
            path.unlink(missing_ok=True)


@contextmanager
def celery_worker(
    app: str, queues: str | None, env: Mapping[str, str], *, concurrency: int = 4
) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(app, queues, env, concurrency=concurrency)
    try:
        yield worker
    except BaseException:
        if not worker.log.closed:
            sys.stderr.write(worker.output())
        raise
    finally:
        worker.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def send_jobs(broker_url: str, options: dict[str, object], queue: str, jobs: range) -> None:
    """Publish ``counting.work(i)`` for every ``i`` in ``jobs`` to ``queue``."""
    send_tasks(broker_url, options, queue, "counting.work", [[job] for job in jobs])


def send_tasks(
    broker_url: str, options: dict[str, object], queue: str, name: str, calls: list[list[object]]
) -> list[str]:
    """Publish task ``name`` once per argument list in ``calls``; return the task ids."""
    from celery import Celery

    import botkit_tasks.runners.kombu_sql  # noqa: F401  (registers botkit+… URLs)

    app = Celery("sender", broker=broker_url, set_as_current=False)
    app.conf.broker_transport_options = options
    with app.producer_or_acquire() as producer:
        ids = [app.send_task(name, args=args, queue=queue, producer=producer).id for args in calls]
    app.close()
    return ids
