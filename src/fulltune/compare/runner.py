"""`fulltune compare`: one config trained under several methods with the same data, seed and budget, each as a
normal run folder (<output_dir>/<method>/) in its own process, so that peak memory and wall time are per method.
Writes comparison.md, comparison.json, comparison.png and comparison.html beside them.

A method that fails is reported as failed with its one-line error; the others still run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fulltune.compare.variants import (
    UNTRAINED,
    VARIANT_METHODS,
    parse_variants,
    test_top5,
    untrained_row,
    variant,
)
from fulltune.config import Config, load_config, save_config, to_dict
from fulltune.config.methods import DEFAULT_LR_MULT
from fulltune.config.yamlfile import read_yaml
from fulltune.data.text import run_inputs
from fulltune.errors import ConfigError
from fulltune.files.rundir import claim_output_dir, release_run_lock
from fulltune.report.html import build_comparison, read_jsonl
from fulltune.report.plots import scientific
from fulltune.runtime.device import resolve_device, resolve_precision
from fulltune.runtime.memory import maxrss_bytes

# Learning rate of each method as a multiple of training.base_learning_rate (read as full fine-tuning's LR).


def parse_methods(text: str) -> list[str]:
    """The method variants typed (`full,lora:r=8,lora:r=16,qlora`), checked, duplicates dropped."""
    return [v.spec for v in parse_variants(text)]


def learning_rates(text: str, methods: list[str], base_lr: float) -> dict[str, float]:
    """Per-variant LR: the defaults (multiples of base_lr), then `method=LR` or `method=xN` entries of `text` (a
    method name sets each of its variants; a variant's label, lora-r16, sets that one)."""
    lrs = {m: base_lr * DEFAULT_LR_MULT[variant(m).method] for m in methods}
    labels = {variant(m).label: m for m in methods}
    for item in filter(None, (s.strip() for s in text.split(","))):
        method, _, value = item.partition("=")
        method = method.strip()
        if method not in VARIANT_METHODS and method not in labels:
            raise ConfigError(
                f"--lr_per_method '{item}': unknown method '{method}'; choose from {', '.join(VARIANT_METHODS)}"
            )
        value = value.strip()
        relative = value.startswith("x")
        try:
            number = float(value[1:] if relative else value) * (base_lr if relative else 1.0)
        except ValueError:
            raise ConfigError(f"--lr_per_method '{item}': expected method=LR or method=xN, e.g. lora=1e-3") from None
        if not number > 0:
            raise ConfigError(f"--lr_per_method '{item}': the learning rate must be > 0")
        for m in methods:
            if m == method or variant(m).method == method or variant(m).label == method:
                lrs[m] = number
    return lrs


def method_config(config: str | None, overrides: list[str], root: Path, method: str, lr: float) -> Config:
    """The shared config with only what differs between methods changed: name (and a variant's options), learning
    rate, run folder (the variant's label: lora-r8)."""
    v = variant(method)
    return load_config(
        config,
        overrides
        + [
            f"method.name={v.method}",
            *v.overrides,
            f"training.base_learning_rate={lr!r}",
            f"output_dir={json.dumps(str(root / v.label))}",
            "logging.progress_bar=false",  # the child writes to a log file, where a live bar is noise
        ],
    )


# ------------------------------------------------------------------------------------------------- one method


def _wait(proc: subprocess.Popen) -> int | None:
    """Wait for the child; return its own peak RSS in bytes (os.wait4 reports per child, unlike RUSAGE_CHILDREN,
    which is the maximum over every child waited for so far)."""
    if not hasattr(os, "wait4"):
        proc.wait()
        return None
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        proc.wait()  # the child got the same SIGINT; let it finish its own clean-up first
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return maxrss_bytes(usage)


def _error_line(log: Path) -> str:
    """The child's one-line error: `fulltune: error: ...`, else the last line (a traceback's exception)."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("fulltune: error:"):
            return line.removeprefix("fulltune: error:").strip()
    return lines[-1][:300] if lines else "no output"


def folder_bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under `path`, leaving out the top-level subfolders named in `skip`."""
    total = 0
    for f in path.rglob("*"):
        if f.is_file() and f.relative_to(path).parts[0] not in skip:
            total += f.stat().st_size
    return total


def _reusable(run_dir: Path, cfg: Config) -> bool:
    try:
        saved = read_yaml((run_dir / "config.yaml").read_text(encoding="utf-8"), str(run_dir / "config.yaml"))
    except (OSError, yaml.YAMLError, ConfigError):
        return False
    return (run_dir / "summary.json").is_file() and saved == to_dict(cfg)


def run_method(cfg: Config, skip_done: bool = False) -> dict[str, Any]:
    """Train `cfg` in a fresh `python -m fulltune train` process; return its row of the comparison."""
    run_dir = Path(cfg.output_dir)
    row: dict[str, Any] = {
        "method": cfg.method.name,
        "learning_rate": cfg.training.base_learning_rate,
        "run_dir": str(run_dir),
        "status": "ok",
        "error": None,
        "peak_rss_bytes": None,
    }
    if skip_done and _reusable(run_dir, cfg):
        row["reused"] = True
        return row | _from_summary(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        # Never delete a folder this invocation did not create: it may hold a finished run and its checkpoints.
        what = "an earlier run" if (run_dir / "config.yaml").is_file() else "files that are not a fulltune run"
        return row | {
            "status": "failed",
            "error": f"'{run_dir}' already holds {what} (left untouched): give compare "
            "a new --output_dir, pass --skip_done to reuse finished runs, or remove the folder yourself",
        }
    claim_output_dir(run_dir, None, inputs=run_inputs(cfg))  # a train run's folder from its first file on
    release_run_lock(run_dir)  # the training process takes it
    save_config(cfg, run_dir / "config.yaml")
    log = run_dir / "compare.log"
    cmd = [sys.executable, "-m", "fulltune", "train", "--config", str(run_dir / "config.yaml")]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        row["peak_rss_bytes"] = _wait(proc)
    row["process_wall_time_s"] = time.perf_counter() - start
    if proc.returncode != 0:
        return row | {"status": "failed", "error": _error_line(log)}
    if not (run_dir / "summary.json").is_file():
        return row | {"status": "failed", "error": "the run ended without writing summary.json"}
    return row | _from_summary(run_dir)


def _from_summary(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    metric = next(k for k in summary["best_val"] if k != "step")
    export = run_dir / "best" if (run_dir / "best").is_dir() else Path(summary.get("last_checkpoint") or run_dir)
    adapter = export / "adapter"
    total = summary["total_parameters"]
    samples_per_s = summary.get("train_samples_per_s") or summary.get("samples_per_s_median")
    history = read_jsonl(run_dir / "run_history.jsonl")
    tokens_per_sample = history[-1].get("tokens_per_sample") if history else None  # a causal LM's seq_len
    return {
        "metric": metric,
        "val": summary["best_val"][metric],
        "test": (summary.get("test") or {}).get(metric),
        "test_weights": (summary.get("test") or {}).get("weights"),  # 'best' (picked on val) or 'final'
        "test_top5": test_top5(run_dir),
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": total,
        "trainable_percent": 100.0 * summary["trainable_parameters"] / total if total else None,
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
        "wall_time_s": summary.get("wall_time_s"),
        # Optimisation-only throughput (evaluation and saving excluded) where train.py reports it.
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * tokens_per_sample if samples_per_s and tokens_per_sample else None,
        "optimizer_steps": summary.get("optimizer_steps"),
        "export_dir": str(export),
        # The export a user ships: weights, config, tokenizer or image processor (not the resume state).
        "exported_bytes": folder_bytes(export, skip=("training_state", "adapter")),
        "adapter_bytes": folder_bytes(adapter) if adapter.is_dir() else None,
    }


# ------------------------------------------------------------------------------------------------- the report


MISSING = "—"


def _num(v: float | None, fmt: str) -> str:
    return MISSING if v is None else format(v, fmt)


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
    head += [
        "trainable params",
        "trainable %",
        "peak memory",
        "wall time",
        "samples/s",
        *(["tokens/s"] if tokens else []),
    ]
    head += ["export size", "adapter size"]
    ok = [r.get("status") == "ok" for r in rows]
    columns = {
        key: _bytes_column([r.get(key) if good else None for r, good in zip(rows, ok, strict=True)])
        for key in ("peak_memory_bytes", "exported_bytes", "adapter_bytes")
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
                _num(r.get("val"), mfmt),
                _num(r.get("test"), mfmt),
                *([_num(r.get("test_top5"), mfmt)] if top5 else []),
                MISSING if params is None else f"{params:,}",
                _num(r.get("trainable_percent"), ".2f") + ("%" if r.get("trainable_percent") is not None else ""),
                columns["peak_memory_bytes"][k],
                _num(r.get("wall_time_s"), ".0f") + (" s" if r.get("wall_time_s") is not None else ""),
                _num(r.get("samples_per_s"), ".1f"),
                *([_num(r.get("tokens_per_s"), ",.0f")] if tokens else []),
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
        f"{settings['global_batch']}, {settings['length']}, seed {settings['seed']}, precision "
        f"{settings['precision']}, device {settings['device']}. Each method ran in its own process.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
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
        + "Wall time is the training loop with its evaluations, without process start-up and model loading. "
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
        bars = ax.bar([i + offset for i in x], heights, width=0.4, label=split if shown else None)
        ax.bar_label(bars, labels=labels(heights, _short), fontsize=8)
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


def settings_of(cfg: Config, methods: list[str], lrs: dict[str, float]) -> dict[str, Any]:
    d, t = cfg.data, cfg.training
    device = resolve_device(cfg.hardware.device)
    data = d.data_dir or d.train_file or "?"
    return {
        "model": cfg.model.describe(),
        "pretrained": not cfg.model.tiny_config,
        "data": data + (f" ({d.max_samples} train examples at most, drawn with the seed)" if d.max_samples else ""),
        "budget": f"{t.num_epochs} epoch{'s' if t.num_epochs != 1 else ''}"
        + (f", at most {t.max_steps} steps" if t.max_steps else ""),
        "global_batch": d.batch_size * t.gradient_accumulation_steps,
        "length": f"max_length {d.max_length}" if cfg.task != "causal_lm" else f"seq_len {d.seq_len}",
        "seed": t.seed,
        "precision": resolve_precision(cfg.hardware.mixed_precision, device).name,
        "device": str(device) + (f" ({os.cpu_count()} CPU cores)" if device.type == "cpu" else ""),
        "methods": methods,
        "learning_rates": lrs,
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------------------------------------- all methods


def run_all(
    config: str | None,
    overrides: list[str],
    root: Path,
    methods: list[str],
    lrs: dict[str, float],
    skip_done: bool = False,
) -> list[dict[str, Any]]:
    """The untrained model's row, then every method in turn (each in its own process and run folder); a failing one
    is reported as failed."""
    rows = []
    print(f"[0/{len(methods)}] {UNTRAINED}: evaluating the model before any training", flush=True)
    try:  # the model as every run starts it: method full (nothing is trained, so nothing is wrapped or frozen)
        untrained = load_config(
            config, overrides + ["method.name=full", f"output_dir={json.dumps(str(root / 'untrained'))}"]
        )
        rows.append(untrained_row(untrained))
    except (ConfigError, RuntimeError, ValueError) as err:
        print(f"    no {UNTRAINED} row: {str(err).splitlines()[0]}", flush=True)
    for i, method in enumerate(methods, start=1):
        label = variant(method).label
        print(f"[{i}/{len(methods)}] {method}: lr {lrs[method]:.3g}, log {root / label / 'compare.log'}", flush=True)
        try:
            row = run_method(method_config(config, overrides, root, method, lrs[method]), skip_done)
        except ConfigError as err:  # a config only this method rejects; the others still run
            row = {
                "method": method,
                "learning_rate": lrs[method],
                "run_dir": str(root / label),
                "status": "failed",
                "error": str(err),
            }
        row["method"] = label  # lora-r8 and lora-r16 are two rows
        rows.append(row)
        if row["status"] == "ok":
            print(
                f"    {row['metric']}: val {_num(row['val'], '.4f')}, test {_num(row['test'], '.4f')}, "
                f"wall {_num(row['wall_time_s'], '.0f')} s",
                flush=True,
            )
        else:
            print(f"    failed: {row['error']}", flush=True)
    return rows


def write_comparison(root: Path, settings: dict[str, Any], rows: list[dict[str, Any]], notes: str = "") -> str:
    """comparison.json, .md, .png and .html in `root`; returns the markdown table."""
    (root / "comparison.json").write_text(json.dumps({"settings": settings, "runs": rows}, indent=2))
    table = markdown(rows, settings) + notes
    (root / "comparison.md").write_text(table, encoding="utf-8")
    plot(rows, root / "comparison.png")

    build_comparison(root, rows, settings, comparison_table(rows, settings))
    return table
