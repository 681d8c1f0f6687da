"""What report.html shows of a token classifier's evaluation: entity-level precision, recall and F1 per entity type
(seqeval's, as the metrics computed them), with a bar of each type's F1, and a few sentences whose tags were wrong,
gold beside predicted. No confusion matrix: a tagger's errors are spans, not classes."""

from __future__ import annotations

import html
from typing import Any

from fulltune.report.plots import fmt

WRONG_SENTENCES = 8


def entity_record(metrics: dict[str, Any], describe: Any = None) -> dict[str, Any]:
    """The report's part of an evaluation: per-type scores and the first sentences with a wrong tag."""
    wrong = []
    pairs = zip(metrics.get("targets") or [], metrics.get("predictions") or [], strict=True)
    for i, (gold, pred) in enumerate(pairs):
        if gold != pred and len(wrong) < WRONG_SENTENCES:
            wrong.append({"input": describe(i) if describe else f"sentence {i + 1}", "gold": gold, "predicted": pred})
    return {"per_entity": metrics["per_entity"], "wrong_sentences": wrong}


def _e(v: Any) -> str:
    return html.escape(str(v))


def entity_section(rec: dict[str, Any], title: str) -> str:
    where = f" at step {rec['step']}" if rec.get("step") is not None else ""
    weights = f" ({rec['weights']} weights)" if rec.get("weights") else ""
    parts = [
        f"<h2>{_e(title)}</h2><p class='muted'>{_e(rec.get('split', ''))}{where}{weights}: "
        f"{fmt(rec.get('examples'))} sentences, {fmt(rec.get('tokens'))} words; entity-level (seqeval) "
        f"precision {fmt(rec.get('precision'))}, recall {fmt(rec.get('recall'))}, F1 {fmt(rec.get('f1'))}; "
        f"word accuracy {fmt(rec.get('accuracy'))}.</p>",
        "<table><tr><th class='l'>entity type</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>"
        "<th class='l'>F1</th></tr>",
    ]
    for name, row in sorted(rec["per_entity"].items()):
        bar = f"<div style='background:#4c78a8;height:10px;width:{200 * row['f1']:.0f}px'></div>"
        parts.append(
            f"<tr><td class='l'>{_e(name)}</td><td>{row['precision']:.3f}</td><td>{row['recall']:.3f}</td>"
            f"<td>{row['f1']:.3f}</td><td>{row['support']:,}</td><td class='l' style='width:210px'>{bar}</td></tr>"
        )
    parts.append("</table>")
    if rec.get("wrong_sentences"):
        parts.append(
            "<h3>Sentences with a wrong tag</h3><table><tr><th class='l'>sentence</th><th class='l'>gold tags</th>"
            "<th class='l'>predicted tags</th></tr>"
        )
        for ex in rec["wrong_sentences"]:
            parts.append(
                f"<tr><td class='ex'>{_e(ex['input'])}</td><td class='ex'>{_e(' '.join(ex['gold']))}</td>"
                f"<td class='ex'>{_e(' '.join(ex['predicted']))}</td></tr>"
            )
        parts.append("</table>")
    return "".join(parts)
