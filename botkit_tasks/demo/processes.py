"""The demo's ``dramatiq`` worker processes: started as a deployment starts them, never left behind.

``dramatiq botkit_tasks.demo.dramatiq_app:broker -p N -t T`` runs in a
process group of its own, so that stopping it reaches every process it
forked.  :meth:`WorkerProcesses.stop` sends ``SIGTERM`` (Dramatiq's graceful
stop: running jobs finish, claimed messages go back), waits, then kills the
group with ``SIGKILL``.  A pipe (the *lifeline*) is inherited by the workers;
should the demo die without stopping them, they read end-of-file on it and
stop themselves (see :mod:`.dramatiq_app`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

__all__ = ["WorkerProcesses"]

#: Seconds the workers get to finish their jobs after SIGTERM before SIGKILL.
GRACE_SECONDS = 8.0


class WorkerProcesses:
    """One ``dramatiq`` command with ``processes`` worker processes of ``threads`` threads."""

    def __init__(
        self, *, db_path: Path, base_url: str, processes: int, threads: int, log_path: Path
    ) -> None:
        self.db_path = db_path
        self.base_url = base_url
        self.processes = max(processes, 1)
        self.threads = max(threads, 1)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        """Start the ``dramatiq`` command (returns at once; see :meth:`wait_ready`)."""
        read_end, self._lifeline = os.pipe()
        env = {
            **os.environ,
            "BOTKIT_DEMO_DB": str(self.db_path),
            "BOTKIT_DEMO_BASE_URL": self.base_url,
            "BOTKIT_DEMO_LIFELINE": str(read_end),
            "PYTHONUNBUFFERED": "1",
        }
        command = [
            sys.executable,
            "-m",
            "dramatiq",
            "botkit_tasks.demo.dramatiq_app:broker",
            "--processes",
            str(self.processes),
            "--threads",
            str(self.threads),
            # In milliseconds: how long a stopping worker waits for its jobs.
            "--worker-shutdown-timeout",
            str(int(GRACE_SECONDS * 1000) - 2000),
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                pass_fds=(read_end,),
                # Its own process group: Ctrl-C in the terminal reaches the demo,
                # which stops the workers in order; stop() can signal the group.
                start_new_session=True,
            )
        finally:
            os.close(read_end)

    def pids(self) -> list[int]:
        """The ``dramatiq`` parent and every process in its group (Linux ``/proc``)."""
        if self.proc is None:
            return []
        found = [self.proc.pid]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.proc.pid:
                continue
            try:
                if os.getpgid(int(entry.name)) == self.proc.pid:
                    found.append(int(entry.name))
            except OSError:
                continue
        return sorted(found)

    def wait_ready(self, ready: object, timeout: float = 30.0) -> None:
        """Wait until ``ready()`` is true; raise if the command exits or time runs out."""
        assert callable(ready)
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"the dramatiq workers exited with status {self.proc.returncode}; "
                    f"see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the dramatiq workers did not start in time; see {self.log_path}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the workers (SIGTERM, then SIGKILL of the group); idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=GRACE_SECONDS)
            # Whatever is left of the group — the parent that did not stop in
            # time, or a worker it lost track of — is killed.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._log is not None:
            self._log.close()
            self._log = None
