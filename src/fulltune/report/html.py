"""A run a person can read: `report.html` (self-contained: inline SVG curves and confusion heatmap, no network)
built from the run folder's files, `curves.png` beside it, `comparison.html` for `fulltune compare`, and the
`fulltune report RUN_DIR` command that rebuilds a report.

Inputs (all written by report.RunLogger): metrics.jsonl (train rows and eval rows), run_history.jsonl (every start
and resume), report/<split>.json (confusion matrix, per-example predictions, example inputs of confused pairs; a
regression's prediction-vs-truth points), report/lr_schedule.json (each group's learning rate over the schedule),
summary.json (at the end), config.yaml and labels.json.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from fulltune.report.entities import entity_record, entity_section
from fulltune.report.labels import per_label_record, per_label_section
from fulltune.report.plots import (  # noqa: F401 (re-exported: evaluate and tests draw through here)
    curve_series,
    fmt,
    normalise_rows,
    plot_confusion_png,
    plot_curves_png,
    svg_chart,
    svg_heatmap,
)
from fulltune.report.scatter import scatter_record, scatter_section

EXAMPLES_PER_PAIR = 3
TOP_PAIRS = 10


# ---------------------------------------------------------------- reading a run folder


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- per-class metrics and confused pairs


def per_class(matrix: list[list[int]]) -> list[dict[str, float | int]]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows true, columns predicted)."""
    n = len(matrix)
    out = []
    for c in range(n):
        tp = matrix[c][c]
        support = sum(matrix[c])
        predicted = sum(matrix[r][c] for r in range(n))
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        out.append(
            {
                "precision": p,
                "recall": r,
                "f1": 2 * p * r / (p + r) if p + r else 0.0,
                "support": support,
                "predicted": predicted,
            }
        )
    return out


def confused_pairs(matrix: list[list[int]], top: int = TOP_PAIRS) -> list[tuple[int, int, int]]:
    """The largest off-diagonal cells: (true class, predicted class, count), most frequent first."""
    cells = [(matrix[i][j], i, j) for i in range(len(matrix)) for j in range(len(matrix)) if i != j and matrix[i][j]]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(i, j, n) for n, i, j in cells[:top]]


def pair_examples(
    targets: list[int], predictions: list[int], describe: Any, per_pair: int = EXAMPLES_PER_PAIR
) -> dict[str, list[str]]:
    """Up to `per_pair` example inputs for each (true, predicted) pair, keyed "true,predicted"."""
    found: dict[str, list[str]] = {}
    for i, (t, p) in enumerate(zip(targets, predictions, strict=True)):
        if t == p:
            continue
        key = f"{t},{p}"
        if len(found.setdefault(key, [])) < per_pair:
            found[key].append(describe(i))
    return found


def write_eval_record(
    run_dir: Path, name: str, metrics: dict[str, Any], labels: list[str] | None, describe: Any = None, **extra: Any
) -> None:
    """report/<name>.json: what the report shows of one evaluation (confusion, example inputs of confused pairs; a
    multi-label model's per-label F1; a tagger's per-entity scores; a regression's prediction-vs-truth points)."""
    per_label = per_label_record(metrics)
    if "pearson" in metrics and "confusion_matrix" not in metrics:  # a regression
        record = scatter_record(metrics) | extra
    elif "confusion_matrix" in metrics or per_label or "per_entity" in metrics:
        examples = {}
        if describe is not None and "predictions" in metrics and "confusion_matrix" in metrics:
            positions = metrics.get("positions") or range(len(metrics["targets"]))  # a skipped image has no target
            examples = pair_examples(metrics["targets"], metrics["predictions"], lambda i: describe(positions[i]))
        tagged = entity_record(metrics, describe) if "per_entity" in metrics else {}  # a tagger: per entity type
        record = {
            "labels": labels,
            **({"confusion_matrix": metrics["confusion_matrix"]} if "confusion_matrix" in metrics else per_label),
            **tagged,
            "pair_examples": examples,
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            **extra,
        }
    else:
        return
    folder = run_dir / "report"
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps(record), encoding="utf-8")
    tmp.replace(folder / f"{name}.json")


# ---------------------------------------------------------------- the HTML report

CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;color:#222;
padding:0 16px}h1{font-size:24px;margin-bottom:4px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:12px}
pre{background:#f7f7f7;padding:10px;font-size:12px;overflow:auto;max-height:420px}.muted{color:#777}
.kv td:first-child{text-align:left;color:#555}.cmp td{white-space:nowrap}.wide{overflow-x:auto;max-width:100%}
.warn{background:#fff3cd;border:1px solid #e0a800;padding:8px 12px;font-size:14px;color:#5c4400}
.ex{font-size:12px;text-align:left;max-width:560px;overflow-wrap:anywhere}"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _kv_table(items: list[tuple[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td class='l'>{_e(v if isinstance(v, str) else fmt(v))}</td></tr>"
        for k, v in items
        if v is not None
    )
    return f"<table class='kv'>{rows}</table>"


def _confusion_section(rec: dict[str, Any], title: str) -> str:
    matrix, labels = rec["confusion_matrix"], rec.get("labels") or [str(i) for i in range(len(rec["confusion_matrix"]))]
    n = len(labels)
    where = f" at step {rec['step']}" if rec.get("step") is not None else ""
    weights = f" ({rec['weights']} weights)" if rec.get("weights") else ""
    parts = [
        f"<h2>{_e(title)}</h2><p class='muted'>{_e(rec.get('split', ''))}{where}{weights}: "
        f"{fmt(rec.get('examples'))} examples, accuracy {fmt(rec.get('accuracy'))}, "
        f"macro-F1 {fmt(rec.get('macro_f1'))}. Rows: true class; columns: predicted class.</p>"
    ]
    parts.append(_one_class_warning(matrix, labels))
    parts.append(f"<div class='grid'><figure>{svg_heatmap(matrix, labels)}</figure></div>")
    stats = per_class(matrix)
    order = sorted(range(n), key=lambda c: (stats[c]["f1"], labels[c])) if n > 30 else range(n)
    shown = list(order)[:40]
    rows = "".join(
        f"<tr><td class='l'>{_e(labels[c])}</td><td>{stats[c]['precision']:.3f}</td>"
        f"<td>{stats[c]['recall']:.3f}</td><td>{stats[c]['f1']:.3f}</td><td>{stats[c]['support']}</td>"
        f"<td>{stats[c]['predicted']}</td></tr>"
        for c in shown
    )
    note = f" (the {len(shown)} classes with the lowest F1 of {n})" if n > 40 else ""
    parts.append(
        f"<h3>Per class{note}</h3><table><tr><th class='l'>class</th><th>precision</th><th>recall</th>"
        f"<th>F1</th><th>support</th><th>predicted</th></tr>{rows}</table>"
    )
    pairs = confused_pairs(matrix)
    if pairs:
        examples = rec.get("pair_examples") or {}
        rows = "".join(
            f"<tr><td class='l'>{_e(labels[i])}</td><td class='l'>{_e(labels[j])}</td><td>{c}</td>"
            f"<td class='ex'>{'<br>'.join(_e(x) for x in examples.get(f'{i},{j}', [])) or '-'}</td></tr>"
            for i, j, c in pairs
        )
        parts.append(
            "<h3>Most confused pairs</h3><table><tr><th class='l'>true</th><th class='l'>predicted as</th>"
            f"<th>count</th><th class='l'>example inputs</th></tr>{rows}</table>"
        )
    return "".join(parts)


def _one_class_warning(matrix: list[list[int]], labels: list[str]) -> str:
    """A visible warning when every example is predicted as the same class (a model that has not learned yet)."""
    predicted = [sum(row[j] for row in matrix) for j in range(len(matrix))]
    total = sum(predicted)
    if len(matrix) < 2 or not total or max(predicted) < total:
        return ""
    only = labels[predicted.index(total)]
    return (
        f"<p class='warn'>Warning: the model predicts <b>{_e(only)}</b> for every one of the {total:,} examples. "
        "It has not learned to tell the classes apart: train longer or with another learning rate, and check that "
        "the labels match the texts or images.</p>"
    )


def _history_section(history: list[dict[str, Any]]) -> str:
    """Every start and resume of the run: when, from where, at which step, and what changed."""
    body = "".join(
        f"<tr><td class='l'>{_e(h.get('time', ''))}</td><td class='l'>{_e(h.get('event'))}</td>"
        f"<td class='l'>{_e(h.get('resumed_from') or '-')}</td><td>{fmt(h.get('optimizer_step'))}</td>"
        f"<td>{fmt(h.get('epoch'))}</td><td>{fmt(h.get('total_steps'))}</td>"
        f"<td class='l'>{_e(h.get('note') or '')}</td></tr>"
        for h in history
    )
    return (
        "<h2>Starts and resumes</h2><table><tr><th class='l'>time (UTC)</th><th class='l'>event</th>"
        "<th class='l'>from</th><th>at step</th><th>epoch</th><th>steps planned</th>"
        f"<th class='l'>note</th></tr>{body}</table>"
    )


def _speed_items(rows: list[dict[str, Any]], summary: dict[str, Any], facts: dict[str, Any]) -> list[tuple[str, Any]]:
    """How fast: steps, wall time, samples/s (and tokens/s for a causal LM), peak memory; from the summary at the
    end, from the latest train row while running."""
    train_rows = [r for r in rows if r.get("split", "train") == "train" and "samples_per_s" in r]
    peak = max((r.get("peak_memory_mb") or 0 for r in train_rows), default=None)
    samples_per_s = summary.get("train_samples_per_s") or summary.get("samples_per_s_median")
    per_token = samples_per_s is not None and facts.get("tokens_per_sample")  # causal LM: blocks of seq_len tokens
    speed = [
        ("optimizer steps done", summary.get("optimizer_steps") or (train_rows[-1]["step"] if train_rows else None)),
        (
            "wall time",
            f"{summary['wall_time_s']:.1f} s"
            if summary.get("wall_time_s")
            else (f"{train_rows[-1]['time_s']:.1f} s so far" if train_rows else None),
        ),
        ("training samples/s", samples_per_s),
        ("training tokens/s", samples_per_s * facts["tokens_per_sample"] if per_token else None),
        (
            "peak memory",
            f"{summary['peak_memory_bytes'] / 2**20:,.0f} MiB"
            if summary.get("peak_memory_bytes")
            else (f"{peak:,.0f} MiB" if peak else None),
        ),
    ]
    return speed


def render_report(run_dir: Path) -> str:
    """The report's HTML: what ran, how fast, results, curves, the confusion matrix, starts and resumes, config."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    history = read_jsonl(run_dir / "run_history.jsonl")
    summary = _read_json(run_dir / "summary.json") or {}
    facts = history[-1] if history else {}
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else ""
    metric = facts.get("metric")
    status = "finished" if summary else "running (or stopped before the end)"
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fulltune run {_e(run_dir.name)}"
        f"</title><style>{CSS}</style></head><body><h1>fulltune run: {_e(run_dir.name)}</h1>"
        f"<p class='muted'>{_e(run_dir.resolve())} &middot; {status}</p>"
    ]
    sizes = facts.get("data_sizes") or {}
    what = [
        ("task", facts.get("task") or summary.get("task")),
        ("model", facts.get("model")),
        ("method", facts.get("method") or summary.get("method")),
        ("data", ", ".join(f"{k} {v:,}" for k, v in sizes.items() if v is not None) or None),
        ("classes", facts.get("num_classes")),
        ("precision", facts.get("precision")),
        ("device", facts.get("device")),
        ("world size", facts.get("world_size")),
        ("global batch", facts.get("global_batch")),
        ("optimizer steps planned", facts.get("total_steps")),
        ("trainable parameters", facts.get("trainable_parameters")),
        ("total parameters", facts.get("total_parameters")),
    ]
    speed = _speed_items(rows, summary, facts)
    results = [
        (f"best val {metric}", (summary.get("best_val") or {}).get(metric)),
        ("best step", (summary.get("best_val") or {}).get("step")),
    ]
    results += [(f"test {k}", v) for k, v in (summary.get("test") or {}).items()]
    parts.append(
        f"<div class='grid'><div><h2>What ran</h2>{_kv_table(what)}</div><div><h2>How fast</h2>"
        f"{_kv_table(speed)}</div><div><h2>Results</h2>{_kv_table(results)}</div></div>"
    )
    parts.append("<h2>Curves</h2><div class='grid'>")
    for panel in curve_series(rows, metric, _read_json(run_dir / "report" / "lr_schedule.json")):
        parts.append(svg_chart(panel.series, panel.title, ylabel=panel.ylabel, log_y=panel.log_y))
    parts.append("</div>")
    for name, title in (
        ("test", "test set"),
        ("val_best", "validation, best step"),
        ("val_latest", "validation, latest evaluation"),
    ):
        rec = _read_json(run_dir / "report" / f"{name}.json")
        if rec and "per_label_f1" in rec:  # multi-label: F1 per label in place of a confusion matrix
            parts.append(per_label_section(rec, f"Per-label F1: {title}"))
            break
        if rec and rec.get("per_entity") is not None:  # a tagger: per entity type
            parts.append(entity_section(rec, f"Entities: {title}"))
            break
        if rec and "scatter" in rec:  # a regression: prediction vs truth
            parts.append(scatter_section(rec, f"Prediction vs truth: {title}"))
            break
        if rec:
            parts.append(_confusion_section(rec, f"Confusion matrix: {title}"))
            break
    if history:
        parts.append(_history_section(history))
    parts.append(f"<h2>Config</h2><pre>{_e(config_text)}</pre>")
    parts.append(
        "<p class='muted'>Written by fulltune; rebuild with <code>fulltune report "
        f"{_e(run_dir)}</code>.</p></body></html>"
    )
    return "".join(parts)


def build_report(run_dir: str | Path, with_png: bool = True) -> Path:
    """Write report.html (and curves.png unless with_png=False) in run_dir; return the report's path."""
    run_dir = Path(run_dir)
    text = render_report(run_dir)
    tmp = run_dir / ".report.html.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(run_dir / "report.html")  # atomic: a browser never sees half a file
    if with_png:
        history = read_jsonl(run_dir / "run_history.jsonl")
        plot_curves_png(
            read_jsonl(run_dir / "metrics.jsonl"),
            run_dir / "curves.png",
            history[-1].get("metric") if history else None,
            _read_json(run_dir / "report" / "lr_schedule.json"),
        )
    return run_dir / "report.html"


# ---------------------------------------------------------------- comparison.html


def build_comparison(
    root: str | Path,
    rows: list[dict[str, Any]],
    settings: dict[str, Any],
    table: tuple[list[str], list[list[str]]],
    notes: list[str] | None = None,
) -> Path:
    """comparison.html beside comparison.md: the same table (`table`: its columns and each row's cells, as
    comparison.md shows them) with a link to each run's report, the notes under it (what its intervals mean),
    the comparison plot, every run's curves."""
    root = Path(root)
    head, cells = table
    body = []
    curves: dict[str, list] = {}
    losses: dict[str, list] = {}
    metric = next((r.get("metric") for r in rows if r.get("metric")), None)
    for r, row_cells in zip(rows, cells, strict=True):
        run_dir = Path(r.get("run_dir", ""))
        report = run_dir / "report.html"
        link = (
            f"<a href='{_e(report.relative_to(root) if report.is_relative_to(root) else report)}'>report</a>"
            if report.is_file()
            else "—"
        )
        body.append(
            "<tr>"
            + "".join(f"<td class='{'l' if i == 0 else ''}'>{_e(c)}</td>" for i, c in enumerate(row_cells))
            + f"<td>{link}</td></tr>"
        )
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        if metric:
            curves[r["method"]] = [(m["step"], m.get(metric)) for m in metrics if m.get("split") == "val"]
        losses[r["method"]] = [
            p
            for m in metrics
            if m.get("split", "train") == "train" and "loss" in m
            for p in (m.get("step_losses") or [(m["step"], m.get("loss"))])
        ]
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fulltune comparison</title>"
        f"<style>{CSS}</style></head><body><h1>fulltune comparison: {_e(root.name)}</h1>",
        f"<p class='muted'>{_e(root.resolve())}; metric: {_e(metric)}</p>",
        "<div class='wide'><table class='cmp'><tr>"
        + "".join(f"<th class='{'l' if i == 0 else ''}'>{_e(h)}</th>" for i, h in enumerate(head))
        + "<th>report</th></tr>"
        + "".join(body)
        + "</table></div>",
        "".join(f"<p>{_e(note)}</p>" for note in notes or []),
        "".join(
            f"<p class='warn'>{_e(r['method'])} failed: {_e(r.get('error'))}</p>"
            for r in rows
            if r.get("status") != "ok"
        ),
        "<h2>Curves</h2><div class='grid'>",
        svg_chart(curves, f"validation {metric}", ylabel=metric or "", log_y=metric == "perplexity"),
        svg_chart(losses, "train loss", ylabel="cross-entropy"),
        "</div>",
    ]
    png = root / "comparison.png"
    if png.is_file():
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(
            f"<h2>Cost and quality</h2><img alt='comparison plot' src='data:image/png;base64,{data}' "
            "style='max-width:100%'>"
        )
    parts.append(f"<h2>Settings</h2><pre>{_e(json.dumps(settings, indent=2))}</pre></body></html>")
    (root / "comparison.html").write_text("".join(parts), encoding="utf-8")
    return root / "comparison.html"


# ---------------------------------------------------------------- `fulltune report`
