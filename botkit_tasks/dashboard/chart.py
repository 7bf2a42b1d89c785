"""The deliveries-per-minute chart: stacked bars as a self-contained SVG picture.

No JavaScript and no charting library: the SVG is built here, inlined in the
page (and served alone as ``/chart.svg``).  Each bar is one minute of
:func:`botkit_tasks.federation.stats.timeline`; green is delivered, amber
retried, red failed for good (permanent or gone).  Each bar has a ``<title>``,
which browsers show as a tooltip.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from html import escape

from ..federation.stats import MinuteCounts

__all__ = ["COLOURS", "deliveries_svg", "nice_ceiling"]

#: Fill colour per series: delivered, retried, failed (permanent or gone).
COLOURS = {"delivered": "#2e7d32", "retry": "#f9a825", "failed": "#c62828"}

_WIDTH = 720
_HEIGHT = 200
_LEFT = 40
_RIGHT = 8
_TOP = 10
_BOTTOM = 24


def nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, … that is at least ``value`` (at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def _series(m: MinuteCounts) -> list[tuple[str, int]]:
    c = m.counts
    return [
        ("delivered", c.get("delivered", 0)),
        ("retry", c.get("retry", 0)),
        ("failed", c.get("permanent", 0) + c.get("gone", 0)),
    ]


def _clock(minute: int) -> str:
    return dt.datetime.fromtimestamp(minute * 60, dt.timezone.utc).strftime("%H:%M")


def deliveries_svg(minutes: Sequence[MinuteCounts]) -> str:
    """An SVG document (no XML declaration, ready to inline) charting ``minutes``."""
    total = {name: 0 for name in COLOURS}
    for m in minutes:
        for name, n in _series(m):
            total[name] += n
    peak = max((sum(n for _, n in _series(m)) for m in minutes), default=0)
    top = nice_ceiling(peak)
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(minutes), 1)
    label = (
        f"Deliveries over the last {len(minutes)} minutes: {total['delivered']} delivered, "
        f"{total['retry']} retried, {total['failed']} failed"
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_WIDTH} {_HEIGHT}" '
        f'width="100%" role="img" aria-label="{escape(label)}" class="chart">',
        f"<title>{escape(label)}</title>",
    ]
    # Horizontal grid lines at 0, half and the top, labelled on the left.
    for value in (0, top // 2 if top >= 2 else None, top):
        if value is None:
            continue
        y = _TOP + plot_h - plot_h * value / top
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_WIDTH - _RIGHT}" y2="{y:.1f}" '
            'stroke="#ccc" stroke-width="1"/>'
            f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#555">{value}</text>'
        )
    for i, m in enumerate(minutes):
        x = _LEFT + i * slot + slot * 0.1
        y = float(_TOP + plot_h)
        series = _series(m)
        tip = f"{_clock(m.minute)} UTC: " + ", ".join(
            f"{n} {'retried' if name == 'retry' else name}" for name, n in series
        )
        parts.append(f'<g class="bar" data-minute="{m.minute}"><title>{escape(tip)}</title>')
        # An invisible full-height rectangle makes the tooltip reachable on empty minutes.
        parts.append(
            f'<rect x="{x:.1f}" y="{_TOP}" width="{slot * 0.8:.1f}" height="{plot_h}" '
            'fill="transparent"/>'
        )
        for name, n in series:
            if n == 0:
                continue
            h = plot_h * n / top
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" height="{h:.1f}" '
                f'fill="{COLOURS[name]}" data-series="{name}" data-count="{n}"/>'
            )
        parts.append("</g>")
    # Time labels every quarter of the window, and "now" at the right.
    for i in range(0, len(minutes), 15):
        x = _LEFT + i * slot + slot / 2
        parts.append(
            f'<text x="{x:.1f}" y="{_HEIGHT - 6}" text-anchor="middle" font-size="11" '
            f'fill="#555">{_clock(minutes[i].minute)}</text>'
        )
    if minutes:
        parts.append(
            f'<text x="{_WIDTH - _RIGHT}" y="{_HEIGHT - 6}" text-anchor="end" font-size="11" '
            'fill="#555">now</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
