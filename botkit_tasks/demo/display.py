"""Live progress on a terminal, or periodic lines when output is not a terminal.

No dependency: a TTY gets a block of lines redrawn in place with plain ANSI
escapes (cursor up, clear line); anything else (a pipe, a CI log) gets one
compact line every few seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TextIO

__all__ = ["Progress", "bar", "table"]

_CLEAR_LINE = "\x1b[2K"
_HIDE_CURSOR = "\x1b[?25l"
_SHOW_CURSOR = "\x1b[?25h"


def bar(done: int, total: int, width: int = 24) -> str:
    """``[#########---------]`` for ``done`` out of ``total``."""
    filled = 0 if total <= 0 else min(width, round(width * done / total))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def table(rows: Sequence[Sequence[object]], *, headers: Sequence[str] | None = None) -> list[str]:
    """Rows as aligned text lines; integer columns (and their headers) are right-aligned."""
    all_rows: list[list[object]] = [list(headers)] if headers else []
    all_rows += [list(r) for r in rows]
    ncols = len(all_rows[0])
    widths = [max(len(str(r[i])) for r in all_rows) for i in range(ncols)]
    numeric = [bool(rows) and all(isinstance(r[i], int) for r in rows) for i in range(ncols)]
    lines = []
    for row in all_rows:
        cells = [
            str(cell).rjust(widths[i]) if numeric[i] else str(cell).ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


class Progress:
    """Redraws ``render(live)`` every ``interval`` seconds from a background thread.

    Args:
        out: The stream to write to.
        render: Returns the lines to show; ``live`` tells whether the full
            multi-line view (TTY) or one compact line (plain) is wanted.
        live: Redraw in place with ANSI escapes; otherwise print a line every
            ``plain_interval`` seconds.
    """

    def __init__(
        self,
        out: TextIO,
        render: Callable[[bool], list[str]],
        *,
        live: bool,
        interval: float = 0.25,
        plain_interval: float = 2.0,
    ) -> None:
        self.out = out
        self.render = render
        self.live = live
        self.interval = interval if live else plain_interval
        self._shown = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.live:
            self.out.write(_HIDE_CURSOR)
        self._thread = threading.Thread(target=self._loop, name="botkit-demo-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.draw()

    def draw(self) -> None:
        """Draw once now (also called at phase changes)."""
        try:
            lines = self.render(self.live)
        except Exception as exc:  # a display must never take the demo down
            lines = [f"(progress unavailable: {type(exc).__name__}: {exc})"]
        with self._lock:
            if self.live:
                buf = []
                if self._shown:
                    buf.append(f"\x1b[{self._shown}F")
                buf.extend(f"{_CLEAR_LINE}{line}\n" for line in lines)
                # Clear leftovers when the block got shorter.
                extra = self._shown - len(lines)
                if extra > 0:
                    buf.extend(f"{_CLEAR_LINE}\n" for _ in range(extra))
                    buf.append(f"\x1b[{extra}F")
                self.out.write("".join(buf))
                self._shown = len(lines)
            else:
                for line in lines:
                    self.out.write(line + "\n")
            self.out.flush()

    def say(self, line: str) -> None:
        """Print a permanent line above the live block (or just print it)."""
        with self._lock:
            if self.live and self._shown:
                self.out.write(f"\x1b[{self._shown}F")
                self.out.write("".join(f"{_CLEAR_LINE}\n" for _ in range(self._shown)))
                self.out.write(f"\x1b[{self._shown}F")
                self._shown = 0
            self.out.write(line + "\n")
            self.out.flush()

    def stop(self, *, final: bool = True) -> None:
        """Stop redrawing; draw a last time when ``final``; restore the cursor."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if final:
            self.draw()
        if self.live:
            self.out.write(_SHOW_CURSOR)
            self.out.flush()


def elapsed(since: float) -> str:
    """Seconds since ``since`` (a ``time.monotonic()`` value), formatted."""
    return f"{time.monotonic() - since:5.1f} s"
