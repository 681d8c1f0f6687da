"""What `fulltune prune` runs: structured pruning of a Llama-family decoder, perplexity before and after, and
recovery training through fulltune's own trainer, with the recovery guide's flags (`--base_model`, `--finetune_*`,
...).

Output folder: pruned/ (a folder fulltune loads again), recovery/ (the training run), prune_results.json."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from fulltune.config import Config, load_config, parse_override
from fulltune.data import lm
from fulltune.errors import ConfigError, DataError
from fulltune.eval.perplexity import file_perplexity
from fulltune.files.rundir import atomic_dir, claim_output
from fulltune.files.safestate import require_safetensors
from fulltune.model.bundle import resolve_model_path, set_end_token
from fulltune.model.exported import load_exported
from fulltune.model.pruned import is_pruned_folder, load_pruned
from fulltune.model.pruning import SHAPES_KEY, PruneConfig, parameter_count, prune_model
from fulltune.planning.recommend import check_memory
from fulltune.prune.flags import FINETUNE_FLAGS, SCRIPT_DEFAULTS
from fulltune.prune.folder import save_pruned
from fulltune.prune.guide import GuideLog, builtin_text, publish_recovered
from fulltune.runtime.device import resolve_device, resolve_precision
from fulltune.runtime.rng import seed_everything
from fulltune.training.trainer import train

RESULTS_FILE = "prune_results.json"
PRUNE_ENTRIES = ("logs", "builtin_text", "cache", "pruned", "recovery", "recovered", RESULTS_FILE)
"""What `fulltune prune` writes into its output folder (its record lists them; other files there are left alone)."""
EVAL_BATCH_SIZE = 8  # windows per forward pass; `fulltune evaluate` uses the same by default


def output_dir(args: argparse.Namespace) -> Path:
    return Path(args.output_dir) if args.output_dir else Path("outputs") / args.save_ckpt_log_name


def recovery_config(args: argparse.Namespace, pruned_dir: Path) -> Config:
    """The recovery run: seed defaults (or --config), then the flags typed, then key=value, then what must hold."""
    values: dict[str, Any] = {} if args.config else dict(SCRIPT_DEFAULTS)
    for flag, (key, default) in FINETUNE_FLAGS.items():
        typed = getattr(args, flag)
        if typed is not None:
            values[key] = typed
        elif not args.config:
            values[key] = default
    values.update(parse_override(o) for o in args.overrides or [])
    values.update(
        {
            "task": "causal_lm",
            "model.name_or_path": str(pruned_dir),
            "model.tiny_config": None,
            "model.tokenizer": None,
            "model.torch_dtype": args.torch_dtype,
            "data.train_file": args.data_file,
            "output_dir": str(output_dir(args) / "recovery"),
        }
    )
    return load_config(args.config, values)


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.pruning_ratio < 1.0:
        raise ConfigError(f"--pruning_ratio {args.pruning_ratio}: expected a fraction in [0, 1)")
    if args.layer_start < 0 or (args.layer_end is not None and args.layer_end <= args.layer_start):
        raise ConfigError(f"--layer_start {args.layer_start} / --layer_end {args.layer_end}: expected 0 <= start < end")
    if args.importance_samples < 1 or args.importance_seq_len < 2:
        raise ConfigError("--importance_samples must be >= 1 and --importance_seq_len >= 2")
    for flag in ("data_file", "eval_file"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise DataError(f"--{flag} '{path}' does not exist")


def _base_config(path: str) -> Any:
    """The base model's config, refused in one line unless it is a causal language model (before anything loads)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if path.startswith((".", "/", "~")) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"--base_model '{path}': no such folder")
    name = resolve_model_path(path)
    if Path(name).is_dir():
        require_safetensors(name, "--base_model")  # a pickled checkpoint is refused before anything else
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--base_model '{path}': cannot read its config ({str(err).splitlines()[0]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = ", ".join(config.architectures or []) or config.model_type
        raise ConfigError(
            f"--base_model '{path}': a {config.model_type} model ({kind}), not a causal language model; prune "
            "removes key/value groups and MLP channels of Llama-family decoders (llama, mistral, qwen2)"
        )
    return config


def layout_note(args: argparse.Namespace, config: Any) -> str:
    """What the pruned folder will need to load, said before pruning starts: plain transformers where every layer is
    pruned alike (and the base was uniform), fulltune's loader where a layer range or importance ratios differ."""
    n = int(config.num_hidden_layers)
    end = n if args.layer_end is None else min(args.layer_end, n)
    uneven = []
    if (args.layer_start, end) != (0, n) and args.pruning_ratio > 0:
        uneven.append(f"only layers {args.layer_start}-{end - 1} of 0-{n - 1} are pruned")
    if args.layer_ratios == "importance" and args.pruning_ratio > 0:
        uneven.append("--layer_ratios importance gives each layer its own ratio")
    if getattr(config, SHAPES_KEY, None) is not None:
        uneven.append("the base model's layers already differ in width")
    if not uneven:
        return "layout: every layer pruned alike; the pruned model loads with plain AutoModelForCausalLM"
    return (
        f"layout: {'; '.join(uneven)}, so its layers will differ in width: the pruned model loads with fulltune "
        "(any fulltune command, or fulltune.model.pruned.load_pruned), not with plain AutoModelForCausalLM"
    )


def _load_base(
    path: str, device: torch.device, cfg: Config, torch_dtype: str = "float32"
) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.startswith((".", "/", "~")) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"--base_model '{path}': no such folder")
    name = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        dtype = torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype)
        if Path(name).is_dir() and is_pruned_folder(name):
            model = load_pruned(name, torch_dtype=dtype)
        else:
            require_safetensors(name, "--base_model")
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True)
    except OSError as err:
        raise ConfigError(f"--base_model '{path}': cannot load a causal LM ({str(err).splitlines()[0]})") from None
    set_end_token(model, tokenizer, cfg.data)  # records end as in training: calibration, perplexity, recovery
    return model.to(device).eval(), tokenizer


