"""The report of `fulltune compare`: one table (columns and each row's cells, one number format per column) that
comparison.md and comparison.html both show, the notes under it, and comparison.png (metric with its spread, trainable
share, peak memory, wall time)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fulltune.compare.seeds import add_differences
from fulltune.compare.variants import UNTRAINED
from fulltune.report.html import build_comparison
from fulltune.report.plots import scientific

MISSING = "—"


def num(v: float | None, fmt: str, sign: bool = False) -> str:
    """`v` in format `fmt` (with its sign), or a dash where there is none."""
    return MISSING if v is None else format(v, ("+" if sign else "") + fmt)


def test_cell(r: dict[str, Any], fmt: str) -> str:
    """The test metric: its mean ± standard deviation over seeds, or the one value."""
    if r.get("test") is None:
        return MISSING
    return num(r["test"], fmt) + (f" ± {num(r['test_sd'], fmt)}" if r.get("test_sd") is not None else "")


def interval_columns(rows: list[dict[str, Any]], fmt: str) -> tuple[list[str], list[list[str]]]:
    """The columns after the test metric: its 95% interval over seeds (or the binomial SE with one seed), and the
    difference to full fine-tuning with its interval and flag; none where no row has them."""
    many = any(r.get("seeds") for r in rows)
    head: list[str] = []
    cells: list[list[str]] = [[] for _ in rows]
    if many:
        head.append("test 95% CI")
        for c, r in zip(cells, rows, strict=True):
            c.append(_span(r.get("test_low"), r.get("test_high"), fmt))
    elif any(r.get("test_se") is not None for r in rows):
        head.append("test ± SE")
        for c, r in zip(cells, rows, strict=True):
            c.append(MISSING if r.get("test_se") is None else f"± {r['test_se']:{fmt}}")
    if any(r.get("diff") for r in rows):
        head += ["Δ test vs full", "Δ 95% CI", "Δ flag"] if many else ["Δ test vs full", "Δ flag"]
        for c, r in zip(cells, rows, strict=True):
            d = r.get("diff") or {}
            c.append(num(d.get("mean"), fmt, sign=True))
            if many:
                c.append(_span(d.get("low"), d.get("high"), fmt, sign=True))
            c.append(_flag(r))
    return head, cells


def _span(low: float | None, high: float | None, fmt: str, sign: bool = False) -> str:
    return MISSING if low is None or high is None else f"[{num(low, fmt, sign)}, {num(high, fmt, sign)}]"


def _flag(r: dict[str, Any]) -> str:
    if r.get("significant") is not None:
        return "significant" if r["significant"] else "not significant"
    if r.get("within_se") is not None:
        return "within 1 SE" if r["within_se"] else "beyond 1 SE"
    return MISSING if r.get("diff") is None else "no interval"


def error_bar(r: dict[str, Any]) -> tuple[float, float]:
    """How far the test bar's error bar reaches below and above the value: the 95% interval over seeds, else one
    binomial SE; NaN where the row has neither."""
    if r.get("test") is None:
        return math.nan, math.nan
    if r.get("test_low") is not None:
        return r["test"] - r["test_low"], r["test_high"] - r["test"]
    if r.get("test_se") is not None:
        return r["test_se"], r["test_se"]
    return math.nan, math.nan


def error_bar_name(rows: list[dict[str, Any]]) -> str:
    return "95% interval" if any(r.get("test_low") is not None for r in rows) else "± 1 SE"


def interval_notes(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """What the interval columns mean, and with one seed that none can be given."""
    count = len(settings.get("seeds") or [settings.get("seed")])
    metric = next((r["metric"] for r in rows if r.get("metric")), "accuracy")
    out = []
    if count > 1:
        out.append(
            f"Each method ran with {count} seeds ({', '.join(map(str, settings['seeds']))}, the same for every "
            f"method); test {metric} is the mean ± standard deviation over the seeds, with a 95% Student-t interval "
            f"of the mean (t with {count - 1} degrees of freedom)."
            + (
                " Δ is the test difference to full fine-tuning, paired by seed, with its 95% interval: "
                '"not significant" when the interval spans 0.'
                if any(r.get("diff") for r in rows)
                else ""
            )
        )
    else:
        out.append(
            "One seed: no interval can be given (run with --seeds 3 or more for a mean, an interval and a "
            "paired difference)."
            + (
                " ± SE is the binomial standard error of accuracy on the n test examples, sqrt(p (1 - p) / n); a "
                'difference to full fine-tuning within both rows\' SEs combined is marked "within 1 SE": it is '
                "not a result."
                if any(r.get("test_se") is not None for r in rows)
                else ""
            )
        )
    if any(r.get("search_trials") for r in rows):
        out.append(
            "Each method's settings were searched first (--tune: the same number of trials each, over the "
            "method's own space, on the validation metric; the test split is not read); search time and search "
            "peak memory are that search's, on top of each seed's run. Settings found: "
            + "; ".join(_found(r) for r in rows if r.get("search_trials"))
            + "."
        )
    failed = [e for r in rows if r.get("status") == "ok" for e in r.get("seed_errors") or []]
    if failed:
        out.append("Failed seeds (left out of the mean and the differences): " + "; ".join(failed) + ".")
    return out


def _found(r: dict[str, Any]) -> str:
    """A method's search in a few words: how many trials finished or were pruned, and the settings it found."""
    settings = ", ".join(f"{k}={_setting(v)}" for k, v in (r.get("best_overrides") or {}).items())
    return f"{r['method']} ({r.get('search_complete')} trials finished, {r.get('search_pruned')} pruned): " + (
        settings or "its defaults"
    )


