"""What report.html shows of a multi-label evaluation in place of a confusion matrix: micro and macro F1, and one
row per label (F1 as a bar, precision, recall, support, the threshold it was scored at)."""

from __future__ import annotations

import html
from typing import Any

from fulltune.report.plots import fmt

PER_LABEL_KEYS = ("per_label_f1", "per_label_precision", "per_label_recall", "per_label_support", "thresholds")
"""The per-label lists of `eval.metrics.multi_label_scores` that report/<name>.json keeps."""

MAX_ROWS = 60


def per_label_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """The per-label lists of a multi-label evaluation, as report/<name>.json keeps them ({} for other tasks)."""
    return {k: metrics[k] for k in PER_LABEL_KEYS if k in metrics} if "per_label_f1" in metrics else {}


def per_label_section(rec: dict[str, Any], title: str) -> str:
    """An HTML section: the scalars, then a table of labels (lowest F1 first when there are many) with F1 bars."""
    f1 = rec["per_label_f1"]
    labels = rec.get("labels") or [str(i) for i in range(len(f1))]
    where = f" at step {rec['step']}" if rec.get("step") is not None else ""
    weights = f" ({rec['weights']} weights)" if rec.get("weights") else ""
    head = (
        f"<h2>{html.escape(title)}</h2><p class='muted'>{html.escape(str(rec.get('split', '')))}{where}{weights}: "
        f"{fmt(rec.get('examples'))} examples, micro-F1 {fmt(rec.get('micro_f1'))}, macro-F1 "
        f"{fmt(rec.get('macro_f1'))}, subset accuracy {fmt(rec.get('subset_accuracy'))}. A label is predicted when "
        "its sigmoid probability reaches its threshold.</p>"
    )
    order = list(range(len(labels)))
    if len(order) > MAX_ROWS:
        order = sorted(order, key=lambda i: (f1[i], labels[i]))[:MAX_ROWS]
    column = {k: rec.get(k) or [None] * len(labels) for k in PER_LABEL_KEYS}
    rows = "".join(
        f"<tr><td class='l'>{html.escape(labels[i])}</td>"
        f"<td class='l'><div style='display:flex;align-items:center;gap:6px'><div style='background:#4c78a8;"
        f"height:12px;width:{max(0.0, min(1.0, f1[i])) * 240:.0f}px'></div>{f1[i]:.3f}</div></td>"
        f"<td>{fmt(column['per_label_precision'][i])}</td><td>{fmt(column['per_label_recall'][i])}</td>"
        f"<td>{fmt(column['per_label_support'][i])}</td><td>{fmt(column['thresholds'][i])}</td></tr>"
        for i in order
    )
    note = f" (the {len(order)} labels with the lowest F1 of {len(labels)})" if len(order) < len(labels) else ""
    return (
        f"{head}<h3>Per label{note}</h3><table><tr><th class='l'>label</th><th class='l'>F1</th><th>precision</th>"
        f"<th>recall</th><th>support</th><th>threshold</th></tr>{rows}</table>"
    )
