"""What report.html shows of a regression's evaluation in place of a confusion matrix: its metrics (MSE, MAE,
Pearson, Spearman) and an inline SVG scatter of each prediction against the truth, with the y = x line a perfect
model would sit on.
"""

from __future__ import annotations

import html
from typing import Any

from fulltune.report.plots import Frame, fmt, svg_open, value_axis

MAX_POINTS = 2000
"""The scatter draws at most this many examples (evenly spaced through the split) so the page stays small."""


def scatter_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """What report/<name>.json keeps of a regression's evaluation: its scalars and up to MAX_POINTS
    (truth, prediction) pairs."""
    truth, pred = metrics["targets"], metrics["predictions"]
    every = max(1, -(-len(truth) // MAX_POINTS))  # ceil: at most MAX_POINTS
    points = [[round(t, 6), round(p, 6)] for t, p in list(zip(truth, pred, strict=True))[::every]]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return {"scatter": points, **scalars}


def svg_scatter(points: list[list[float]], title: str, size: int = 420) -> str:
    """An inline SVG scatter of prediction (y) against truth (x) on one scale for both axes, with the y = x line."""
    left, right, top, bottom = 58, 14, 28, 40
    plot = size - left - right
    height = top + plot + bottom
    out = svg_open(title, size, height)
    if not points:
        return "".join(out) + f'<text x="{size / 2}" y="{height / 2}" text-anchor="middle">no examples</text></svg>'
    axis = value_axis([v for p in points for v in p])
    frame = Frame(left, top, plot, plot, axis, axis)
    px, py = frame.px, frame.py
    out += frame.axes("truth", "prediction", height - 6)
    lo, hi = axis.lo, axis.hi
    out.append(
        f'<line class="diagonal" x1="{px(lo):.1f}" y1="{py(lo):.1f}" x2="{px(hi):.1f}" y2="{py(hi):.1f}" '
        'stroke="#d62728" stroke-dasharray="4 3"/>'
    )
    out.extend(
        f'<circle cx="{px(t):.1f}" cy="{py(p):.1f}" r="2.5" fill="#1f77b4" fill-opacity="0.5"/>' for t, p in points
    )
    return "".join(out) + "</svg>"


def scatter_section(rec: dict[str, Any], title: str) -> str:
    """The report's section for one regression evaluation: what was scored, its metrics and the scatter."""
    where = f" at step {rec['step']}" if rec.get("step") is not None else ""
    weights = f" ({rec['weights']} weights)" if rec.get("weights") else ""
    shown = len(rec["scatter"])
    sample = f" (the scatter shows {shown:,} of them, evenly spaced)" if shown < (rec.get("examples") or 0) else ""
    return (
        f"<h2>{html.escape(title)}</h2><p class='muted'>{html.escape(str(rec.get('split', '')))}{where}{weights}: "
        f"{fmt(rec.get('examples'))} examples{sample}, MSE {fmt(rec.get('mse'))}, MAE {fmt(rec.get('mae'))}, "
        f"Pearson {fmt(rec.get('pearson'))}, Spearman {fmt(rec.get('spearman'))}. Each point is one example; on "
        "the dashed line the prediction equals the truth.</p>"
        f"<div class='grid'><figure>{svg_scatter(rec['scatter'], 'prediction vs truth')}</figure></div>"
    )