def _setting(v: Any) -> str:
    if not isinstance(v, float):
        return str(v)
    return scientific(v) if 0 < abs(v) < 1e-2 else f"{v:.3g}"


def _lr(v: float | None) -> str:
    return MISSING if v is None else scientific(v)


def _bytes_column(values: list[float | None]) -> list[str]:
    """Sizes of one column in one unit (that of the largest), so the column reads down."""
    known = [v for v in values if v is not None]
    unit, size = next(
        ((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if known and max(known) >= s), ("B", 1)
    )
    return [MISSING if v is None else f"{v / size:,.1f} {unit}" if size > 1 else f"{int(v)} B" for v in values]


def comparison_table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison's columns and each row's cells, one number format per column: comparison.md and
    comparison.html both show this table."""
    metric = next((r["metric"] for r in rows if r.get("metric")), "accuracy")
    mfmt = ".2f" if metric in ("perplexity", "loss") else ".4f"
    top5 = (settings.get("num_classes") or 0) > 5  # a top-5 column where there are more than five classes
    tokens = any(r.get("tokens_per_s") for r in rows)  # a causal LM: its speed in tokens too
    head = ["method", "lr", f"val {metric}", f"test {metric}", *(["test top-5"] if top5 else [])]
    stat_head, stat_cells = interval_columns(rows, mfmt)
    search = any(r.get("search_trials") for r in rows)
    head += stat_head
    head += [
        "trainable params",
        "trainable %",
        "peak memory",
        "wall time",
        *(["search time", "search peak memory"] if search else []),
        "samples/s",
        *(["tokens/s"] if tokens else []),
    ]
    head += ["export size", "adapter size"]
    ok = [r.get("status") == "ok" for r in rows]
    columns = {
        key: _bytes_column([r.get(key) if good else None for r, good in zip(rows, ok, strict=True)])
        for key in ("peak_memory_bytes", "exported_bytes", "adapter_bytes", "search_peak_rss_bytes")
    }
    body = []
    for k, (r, good) in enumerate(zip(rows, ok, strict=True)):
        if not good:
            body.append([r["method"], _lr(r.get("learning_rate")), "failed"] + [""] * (len(head) - 3))
            continue
        params = r.get("trainable_parameters")
        body.append(
            [
                r["method"],
                _lr(r.get("learning_rate")),
                num(r.get("val"), mfmt),
                test_cell(r, mfmt),
                *([num(r.get("test_top5"), mfmt)] if top5 else []),
                *stat_cells[k],
                MISSING if params is None else f"{params:,}",
                num(r.get("trainable_percent"), ".2f") + ("%" if r.get("trainable_percent") is not None else ""),
                columns["peak_memory_bytes"][k],
                num(r.get("wall_time_s"), ".0f") + (" s" if r.get("wall_time_s") is not None else ""),
                *(
                    [
                        num(r.get("search_wall_time_s"), ".0f") + (" s" if r.get("search_wall_time_s") else ""),
                        columns["search_peak_rss_bytes"][k],
                    ]
                    if search
                    else []
                ),
                num(r.get("samples_per_s"), ".1f"),
                *([num(r.get("tokens_per_s"), ",.0f")] if tokens else []),
                columns["exported_bytes"][k],
                columns["adapter_bytes"][k],
            ]
        )
    return head, body


def markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    metric = next((r["metric"] for r in rows if r.get("metric")), "accuracy")
    head, body = comparison_table(rows, settings)
    lines = [
        "# fulltune compare",
        "",
        f"Model `{settings['model']}`, data `{settings['data']}`; {settings['budget']}, global batch "
        f"{settings['global_batch']}, {settings['length']}, {_seeds_text(settings)}, precision "
        f"{settings['precision']}, device {settings['device']}. Each method ran in its own process.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += ["", *(line for note in interval_notes(rows, settings) for line in (note, ""))][:-1]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed:", ""]
        lines += [f"- {r['method']}: {r['error']} (log: {r['run_dir']}/compare.log)" for r in failed]
    lines += [
        "",
        f"Val is the best validation {metric} of the run; test is measured on the weights of that best "
        "checkpoint (on the final weights where there is no validation set). Peak memory is "
        + (
            "allocated GPU memory. "
            if settings["device"].startswith("cuda")
            else "the process's peak resident set (model, data and training state together). "
        )
        + "Wall time is the training loop with its evaluations, without process start-up and model loading"
        + (" (the mean over a method's seeds; peak memory is the largest)" if settings.get("seeds") else "")
        + ". "
        "samples/s counts training steps only (evaluation and checkpoint time excluded). Export size is the "
        "folder that plain transformers loads (weights, config, tokenizer); LoRA's is merged, its adapter alone is "
        "the last column."
        + (
            f" The {UNTRAINED} row is the model as each run starts it ("
            + ("pretrained weights" if settings.get("pretrained", True) else "randomly initialised from a config")
            + ", a fresh head), "
            "evaluated without training."
            if any(r["method"] == UNTRAINED for r in rows)
            else ""
        ),
    ]
    return "\n".join(lines) + "\n"


def _seeds_text(settings: dict[str, Any]) -> str:
    seeds = settings.get("seeds") or [settings["seed"]]
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"seeds {', '.join(map(str, seeds))}"


def _short(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    ok = [r["status"] == "ok" for r in rows]
    metric = next((r["metric"] for r in rows if r.get("metric")), "accuracy")

    def values(key: str, scale: float = 1.0) -> list[float]:
        """One value per row; NaN (no bar, no label) where the row has none or failed."""
        return [
            r[key] / scale if good and r.get(key) is not None else math.nan for r, good in zip(rows, ok, strict=True)
        ]

    def labels(heights: list[float], fmt: Any) -> list[str]:
        return ["" if math.isnan(v) else fmt(v) for v in heights]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    x = range(len(rows))
    ax = axes[0][0]
    for offset, split in ((-0.2, "val"), (0.2, "test")):
        heights = values(split)
        shown = any(not math.isnan(v) for v in heights)  # no legend entry for a split no row has
        # The test bars carry their spread: a 95% interval over seeds, else one binomial SE (accuracy, one seed).
        errors = [error_bar(r) if good else (math.nan, math.nan) for r, good in zip(rows, ok, strict=True)]
        spread = split == "test" and any(not math.isnan(e[0]) for e in errors)
        if spread:
            ax.set_title(f"{metric} (test: {error_bar_name(rows)})", loc="left")  # the legend is on the right
        bars = ax.bar(
            [i + offset for i in x],
            heights,
            width=0.4,
            label=split if shown else None,
            yerr=[list(e) for e in zip(*errors, strict=True)] if spread else None,
            capsize=4,
        )
        ax.bar_label(bars, labels=labels(heights, _short), fontsize=8)
    if not ax.get_title(loc="left"):
        ax.set_title(metric)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False, fontsize=8)  # above the bars
    panels = [
        (axes[0][1], "trainable_percent", 1.0, "trainable parameters (%)", True),
        (axes[1][0], "peak_memory_bytes", 2**20, "peak memory (MiB)", False),
        (axes[1][1], "wall_time_s", 1.0, "wall time (s)", False),
    ]
    for ax, key, scale, title, log in panels:
        heights = values(key, scale)
        ax.bar_label(ax.bar(list(x), heights, color="tab:gray"), labels=labels(heights, _short), fontsize=8)
        ax.set_title(title)
        if log and any(v > 0 for v in heights):
            ax.set_yscale("log")
    for ax in axes.flat:
        ax.set_xticks(list(x), names)
        for i, good in enumerate(ok):
            if not good:  # x in data units, y in axes units: visible on log axes too
                ax.text(i, 0.05, "failed", transform=ax.get_xaxis_transform(), ha="center", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(root: Path, settings: dict[str, Any], rows: list[dict[str, Any]], notes: str = "") -> str:
    """comparison.json, .md, .png and .html in `root` (with each row's difference to full fine-tuning); returns the
    markdown table."""
    add_differences(rows)
    (root / "comparison.json").write_text(json.dumps({"settings": settings, "runs": rows}, indent=2))
    table = markdown(rows, settings) + notes
    (root / "comparison.md").write_text(table, encoding="utf-8")
    plot(rows, root / "comparison.png")

    build_comparison(root, rows, settings, comparison_table(rows, settings), interval_notes(rows, settings))
    return table
