"""tune.html: a search read at a glance, self-contained like report.html (inline SVG, its styles, no network): the
trials sorted by the metric (best first), the metric against each searched key (a log axis for learning rates), each
trial's validation metric over steps with the pruned ones marked (what was pruned when), and the best trial's report.

Input: the study as a dict, {"metric", "direction" ("maximize" | "minimize"), "best" (trial number or None),
"trials": [{"number", "state" (complete | pruned | failed | running), "value", "params" {dotted key: value},
"run_dir" (relative to the tune folder), "wall_time_s", "pruned_at" (step or None), "intermediate" [[step, value]],
"worker"}]}.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from fulltune.report.html import CSS
from fulltune.report.plots import PALETTE, Axis, Frame, fmt, scientific, svg_chart, svg_open, value_axis

TUNE_CSS = ".best td{background:#e8f4e8;font-weight:600}.pruned{color:#a35c00}.failed{color:#b00}"
STATE_COLOR = {"complete": PALETTE[0], "pruned": "#ff7f0e", "failed": PALETTE[1], "running": "#7f7f7f"}


def _e(v: Any) -> str:
    return html.escape(str(v))


def is_learning_rate(key: str) -> bool:
    """A key searched on a log scale by nature (training.base_learning_rate, method.lora.lr...): a log axis."""
    last = key.rsplit(".", 1)[-1]
    return "learning_rate" in last or last == "lr" or last.endswith("_lr")


def _setting(key: str, v: Any) -> str:
    """A searched value as people write it: 2e-5 for a learning rate, 0.01, 16, cosine."""
    return scientific(v) if is_learning_rate(key) and isinstance(v, float) else fmt(v)


def short_key(key: str) -> str:
    """A dotted key without its config section: training.base_learning_rate -> base_learning_rate, method.lora.r ->
    lora.r."""
    return key.split(".", 1)[1] if key.count(".") >= 1 else key


def _last_value(t: dict[str, Any]) -> float | None:
    """A trial's final value, else the last value it reported (a pruned or running trial)."""
    if t.get("value") is not None:
        return float(t["value"])
    points = [p for p in t.get("intermediate") or [] if p[1] is not None]
    return float(points[-1][1]) if points else None


def sorted_trials(study: dict[str, Any]) -> list[dict[str, Any]]:
    """Finished trials by their value, best first (direction-aware); then pruned and running ones by the last
    value they reported; then those with no value at all (failed), each group in trial order on ties."""
    sign = -1.0 if study.get("direction", "maximize") == "maximize" else 1.0

    def key(t: dict[str, Any]) -> tuple[int, float, int]:
        value = _last_value(t)
        group = 0 if t.get("value") is not None else (1 if value is not None else 2)
        return group, sign * value if value is not None else 0.0, int(t["number"])

    return sorted(study.get("trials") or [], key=key)


# ---------------------------------------------------------------- the metric against one searched key


def svg_scatter(
    points: list[tuple[Any, float, str, bool]], title: str, xlabel: str, ylabel: str, log_x: bool = False
) -> str:
    """One dot per trial: (searched value, metric, state, is the best); numbers on a linear or log x axis, other
    choices (a scheduler's name) as categories. Pruned trials are hollow, at the last value they reported."""
    width, height, left, right, top, bottom = 360, 240, 62, 14, 28, 42
    out = svg_open(title, width, height)
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, *_ in points)
    log_x = log_x and numeric and all(x > 0 for x, *_ in points)
    if not points:
        return "".join(out) + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no values</text></svg>'
    if numeric:
        x_axis = value_axis([float(x) for x, *_ in points], log_x)
    else:  # categories, in the order first seen
        names = list(dict.fromkeys(str(x) for x, *_ in points))
        x_axis = Axis(-0.5, len(names) - 0.5, [float(k) for k in range(len(names))], names)
    frame = Frame(
        left, top, width - left - right, height - top - bottom, x_axis, value_axis([y for _, y, *_ in points])
    )
    out += frame.axes(xlabel + (" (log)" if log_x else ""), ylabel, height - 6)
    for x, y, state, best in sorted(points, key=lambda p: p[3]):  # the best dot last, on top
        color = STATE_COLOR.get(state, "#7f7f7f")
        fill = "none" if state == "pruned" else color
        cx = frame.px(float(x) if numeric else float(names.index(str(x))))
        out.append(
            f'<circle class="trial" cx="{cx:.1f}" cy="{frame.py(y):.1f}" r="{6 if best else 4}" fill="{fill}" '
            f'stroke="{"#000" if best else color}" stroke-width="{2 if best else 1.5}"/>'
        )
    return "".join(out) + "</svg>"


# ---------------------------------------------------------------- the page