def _recovery_samples(cfg: Config, tokenizer: Any, out: Path, guide: GuideLog) -> Config:
    """The recovery run takes --finetune_samples (data.max_samples) blocks of data.seq_len tokens from --data_file,
    or every block there is when the file holds fewer: settled here, so that the run's config records the count it
    trains on, and said in the log."""
    d = cfg.data
    available = len(lm.load_blocks(Path(d.train_file), d, tokenizer, out / "cache"))  # the trainer's own packing
    used = available if d.max_samples is None else min(d.max_samples, available)
    asked = "" if d.max_samples is None else f" (--finetune_samples {d.max_samples:,}"
    if asked:
        asked += f": {available:,} available)" if d.max_samples > available else ")"
    guide.line(f"recovery training on {used:,} blocks of {d.seq_len} tokens of {d.train_file}{asked}")
    if d.max_samples is None or d.max_samples <= available:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(d, max_samples=available))


def _perplexity(model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace, cfg: Config, device: Any) -> dict:
    """--eval_file's perplexity, as `eval.perplexity` defines it (windows of data.seq_len tokens, read with
    data.encoding): what the recovery run's validation and `fulltune evaluate` give on that file."""
    precision = resolve_precision(cfg.hardware.mixed_precision, device)
    return file_perplexity(
        model, tokenizer, args.eval_file, cfg.data, cfg.data.seq_len, None, EVAL_BATCH_SIZE, device, precision.autocast
    )


def _recovered_folder(summary: dict[str, Any]) -> Path:
    """best/ (chosen on a validation file, if the run had one), else the run's last checkpoint."""
    best = Path(summary["output_dir"]) / "best"
    if best.is_dir():
        return best
    if not summary.get("last_checkpoint"):
        raise ConfigError("the recovery run wrote no checkpoint (checkpoint.save_every_epochs=0?); nothing to evaluate")
    return Path(summary["last_checkpoint"])


def pruned_line(report: dict[str, Any]) -> str:
    """What pruning removed: the share of the prunable blocks' parameters, then of the whole model, whose embeddings
    (and untied output head) pruning never touches (a small model's vocabulary can be nearly all of it)."""
    blocks = 1 - report["block_params_after"] / max(report["block_params_before"], 1)
    whole = 1 - report["params_after"] / max(report["params_before"], 1)
    embeddings = report["embedding_params"] / max(report["params_before"], 1)
    return (
        f"pruned: blocks {100 * blocks:.1f}% fewer parameters ({report['block_params_before']:,} -> "
        f"{report['block_params_after']:,}); whole model {100 * whole:.1f}% fewer ({report['params_before']:,} -> "
        f"{report['params_after']:,}; embeddings are {embeddings:.1%} of it)"
    )


def format_results(rows: list[dict[str, Any]]) -> str:
    lines = [f"  {'model':<10}{'parameters':>14}{'perplexity':>13}{'tokens':>11}"]
    for r in rows:
        ppl = f"{r['perplexity']:.3f}" if r.get("perplexity") is not None else "-"
        tokens = f"{r['tokens']:,}" if r.get("tokens") is not None else "-"
        lines.append(f"  {r['model']:<10}{r['parameters']:>14,}{ppl:>13}{tokens:>11}")
    return "\n".join(lines)


def _prune(args: argparse.Namespace, model: Any, tokenizer: Any, cfg: Config, out: Path) -> dict[str, Any]:
    """Prune `model` in place as the flags say (Taylor importance from calibration blocks of --data_file)."""

    calibration = None
    if args.importance == "taylor":
        data_cfg = dataclasses.replace(cfg.data, seq_len=args.importance_seq_len)
        calibration = lm.load_blocks(
            Path(args.data_file), data_cfg, tokenizer, out / "cache", args.importance_samples, cfg.training.seed
        ).input_ids  # (n, seq_len)
    prune_cfg = PruneConfig(
        pruning_ratio=args.pruning_ratio,
        importance=args.importance,
        prune_mlp=args.prune_mlp,
        layer_start=args.layer_start,
        layer_end=args.layer_end,
        layer_ratios=args.layer_ratios,
        calibration_block_size=args.importance_seq_len,
        num_calibration_samples=args.importance_samples,
    )
    try:
        return prune_model(model, prune_cfg, calibration)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--base_model '{args.base_model}': cannot prune it ({err})") from None


