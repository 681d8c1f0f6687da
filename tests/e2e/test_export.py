"""Model cards in every exported folder, and `fulltune export`: the shipped folder loads with plain transformers
(fulltune not importable) and gives the checkpoint's logits to 1e-5, for full, LoRA-merged, image and pruned
models; bf16 weights, the LoRA adapter alone, no training state; push_to_hub fails in one line without a hub."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TINY_CLIP, base_overrides, write_text_split
from PIL import Image
from safetensors.torch import load_file

from fulltune.cli import main
from fulltune.config import ConfigError, load_config
from fulltune.model.exported import load_exported
from fulltune.state.export import export, push_to_hub, unprune
from fulltune.training.trainer import train

# Logits of each folder, computed in a process where fulltune cannot be imported.
PLAIN_LOGITS = """
import sys, json, torch
sys.modules['fulltune'] = None
import transformers as tf
from PIL import Image
out = {}
for path, kind in json.loads(sys.argv[1]):
    if kind == 'text':
        tok = tf.AutoTokenizer.from_pretrained(path)
        model = tf.AutoModelForSequenceClassification.from_pretrained(path).float().eval()
        inputs = tok(['a good film', 'terrible acting all round'], return_tensors='pt', padding=True)
    elif kind == 'image':
        proc = tf.AutoImageProcessor.from_pretrained(path)
        model = tf.AutoModelForImageClassification.from_pretrained(path).float().eval()
        inputs = proc(Image.new('RGB', (50, 40), (200, 60, 40)), return_tensors='pt')
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(path).float().eval()
        inputs = {'input_ids': torch.arange(2, 20).view(2, 9) % 128}
    with torch.no_grad():
        out[path] = model(**inputs).logits.tolist()
print(json.dumps(out))
"""


def plain_logits(folders: list[tuple[Path, str]]) -> dict[str, torch.Tensor]:
    arg = json.dumps([(str(p), kind) for p, kind in folders])
    done = subprocess.run([sys.executable, "-c", PLAIN_LOGITS, arg], capture_output=True, text=True, check=True)
    return {k: torch.tensor(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def fulltune_logits(folder: Path, kind: str) -> torch.Tensor:
    """The checkpoint's own logits, as fulltune evaluates it (load_exported)."""
    bundle = load_exported(folder)
    with torch.no_grad():
        if kind == "text":
            inputs = bundle.tokenizer(["a good film", "terrible acting all round"], return_tensors="pt", padding=True)
        else:
            from fulltune.data.images import eval_transform

            inputs = {
                "pixel_values": eval_transform(Image.new("RGB", (50, 40), (200, 60, 40)), bundle.image_spec)[None]
            }
        return bundle.model(**inputs).logits


def card(folder: Path) -> str:
    text = (folder / "README.md").read_text()
    for section in ("## Model", "## Data", "## Metrics", "## How to load", "## Limits"):
        assert section in text, (folder, section)
    return text


