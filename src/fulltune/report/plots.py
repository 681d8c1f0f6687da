"""The report's pictures: SVG line charts and the confusion heatmap (inline, no network), and curves.png.

Charts keep their legend below the plot area, put ticks on round values (1, 2, 2.5 or 5 times a power of ten), and
draw a series of one point as a labelled marker.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
CHAR_PX = 6.2  # width of one character at font-size 10 (sans-serif), to lay out legends and labels


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers rounded for people: 4 significant digits, thousands separators for counts and large values."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if 1e4 <= abs(v) < 1e9:
            return f"{v:,.0f}"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e9):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> tuple[list[float], float]:
    """About `n` ticks on round values (a step of 1, 2, 2.5 or 5 times a power of ten) inside [lo, hi], and the
    step; `integer` keeps the step at 1 or more (optimizer steps)."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, step if step >= 1 else 1.0)
        if step == 2.5:
            step = 2.0
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)], step


def tick_labels(values: list[float], step: float) -> list[str]:
    """Tick values written alike along one axis, with just the digits the step needs: 0.15 0.2 0.25 -> 0.15 0.20
    0.25; 2.5e-4 5e-4; 1,000 2,000. `step` 0 (a log axis) writes each value with its own digits."""
    if step >= 1 and all(abs(v) < 1e6 for v in values):
        return [f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}" for v in values]
    if (step >= 1e-3 or step == 0) and all(v == 0 or 1e-3 <= abs(v) < 1e6 for v in values):
        if step == 0:
            return [f"{v:,.6g}" for v in values]
        decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if _mantissa(step) == 2.5 else 0)
        return [f"{v:.{decimals}f}" for v in values]
    return [scientific(v) for v in values]


def scientific(v: float) -> str:
    """2.5e-4, 1e-3, 0: a mantissa of up to four digits without trailing zeros, the exponent without padding."""
    if v == 0:
        return "0"
    exponent = math.floor(math.log10(abs(v)) + 1e-9)
    mantissa = f"{v / 10**exponent:.3f}".rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


def _mantissa(v: float) -> float:
    return round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)


def log_ticks(lo: float, hi: float) -> tuple[list[float], float]:
    """Round values for a log axis over [lo, hi] (values, not logarithms): 1-2-5 per decade, only powers of ten over
    many decades, and evenly spaced round values where fewer than three of those fall in the range; and their step
    (0 where they are not evenly spaced)."""
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1,), (1, 2, 5)) if len(decades) > 6 else ((1, 2, 5),):
        ticks = [m * 10.0**k for k in decades for m in mantissas if lo <= m * 10.0**k <= hi]
        if len(ticks) >= 3:  # two (0.5 and 1) read worse than the evenly spaced 0.6 0.8 1.0 below
            return [float(f"{t:.6g}") for t in ticks], 0.0
    return nice_ticks(lo, hi, 4)


def _legend(names: list[str], colors: list[str], x: float, y: float, width: float) -> tuple[str, float]:
    """Legend entries (a short line and the name) laid out in rows from (x, y) within `width`; (svg, height)."""
    parts, cx, cy = [], x, y
    for name, color in zip(names, colors, strict=True):
        w = 22 + CHAR_PX * len(name) + 12
        if cx > x and cx + w > x + width:
            cx, cy = x, cy + 14
        parts.append(
            f'<line x1="{cx:.1f}" x2="{cx + 16:.1f}" y1="{cy - 3:.1f}" y2="{cy - 3:.1f}" stroke="{color}" '
            f'stroke-width="2"/><text x="{cx + 20:.1f}" y="{cy:.1f}" font-size="10">{html.escape(name)}</text>'
        )
        cx += w
    height = cy - y + 14
    box = f'<rect class="legend" x="{x - 4}" y="{y - 12}" width="{width + 8}" height="{height + 2}" fill="none"/>'
    return box + "".join(parts), height


@dataclass
class Axis:
    """One axis of a chart: its range, round ticks and their labels; `log` maps values through log10."""

    lo: float
    hi: float
    ticks: list[float]
    labels: list[str]
    log: bool = False

    def frac(self, v: float) -> float:
        """Where `v` falls along the axis, 0 at `lo` and 1 at `hi`."""
        f = math.log10 if self.log else float
        return (f(v) - f(self.lo)) / (f(self.hi) - f(self.lo))


def step_axis(xs: list[float], integer: bool) -> Axis:
    """An axis over exactly the values' range (optimizer steps, epochs)."""
    lo, hi = min(xs), max(xs)
    if hi == lo:  # one evaluation: a marker in the middle, one tick under it (not an axis from 16 to 17)
        return Axis(lo - 1, hi + 1, [lo], tick_labels([lo], 1.0))
    ticks, step = nice_ticks(lo, hi, 5, integer)
    return Axis(lo, hi, ticks, tick_labels(ticks, step))


