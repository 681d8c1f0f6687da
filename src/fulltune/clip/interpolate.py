"""`fulltune interpolate`: WiSE-FT (Wortsman et al. 2022), the weight-space ensemble of a zero-shot CLIP classifier
and its fine-tuned version, theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned.

alpha 0 is the zero-shot model and alpha 1 the fine-tuned one, exactly (torch.lerp is exact at both ends). A sweep
over alphas on a validation split picks one; the result is an ordinary export (save_pretrained + fulltune_run.json).
Both endpoints must be the same architecture: a fine-tuned run with method.head_init zeroshot or linear_probe.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fulltune.clip.zeroshot import evaluate_model
from fulltune.config import Config, ConfigError, config_from_dict
from fulltune.data import images as img
from fulltune.eval.metrics import improves
from fulltune.files.manifest import listed_files
from fulltune.files.rundir import atomic_output, claim_output, claim_output_dir, release_run_lock
from fulltune.model.build import _load_config
from fulltune.model.bundle import resolve_model_path
from fulltune.model.clip import build_embedding_classifier, is_embedding_classifier
from fulltune.model.exported import load_exported
from fulltune.runtime.device import resolve_device
from fulltune.state import checkpoint as ckpt

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = listed_files(Path(folder), "*.safetensors")
    if not files:
        raise ConfigError(f"'{folder}' has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def interpolate_weights(
    zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * zeroshot + alpha * finetuned, tensor by tensor; non-float tensors must be equal."""
    if zeroshot.keys() != finetuned.keys():
        only_zs, only_ft = sorted(zeroshot.keys() - finetuned.keys()), sorted(finetuned.keys() - zeroshot.keys())
        raise ConfigError(
            f"the zero-shot and fine-tuned weights differ in names: only zero-shot {only_zs[:3]}, "
            f"only fine-tuned {only_ft[:3]}"
        )
    out = {}
    for name, ft in finetuned.items():
        zs = zeroshot[name]
        if zs.shape != ft.shape:
            raise ConfigError(f"weight '{name}': zero-shot shape {list(zs.shape)}, fine-tuned {list(ft.shape)}")
        if ft.is_floating_point():
            out[name] = torch.lerp(zs.to(ft.dtype), ft, alpha)
        elif torch.equal(zs, ft):
            out[name] = ft
        else:
            raise ConfigError(f"weight '{name}' ({ft.dtype}) differs between the two models and cannot be interpolated")
    return out


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ConfigError(f"--alphas '{text}': expected comma-separated numbers, e.g. 0,0.25,0.5,0.75,1") from None
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ConfigError(f"--alphas '{text}': each alpha must be in [0, 1]")
    return alphas


