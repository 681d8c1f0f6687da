"""Config loading: shipped example configs parse, foreign names (HF Trainer's, other configs', the layout of a CLIP
fine-tuning config.yaml) load as fulltune's keys, overrides and errors."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from fulltune.config import coerce, config_from_dict, dotted_items, load_config, names, to_dict
from fulltune.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_seed_document_layout_loads(tmp_path):
    seed = tmp_path / "config.yaml"
    seed.write_text(
        """
data:
  batch_size: 16
training:
  base_learning_rate: 1e-5
  num_epochs: 20
  gradient_accumulation_steps: 2
  layerwise_lr:
    enabled: true
    decay_rate: 0.95
  progressive_unfreezing:
    enabled: false
    unfreeze_schedule:
      - epoch: 0
        layers: ["classifier"]
      - epoch: 2
        layers: ["vision_model.encoder.layers.11"]
      - epoch: 6
        layers: ["all"]
  max_grad_norm: 0.5
  patience: 3
hardware:
  mixed_precision: true
"""
    )
    cfg = load_config(seed)
    assert cfg.training.base_learning_rate == 1e-5  # YAML 1.1 reads 1e-5 as a string: coerced
    assert cfg.training.layerwise_lr.decay_rate == 0.95
    assert cfg.training.progressive_unfreezing.unfreeze_schedule[1].layers == ["vision_model.encoder.layers.11"]
    assert cfg.training.early_stopping.patience == 3
    assert cfg.hardware.mixed_precision == "amp"  # the seeds: fp16 + GradScaler on CUDA, bf16 elsewhere


def test_overrides_and_aliases():
    cfg = load_config(
        None,
        [
            "training.learning_rate=2e-5",
            "training.fp16=true",
            "model.name=foo/bar",
            "data.batch_size=8",
            "method.freeze=embeddings,encoder.layer.0",
        ],
    )
    assert cfg.training.base_learning_rate == 2e-5
    assert cfg.hardware.mixed_precision == "fp16"
    assert cfg.model.name_or_path == "foo/bar"
    assert cfg.method.freeze == ["embeddings", "encoder.layer.0"]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("training.lr_schedular=cosine", "did you mean 'lr_scheduler'"),
        ("training.lr_scheduler=exponential", "expected one of 'cosine', 'linear', 'constant'"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("hardware.mixed_precision=fp8", "hardware.mixed_precision"),
        ("nonsense", "expected key=value"),
        ("training.layerwise_lr=5", "expected a mapping"),
        ("training.base_learning_rate=inf", "base_learning_rate must be a finite number"),
        ('training.layer_groups_lr={"head": .nan}', "layer_groups_lr.head must be a finite number"),
        ("hardware.num_threads=100000", "hardware.num_threads"),
        (f"training.seed={2**70}", "config key 'training.seed': 1180591620717411303424 is out of range; allowed: 0 to"),
    ],
)
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("'", "'")):
        load_config(None, [override])


# ------------------------------------------------------------------------------------------------ the coercer


@pytest.mark.parametrize(
    ("value", "tp", "expected"),
    [
        ("1e-5", float, 1e-5),
        (3, float, 3.0),
        (4.0, int, 4),
        ("12", int, 12),
        ("yes", bool, True),
        ("0", bool, False),
        (7, str, "7"),
        (None, int | None, None),
        ("2", int | None, 2),
        ("a,b", list[str], ["a", "b"]),
        ([0.5, 1], tuple[float, float], (0.5, 1.0)),
        (True, Literal["auto", "bf16", "no"], "auto"),
        (False, Literal["auto", "bf16", "no"], "no"),
        ({"x": 1}, dict[str, Any], {"x": 1}),
    ],
)
def test_coerce_accepts_what_yaml_gives(value, tp, expected):
    assert coerce(value, tp, "k") == expected


@pytest.mark.parametrize(
    ("value", "tp", "message"),
    [
        (True, int, "expected an integer"),
        (2.5, int, "expected an integer"),
        ("fast", float, "expected a number"),
        ("maybe", bool, "true or false"),
        ([1], str, "expected a string"),
        ([1, 2, 3], tuple[float, float], "2 values"),
        ("fp8", Literal["bf16", "no"], "one of"),
        (5, list[int], "expected a list"),
        ("x", int | None, "int | None"),
    ],
)
def test_coerce_rejects_with_the_key_and_what_was_expected(value, tp, message):
    with pytest.raises(ConfigError, match=f"config key 'section.key'.*{message}"):
        coerce(value, tp, "section.key")


# ------------------------------------------------------------------------------------------------ foreign names

# A value other than the default for every key a foreign name becomes (fp16/bf16 and optim take their own values).
TARGET_VALUES: dict[str, Any] = {
    "checkpoint.keep_last": 5,
    "checkpoint.save_every_epochs": 2,
    "checkpoint.save_every_steps": 7,
    "data.batch_size": 8,
    "data.dataset_config": "plain_text",
    "data.dataset_name": "some/set",
    "data.data_dir": "somewhere",
    "data.eval_batch_size": 4,
    "data.image_size": 64,
    "data.label_column": "y",
    "data.max_eval_samples": 9,
    "data.max_length": 64,
    "data.max_samples": 11,
    "data.num_classes": 3,
    "data.num_workers": 2,
    "data.seq_len": 256,
    "data.test_file": "t.csv",
    "data.text_column": "x",
    "data.train_file": "a.csv",
    "data.val_file": "b.csv",
    "hardware.mixed_precision": "bf16",
    "logging.log_dir": "logs",
    "logging.report_to": ["mlflow"],
    "logging.run_name": "first",
    "logging.log_every_steps": 3,
    "method.lora.alpha": 4.0,
    "method.lora.dropout": 0.2,
    "method.lora.r": 4,
    "method.lora.target_modules": ["q", "v"],
    "method.name": "partial",
    "model.name_or_path": "foo/bar",
    "output_dir": "out",
    "speed.cpu_allocator": "off",
    "speed.cpu_dropout": "off",
    "speed.first_token_only": "off",
    "speed.fused_qkv": "off",
    "training.adam_beta1": 0.8,
    "training.adam_beta2": 0.99,
    "training.adam_epsilon": 1e-6,
    "training.compile": True,
    "training.base_learning_rate": 2e-5,
    "training.early_stopping": {"enabled": True, "patience": 4},
    "training.early_stopping.patience": 4,
    "training.eval_every_steps": 6,
    "training.gradient_accumulation_steps": 2,
    "training.gradient_checkpointing": True,
    "training.label_smoothing": 0.1,
    "training.layer_groups_lr": {"head": 1e-4},
    "training.layerwise_lr": {"enabled": True, "decay_rate": 0.9},
    "training.layerwise_lr.decay_rate": 0.9,
    "training.lr_scheduler": "linear",
    "training.max_grad_norm": 0.5,
    "training.max_steps": 12,
    "training.metric": "macro_f1",
    "training.num_epochs": 5,
    "training.progressive_unfreezing": {"enabled": True, "auto": 2},
    "training.seed": 7,
    "training.warmup_ratio": 0.2,
    "training.warmup_steps": 10,
    "training.weight_decay": 0.05,
}


def _fulltune_keys() -> set[str]:
    keys = {k for k, _ in dotted_items(to_dict(load_config()))}
    return keys | {k.rsplit(".", 1)[0] for k in keys if "." in k}  # and the sections


def test_foreign_names_are_each_said_once_and_none_is_a_fulltune_key():
    in_sections = [f"{s}.{n}" for s, ns in names.HF_TRAINER_IN_SECTIONS.items() for n in ns]
    tables = [list(names.HF_TRAINER), in_sections, list(names.SPELLINGS), list(names.EARLIER_KEYS)]
    tables.append(list(names.CLIP_LAYOUT))
    every = [name for table in tables for name in table]
    assert len(every) == len(set(every)), sorted(n for n in every if every.count(n) > 1)
    keys = _fulltune_keys()
    assert not set(every) & keys  # nothing maps to itself, no key of fulltune's is read as another
    assert set(names.HF_TRAINER_IN_SECTIONS) <= keys
    for name, target in [*names.ALIASES.items(), *names.CLIP_LAYOUT.items()]:
        assert target in keys, (name, target)
    assert set(names.ALIASES) == {*names.HF_TRAINER, *in_sections, *names.SPELLINGS, *names.EARLIER_KEYS}
    assert set(names.EARLIER_VALUES) <= keys


@pytest.mark.parametrize("name", sorted(names.ALIASES))
def test_each_alias_loads_as_its_key(name):
    target = names.ALIASES[name]
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("fp16", "bf16"):
        value, expected = True, leaf
    elif leaf == "optim":
        value, expected = "adamw_torch", False
    else:
        value = expected = TARGET_VALUES[target]
    assert load_config(None, {name: value}) == load_config(None, {target: expected})
    assert load_config(None, [f"{name}={json.dumps(value)}"]) == load_config(None, {target: expected})


def test_hf_trainer_names_without_a_key_say_what_to_use_and_report_to_reads_hf_values():
    for name, hint in names.HF_TRAINER_ELSEWHERE.items():
        with pytest.raises(ConfigError, match=re.escape(hint)):
            load_config(None, {name: "steps"})
    assert load_config(None, ["report_to=none"]).logging.report_to == []
    assert load_config(None, ["report_to=mlflow,wandb"]).logging.report_to == ["mlflow", "wandb"]


@pytest.mark.parametrize("source", sorted(names.CLIP_LAYOUT))
def test_each_clip_layout_key_loads_as_its_key_and_says_so(tmp_path, capsys, source):
    target = names.CLIP_LAYOUT[source]
    value = TARGET_VALUES[target]
    tree: dict[str, Any] = {}
    node = tree
    for part in source.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[source.rsplit(".", 1)[-1]] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    names._SAID.clear()
    assert load_config(path) == load_config(None, {target: value})
    err = capsys.readouterr().err
    assert f"read as the layout of a CLIP fine-tuning config.yaml: {source} -> {target}\n" in err
    assert "seed" not in err


def test_mapping_under_an_alias_names_the_key_it_stands_for(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("learning_rate: {head: 1.0e-4}\n")
    with pytest.raises(ConfigError, match=r"config key 'training.base_learning_rate': expected a number"):
        load_config(path)
    with pytest.raises(ConfigError, match="optim .* fulltune trains with AdamW"):
        load_config(None, {"optim": ["adamw_torch"]})


def test_config_package_imports_fulltune_modules_at_the_top_only():
    package = Path(__file__).resolve().parents[2] / "src" / "fulltune" / "config"
    inside = [
        f"{path.name}:{node.lineno} in {fn.name}"
        for path in sorted(package.glob("*.py"))
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    ]
    assert not inside  # an import inside a function there would hide a cycle (checks <-> load was one)


def test_a_short_name_on_the_command_line_is_not_announced_as_a_config_layout(tmp_path, capsys):
    names._SAID.clear()
    assert load_config(None, ["num_epochs=2", "batch_size=4"]).training.num_epochs == 2
    assert capsys.readouterr().err == ""
    path = tmp_path / "clip.yaml"
    path.write_text("num_epochs: 2\n")
    assert load_config(path).training.num_epochs == 2
    assert "read as the layout of a CLIP fine-tuning config.yaml: num_epochs" in capsys.readouterr().err
