"""The report's pictures read as SVG/HTML: round ticks written alike along an axis, legends outside the plot area, a
single evaluation as a labelled marker, the LR panel from the schedule, perplexity and tokens/s for a causal LM, class
names on the heatmap, the one-class warning, and comparison.html with comparison.md's columns."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from fulltune.compare.table import comparison_table, markdown
from fulltune.report.html import build_comparison, render_report
from fulltune.report.plots import curve_series, svg_chart, svg_heatmap

NS = "{http://www.w3.org/2000/svg}"


def svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(m) for m in re.findall(r"<svg.*?</svg>", page, flags=re.S)]


def texts(svg: ET.Element, cls: str) -> list[str]:
    return [t.text or "" for t in svg.iter(f"{NS}text") if t.get("class") == cls]


def number(label: str) -> float:
    return float(label.replace(",", ""))


def assert_round_ticks(labels: list[str]) -> None:
    """Each tick a round value (1, 2, 2.5 or 5 times a power of ten, in steps), written with the same decimals."""
    values = [number(x) for x in labels]
    assert len(values) >= 2, labels
    steps = {round(b - a, 12) for a, b in zip(values, values[1:], strict=False)}
    assert len(steps) == 1, labels
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5)), labels
    assert all(math.isclose(v / step, round(v / step), abs_tol=1e-6) for v in values), labels
    if "e" not in "".join(labels):
        assert len({len(x.split(".")[1]) if "." in x else 0 for x in labels if x != "0"}) == 1, labels


def box(el: ET.Element) -> tuple[float, float, float, float]:
    x, y, w, h = (float(el.get(k)) for k in ("x", "y", "width", "height"))
    return x, y, x + w, y + h


def test_ticks_are_round_and_legend_is_outside_the_plot_area():
    lr = [(s, 1e-3 * min(1, s / 4) * (1 - s / 40)) for s in range(1, 41)]
    chart = ET.fromstring(svg_chart({"head": lr, "body": [(s, v / 10) for s, v in lr]}, "learning rate"))
    assert_round_ticks(texts(chart, "ytick"))
    assert_round_ticks(texts(chart, "xtick"))
    assert all("e-" in t or t == "0" for t in texts(chart, "ytick"))  # 2.5e-4, not 0.00025 beside 7.50e-04
    rects = {r.get("class"): box(r) for r in chart.iter(f"{NS}rect") if r.get("class")}
    plot, legend = rects["plot"], rects["legend"]
    assert legend[1] >= plot[3] or legend[0] >= plot[2], (plot, legend)  # below or right of the plot area
    names = [t.text for t in chart.iter(f"{NS}text")]
    assert "head" in names and "body" in names
    accuracy = ET.fromstring(svg_chart({"val accuracy": [(16, 0.19), (32, 0.23), (48, 0.41)]}, "accuracy"))
    assert_round_ticks(texts(accuracy, "ytick"))
    norms = ET.fromstring(svg_chart({"g": [(1, 0.63), (2, 1.04), (3, 0.57)]}, "gradient norm", log_y=True))
    assert_round_ticks(texts(norms, "ytick"))  # a narrow log axis: 0.6 0.8 1.0, not 10**-0.2 = 0.63
    wide = ET.fromstring(svg_chart({"g": [(1, 0.004), (2, 30.0)]}, "gradient norm", log_y=True))
    labels = texts(wide, "ytick")
    assert len(labels) >= 3 and all(number(t) / 10 ** math.floor(math.log10(number(t))) in (1, 2, 5) for t in labels)


def test_a_single_evaluation_is_a_labelled_marker():
    chart = ET.fromstring(svg_chart({"val perplexity": [(16, 812.5)]}, "validation perplexity", ylabel="perplexity"))
    assert texts(chart, "xtick") == ["16"]  # one tick under the point, not an axis from 16.0 to 17.0
    assert texts(chart, "value") == ["812.5 at optimizer step 16"]
    assert "perplexity" in [t.text for t in chart.iter(f"{NS}text")]


def test_heatmap_names_the_classes_and_one_class_predictions_are_warned(tmp_path):
    labels = ["concurrency", "data_structures", "formats"]
    matrix = [[0, 0, 26], [0, 0, 32], [0, 0, 57]]
    heat = ET.fromstring(svg_heatmap(matrix, labels))
    assert texts(heat, "row-label") == labels and texts(heat, "col-label") == labels
    many = [f"class_{i}" for i in range(120)]
    shown = texts(ET.fromstring(svg_heatmap([[1] * 120 for _ in range(120)], many)), "row-label")
    assert 10 <= len(shown) <= 120 and set(shown) <= set(many)
    run = write_run(tmp_path, "accuracy", {"labels": labels, "confusion_matrix": matrix, "examples": 115})
    page = render_report(run)
    assert "Warning: the model predicts <b>formats</b> for every one of the 115 examples" in page
    matrix[0][0], matrix[0][2] = 20, 6
    (run / "report" / "test.json").write_text(json.dumps({"labels": labels, "confusion_matrix": matrix}))
    assert "Warning: the model predicts" not in render_report(run)


def write_run(root: Path, metric: str, test: dict | None = None, tokens_per_sample: int | None = None) -> Path:
    run = root / "run"
    (run / "report").mkdir(parents=True)
    rows = [
        {
            "step": 4,
            "split": "train",
            "loss": 2.0,
            "lrs": {"all": 5e-4},
            "grad_norm": 1.0,
            "samples_per_s": 10.0,
            "time_s": 1.0,
            "step_losses": [[1, 2.3], [2, 2.2], [3, 2.1], [4, 2.0]],
        },
        {"step": 4, "split": "val", metric: 800.0 if metric == "perplexity" else 0.5, "loss": 1.9},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    event = {
        "event": "start",
        "metric": metric,
        "task": "causal_lm" if tokens_per_sample else "text_classification",
        "tokens_per_sample": tokens_per_sample,
    }
    (run / "run_history.jsonl").write_text(json.dumps(event) + "\n")
    (run / "summary.json").write_text(json.dumps({"train_samples_per_s": 10.0, "best_val": {metric: 1.0, "step": 4}}))
    schedule = {"steps": [1, 2, 3, 4, 5, 6, 7, 8], "lrs": {"all": [2.5e-4, 5e-4, 7.5e-4, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4]}}
    (run / "report" / "lr_schedule.json").write_text(json.dumps(schedule))
    if test:
        (run / "report" / "test.json").write_text(json.dumps(test))
    return run


def test_causal_lm_report_names_perplexity_shows_tokens_per_s_and_every_step(tmp_path):
    run = write_run(tmp_path, "perplexity", tokens_per_sample=64)
    page = render_report(run)
    assert re.search(r"training tokens/s</td><td class='l'>640</td>", page)  # 10 samples/s of 64-token blocks
    charts = {c.get("aria-label"): c for c in svgs(page)}
    assert "validation perplexity" in charts
    assert "perplexity" in [t.text for t in charts["validation perplexity"].iter(f"{NS}text")]
    lines = {c: len(p.get("points").split()) for c, chart in charts.items() for p in chart.iter(f"{NS}polyline")}
    assert lines["loss"] == 4  # every logged step's loss, not one point per log row
    assert lines["learning rate per group"] == 8  # the schedule, warmup included, not the one logged LR
    panels = curve_series(json.loads("[]"), "accuracy")
    assert [p.title for p in panels][2:] == ["learning rate per group", "gradient norm"]


def test_comparison_html_has_the_markdown_columns_in_one_format_each(tmp_path):
    base = {
        "status": "ok",
        "metric": "accuracy",
        "trainable_parameters": 10,
        "trainable_percent": 100.0,
        "wall_time_s": 12.0,
        "samples_per_s": 20.0,
        "exported_bytes": 3 * 2**20,
        "adapter_bytes": None,
    }
    rows = [
        base
        | {
            "method": "untrained head",
            "learning_rate": None,
            "val": 0.25,
            "test": 0.2,
            "wall_time_s": None,
            "peak_memory_bytes": None,
            "run_dir": str(tmp_path / "u"),
        },
        base
        | {
            "method": "full",
            "learning_rate": 1e-3,
            "val": 0.5,
            "test": 0.4,
            "peak_memory_bytes": 2**28,
            "run_dir": str(tmp_path / "full"),
        },
        base
        | {
            "method": "lora",
            "learning_rate": 1e-2,
            "val": 0.75,
            "test": 0.625,
            "peak_memory_bytes": 3 * 2**30,
            "adapter_bytes": 2**15,
            "run_dir": str(tmp_path / "lora"),
        },
    ]
    settings = {
        "model": "m",
        "data": "d",
        "budget": "1 epoch",
        "global_batch": 8,
        "length": "x",
        "seed": 0,
        "precision": "fp32",
        "device": "cpu",
    }
    head, cells = comparison_table(rows, settings)
    md = markdown(rows, settings)
    page = build_comparison(tmp_path, rows, settings, (head, cells)).read_text()
    table = re.search(r"<table[^>]*>(.*?)</table>", page, flags=re.S).group(1)
    assert "<div class='wide'><table class='cmp'>" in page and ".wide{overflow-x:auto" in page  # scrolls in its box
    html_head = re.findall(r"<th[^>]*>(.*?)</th>", table)
    assert html_head[:-1] == head and "| " + " | ".join(head) + " |" in md
    body = [re.findall(r"<td[^>]*>(.*?)</td>", tr)[:-1] for tr in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
    assert body == [[c.replace("%", "%") for c in row] for row in cells]
    for row in cells:
        assert "| " + " | ".join(row) + " |" in md
    columns = list(zip(*cells, strict=True))
    memory = columns[head.index("peak memory")]
    assert memory == ("—", "0.2 GiB", "3.0 GiB")  # one unit down the column
    assert columns[head.index("lr")] == ("—", "1e-3", "1e-2")
    assert columns[head.index("val accuracy")] == ("0.2500", "0.5000", "0.7500")
    assert "(pretrained weights, a fresh head)" in md and "tokens/s" not in head
    lm = rows[1] | {"metric": "perplexity", "val": 812.25, "test": None, "tokens_per_s": 640.4}
    lm_head, lm_cells = comparison_table([lm], settings)
    assert lm_cells[0][lm_head.index("tokens/s")] == "640" and lm_cells[0][2:4] == ["812.25", "—"]
    md = markdown(rows, settings | {"pretrained": False})
    assert "(randomly initialised from a config, a fresh head)" in md and "pretrained" not in md


def test_comparison_plot_draws_no_bar_for_a_row_without_a_value(tmp_path, monkeypatch):
    import matplotlib.axes

    from fulltune.compare.table import plot

    drawn: list[tuple[list[float], list[str]]] = []
    bar, bar_label = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.bar_label

    def record(ax, container, labels=None, **kw):
        drawn.append(([b.get_height() for b in container], list(labels)))
        return bar_label(ax, container, labels=labels, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar_label", record)
    rows = [
        {"method": "untrained head", "status": "ok", "metric": "accuracy", "val": 0.25, "test": 0.2},
        {
            "method": "full",
            "status": "ok",
            "metric": "accuracy",
            "val": 0.5,
            "test": 0.4,
            "trainable_percent": 100.0,
            "peak_memory_bytes": 2**28,
            "wall_time_s": 12.0,
        },
        {"method": "lora", "status": "failed", "error": "x"},
    ]
    plot(rows, tmp_path / "comparison.png")
    assert bar is matplotlib.axes.Axes.bar and len(drawn) == 5
    for heights, labels in drawn[2:]:  # trainable %, memory, wall time: only the full row has a value
        assert math.isnan(heights[0]) and math.isnan(heights[2]) and labels[0] == labels[2] == "" and labels[1]
