"""`compare`'s rows for CLIP models besides the methods: the zero-shot model without training, full fine-tuning from
the zero-shot head, LP-FT, and WiSE-FT (zero-shot and fine-tuned weights interpolated); docs/clip_zeroshot.md."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fulltune.clip.interpolate import wise_ft_run
from fulltune.clip.zeroshot import zero_shot_run
from fulltune.compare.runner import _from_summary, run_method
from fulltune.compare.table import num
from fulltune.config import load_config
from fulltune.errors import ConfigError, DataError
from fulltune.model.clip import is_embedding_classifier

# Rows for CLIP models besides the methods (docs/clip_zeroshot.md): the zero-shot model without training, full
# fine-tuning from the zero-shot head, LP-FT, and WiSE-FT (zero-shot and fine-tuned weights interpolated).
CLIP_ROWS = {"zero_shot": None, "full_zs_head": "zeroshot", "lp_ft": "linear_probe", "wise_ft": None}
# The fine-tuned run WiSE-FT interpolates with: the first of these that ran with a zero-shot-style head.
WISE_FT_SOURCES = ("full_zs_head", "lp_ft", "full")


def split_clip_rows(text: str) -> tuple[str, list[str]]:
    """--methods without the CLIP rows (for parse_methods), and the CLIP rows asked for, in CLIP_ROWS order."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    return ",".join(m for m in names if m not in CLIP_ROWS), [m for m in CLIP_ROWS if m in names]


def _clip_row(
    config: str | None,
    overrides: list[str],
    skip_done: bool,
    root: Path,
    name: str,
    lr: float,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:

    run_dir = root / name
    out = f"output_dir={json.dumps(str(run_dir))}"
    row: dict[str, Any] = {
        "method": name,
        "learning_rate": None,
        "run_dir": str(run_dir),
        "status": "ok",
        "error": None,
        "peak_rss_bytes": None,
    }
    if CLIP_ROWS[name]:  # a training run: full fine-tuning from that head
        cfg = load_config(
            config,
            overrides
            + [
                "method.name=full",
                f"method.head_init={CLIP_ROWS[name]}",
                f"training.base_learning_rate={lr!r}",
                out,
                "logging.progress_bar=false",
            ],
        )
        return run_method(cfg, skip_done) | {"method": name}
    cfg = load_config(config, overrides + [out])
    if run_dir.exists() and any(run_dir.iterdir()):  # never delete what this invocation did not create
        raise ConfigError(f"'{run_dir}' already holds files (left untouched): give compare a new --output_dir")
    if name == "zero_shot":
        zero_shot_run(cfg)
        return row | _from_summary(run_dir)
    source = next(
        (
            r
            for n in WISE_FT_SOURCES
            for r in rows
            if r["method"] == n and r["status"] == "ok" and is_embedding_classifier(r["export_dir"])
        ),
        None,
    )
    if source is None:
        raise ConfigError(
            "wise_ft needs a fine-tuned run with a zero-shot-style head: add full_zs_head or lp_ft to "
            "--methods (or pass method.head_init=zeroshot)"
        )
    zeroshot = root / "zero_shot" / "best"
    base = str(zeroshot) if zeroshot.is_dir() else cfg.model.name_or_path
    summary = wise_ft_run(base, Path(source["export_dir"]), run_dir, cfg.data.data_dir)
    return (
        row
        | _from_summary(run_dir)
        | {"alpha": summary["alpha"], "finetuned_row": source["method"], "sweep": summary["sweep"]}
    )


def run_clip_rows(
    config: str | None,
    overrides: list[str],
    skip_done: bool,
    root: Path,
    names: list[str],
    full_lr: float,
    rows: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The CLIP rows asked for, after the methods (wise_ft reads their runs); a failed row names its error."""
    done: list[dict[str, Any]] = []
    for i, name in enumerate(names, start=1):
        print(f"[clip {i}/{len(names)}] {name}", flush=True)
        start = time.perf_counter()
        try:
            row = _clip_row(config, overrides, skip_done, root, name, full_lr, rows + done)
        except (ConfigError, DataError) as err:
            row = {
                "method": name,
                "learning_rate": None,
                "run_dir": str(root / name),
                "status": "failed",
                "error": str(err),
            }
        row.setdefault("process_wall_time_s", time.perf_counter() - start)
        done.append(row)
        if row["status"] == "ok":
            print(f"    {row['metric']}: val {num(row['val'], '.4f')}, test {num(row['test'], '.4f')}", flush=True)
        else:
            print(f"    failed: {row['error']}", flush=True)
    return done


def clip_notes(rows: list[dict[str, Any]]) -> str:
    """Lines under the table that say what the CLIP rows are."""
    notes = []
    names = {r["method"] for r in rows}
    if "zero_shot" in names:
        notes.append("zero_shot: CLIP's zero-shot classifier (class-prompt text embeddings), no training.")
    if names & {"full_zs_head", "lp_ft"}:
        notes.append(
            "full_zs_head: full fine-tuning from the zero-shot head; lp_ft: the head alone for "
            "method.head_init_epochs, then full (LP-FT)."
        )
    for r in rows:
        if r["method"] == "wise_ft" and r["status"] == "ok":
            sweep = ", ".join(f"{s['alpha']:g}: {num(s.get('accuracy'), '.4f')}" for s in r["sweep"])
            notes.append(
                f"wise_ft: (1 - alpha) x zero_shot + alpha x {r['finetuned_row']} weights, alpha "
                f"{r['alpha']:g}" + (f" chosen on val ({sweep})." if len(r["sweep"]) > 1 else ".")
            )
    return "\n" + "\n".join(notes) + "\n" if notes else ""