def _trials_table(study: dict[str, Any], trials: list[dict[str, Any]], keys: list[str]) -> str:
    metric, best = study.get("metric", "metric"), study.get("best")
    head = ["trial", "state", metric, "last reported", *keys, "pruned at step", "wall time", "worker", "report"]
    rows = []
    for t in trials:
        points = [p for p in t.get("intermediate") or [] if p[1] is not None]
        last = f"{fmt(float(points[-1][1]))} at step {points[-1][0]}" if points else "-"
        link = f"<a href='{_e(Path(t['run_dir']) / 'report.html')}'>report</a>" if t.get("run_dir") else "-"
        cells = [
            f"#{t['number']}",
            f"<span class='{_e(t.get('state'))}'>{_e(t.get('state'))}</span>",
            fmt(t.get("value")),
            last,
            *(_e(_setting(k, (t.get("params") or {}).get(k))) for k in keys),
            fmt(t.get("pruned_at")),
            f"{t['wall_time_s']:.0f} s" if t.get("wall_time_s") is not None else "-",
            _e(t.get("worker") or "-"),
            link,
        ]
        rows.append(
            ("<tr class='best'>" if best is not None and t["number"] == best else "<tr>")
            + "".join(f"<td class='{'l' if i in (1, 3, len(cells) - 2) else ''}'>{c}</td>" for i, c in enumerate(cells))
            + "</tr>"
        )
    th = "".join(
        f"<th title='{_e(h)}'>{_e(short_key(h) if h in keys else h)}</th>" for h in head
    )  # a searched key without its section (base_learning_rate), the whole key on hover
    return f"<div class='wide'><table class='cmp'><tr>{th}</tr>{''.join(rows)}</table></div>"


def _best_section(study: dict[str, Any], trials: list[dict[str, Any]]) -> str:
    best = next((t for t in trials if t["number"] == study.get("best")), None)
    if best is None:
        return "<p class='warn'>No trial has finished yet: there is no best setting.</p>"
    settings = (
        ", ".join(f"{_e(k)} = {_e(_setting(k, v))}" for k, v in (best.get("params") or {}).items()) or "the defaults"
    )
    link = (
        f" &middot; <a href='{_e(Path(best['run_dir']) / 'report.html')}'>its report</a>" if best.get("run_dir") else ""
    )
    return (
        f"<h2>Best trial: #{best['number']}</h2><p>{_e(study.get('metric'))} {fmt(best.get('value'))} with "
        f"{settings}{link}</p>"
    )


def render_tune(study: dict[str, Any], folder: Path) -> str:
    """tune.html's text for `study` (the module's dict), a search in `folder`."""
    title = folder.name if folder.name != "tune" else f"{folder.parent.name}/{folder.name}"  # compare's: full/tune
    metric = study.get("metric", "metric")
    trials = sorted_trials(study)
    keys = list(dict.fromkeys(k for t in trials for k in (t.get("params") or {})))
    states = ("complete", "pruned", "failed", "running", "waiting")
    counts = {s: sum(t.get("state") == s for t in trials) for s in states}
    better = "higher" if study.get("direction", "maximize") == "maximize" else "lower"
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fulltune tune {_e(title)}</title>"
        f"<style>{CSS}{TUNE_CSS}</style></head><body><h1>fulltune tune: {_e(title)}</h1>",
        f"<p class='muted'>{_e(folder)} &middot; validation {_e(metric)} ({better} is better) &middot; "
        f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "</p>",
        _best_section(study, trials),
        "<h2>Trials</h2><p class='muted'>Best first; a pruned trial has no final value and is ranked by the last "
        "value it reported.</p>",
        _trials_table(study, trials, keys),
        f"<h2>{_e(metric)} against each searched key</h2><p class='muted'>One dot per trial: filled finished, "
        "hollow pruned (at its last reported value), the best one outlined in black.</p><div class='grid'>",
    ]
    for key in keys:
        points = [
            (t["params"][key], v, t.get("state", ""), t["number"] == study.get("best"))
            for t in trials
            if key in (t.get("params") or {}) and (v := _last_value(t)) is not None
        ]
        parts.append(svg_scatter(points, key, key.rsplit(".", 1)[-1], metric, log_x=is_learning_rate(key)))
    series = {
        f"#{t['number']}" + (f" pruned at step {t['pruned_at']}" if t.get("state") == "pruned" else ""): [
            (float(s), float(v)) for s, v in t.get("intermediate") or [] if v is not None
        ]
        for t in sorted(trials, key=lambda t: t["number"])
    }
    pruned = [t for t in sorted(trials, key=lambda t: t["number"]) if t.get("state") == "pruned"]
    parts += [
        "</div>",
        f"<h2>Validation {_e(metric)} over steps</h2><div class='grid'>",
        svg_chart(series, f"validation {metric} of each trial", ylabel=metric, width=760, height=320),
        "</div>",
        "<p>"
        + (
            "Pruned: "
            + "; ".join(f"#{t['number']} at step {fmt(t.get('pruned_at'))} ({fmt(_last_value(t))})" for t in pruned)
            if pruned
            else "No trial was pruned."
        )
        + "</p>",
        "<p class='muted'>Written by fulltune tune.</p></body></html>",
    ]
    return "".join(parts)


def write_tune_html(path: Path, study: dict[str, Any]) -> None:
    """Write tune.html at `path` (links to trial reports are relative to its folder), atomically: a browser never
    sees half a page while a search goes on."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # several processes may work on one study
    tmp.write_text(render_tune(study, path.parent.resolve()), encoding="utf-8")
    tmp.replace(path)
