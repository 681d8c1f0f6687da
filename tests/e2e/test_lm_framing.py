"""Causal LM: one framing of a record for training, perplexity and `predict --prompt` (no [CLS]/[SEP], an end
token after each record, generation that stops there), one perplexity for the training run's validation,
`evaluate` and `prune`, `task: auto` on prompt/response JSONL, and bad LM inputs as one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, base_overrides
from test_causal_lm import make_bpe_tokenizer, write_corpus, write_jsonl

from fulltune import cli
from fulltune.config import ConfigError, load_config
from fulltune.data.lm import frame_prompt, tokenize_records
from fulltune.eval.predict import generate
from fulltune.model.build import build_model
from fulltune.model.bundle import set_end_token
from fulltune.training.tasks import infer_task
from fulltune.training.trainer import train

TINY_YAML = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_llama.yaml")
PROMPT = "Q: What is the capital of Peru?\nA:"
CAPITALS = {
    "peru": "lima", "chile": "santiago", "france": "paris", "spain": "madrid", "italy": "rome", "japan": "tokyo",
    "egypt": "cairo", "kenya": "nairobi", "canada": "ottawa", "cuba": "havana", "greece": "athens", "norway": "oslo",
    "poland": "warsaw", "austria": "vienna", "ireland": "dublin", "portugal": "lisbon", "china": "beijing",
    "russia": "moscow", "india": "delhi", "germany": "berlin", "sweden": "stockholm", "finland": "helsinki",
    "hungary": "budapest", "belgium": "brussels", "denmark": "copenhagen", "thailand": "bangkok",
    "vietnam": "hanoi", "iran": "tehran", "iraq": "baghdad", "syria": "damascus", "lebanon": "beirut",
    "qatar": "doha", "nepal": "kathmandu", "mexico": "mexico", "colombia": "bogota", "venezuela": "caracas",
    "ecuador": "quito", "bolivia": "sucre", "uruguay": "montevideo", "argentina": "buenos aires",
}  # fmt: skip


def qa_pairs(path: Path) -> Path:
    """40 prompt/response records: "Q: What is the capital of X?\\nA:" -> " the capital of x is y."."""
    rows = [
        {
            "prompt": f"Q: What is the capital of {country.title()}?\nA:",
            "response": f" the capital of {country} is {city}.",
        }
        for country, city in CAPITALS.items()
    ]
    return write_jsonl(path, rows)


def minilm_llama(out: Path, **extra: object):
    """The tiny Llama of configs/tiny_llama.yaml (the MiniLM tokenizer: no EOS, [SEP] ends records)."""
    overrides = base_overrides(out, {}, **extra)
    del overrides["model.tiny_config"]  # the file's
    return load_config(TINY_YAML, overrides)


def test_one_framing_for_training_and_predict(tmp_path, monkeypatch):
    bundle = build_model(minilm_llama(tmp_path / "run", task="causal_lm"), "causal_lm")
    tok, sep = bundle.tokenizer, bundle.tokenizer.sep_token_id
    assert tok.eos_token_id == sep and bundle.model.generation_config.eos_token_id == sep
    assert bundle.model.generation_config.pad_token_id == tok.pad_token_id
    framed = frame_prompt(tok, PROMPT).tolist()
    assert framed == tok(PROMPT, add_special_tokens=False)["input_ids"]  # no [CLS] ... [SEP]
    ids, labels = tokenize_records([(PROMPT, " the capital of peru is lima.")], tok)
    assert ids[: len(framed)].tolist() == framed and (labels[: len(framed)] == -100).all()
    assert ids[-1].item() == labels[-1].item() == sep  # the model learns to stop
    seen: dict = {}

    def fake_generate(input_ids, **kwargs):
        seen.update(kwargs, input_ids=input_ids)
        return torch.cat([input_ids, torch.tensor([[sep]])], dim=1)

    monkeypatch.setattr(bundle.model, "generate", fake_generate)
    assert generate(bundle, PROMPT, 5) == ""
    assert seen["input_ids"][0].tolist() == framed and "eos_token_id" not in seen  # the generation config's
    # a declared end token must be in the vocabulary; a tokenizer with none and no declaration is refused
    with pytest.raises(ConfigError, match="data.eos_token"):
        set_end_token(bundle.model, tok, minilm_llama(tmp_path / "r2", data__eos_token="<|nope|>").data)
    tok.eos_token = tok.sep_token = None
    with pytest.raises(ConfigError, match="data.eos_token"):
        set_end_token(bundle.model, tok, minilm_llama(tmp_path / "r3").data)


def test_predict_answers_as_plain_generate_and_stops(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = qa_pairs(tmp_path / "qa.jsonl")
    cfg = minilm_llama(
        tmp_path / "run", data__train_file=str(data), data__max_samples=None, training__num_epochs=6,
        training__base_learning_rate=1e-2, checkpoint__save_every_epochs=6,
    )  # fmt: skip
    assert infer_task(cfg) == "causal_lm"  # prompt/response JSONL under task: auto
    train(cfg)
    best = tmp_path / "run" / "checkpoint-epoch-6"
    sep = json.loads((best / "generation_config.json").read_text())["eos_token_id"]
    model, tok = AutoModelForCausalLM.from_pretrained(best), AutoTokenizer.from_pretrained(best)
    assert sep == tok.sep_token_id == tok.eos_token_id
    enc = tok(PROMPT, add_special_tokens=False, return_tensors="pt")
    out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=30)[0]
    plain = tok.decode(out[enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out[-1].item() == sep and len(out) - enc["input_ids"].shape[1] < 30  # stopped at the end token
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(best), "--prompt", PROMPT, "--max_new_tokens", "30"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generated"] == plain


def test_training_evaluate_and_prune_give_one_perplexity(tmp_path):
    train_file, val = write_corpus(tmp_path / "train.txt", 120, 0), write_corpus(tmp_path / "val.txt", 23, 1)
    tokenizer = make_bpe_tokenizer(train_file.read_text(), tmp_path / "tokenizer")
    cfg = load_config(None, base_overrides(
        tmp_path / "run", TINY_LLAMA | {"vocab_size": 300}, task="causal_lm", model__tokenizer=str(tokenizer),
        data__train_file=str(train_file), data__val_file=str(val), data__seq_len=32, data__batch_size=4,
        data__max_samples=12, training__num_epochs=1, checkpoint__save_every_epochs=0,
    ))  # fmt: skip
    train(cfg)
    best = tmp_path / "run" / "best"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validation = next(r for r in reversed(rows) if r.get("perplexity") is not None)
    evaluated = cli.main(
        ["evaluate", "--checkpoint", str(best), "--file", str(val), "--output_dir", str(tmp_path / "e")]
    )
    assert evaluated == 0
    evaluation = json.loads((tmp_path / "e" / "metrics.json").read_text())
    pruned = tmp_path / "prune"
    argv = ["prune", "--base_model", str(best), "--output_dir", str(pruned), "--data_file", str(train_file)]
    argv += ["--eval_file", str(val), "--test_after_prune", "--pruning_ratio", "0.0", "--importance", "magnitude"]
    assert cli.main([*argv, "data.seq_len=32", "hardware.mixed_precision=no"]) == 0
    original = json.loads((pruned / "prune_results.json").read_text())["results"][0]
    assert validation["tokens"] == evaluation["tokens"] == original["tokens"] > 0
    assert evaluation["perplexity"] == pytest.approx(validation["perplexity"], rel=1e-4)
    assert original["perplexity"] == pytest.approx(validation["perplexity"], rel=1e-4)


def test_auto_task_reads_prompt_response_jsonl(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "response": "b"}])
    labelled = write_jsonl(tmp_path / "labelled.jsonl", [{"text": "a", "label": "pos"}])
    assert infer_task(load_config(None, {"data.train_file": str(pairs)})) == "causal_lm"
    assert infer_task(load_config(None, {"data.train_file": str(labelled)})) == "text_classification"


def error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("fulltune: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_lm_inputs_end_as_one_line(tmp_path, capsys):
    text = write_corpus(tmp_path / "train.txt", 60, 0)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(text.read_text().replace("good", "caf\u00e9").encode("latin-1"))
    run = ["train", "--config", TINY_YAML, "data.seq_len=32", "logging.progress_bar=false", "training.max_steps=1"]
    run += ["logging.tensorboard=false"]
    assert "latin.txt" in error_line(capsys, [*run, f"data.train_file={latin}", f"output_dir={tmp_path / 'bad'}"])
    argv = [*run, f"data.train_file={latin}", f"data.val_file={latin}", "data.encoding=latin-1"]
    assert cli.main([*argv, f"output_dir={tmp_path / 'run'}"]) == 0
    best = str(tmp_path / "run" / "best")
    assert cli.main(["evaluate", "--checkpoint", best, "--file", str(latin)]) == 0  # the run's data.encoding
    evaluate = ["evaluate", "--checkpoint", best, "--file", str(latin)]
    for flags, named in ((["--block_size", "1"], "--block_size"), (["--stride", "0"], "--stride")):
        assert named in error_line(capsys, [*evaluate, *flags])
    assert "--stride" in error_line(capsys, [*evaluate, "--stride", "9999"])
    for content, name in (("", "empty.txt"), ("a", "one.txt")):
        (tmp_path / name).write_text(content)
        assert name in error_line(capsys, ["evaluate", "--checkpoint", best, "--file", str(tmp_path / name)])
    for n in ("0", "-1"):
        line = error_line(capsys, ["predict", "--checkpoint", best, "--prompt", "a", "--max_new_tokens", n])
        assert "--max_new_tokens" in line
    # prune's calibration blocks and perplexity read the text as training does
    prune = ["prune", "--base_model", best, "--data_file", str(latin), "--eval_file", str(latin)]
    prune += ["--importance_samples", "2", "--importance_seq_len", "16"]
    calibration = error_line(capsys, [*prune, "--output_dir", str(tmp_path / "p1"), "data.seq_len=32"])
    assert "latin.txt" in calibration  # taylor importance reads calibration blocks (no perplexity asked)
    argv = [*prune, "--test_after_prune", "--output_dir", str(tmp_path / "p2"), "data.seq_len=32"]
    assert cli.main([*argv, "data.encoding=latin-1"]) == 0
