"""Zero-shot head initialisation and LP-FT for CLIP, on a tiny random CLIP with both towers and a local tokenizer:
the head's logits are CLIP's own image-text logits, an LP-FT run resumes bit-identically, the export loads with
plain transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_overrides
from test_train import assert_same_weights
from tiny_clip import make_tiny_clip

from fulltune.config import ConfigError, load_config
from fulltune.model.build import build_model
from fulltune.model.exported import load_exported
from fulltune.training.trainer import train

CLASS_NAMES = ["ants", "bees", "ant", "bee", "honey"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", CLASS_NAMES)


def clip_cfg(out: Path, clip_dir: Path, data: Path, **extra: object):
    tree = base_overrides(
        out,
        None,
        model__name_or_path=str(clip_dir),
        data__data_dir=str(data),
        data__num_workers=0,
        data__batch_size=4,
        **extra,
    )
    del tree["model.tiny_config"]
    return load_config(None, tree)


def clip_logits(clip_dir: Path, pixels: torch.Tensor, names: list[str], templates: list[str]) -> torch.Tensor:
    """CLIPModel's own logits_per_image for every (class, template) prompt: (batch, classes, templates)."""
    import transformers as tf

    clip = tf.CLIPModel.from_pretrained(str(clip_dir)).eval()
    tok = tf.AutoTokenizer.from_pretrained(str(clip_dir))
    prompts = [t.format(n) for n in names for t in templates]
    inputs = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixels)
    return out.logits_per_image.reshape(len(pixels), len(names), len(templates)), out.text_embeds


@pytest.mark.parametrize("templates", [["a photo of a {}."], None])
def test_zeroshot_head_logits_are_clips_own(tmp_path, clip_dir, image_data, templates):
    extra = {"method.head_init": "zeroshot", "data.class_names": {"ants": "ant"}}
    if templates:
        extra["method.prompt_templates"] = templates
    cfg = clip_cfg(tmp_path / "run", clip_dir, image_data, **extra)
    labels = ["ants", "bees"]
    bundle = build_model(cfg, "image_classification", labels)
    model = bundle.model.eval()
    assert not any("text" in n for n, _ in model.named_parameters())  # the text tower is gone
    assert bundle.extra["class_names"] == ["ant", "bees"]
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head = model(pixel_values=pixels).logits  # (3, 2)
    per_prompt, text = clip_logits(clip_dir, pixels, ["ant", "bees"], cfg.method.prompt_templates)
    if templates:  # one prompt per class: exactly logits_per_image
        torch.testing.assert_close(head, per_prompt[:, :, 0], atol=1e-5, rtol=0)
    else:
        # The prompt ensemble averages normalised text embeddings and renormalises (the CLIP paper's recipe):
        # logits = (mean over templates of logits_per_image) / |mean of the normalised text embeddings|.
        norms = text.reshape(2, len(cfg.method.prompt_templates), -1).mean(1).norm(dim=-1)  # (classes,)
        torch.testing.assert_close(head, per_prompt.mean(-1) / norms, atol=1e-5, rtol=0)
    assert torch.equal(model.classifier.bias, torch.zeros(2))