def _recover(
    args: argparse.Namespace, cfg: Config, device: Any, timings: dict[str, float]
) -> tuple[Path, dict[str, Any]]:
    """Recovery training of the pruned model with fulltune's trainer; its folder and its perplexity row."""

    tic = time.perf_counter()
    summary = train(cfg, overwrite=True)  # OUTPUT/recovery belongs to this command: a rerun replaces it
    timings["recovery_train_s"] = time.perf_counter() - tic
    recovered = _recovered_folder(summary)
    bundle = load_exported(recovered, device)
    print(f"recovered model ({recovered}):")
    tic = time.perf_counter()
    row = {
        "model": "recovered",
        "parameters": parameter_count(bundle.model),
        **_perplexity(bundle.model, bundle.tokenizer, args, cfg, device),
    }
    timings["eval_recovered_s"] = time.perf_counter() - tic
    return recovered, row


def _results(
    args: argparse.Namespace,
    block: int,
    rows: list[dict[str, Any]],
    pruned_dir: Path,
    recovered: Path | None,
    report: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """prune_results.json: the perplexity rows, where the models went, the pruning report, timings."""
    return {
        "base_model": args.base_model,
        "eval_file": args.eval_file,
        "block_size": block,
        "results": rows,
        "pruned_model": str(pruned_dir) if pruned_dir.is_dir() else None,
        "recovered_model": str(recovered) if recovered else None,
        "prune": {
            k: report[k]
            for k in ("params_before", "params_after", "block_params_before", "block_params_after", "config")
        }
        | {"embedding_params": report["embedding_params"], "layer_range": report["layer_range"]},
        "layers": report["layers"],
        "timings_s": timings,
    }


def run_prune(args: argparse.Namespace) -> int:

    _check_args(args)
    out = output_dir(args)
    pruned_dir = out / "pruned"
    claim_output(out, "prune", (args.base_model, args.data_file, args.eval_file), PRUNE_ENTRIES)
    base_config = _base_config(args.base_model)
    guide = GuideLog(out)  # OUTPUT/logs/training.log, the log the guide greps
    guide.line(layout_note(args, base_config))
    measure = args.eval_file is not None or args.test_after_prune or args.finetune
    if args.data_file is None or args.eval_file is None:
        train_text, eval_text, what = builtin_text(out)
        args.data_file, args.eval_file = args.data_file or str(train_text), args.eval_file or str(eval_text)
        guide.line(f"text: {what}")
    cfg = recovery_config(args, pruned_dir)  # validated before any slow step
    device = resolve_device(cfg.hardware.device)
    block = cfg.data.seq_len  # all three perplexities, and `fulltune evaluate` on the recovered run, use it
    seed_everything(cfg.training.seed)
    timings: dict[str, float] = {}
    rows: list[dict[str, Any]] = []

    tic = time.perf_counter()
    model, tokenizer = _load_base(args.base_model, device, cfg, args.torch_dtype)
    guide.line(f"model {args.base_model}: {parameter_count(model):,} parameters in {next(model.parameters()).dtype}")
    if args.finetune:
        cfg = _recovery_samples(cfg, tokenizer, out, guide)
    if measure:
        rows.append({"model": "original", "parameters": parameter_count(model)})
        rows[-1] |= _perplexity(model, tokenizer, args, cfg, device)
        guide.perplexity("original", rows[-1]["perplexity"], rows[-1]["tokens"])
        timings["eval_original_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    report = _prune(args, model, tokenizer, cfg, out)
    timings["prune_s"] = time.perf_counter() - tic
    guide.line(pruned_line(report))
    if measure:
        tic = time.perf_counter()
        rows.append({"model": "pruned", "parameters": report["params_after"]})
        rows[-1] |= _perplexity(model, tokenizer, args, cfg, device)
        guide.perplexity("pruned", rows[-1]["perplexity"], rows[-1]["tokens"])
        timings["eval_pruned_s"] = time.perf_counter() - tic
    if args.save_model or args.finetune:
        with atomic_dir(pruned_dir) as tmp:  # a rerun replaces the earlier pruned model whole
            save_pruned(model, tokenizer, tmp, report)
        guide.line(f"pruned model written to {pruned_dir}")

    recovered = None
    if args.finetune:
        del model  # the run loads its own copy from pruned/
        gc.collect()
        # as `fulltune plan` estimates it: refused in one line, before training, where it cannot fit
        guide.line(check_memory(cfg, "causal_lm", None, "the recovery run"))
        recovered, row = _recover(args, cfg, device, timings)
        rows.append(row)
        guide.perplexity("recovered", row["perplexity"], row["tokens"])
        guide.line(f"recovered model written to {publish_recovered(recovered, out)}")

    results = _results(args, block, rows, pruned_dir, recovered, report, timings)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    if rows:
        guide.line(format_results(rows))
    guide.line(f"written: {out / RESULTS_FILE}; log: {guide.path}")
    guide.close()
    return 0