def value_axis(values: list[float], log: bool = False) -> Axis:
    """An axis with a margin around the values (metrics, losses, a searched setting); values close together get a
    readable span around them (2% of their size), not ticks in the fourth decimal."""
    lo, hi = min(values), max(values)
    if log:
        lo, hi = (lo / 1.5, hi * 1.5) if hi / lo < 1.1 else (lo / 1.15, hi * 1.15)  # a dot at an end stays inside
        ticks, step = log_ticks(lo, hi)
        return Axis(lo, hi, ticks, tick_labels(ticks, step), log=True)
    pad = max((hi - lo) * 0.05, abs(hi) * 0.02) or 1.0
    ticks, step = nice_ticks(lo - pad, hi + pad, 5)
    return Axis(lo - pad, hi + pad, ticks, tick_labels(ticks, step))


def svg_open(title: str, width: float, height: float) -> list[str]:
    """The start of an inline SVG figure: white ground and the title on top."""
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" role="img" '
        f'aria-label="{html.escape(title)}"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2}" y="17" text-anchor="middle" font-size="13" font-weight="bold">'
        f"{html.escape(title)}</text>",
    ]


@dataclass
class Frame:
    """A chart's plot area (left, top, width, height in pixels) and its two axes: `px`/`py` place a value."""

    left: float
    top: float
    width: float
    height: float
    x: Axis
    y: Axis

    def px(self, v: float) -> float:
        return self.left + self.x.frac(v) * self.width

    def py(self, v: float) -> float:
        return self.top + (1 - self.y.frac(v)) * self.height

    def axes(self, xlabel: str, ylabel: str, label_y: float) -> list[str]:
        """The plot area's box, the y grid and tick labels, the x ticks and their labels, the axis names (the x
        name's baseline at `label_y`; no y name when `ylabel` is empty)."""
        left, top, pw, ph = self.left, self.top, self.width, self.height
        out = [f'<rect class="plot" x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
        for t, label in zip(self.y.ticks, self.y.labels, strict=True):
            out.append(
                f'<line x1="{left}" x2="{left + pw}" y1="{self.py(t):.1f}" y2="{self.py(t):.1f}" stroke="#eee"/>'
                f'<text class="ytick" x="{left - 4}" y="{self.py(t) + 4:.1f}" text-anchor="end" font-size="10">'
                f"{html.escape(label)}</text>"
            )
        for t, label in zip(self.x.ticks, self.x.labels, strict=True):
            x = self.px(t)
            out.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#999"/>'
                f'<text class="xtick" x="{x:.1f}" y="{top + ph + 15}" text-anchor="middle" font-size="10">'
                f"{html.escape(label)}</text>"
            )
        out.append(
            f'<text x="{left + pw / 2}" y="{label_y}" text-anchor="middle" font-size="11">{html.escape(xlabel)}</text>'
        )
        if ylabel:
            out.append(
                f'<text x="12" y="{top + ph / 2}" text-anchor="middle" font-size="11" '
                f'transform="rotate(-90 12 {top + ph / 2})">{html.escape(ylabel)}</text>'
            )
        return out


def svg_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    xlabel: str = "optimizer step",
    ylabel: str = "",
    log_y: bool = False,
    width: int = 460,
    height: int = 260,
) -> str:
    """An inline SVG line chart: one polyline per series (markers where a series has few points), the legend below
    the plot area, round ticks; a series of one point is a marker labelled with its value."""
    series = {
        k: sorted((x, y) for x, y in v if y is not None and math.isfinite(y) and (y > 0 or not log_y))
        for k, v in series.items()
    }
    series = {k: v for k, v in series.items() if v}
    left, right, top, bottom = 70 if ylabel else 58, 14, 28, 40
    pw, ph = width - left - right, height - top - bottom
    legend, legend_h = "", 0.0
    if len(series) > 1:
        colors = [PALETTE[k % len(PALETTE)] for k in range(len(series))]
        legend, legend_h = _legend(list(series), colors, left, height + 12, pw)
    total_h = height + legend_h + (12 if legend else 0)
    out = svg_open(title, width, total_h)
    if not series:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888">no data yet</text></svg>')
        return "".join(out)
    xs = [x for v in series.values() for x, _ in v]
    integer_x = all(float(x).is_integer() for x in xs)
    ys = [y for v in series.values() for _, y in v]
    frame = Frame(left, top, pw, ph, step_axis(xs, integer_x), value_axis(ys, log_y))
    px, py = frame.px, frame.py
    out += frame.axes(xlabel, ylabel, height - 6)
    for k, points in enumerate(series.values()):
        color = PALETTE[k % len(PALETTE)]
        if len(points) > 1:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{coords}"/>')
        if len(points) <= 40:
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in points)
        if len(points) == 1:
            (x, y), anchor = points[0], "start" if px(points[0][0]) < left + pw * 0.6 else "end"
            below = py(y) < top + 16  # near the top edge: the label goes under the marker
            out.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{color}"/><text class="value" '
                f'x="{px(x) + (8 if anchor == "start" else -8):.1f}" y="{py(y) + (14 if below else -6):.1f}" '
                f'text-anchor="{anchor}" '
                f'font-size="11" fill="{color}">{fmt(float(y))} at {xlabel} {fmt(int(x) if integer_x else x)}</text>'
            )
    out.append(legend + "</svg>")
    return "".join(out)