def test_head_init_errors(tmp_path, clip_dir, image_data):
    with pytest.raises(ConfigError, match="exactly one"):
        clip_cfg(tmp_path, clip_dir, image_data, method__prompt_templates=["a photo"])
    with pytest.raises(ConfigError, match="no epoch of fine-tuning"):
        clip_cfg(tmp_path, clip_dir, image_data, method__head_init="linear_probe", training__num_epochs=1)
    cfg = clip_cfg(tmp_path, clip_dir, image_data, method__head_init="zeroshot", data__class_names=["ant"])
    with pytest.raises(ConfigError, match="1 names but the data has 2 classes"):
        build_model(cfg, "image_classification", ["ants", "bees"])
    # A vision-only CLIP folder: zeroshot refuses it, linear_probe probes the ordinary random head instead.
    import transformers as tf

    vision = tf.CLIPConfig.from_pretrained(str(clip_dir)).vision_config
    vision.projection_dim = 16
    tf.CLIPVisionModelWithProjection(vision).save_pretrained(str(tmp_path / "vision"))
    for head_init in ("zeroshot", "linear_probe"):
        cfg = clip_cfg(tmp_path, tmp_path / "vision", image_data, method__head_init=head_init)
        if head_init == "zeroshot":
            with pytest.raises(ConfigError, match="is a clip_vision_model"):
                build_model(cfg, "image_classification", ["ants", "bees"])
        else:
            assert (
                type(build_model(cfg, "image_classification", ["ants", "bees"]).model) is tf.CLIPForImageClassification
            )
    bert = load_config(None, {"method.head_init": "zeroshot", "model.tiny_config": {"model_type": "bert"}})
    with pytest.raises(ConfigError, match="needs a CLIP image classifier"):
        build_model(bert, "text_classification", ["a", "b"])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_linear_probe_resume_mid_run_is_bit_identical(tmp_path, clip_dir, image_data, method):
    """LP-FT: epoch 0 trains the head alone, epoch 1 on the method; resumed mid-epoch 1 = uninterrupted."""

    def make(out: Path):
        return clip_cfg(
            out,
            clip_dir,
            image_data,
            method__name=method,
            method__head_init="linear_probe",
            training__num_epochs=2,
            checkpoint__save_every_steps=2,
            checkpoint__keep_last=0,
            data__augmentation={"color_jitter": 0.3},
            training__base_learning_rate=1e-3,
        )

    train(make(tmp_path / "full"))
    first = tmp_path / "full" / "checkpoint-epoch-1"
    # After the probe epoch only the head moved (weights of the tower are the pretrained ones).
    import transformers as tf
    from safetensors.torch import load_file

    clip = tf.CLIPModel.from_pretrained(str(clip_dir)).state_dict()
    probed = load_file(str(first / "model.safetensors"))
    assert all(torch.equal(probed[k], clip[k]) for k in probed if not k.startswith("classifier"))
    zero_shot = build_model(make(tmp_path / "zs"), "image_classification", ["ants", "bees"]).model
    assert not torch.equal(probed["classifier.weight"], zero_shot.classifier.weight)  # the probe trained the head
    state = json.loads((tmp_path / "full/checkpoint-step-4/training_state/trainer_state.json").read_text())
    assert state["epoch"] == 1 and 0 < state["batches_done"] < 3  # mid-way through the fine-tuning epoch
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-step-4", resumed / "checkpoint-step-4")
    train(make(resumed), resume="auto")
    assert_same_weights(tmp_path / "full" / "checkpoint-epoch-2", resumed / "checkpoint-epoch-2")
    final = load_file(str(tmp_path / "full" / "checkpoint-epoch-2" / "model.safetensors"))
    key = "vision_model.encoder.layers.1.self_attn.q_proj.weight"  # LoRA's export is merged
    assert not torch.equal(final[key], clip[key])  # and then the tower trained


PLAIN_LOAD = """
import sys, json, torch
sys.modules['fulltune'] = None  # prove fulltune is not needed
import transformers as tf
from safetensors.torch import load_file
from PIL import Image
for path in sys.argv[1:]:
    proc = tf.AutoImageProcessor.from_pretrained(path)
    tower = tf.CLIPVisionModelWithProjection.from_pretrained(path)  # vision tower + projection
    head = load_file(path + '/model.safetensors')  # classifier.weight (labels, projection_dim), classifier.bias
    pixels = proc(Image.new('RGB', (50, 40), (200, 60, 40)), return_tensors='pt')['pixel_values']
    with torch.no_grad():
        embeds = tower(pixel_values=pixels).image_embeds
        logits = torch.nn.functional.normalize(embeds, dim=-1) @ head['classifier.weight'].T + head['classifier.bias']
    print(json.dumps({'logits': logits.tolist(), 'labels': tower.config.id2label, 'pixels': pixels.tolist()}))
"""