def _zeroshot_weights(base: str, finetuned_meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights of the zero-shot endpoint: a fulltune export as it is, or a CLIP model (folder or hub id) given a
    zero-shot head for the fine-tuned run's labels, prompts and class names."""

    folder = Path(base)
    if (folder / "fulltune_run.json").is_file():
        labels = json.loads((folder / "fulltune_run.json").read_text()).get("labels")
        if labels != finetuned_meta["labels"]:
            raise ConfigError(
                f"--zeroshot '{base}' has labels {labels}, the fine-tuned model {finetuned_meta['labels']}"
            )
        return read_weights(folder)
    cfg = config_from_dict(finetuned_meta["fulltune_config"])
    cfg.model.name_or_path, cfg.model.tiny_config, cfg.method.head_init = base, None, "zeroshot"
    path = resolve_model_path(base)
    model = build_embedding_classifier(cfg, path, _load_config(cfg, path), finetuned_meta["labels"]).model
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _evaluate(bundle: Any, cfg: Config, data_dir: str, split: str, batch_size: int) -> dict[str, Any]:

    folder = img.scan_split(Path(data_dir) / split, bundle.extra["labels"])
    cfg.data.eval_batch_size = batch_size
    return evaluate_model(bundle.model, img.ImageDataset(folder, bundle.image_spec, None), cfg, len(folder.classes))


def wise_ft(
    zeroshot: str,
    finetuned: str | Path,
    output_dir: str | Path,
    alphas: list[float],
    data_dir: str | None = None,
    split: str = "val",
    batch_size: int = 32,
    device: str = "auto",
    test_split: str | None = None,
) -> dict[str, Any]:
    """Interpolate, evaluate each alpha on data_dir/split when given (the best accuracy wins, then the lower loss,
    then the alpha nearest 0.5), export the chosen one to output_dir; return the sweep and the choice."""

    finetuned = Path(finetuned)
    claim_output(Path(output_dir), "interpolate", inputs=(zeroshot, finetuned, data_dir))
    if not is_embedding_classifier(finetuned):
        raise ConfigError(
            f"--finetuned '{finetuned}' is not a CLIP model with a zero-shot-style head: WiSE-FT needs a "
            "run trained with method.head_init zeroshot or linear_probe (its head and the zero-shot "
            "head must sit on the same image embedding)"
        )
    if len(alphas) > 1 and not data_dir:
        raise ConfigError("a sweep over several --alphas needs --data_dir (and --split) to choose among them")
    bundle = load_exported(finetuned, resolve_device(device, "--device"))
    cfg = config_from_dict(bundle.extra["fulltune_config"])
    cfg.hardware.device = device
    ft_weights = read_weights(finetuned)
    zs_weights = _zeroshot_weights(zeroshot, bundle.extra)
    sweep: list[dict[str, Any]] = []
    for alpha in alphas:
        row: dict[str, Any] = {"alpha": alpha}
        if data_dir:
            bundle.model.load_state_dict(interpolate_weights(zs_weights, ft_weights, alpha))
            row |= _evaluate(bundle, cfg, data_dir, split, batch_size)
        sweep.append(row)
    # The rule that picks a training run's best/ (accuracy, a tie to the lower loss); of equals, the alpha nearest 0.5.
    best = min(sweep, key=lambda r: abs(r["alpha"] - 0.5))
    for row in sorted(sweep, key=lambda r: abs(r["alpha"] - 0.5)):
        if improves(row.get("accuracy", 0.0), best.get("accuracy", 0.0), True, 0.0, row.get("loss"), best.get("loss")):
            best = row
    bundle.model.load_state_dict(interpolate_weights(zs_weights, ft_weights, best["alpha"]))
    result: dict[str, Any] = {
        "alpha": best["alpha"],
        "zeroshot": str(zeroshot),
        "finetuned": str(finetuned),
        "split": split if data_dir else None,
        "sweep": sweep,
    }
    if data_dir and test_split and (Path(data_dir) / test_split).is_dir():
        result["test"] = _evaluate(bundle, cfg, data_dir, test_split, batch_size)
    meta = dict(bundle.extra)
    meta["wise_ft"] = result
    meta["val_metrics"] = {k: v for k, v in best.items() if k != "alpha"} or None
    out = Path(output_dir)
    with atomic_output(out, "interpolate") as tmp:
        ckpt.export_model(bundle.model, bundle, tmp, meta)
        if (finetuned / "config.yaml").is_file():
            shutil.copy(finetuned / "config.yaml", tmp / "config.yaml")
    result["output_dir"] = str(out)
    return result


def format_sweep(result: dict[str, Any]) -> str:
    lines = [f"{'alpha':>6}  {'accuracy':>9}  {'macro_f1':>9}  {'loss':>9}"]
    for r in result["sweep"]:
        mark = "  <- chosen" if r["alpha"] == result["alpha"] else ""
        cells = [f"{r[k]:>9.4f}" if k in r else f"{'—':>9}" for k in ("accuracy", "macro_f1", "loss")]
        lines.append(f"{r['alpha']:>6.3g}  " + "  ".join(cells) + mark)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ compare's wise_ft row


def wise_ft_run(zeroshot_export: Path, finetuned_export: Path, run_dir: Path, data_dir: str) -> dict[str, Any]:
    """compare's `wise_ft` row: sweep DEFAULT_ALPHAS on val (alpha 0.5 without one), export the chosen alpha to
    <run_dir>/best, and write summary.json as a training run would (val and test at that alpha)."""
    start = time.perf_counter()
    has_val = (Path(data_dir) / "val").is_dir()
    claim_output_dir(run_dir, None, inputs=(zeroshot_export, finetuned_export, data_dir))  # like a training run
    result = wise_ft(
        str(zeroshot_export),
        finetuned_export,
        run_dir / "best",
        list(DEFAULT_ALPHAS) if has_val else [0.5],
        data_dir if has_val else None,
        "val",
        test_split="test",
    )
    chosen = next(r for r in result["sweep"] if r["alpha"] == result["alpha"])
    meta = json.loads((run_dir / "best" / "fulltune_run.json").read_text())
    shutil.copy(run_dir / "best" / "config.yaml", run_dir / "config.yaml")
    summary = {
        "task": "image_classification",
        "method": "wise_ft",
        "optimizer_steps": 0,
        "epochs_done": 0,
        "best_val": {"accuracy": chosen.get("accuracy"), "step": 0},
        "alpha": result["alpha"],
        "sweep": result["sweep"],
        "zeroshot": str(zeroshot_export),
        "finetuned": str(finetuned_export),
        "trainable_parameters": 0,
        "total_parameters": meta.get("total_parameters"),
        "peak_memory_bytes": None,
        "output_dir": str(run_dir),
        "last_checkpoint": str(run_dir / "best"),
        "wall_time_s": time.perf_counter() - start,
    }
    if "test" in result:
        summary["test"] = result["test"] | {"weights": "best"}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    release_run_lock(run_dir)
    return summary