def _blue(t: float) -> str:
    """White (0) to dark blue (1)."""
    t = min(max(t, 0.0), 1.0)
    r, g, b = (round(255 + (c - 255) * t) for c in (8, 48, 107))
    return f"rgb({r},{g},{b})"


def svg_heatmap(matrix: list[list[int]], labels: list[str], max_px: int = 600) -> str:
    """The confusion matrix as an SVG heatmap, row-normalised (white 0, dark blue 1), with class names on both axes
    (every k-th where cells are too small to hold a name) and, where cells are big enough, count and percent."""
    n = max(len(matrix), 1)
    norm = normalise_rows(matrix)
    cell = max(3.0, min(48.0, max_px / n))
    font = max(7.0, min(11.0, cell * 0.8))
    every = 1 if cell >= 9 else math.ceil(9 / cell)
    names = [lb if len(lb) <= 24 else lb[:23] + "…" for lb in labels]
    name_px = max((len(s) for s in names), default=1) * font * 0.62 + 8
    left, top = name_px + 18, 24.0
    side = cell * n
    height = top + side + name_px * 0.75 + 26
    out = [
        f'<svg class="heatmap" xmlns="http://www.w3.org/2000/svg" width="{left + side + 12:.0f}" '
        f'height="{height:.0f}" role="img" aria-label="confusion matrix"><rect width="100%" height="100%" '
        f'fill="white"/><text x="{left + side / 2:.1f}" y="14" text-anchor="middle" font-size="11">'
        "predicted class (columns); row-normalised</text>"
    ]
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            x, y, v = left + j * cell, top + i * cell, norm[i][j]
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" fill="{_blue(v)}" '
                f'stroke="#ddd" stroke-width="{0.5 if cell >= 6 else 0}"><title>true {html.escape(labels[i])}, '
                f"predicted {html.escape(labels[j])}: {count} ({100 * v:.0f}%)</title></rect>"
            )
            if cell >= 28:
                ink = "white" if v > 0.5 else "black"
                out.append(
                    f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 - 1:.1f}" text-anchor="middle" font-size="10" '
                    f'fill="{ink}">{count}</text><text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 10:.1f}" '
                    f'text-anchor="middle" font-size="8" fill="{ink}">{100 * v:.0f}%</text>'
                )
    for k, name in enumerate(names):
        if k % every:
            continue
        c = k * cell + cell / 2
        out.append(
            f'<text class="row-label" x="{left - 4:.1f}" y="{top + c + font * 0.35:.1f}" text-anchor="end" '
            f'font-size="{font:.1f}">{html.escape(name)}</text>'
            f'<text class="col-label" x="{left + c:.1f}" y="{top + side + 6:.1f}" text-anchor="end" '
            f'font-size="{font:.1f}" transform="rotate(-50 {left + c:.1f} {top + side + 6:.1f})">'
            f"{html.escape(name)}</text>"
        )
    out.append(
        f'<text x="10" y="{top + side / 2:.1f}" text-anchor="middle" font-size="11" '
        f'transform="rotate(-90 10 {top + side / 2:.1f})">true class (rows)</text></svg>'
    )
    return "".join(out)


def normalise_rows(matrix: list[list[int]]) -> list[list[float]]:
    return [[v / sum(row) if sum(row) else 0.0 for v in row] for row in matrix]


