"""The report's pictures: SVG line charts (inline, no network), confusion heatmaps as PNG, and curves.png."""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers rounded for people: 4 significant digits, thousands separators for counts."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def svg_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    xlabel: str = "optimizer step",
    log_y: bool = False,
    width: int = 460,
    height: int = 260,
) -> str:
    """An inline SVG line chart (one polyline per series, markers where a series has few points)."""
    series = {
        k: [(x, y) for x, y in v if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
        for k, v in series.items()
    }
    series = {k: v for k, v in series.items() if v}
    left, right, top, bottom = 62, 12, 28, 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2}" y="17" text-anchor="middle" font-size="13" font-weight="bold">'
        f"{html.escape(title)}</text>",
    ]
    if not series:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888">no data yet</text></svg>')
        return "".join(out)
    xs = [x for v in series.values() for x, _ in v]
    ys = [math.log10(y) if log_y else y for v in series.values() for _, y in v]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - ((math.log10(y) if log_y else y) - y0) / (y1 - y0)) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for t in _nice_ticks(y0, y1):
        y = top + (1 - (t - y0) / (y1 - y0)) * ph
        label = fmt(10**t, 2) if log_y else fmt(float(t), 3)
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{label}</text>'
        )
    for t in _nice_ticks(x0, x1):
        x = px(t)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#999"/>'
            f'<text x="{x:.1f}" y="{top + ph + 15}" text-anchor="middle" font-size="10">{fmt(float(t), 4)}</text>'
        )
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="11">{xlabel}</text>')
    for k, (name, points) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{coords}"/>')
        if len(points) <= 40:
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in points)
        if len(series) > 1 and k < 8:
            out.append(
                f'<text x="{left + 6}" y="{top + 14 + 13 * k}" font-size="10" fill="{color}">{html.escape(name)}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def heatmap_png(matrix: list[list[float]], max_px: int = 600) -> bytes:
    """A row-normalised confusion matrix as a PNG: white (0) to dark blue (1), grey grid lines when cells are big."""
    import numpy as np
    from PIL import Image

    a = np.asarray(matrix, dtype=np.float64)
    n = max(a.shape[0], 1)
    cell = max(1, min(40, max_px // n))
    t = np.clip(a, 0, 1)[..., None]
    white, blue = np.array([255, 255, 255]), np.array([8, 48, 107])
    rgb = (white * (1 - t) + blue * t).astype(np.uint8)
    img = np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8))
    if cell >= 6:
        img[::cell, :, :] = 200
        img[:, ::cell, :] = 200
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG")
    return buf.getvalue()


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


def plot_curves_png(rows: list[dict[str, Any]], path: Path, metric: str | None = None) -> None:
    """curves.png: train loss, validation metric, learning rate per group and gradient norm over optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = curve_series(rows, metric)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, series, log_y) in zip(axes.flat, panels, strict=False):
        for name, points in series.items():
            pts = [(x, y) for x, y in points if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
            if pts:
                ax.plot(
                    [x for x, _ in pts],
                    [y for _, y in pts],
                    marker="o" if len(pts) <= 40 else None,
                    markersize=3,
                    label=name,
                )
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if log_y:
            ax.set_yscale("log")
        if 1 < len(series) <= 10:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def curve_series(rows: list[dict[str, Any]], metric: str | None = None) -> list[tuple[str, dict[str, list], bool]]:
    """(title, {series name: [(step, value)]}, log scale) for the four panels."""
    train = [r for r in rows if r.get("split", "train") == "train" and "loss" in r]
    evals = [r for r in rows if r.get("split") in ("val", "validation")]
    metric_keys = [metric] if metric else []
    metric_keys += [k for k in ("accuracy", "macro_f1", "perplexity") if k not in metric_keys]
    val = {f"val {k}": [(r["step"], r.get(k)) for r in evals] for k in metric_keys if any(k in r for r in evals)}
    if not val and evals:
        val = {"val loss": [(r["step"], r.get("loss")) for r in evals]}
    loss = {"train loss": [(r["step"], r.get("loss")) for r in train]}
    if any("loss" in r for r in evals):
        loss["val loss"] = [(r["step"], r.get("loss")) for r in evals]
    groups: dict[str, list] = {}
    for r in train:
        for name, lr in (r.get("lrs") or {"lr": r.get("lr")}).items():
            groups.setdefault(str(name), []).append((r["step"], lr))
    grad = {"gradient norm (before clipping)": [(r["step"], r.get("grad_norm")) for r in train]}
    return [
        ("loss", loss, False),
        ("validation metric", val, False),
        ("learning rate per group", groups, False),
        ("gradient norm", grad, True),
    ]
