"""The geometry of the report's charts; their SVG markup is in ``templates/macros.html``.

Each function returns a dict of coordinates already formatted as the SVG shows them (one
decimal, or three significant digits for axis labels), which the template's macro of the same
name draws. The page holds no chart library and loads nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

WIDTH = 560  # both charts' width in CSS pixels


def histogram(values: Sequence[float], label: str, marker: float | None = None,
              bins: int = 40, span: tuple[float, float] | None = None) -> dict[str, Any]:
    """A histogram of ``values`` in ``bins`` bars, with an optional vertical line at
    ``marker`` (a cutoff); the x axis covers ``span`` (widened to the values) or the values'
    range. ``values`` must not be empty."""
    width, height, pad = WIDTH, 160, 24
    low = min(min(values), span[0]) if span else min(values)
    high = max(max(values), marker if marker is not None else -math.inf,
               span[1] if span else -math.inf)
    high = high if high > low else low + 1.0
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    top = max(1, int(counts.max()))
    step = (width - 2 * pad) / bins
    bars = []
    for i, count in enumerate(counts):
        h = (height - 2 * pad) * count / top
        bars.append({"x": f"{pad + i * step:.1f}", "y": f"{height - pad - h:.1f}",
                     "width": f"{max(step - 1, 1):.1f}", "height": f"{h:.1f}"})
    chart = {"width": width, "height": height, "pad": pad, "right": width - pad,
             "axis_y": height - pad, "text_y": height - 6, "middle": f"{width / 2:.0f}",
             "top_text_y": f"{pad / 2 + 4:.0f}", "label": label, "bars": bars, "top": top,
             "low": f"{edges[0]:.3g}", "high": f"{edges[-1]:.3g}", "marker": None}
    if marker is not None:
        x = pad + (width - 2 * pad) * (marker - low) / (high - low)
        right = x > width / 2  # a label right of a line near the edge would be cut off
        chart["marker"] = {"x": f"{x:.1f}", "top": pad / 2,
                           "text_x": f"{x - 3:.1f}" if right else f"{x + 3:.1f}",
                           "anchor": "end" if right else "start",
                           "text_y": f"{pad + 14:.0f}", "label": f"{marker:.3g}"}
    return chart


def cumulative(points: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """A step chart of images committed (y) against seconds (x); ``points`` are
    ``(seconds, images so far)``, sorted, starting at ``(0, 0)``."""
    width, height, pad = WIDTH, 180, 32
    span = max(points[-1][0], 1e-9)
    total = max(points[-1][1], 1)
    xy = [(pad + (width - 2 * pad) * t / span, height - pad - (height - 2 * pad) * n / total)
          for t, n in points]
    return {"width": width, "height": height, "pad": pad, "right": width - pad,
            "axis_y": height - pad, "text_y": height - 10, "middle": f"{width / 2:.0f}",
            "points": " ".join(f"{x:.1f},{y:.1f}" for x, y in xy), "span": span,
            "total": total}