def plot_confusion_png(matrix: list[list[int]], labels: list[str], path: Path, title: str = "confusion matrix") -> None:
    """confusion_matrix.png: counts and the row-normalised view side by side, titled, legible up to ~200 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    side = min(max(4.0, 0.32 * n + 2), 24.0)
    font = max(5.0, min(9.0, 300 / max(n, 1)))
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side + 0.8), squeeze=False)
    norm = normalise_rows(matrix)
    for ax, data, name in ((axes[0][0], matrix, "counts"), (axes[0][1], norm, "row-normalised (recall per class)")):
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=None if data is matrix else 1, interpolation="nearest")
        ticks = range(n) if n <= 60 else range(0, n, max(1, n // 40))
        ax.set_xticks(list(ticks), [labels[i] for i in ticks], rotation=70, ha="right", fontsize=font)
        ax.set_yticks(list(ticks), [labels[i] for i in ticks], fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=11)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if n <= 25:
            peak = max((max(r) for r in data), default=1) or 1
            for i, row in enumerate(data):
                for j, v in enumerate(row):
                    text = str(v) if data is matrix else f"{v:.2f}"
                    ax.text(
                        j, i, text, ha="center", va="center", fontsize=font, color="white" if v > peak / 2 else "black"
                    )
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Panel:
    """One chart of the report's curves."""

    title: str
    series: dict[str, list[tuple[float, float]]]
    log_y: bool = False
    ylabel: str = ""


def curve_series(
    rows: list[dict[str, Any]], metric: str | None = None, schedule: dict[str, Any] | None = None
) -> list[Panel]:
    """The four panels: training loss at every logged optimizer step, the validation metric at each evaluation, the
    learning rate of each group (from the schedule where the run wrote it, so warmup shows), the gradient norm."""
    train = [r for r in rows if r.get("split", "train") == "train" and "loss" in r]
    evals = [r for r in rows if r.get("split") in ("val", "validation")]
    lm = metric == "perplexity"
    metric_keys = [metric] if metric else []
    metric_keys += [k for k in ("accuracy", "macro_f1", "perplexity") if k not in metric_keys]
    val = {f"val {k}": [(r["step"], r.get(k)) for r in evals] for k in metric_keys if any(k in r for r in evals)}
    if not val and evals:
        val = {"val loss": [(r["step"], r.get("loss")) for r in evals]}
    losses = [p for r in train for p in (r.get("step_losses") or [(r["step"], r.get("loss"))])]
    loss = {"train loss": [(s, v) for s, v in losses]}
    if any("loss" in r for r in evals):
        loss["val loss"] = [(r["step"], r.get("loss")) for r in evals]
    groups: dict[str, list] = {}
    if schedule and schedule.get("steps"):
        groups = {name: list(zip(schedule["steps"], lrs, strict=True)) for name, lrs in schedule["lrs"].items()}
    else:
        for r in train:
            for name, lr in (r.get("lrs") or {"lr": r.get("lr")}).items():
                groups.setdefault(str(name), []).append((r["step"], lr))
    grad = {"gradient norm (before clipping)": [(r["step"], r.get("grad_norm")) for r in train]}
    only = next(iter(val)).removeprefix("val ") if len(val) == 1 else ""
    regression = any("pearson" in r for r in evals)  # train and val loss: training.loss (MSE or Huber)
    return [
        Panel("loss", loss, False, "cross-entropy per token" if lm else "loss" if regression else "cross-entropy"),
        Panel(f"validation {only}" if only else "validation metric", val, only == "perplexity", only),
        Panel("learning rate per group", groups, False, "learning rate"),
        Panel("gradient norm", grad, True, "L2 norm"),
    ]


def plot_curves_png(
    rows: list[dict[str, Any]], path: Path, metric: str | None = None, schedule: dict[str, Any] | None = None
) -> None:
    """curves.png: the report's four panels (curve_series) for a quick look outside the browser."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, panel in zip(axes.flat, curve_series(rows, metric, schedule), strict=False):
        for name, points in panel.series.items():
            pts = [(x, y) for x, y in points if y is not None and math.isfinite(y) and (y > 0 or not panel.log_y)]
            if pts:
                ax.plot(
                    [x for x, _ in pts],
                    [y for _, y in pts],
                    marker="o" if len(pts) <= 40 else None,
                    markersize=3 if len(pts) > 1 else 6,
                    label=name,
                )
            if len(pts) == 1:
                ax.annotate(
                    f"{fmt(float(pts[0][1]))} at step {pts[0][0]}",
                    pts[0],
                    xytext=(6, 6),
                    textcoords="offset points",
                    fontsize=8,
                )
        ax.set_title(panel.title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(panel.ylabel)
        if panel.log_y:
            ax.set_yscale("log")
            for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_format(matplotlib.ticker.FormatStrFormatter("%g"))  # 0.9, not 9 x 10^-1
        if 1 < len(panel.series) <= 10:  # below the axes, never over the data
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(3, len(panel.series)))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
