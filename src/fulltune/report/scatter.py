"""What report.html shows of a regression's evaluation in place of a confusion matrix: its metrics (MSE, MAE,
Pearson, Spearman) and an inline SVG scatter of each prediction against the truth, with the y = x line a perfect
model would sit on.
"""

from __future__ import annotations

import html
from typing import Any

from fulltune.report.plots import fmt, nice_ticks, tick_labels

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
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{size / 2}" y="17" text-anchor="middle" font-size="13" font-weight="bold">'
        f"{html.escape(title)}</text>",
    ]
    if not points:
        return "".join(out) + f'<text x="{size / 2}" y="{height / 2}" text-anchor="middle">no examples</text></svg>'
    values = [v for p in points for v in p]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or abs(lo) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
    ticks, step = nice_ticks(lo, hi, 5)
    labels = tick_labels(ticks, step)

    def px(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot

    def py(v: float) -> float:
        return top + (1 - (v - lo) / (hi - lo)) * plot

    out.append(f'<rect x="{left}" y="{top}" width="{plot}" height="{plot}" fill="none" stroke="#999"/>')
    for t, label in zip(ticks, labels, strict=True):
        out.append(
            f'<line x1="{left}" x2="{left + plot}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
            f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end" font-size="10">{label}</text>'
            f'<text x="{px(t):.1f}" y="{top + plot + 15}" text-anchor="middle" font-size="10">{label}</text>'
        )
    out.append(
        f'<line class="diagonal" x1="{px(lo):.1f}" y1="{py(lo):.1f}" x2="{px(hi):.1f}" y2="{py(hi):.1f}" '
        'stroke="#d62728" stroke-dasharray="4 3"/>'
    )
    out.extend(
        f'<circle cx="{px(t):.1f}" cy="{py(p):.1f}" r="2.5" fill="#1f77b4" fill-opacity="0.5"/>' for t, p in points
    )
    out.append(f'<text x="{left + plot / 2}" y="{height - 6}" text-anchor="middle" font-size="11">truth</text>')
    out.append(
        f'<text x="12" y="{top + plot / 2}" text-anchor="middle" font-size="11" '
        f'transform="rotate(-90 12 {top + plot / 2})">prediction</text></svg>'
    )
    return "".join(out)


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