def _text_cfg(out: Path, text_data: Path, **extra):
    values = dict(
        data__data_dir=str(text_data), data__text_column="sentence", data__batch_size=8, training__num_epochs=2
    )
    return load_config(None, base_overrides(out, TINY_BERT, **(values | extra)))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A full fine-tuning run of 2 epochs with step checkpoints too, texts cut at 16 tokens, shared by the tests
    below."""
    root = tmp_path_factory.mktemp("export")
    text_data = root / "text"
    text_data.mkdir()
    for split, n, seed in (("train", 32, 0), ("val", 8, 1), ("test", 8, 2)):
        write_text_split(text_data / f"{split}.tsv", n, seed)
    train(
        _text_cfg(
            root / "full", text_data, data__max_length=16, checkpoint__save_every_steps=3, checkpoint__keep_last=0
        )
    )
    return root / "full"


def test_cards_and_exports_of_full_and_lora_runs(tmp_path, text_data, full_run):
    full, lora = full_run, tmp_path / "lora"
    train(_text_cfg(lora, text_data, method__name="lora", training__base_learning_rate=1e-2, training__num_epochs=1))
    exported = sorted(p for p in full.iterdir() if (p / "config.json").is_file())
    assert [p.name for p in exported] == [
        "best",
        "checkpoint-epoch-1",
        "checkpoint-epoch-2",
        "checkpoint-step-3",
        "checkpoint-step-6",
    ]
    for folder in exported:
        text = card(folder)
        assert "Labels (2): `0`, `1`" in text and "Examples: train 32, val 8, test 8" in text
        assert "| learning rate (peak) | 5e-05 |" in text and "AutoModelForSequenceClassification" in text
    best = card(full / "best")
    summary = json.loads((full / "summary.json").read_text())
    assert "| validation | best of the run" in best
    assert f"| test | these weights | accuracy | {summary['test']['accuracy']:.4g} |" in best
    assert "| validation | latest evaluation, optimizer step 3 |" not in card(full / "checkpoint-step-3")  # no eval yet
    assert "| validation | latest evaluation, optimizer step 4 |" in card(full / "checkpoint-step-6")
    assert "LoRA r / alpha / dropout | 8 / 16.0 / 0.05" in card(lora / "best")
    assert "adapter alone (peft) is in adapter/" in card(lora / "best")
    assert "AutoPeftModelForSequenceClassification" in card(lora / "best" / "adapter")

    outs = {name: tmp_path / "ship" / name for name in ("full", "lora", "bf16", "adapter", "ckpt")}
    assert main(["export", str(full), "--output_dir", str(outs["full"])]) == 0  # a run folder: its best/
    assert main(["export", str(lora), "--output_dir", str(outs["lora"])]) == 0
    assert main(["export", str(full / "checkpoint-step-3"), "--output_dir", str(outs["ckpt"])]) == 0
    export(full / "best", outs["bf16"], dtype="bfloat16")
    export(lora, outs["adapter"], lora="adapter")
    for out in outs.values():
        names = {p.name for p in out.iterdir()}
        assert {"README.md", "fulltune_run.json", "tokenizer.json"} <= names
        assert not names & {"training_state", "config.yaml", "adapter"}
        assert "Exported by `fulltune export`" in card(out)
    assert {t.dtype for t in load_file(str(outs["bf16"] / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((outs["bf16"] / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.name for p in outs["adapter"].glob("adapter_*")} == {"adapter_config.json", "adapter_model.safetensors"}
    assert not (outs["adapter"] / "model.safetensors").exists()

    logits = plain_logits(
        [(outs["full"], "text"), (outs["lora"], "text"), (outs["ckpt"], "text"), (outs["bf16"], "text")]
    )
    for out, src in (
        (outs["full"], full / "best"),
        (outs["lora"], lora / "best"),
        (outs["ckpt"], full / "checkpoint-step-3"),
    ):
        torch.testing.assert_close(logits[str(out)], fulltune_logits(src, "text"), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[str(outs["bf16"])], fulltune_logits(full / "best", "text"), atol=2e-2, rtol=0)
    assert not torch.equal(logits[str(outs["full"])], logits[str(outs["lora"])])


def test_export_keeps_the_training_length(tmp_path, full_run):
    """Trained on the first 16 tokens of each text: the exported tokenizer cuts there too, so a default pipeline
    asked to truncate (as the card says) scores a long text as `fulltune predict` does."""
    from transformers import AutoTokenizer, pipeline

    from fulltune.eval.predict import classify

    out = export(full_run, tmp_path / "ship")
    assert AutoTokenizer.from_pretrained(out).model_max_length == 16
    assert json.loads((full_run / "best" / "tokenizer_config.json").read_text())["model_max_length"] == 16
    text = "terrible acting all round, i hated it. " + "a good and great film, wonderful acting, i loved it. " * 4
    assert len(AutoTokenizer.from_pretrained(out)(text)["input_ids"]) > 16
    [[(label, score)]] = classify(load_exported(out), [text], top_k=1)
    classifier = pipeline("text-classification", model=str(out))
    assert classifier.preprocess(text, truncation=True)["input_ids"].shape == (1, 16)
    [cut] = classifier(text, truncation=True)
    assert cut["label"] == label and cut["score"] == pytest.approx(score, abs=1e-6)
    # transformers keeps every token unless asked to truncate, whatever the settings: why the card says so
    assert classifier.preprocess(text)["input_ids"].shape[1] > 16
    text = card(out)
    assert "its model_max_length is 16" in text and "first 16 tokens" in text
    snippet = text.split("```python\n")[1].split("```")[0]
    assert snippet.count(", truncation=True") == 2  # the pipeline call and the tokenizer call
    exec(snippet.replace("PATH", str(out)), {})  # the card's own snippet runs as written


def test_image_export_gives_the_checkpoint_logits(tmp_path, image_data):
    run = tmp_path / "run"
    train(
        load_config(
            None,
            base_overrides(
                run,
                TINY_CLIP,
                data__data_dir=str(image_data),
                data__batch_size=6,
                training__num_epochs=1,
                data__num_workers=0,
            ),
        )
    )
    text = card(run / "best")
    assert "Labels (2): `ants`, `bees`" in text and "AutoImageProcessor" in text
    out = export(run, tmp_path / "ship")
    assert (out / "preprocessor_config.json").is_file()
    logits = plain_logits([(out, "image")])[str(out)]
    torch.testing.assert_close(logits, fulltune_logits(run / "best", "image"), atol=1e-5, rtol=0)


def test_pruned_folder_has_a_card_and_exports_to_plain_transformers(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fulltune.model.pruned import load_pruned
    from fulltune.model.pruning import PruneConfig, get_layer_shapes, prune_model
    from fulltune.prune.folder import save_pruned

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=128,
        )
    ).eval()
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    report = prune_model(model, PruneConfig(pruning_ratio=0.5, prune_mlp=True, layer_ratios="importance"), calib)
    shapes = {(s["num_key_value_heads"], s["intermediate_size"]) for s in get_layer_shapes(model)}
    assert len(shapes) > 1  # layers of different widths: the case plain transformers cannot build
    pruned = save_pruned(model, None, tmp_path / "prune_out" / "pruned", report)
    text = card(pruned)
    assert "load_pruned" in text and f"to {report['params_after']:,} parameters" in text

    padded = unprune(load_pruned(pruned))
    x = torch.arange(2, 20).view(2, 9) % 128
    with torch.no_grad():
        torch.testing.assert_close(padded(x).logits, model(x).logits, atol=1e-5, rtol=0)
    (tmp_path / "prune_out" / "prune_results.json").write_text(json.dumps({"recovered_model": None}))
    out = export(tmp_path / "prune_out", tmp_path / "ship")  # a prune output: its pruned/ folder
    assert "fulltune_layer_shapes" not in json.loads((out / "config.json").read_text())
    assert "zero-padded to uniform layer widths" in card(out) and "load_pruned" not in card(out)
    logits = plain_logits([(out, "lm")])[str(out)]
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x).logits, atol=1e-5, rtol=0)


def test_export_errors_are_one_line(tmp_path, full_run, monkeypatch, capsys):
    run = full_run
    assert main(["export", str(run), "--output_dir", str(tmp_path / "a"), "--lora", "adapter"]) == 2
    assert main(["export", str(tmp_path), "--output_dir", str(tmp_path / "b")]) == 2  # an empty folder
    assert main(["export", str(run), "--output_dir", str(run / "best" / "x")]) == 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", str(run), "--output_dir", str(tmp_path / "c"), "--push_to_hub", "me/model"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fulltune: error:")]
    assert len(lines) == 4
    assert "holds no LoRA adapter" in lines[0] and "not a run folder" in lines[1]
    assert "lies inside the input" in lines[2]
    assert "HF_HUB_OFFLINE is set" in lines[3] and not (tmp_path / "c").exists()  # checked before exporting

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # the env was read at import: ask it again
    with pytest.raises(ConfigError, match="no Hugging Face token"):
        push_to_hub(run / "best", "me/model")
    with pytest.raises(ConfigError, match=r"^export --push_to_hub me/model: upload failed \("):
        # A token but no reachable hub (a closed local port): the failure is one line too.
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
        push_to_hub(run / "best", "me/model", token="hf_fake")
