"""``botkit-tasks demo`` runs end to end, checks itself, and cleans up after itself."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from botkit_tasks.cli import main

CODE = "import sys; from botkit_tasks.cli import main; sys.exit(main())"


def _demo(*args: str, session: bool = False) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    return subprocess.Popen(
        [sys.executable, "-c", CODE, "demo", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A session of its own, as a terminal gives a command: Ctrl-C signals the group.
        start_new_session=session,
    )


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _worker_pids(output: str) -> list[int]:
    """The pids the demo says its `dramatiq` command runs as (parent and workers)."""
    match = re.search(
        r"^\s+workers\s+`dramatiq` with (\d+) processes .*\(pids ([\d ]+)\)", output, re.M
    )
    assert match, f"no workers line in:\n{output}"
    pids = [int(p) for p in match.group(2).split()]
    assert len(pids) == int(match.group(1)) + 1  # the dramatiq parent and its workers
    return pids


def _alive(pids: list[int]) -> list[int]:
    # A zombie is gone for our purposes only once reaped; /proc shows both.
    return [p for p in pids if "dramatiq" in _cmdline(p)]


def _read_until(proc: subprocess.Popen[str], prefix: str, timeout: float = 60) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            break
    return lines


def _observed(summary: str, label: str) -> tuple[int, int]:
    """(observed, expected) of the summary row starting with ``label``."""
    match = re.search(rf"^\s+{re.escape(label)}\s+(\d+)\s+(\d+)\s+ok$", summary, re.M)
    assert match, f"no passing row {label!r} in:\n{summary}"
    return int(match.group(1)), int(match.group(2))


@pytest.mark.timeout(170)
def test_demo_command_completes_as_scripted() -> None:
    # Given a fresh machine's view (no backend variables), when the README's command runs
    proc = _demo()
    output, _ = proc.communicate(timeout=160)
    # Then it exits 0 and its summary says everything behaved as scripted
    assert proc.returncode == 0, output
    assert "Result: OK - everything behaved as scripted." in output
    # The jobs ran in real `dramatiq` processes, all gone now
    pids = _worker_pids(output)
    assert len(pids) == 3
    assert _alive(pids) == []
    summary = output[output.index("Summary (") :]
    assert _observed(summary, "follows accepted (signed Accept verified)") == (240, 240)
    delivered, expected = _observed(summary, "delivered (2xx, signature verified)")
    assert delivered == expected > 150
    assert _observed(summary, "permanently failed: 410 Gone") == (1, 1)
    assert _observed(summary, "dead letters (retries exhausted)") == (1, 1)
    assert _observed(summary, "followers after the 410 dropped one") == (239, 239)
    retried, _ = _observed(summary, "delivered after retries (500s, 429)")
    assert retried >= 4
    seconds = float(re.search(r"Summary \((\d+\.\d) s\)", output).group(1))  # type: ignore[union-attr]
    assert seconds < 60
    # Not a terminal: periodic progress lines, no ANSI escapes
    assert "\x1b[" not in output
    assert re.search(r"^\[\s*\d+\.\ds\] phase 2/2 \| follows 240/240", output, re.M)
    # And its temporary directory is gone
    (db,) = re.findall(r"storage\s+SQLite (\S+)", output)
    assert not Path(db).parent.exists()


@pytest.mark.timeout(120)
def test_demo_in_process_with_kept_database(tmp_path: Path) -> None:
    # main(["demo", ...]) in this process; --keep leaves a database to inspect
    out = io.StringIO()
    keep = tmp_path / "kept"
    code = main(["demo", "--followers", "40", "--threads", "4", "--keep", str(keep)], stdout=out)
    text = out.getvalue()
    assert code == 0, text
    assert (keep / "demo.sqlite3").exists() and (keep / "demo.log").exists()
    # The kept database answers `botkit-tasks status`: the one dead delivery is there
    status = io.StringIO()
    assert main(["--database-url", f"sqlite:///{keep}/demo.sqlite3", "status"], stdout=status) == 0
    row = next(
        ln.split() for ln in status.getvalue().splitlines() if ln.startswith("botkit.outbox")
    )
    assert row[1:] == ["0", "0", "0", "1"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("whole_group", [False, True], ids=["sigint-to-demo", "ctrl-c-to-group"])
def test_demo_interrupted_stops_everything(whole_group: bool) -> None:
    # Given a demo whose worker processes are running jobs
    proc = _demo("--followers", "200", session=whole_group)
    lines = _read_until(proc, "Phase 1/2")
    pids = _worker_pids("".join(lines))
    assert len(_alive(pids)) == len(pids), "".join(lines)
    time.sleep(1.0)
    # When Ctrl-C is pressed (SIGINT to the demo, or to its whole process group
    # as a terminal does)
    if whole_group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=40)
    output = "".join(lines) + rest
    # Then it stops with 130, no worker process is left and its directory is gone
    assert proc.returncode == 130, output
    assert "Interrupted" in output
    assert _alive(pids) == []
    (db,) = re.findall(r"storage\s+SQLite (\S+)", output)
    assert not Path(db).parent.exists()


@pytest.mark.timeout(90)
def test_workers_stop_by_themselves_when_the_demo_is_killed(tmp_path: Path) -> None:
    # Given a running demo, killed outright (no chance to stop its workers)
    proc = _demo("--followers", "200", "--keep", str(tmp_path / "kept"))
    lines = _read_until(proc, "Phase 1/2")
    pids = _worker_pids("".join(lines))
    assert len(_alive(pids)) == len(pids), "".join(lines)
    proc.kill()
    proc.communicate(timeout=10)
    # Then the workers notice (their lifeline closed) and stop within seconds
    deadline = time.monotonic() + 30
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _alive(pids)
    for pid in left:  # never leave them behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert left == []


def test_demo_rejects_too_few_followers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--followers", "3"]) == 2
    assert "at least 20 followers" in capsys.readouterr().err


def test_live_progress_redraws_in_place() -> None:
    from botkit_tasks.demo.display import Progress, bar, table

    frames = iter([["a", "b", "c"], ["d", "e"], ["f", "g"]])
    out = io.StringIO()
    progress = Progress(out, lambda live: next(frames), live=True, interval=3600)
    progress.start()
    progress.draw()  # three lines
    progress.draw()  # cursor up three, redraw two, clear the leftover line
    progress.say("permanent line")
    progress.stop()  # last frame, cursor shown again
    text = out.getvalue()
    assert text.startswith("\x1b[?25l") and text.endswith("\x1b[?25h")
    assert "\x1b[3F\x1b[2Kd\n\x1b[2Ke\n\x1b[2K\n\x1b[1F" in text
    assert "permanent line\n" in text
    assert bar(5, 10, width=10) == "[#####-----]"
    assert table([["x", 1], ["long", 22]], headers=["name", "n"]) == [
        "name   n",
        "x      1",
        "long  22",
    ]