def test_train_export_interpolate_and_plain_load(tmp_path, clip_dir, image_data):
    """full + zero-shot head trains; WiSE-FT alpha 0 / 1 give the two endpoints exactly; the exports load with
    plain transformers (CLIPVisionModelWithProjection + the classifier tensors) and name their labels."""
    from fulltune.cli import main
    from fulltune.clip.interpolate import read_weights
    from fulltune.compare.clip_rows import clip_notes, run_clip_rows
    from fulltune.compare.table import markdown

    cfg = clip_cfg(
        tmp_path / "full_zs_head",
        clip_dir,
        image_data,
        method__head_init="zeroshot",
        training__num_epochs=1,
        training__base_learning_rate=1e-3,
    )
    train(cfg)
    ft = tmp_path / "full_zs_head" / "best"
    # compare's CLIP rows, beside a full_zs_head row as compare's own run would give it
    overrides = [
        f"data.data_dir={image_data}",
        f"model.name_or_path={clip_dir}",
        "hardware.mixed_precision=no",
        "data.num_workers=0",
        "data.batch_size=4",
    ]
    ran = [{"method": "full_zs_head", "status": "ok", "export_dir": str(ft), "learning_rate": 1e-3}]
    rows = run_clip_rows(None, overrides, False, tmp_path, ["zero_shot", "wise_ft"], 1e-3, ran)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert rows[0]["trainable_parameters"] == 0 and rows[0]["test"] is not None
    assert rows[1]["finetuned_row"] == "full_zs_head" and [s["alpha"] for s in rows[1]["sweep"]] == [
        0,
        0.25,
        0.5,
        0.75,
        1,
    ]
    table = markdown(
        rows,
        {
            "model": "tiny",
            "data": "d",
            "budget": "1 epoch",
            "global_batch": 4,
            "length": "-",
            "seed": 0,
            "precision": "fp32",
            "device": "cpu",
        },
    ) + clip_notes(rows)
    assert "| zero_shot | — |" in table and "wise_ft: (1 - alpha) x zero_shot + alpha x full_zs_head" in table
    for alpha in (0, 1):
        assert (
            main(
                [
                    "interpolate",
                    "--zeroshot",
                    str(clip_dir),
                    "--finetuned",
                    str(ft),
                    "--alpha",
                    str(alpha),
                    "--output_dir",
                    str(tmp_path / f"a{alpha}"),
                ]
            )
            == 0
        )
    a0, a1 = read_weights(tmp_path / "a0"), read_weights(tmp_path / "a1")
    for name, ref in read_weights(tmp_path / "zero_shot" / "best").items():
        assert torch.equal(a0[name], ref), name  # the zero-shot export built at run time, and from the base model
    for name, ref in read_weights(ft).items():
        assert torch.equal(a1[name], ref), name
    assert (
        main(
            [
                "interpolate",
                "--zeroshot",
                str(tmp_path / "zero_shot" / "best"),
                "--finetuned",
                str(ft),
                "--alphas",
                "0,0.5,1",
                "--data_dir",
                str(image_data),
                "--split",
                "val",
                "--output_dir",
                str(tmp_path / "sw"),
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "sw" / "fulltune_run.json").read_text())
    assert [r["alpha"] for r in meta["wise_ft"]["sweep"]] == [0.0, 0.5, 1.0]
    assert meta["wise_ft"]["alpha"] in (0.0, 0.5, 1.0) and meta["wise_ft"]["sweep"][0]["examples"] == 4
    assert load_exported(tmp_path / "sw").extra["wise_ft"] == meta["wise_ft"]  # an ordinary export: fulltune loads it
    folders = [tmp_path / "zero_shot" / "best", tmp_path / "sw"]
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, *map(str, folders)], capture_output=True, text=True, check=True
    )
    results = [line for line in out.stdout.splitlines() if line.startswith("{")]
    for folder, line in zip(folders, results, strict=True):
        plain = json.loads(line)
        assert plain["labels"] == {"0": "ants", "1": "bees"}
        with torch.no_grad():
            ours = load_exported(folder).model(pixel_values=torch.tensor(plain["pixels"])).logits
        torch.testing.assert_close(torch.tensor(plain["logits"]), ours, atol=1e-5, rtol=0)


def test_interpolate_rejects_a_random_head_run(tmp_path, clip_dir, image_data, capsys):
    from fulltune.cli import main
    from fulltune.state import checkpoint as ckpt

    cfg = clip_cfg(tmp_path / "ft", clip_dir, image_data)  # head_init random: CLIPForImageClassification
    bundle = build_model(cfg, "image_classification", ["ants", "bees"])
    (tmp_path / "ft" / "best").mkdir(parents=True)
    ckpt.export_model(bundle.model, bundle, tmp_path / "ft" / "best", ckpt.run_meta("image_classification", None, cfg))
    code = main(
        [
            "interpolate",
            "--zeroshot",
            str(clip_dir),
            "--finetuned",
            str(tmp_path / "ft" / "best"),
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fulltune: error:") and "method.head_init zeroshot" in err
    assert len(err.splitlines()) == 1


def test_lp_ft_schedule_on_partial(tmp_path, clip_dir, image_data):
    """partial + linear_probe: the head alone first, then the top block, what sits above it (post-layernorm, the
    projection) and the head; the text tower is nowhere."""
    from fulltune.model.trainable import plan_trainable

    cfg = clip_cfg(
        tmp_path,
        clip_dir,
        image_data,
        method__name="partial",
        method__trainable_layers=1,
        method__head_init="linear_probe",
        training__num_epochs=3,
        method__head_init_epochs=2,
    )
    plan = plan_trainable(build_model(cfg, "image_classification", ["ants", "bees"]).model, cfg)
    head = {"classifier.weight", "classifier.bias"}
    assert plan.trainable_at(0) == plan.trainable_at(1) == head
    later = plan.trainable_at(2)
    assert head < later and "visual_projection.weight" in later and "vision_model.post_layernorm.weight" in later
    assert {n.split(".")[3] for n in later if ".layers." in n} == {"1"}  # the top block of two
