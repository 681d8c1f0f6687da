"""Causal LM task: record framing, packing and the response-only loss mask (exact positions), the token cache,
training of tiny Llama / Qwen2 / GPT-2 through the trainer, bit-identical resume, and evaluate/predict on the
exported checkpoint."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import NEGATIVE, POSITIVE, TINY_GPT2, TINY_LLAMA, TINY_QWEN2, base_overrides, config_kwargs
from test_train import assert_same_weights
from transformers import LlamaConfig, LlamaForCausalLM

from fulltune import cli
from fulltune.config import DataConfig, load_config
from fulltune.data import lm
from fulltune.data.text import DataError
from fulltune.eval.evaluate import evaluate_checkpoint
from fulltune.eval.losses import count_tokens, lm_loss
from fulltune.eval.perplexity import perplexity
from fulltune.model.exported import load_exported
from fulltune.training.trainer import setup, train

BOS, EOS = 1, 2


class CharTokenizer:
    """One id per character (ord + 10), BOS 1, EOS 2: every position of the packed stream can be written by hand."""

    name_or_path = "chars"
    bos_token_id = BOS
    eos_token_id = EOS

    def __init__(self) -> None:
        self.calls = 0

    def __len__(self) -> int:
        return 300

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = True) -> dict[str, list[int]]:
        self.calls += 1
        return {"input_ids": [ord(c) + 10 for c in text]}


def ids(text: str) -> list[int]:
    return [ord(c) + 10 for c in text]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_text_records_are_framed_and_packed(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "ab"}, {"text": "cde"}])
    data = lm.load_blocks(f, DataConfig(seq_len=4), CharTokenizer(), None)
    # stream: <s> a b </s> <s> c d e </s>  (9 tokens: the last one is the dropped ragged tail)
    assert data.input_ids.tolist() == [[BOS, *ids("ab"), EOS], [BOS, *ids("cde")]]
    assert data.labels.tolist() == [[-100, *ids("ab"), EOS], [-100, *ids("cde")]]


def test_response_only_loss_mask_positions(tmp_path):
    f = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "ab", "response": "cd"}, {"prompt": "x", "response": "yz"}])
    data = lm.load_blocks(f, DataConfig(seq_len=11), CharTokenizer(), None)
    assert data.input_ids.tolist() == [[BOS, *ids("abcd"), EOS, BOS, *ids("xyz"), EOS]]
    assert data.labels.tolist() == [[-100, -100, -100, *ids("cd"), EOS, -100, -100, *ids("yz"), EOS]]
    # The loss is the cross-entropy of exactly those targets, each predicted from the position before it.
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config_kwargs(TINY_LLAMA, vocab_size=300))).eval()
    batch = lm.collate_blocks([data[0]])
    loss, logits = lm_loss(model, batch, 0.0)
    targets = [j for j, y in enumerate(batch["labels"][0].tolist()) if y != -100]
    assert targets == [3, 4, 5, 8, 9, 10] and count_tokens(batch) == 6
    pred = logits[0, [j - 1 for j in targets]].float()
    expected = F.cross_entropy(pred, batch["input_ids"][0, targets], reduction="sum")
    torch.testing.assert_close(loss, expected)


def test_bos_equal_to_eos_is_not_doubled():
    tok = CharTokenizer()
    tok.bos_token_id = EOS  # GPT-2: one token for both
    x, y = lm.tokenize_records([("ab", None), ("c", None)], tok)
    assert x.tolist() == [*ids("ab"), EOS, *ids("c"), EOS] and y.tolist() == x.tolist()


def test_max_samples_draws_seeded_blocks_from_the_whole_file(tmp_path):
    rows = [{"text": f"{i:03d}abcd"} for i in range(50)]  # 9 tokens per record: records are shorter than blocks
    f = write_jsonl(tmp_path / "many.jsonl", rows)
    full = lm.load_blocks(f, DataConfig(seq_len=16), CharTokenizer(), None)
    capped = lm.load_blocks(f, DataConfig(seq_len=16), CharTokenizer(), None, max_blocks=5, seed=3)
    assert len(full) == 28 and len(capped) == 5  # a cap on blocks, not on records
    rows_of = [next(i for i in range(len(full)) if torch.equal(full.input_ids[i], b)) for b in capped.input_ids]
    assert rows_of == sorted(rows_of) and len(set(rows_of)) == 5 and rows_of != [0, 1, 2, 3, 4]
    assert all(torch.equal(full.labels[i], capped.labels[k]) for k, i in enumerate(rows_of))
    again = lm.load_blocks(f, DataConfig(seq_len=16), CharTokenizer(), None, max_blocks=5, seed=3)
    other = lm.load_blocks(f, DataConfig(seq_len=16), CharTokenizer(), None, max_blocks=5, seed=4)
    assert torch.equal(again.input_ids, capped.input_ids) and not torch.equal(other.input_ids, capped.input_ids)


def test_token_cache_is_reused_and_keyed(tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("hello world\n" * 20, encoding="utf-8")
    tok = CharTokenizer()
    first = lm.load_blocks(f, DataConfig(seq_len=8), tok, tmp_path / "cache")
    calls = tok.calls
    again = lm.load_blocks(f, DataConfig(seq_len=8), tok, tmp_path / "cache")
    assert tok.calls == calls and torch.equal(first.input_ids, again.input_ids)
    lm.load_blocks(f, DataConfig(seq_len=16), tok, tmp_path / "cache")  # another seq_len: tokenised again
    assert tok.calls > calls and len(list((tmp_path / "cache").glob("lm-*.safetensors"))) == 2


@pytest.mark.parametrize(
    "line,message",
    [
        ('"just a string"', "JSON object"),
        ('{"title": "x"}', "'text' field"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_jsonl_lines_name_the_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"line 2: .*{message}"):
        lm.load_blocks(f, DataConfig(seq_len=4), CharTokenizer(), None)


# ---------------------------------------------------------------- training through the trainer


def write_corpus(path: Path, n_lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = [f"{rng.choice(POSITIVE + NEGATIVE)} and {rng.choice(POSITIVE)}." for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_bpe_tokenizer(text: str, out_dir: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer with <s> and </s>, trained on `text` and saved as a tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out_dir)
    return out_dir


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    return write_corpus(tmp_path / "train.txt", 120, 0), write_corpus(tmp_path / "valid.txt", 20, 1)


def lm_cfg(out: Path, tiny: dict, train_file: Path, **extra: object):
    return load_config(
        None,
        base_overrides(
            out,
            tiny,
            task="causal_lm",
            data__train_file=str(train_file),
            data__seq_len=32,
            data__batch_size=4,
            training__base_learning_rate=3e-3,
            training__warmup_ratio=0.0,
            logging__log_every_steps=1,
            **extra,
        ),
    )


@pytest.mark.parametrize("tiny", [TINY_LLAMA, TINY_QWEN2, TINY_GPT2], ids=["llama", "qwen2", "gpt2"])
def test_tiny_decoders_learn(tmp_path, corpus, tiny):
    cfg = lm_cfg(
        tmp_path / "run",
        tiny,
        corpus[0],
        training__max_steps=12,
        data__max_samples=24,
        checkpoint__save_every_epochs=0,
        checkpoint__save_best=False,
    )
    summary = train(cfg)
    assert summary["optimizer_steps"] == 12
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for v in losses if v is not None]
    assert len(losses) == 12
    # from ln(30522) = 10.3 at random init: a steady fall, not noise
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_max_samples_caps_the_training_set(tmp_path, corpus):
    run = setup(lm_cfg(tmp_path / "run", TINY_LLAMA, corpus[0], data__max_samples=5))
    assert len(run.data.train) == 5 and run.data.train.input_ids.shape == (5, 32)


def test_resume_mid_epoch_is_bit_identical(tmp_path, corpus):
    def make(out: Path):
        return lm_cfg(
            out,
            TINY_LLAMA,
            corpus[0],
            model__dropout=0.1,
            data__max_samples=16,
            training__num_epochs=2,
            checkpoint__save_every_steps=3,
            checkpoint__keep_last=0,
            checkpoint__save_best=False,
        )

    train(make(tmp_path / "full"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-step-3", resumed / "checkpoint-step-3")
    state = json.loads((resumed / "checkpoint-step-3/training_state/trainer_state.json").read_text())
    assert state["epoch"] == 0 and 0 < state["batches_done"] < 4  # 16 blocks / 4 per batch: step 3 is mid-epoch
    train(make(resumed), resume="auto")
    assert_same_weights(tmp_path / "full" / "checkpoint-epoch-2", resumed / "checkpoint-epoch-2")


def test_evaluate_and_predict_on_the_exported_checkpoint(tmp_path, corpus, capsys):
    # A byte-level BPE tokenizer, as real decoders have (the MiniLM one adds [CLS]/[SEP] and token_type_ids).
    tokenizer = make_bpe_tokenizer(corpus[0].read_text(), tmp_path / "tokenizer")
    cfg = lm_cfg(
        tmp_path / "run",
        TINY_LLAMA | {"vocab_size": 300},
        corpus[0],
        data__val_file=str(corpus[1]),
        training__num_epochs=2,
        model__tokenizer=str(tokenizer),
    )
    train(cfg)
    best = tmp_path / "run" / "best"
    metrics = evaluate_checkpoint(best, file=str(corpus[1]), output_dir=tmp_path / "eval")
    bundle = load_exported(best)
    ids, labels = lm.file_tokens(corpus[1], DataConfig(), bundle.tokenizer)
    direct = perplexity(bundle.model, ids, block_size=32, labels=labels)
    assert metrics["tokens"] == direct["tokens"] > 0
    assert metrics["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    # the same through the command line, and generation from a prompt
    capsys.readouterr()
    assert (
        cli.main(
            ["evaluate", "--checkpoint", str(best), "--file", str(corpus[1]), "--output_dir", str(tmp_path / "eval2")]
        )
        == 0
    )
    assert f"{direct['perplexity']:.4f}" in capsys.readouterr().out
    assert cli.main(["predict", "--checkpoint", str(best), "--prompt", "a good", "--max_new_tokens", "5"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "a good" and isinstance(line["generated"], str)
