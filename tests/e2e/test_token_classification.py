"""Token classification: CoNLL and JSONL read alike, each word's tag on its first sub-token, entity-level metrics
as seqeval computes them, and a tiny BERT that trains, resumes mid-epoch bit-identically, evaluates, predicts and
exports to a folder plain transformers loads with the same outputs."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, base_overrides
from safetensors.torch import load_file
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

from fulltune.config import DataConfig, load_config
from fulltune.data import tokens as tok
from fulltune.errors import DataError
from fulltune.eval.evaluate import evaluate_checkpoint
from fulltune.eval.metrics import token_metrics
from fulltune.eval.tagging import sentence_inputs, tag_sentences, tagged_row
from fulltune.model.bundle import resolve_model_path
from fulltune.model.exported import load_exported
from fulltune.runtime.device import resolve_precision
from fulltune.state.export import export
from fulltune.training.trainer import train

PEOPLE = ["John", "Mary Ann", "Li Wei", "Ahmed"]
PLACES = ["Paris", "New York", "Lagos", "Rio de Janeiro"]


def tagged(rng: random.Random) -> list[tuple[str, str]]:
    """One sentence: (word, tag) pairs, a person who lives in a place."""
    out = []
    for name, kind in ((rng.choice(PEOPLE), "PER"), ("lives in", None), (rng.choice(PLACES), "LOC")):
        for i, word in enumerate(name.split()):
            out.append((word, "O" if kind is None else f"{'B' if i == 0 else 'I'}-{kind}"))
    return out


def write_conll(path: Path, n: int, seed: int) -> list[list[tuple[str, str]]]:
    """CoNLL-2003 layout: four columns (word, POS, chunk, NER tag), a -DOCSTART- line, blank lines between."""
    rng = random.Random(seed)
    sentences = [tagged(rng) for _ in range(n)]
    lines = ["-DOCSTART- -X- -X- O", ""]
    for sent in sentences:
        lines += [f"{w} NNP B-NP {t}" for w, t in sent] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return sentences


def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))


def test_conll_and_jsonl_read_alike(tmp_path: Path) -> None:
    sentences = write_conll(tmp_path / "train.conll", 5, 0)
    rows = [{"words": [w for w, _ in s], "ner": [t for _, t in s]} for s in sentences]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    conll = tok.read_sentences(tmp_path / "train.conll", DataConfig())
    jsonl = tok.read_sentences(tmp_path / "train.jsonl", DataConfig(tokens_column="words", tags_column="ner"))
    assert conll.words == jsonl.words == [[w for w, _ in s] for s in sentences]
    assert conll.tags == jsonl.tags == [[t for _, t in s] for s in sentences]
    assert conll.lines[0] == 3  # after the -DOCSTART- line and its blank line
    # Another column by index: the chunk column as tags.
    chunks = tok.read_sentences(tmp_path / "train.conll", DataConfig(tag_column_index=2))
    assert {t for s in chunks.tags for t in s} == {"B-NP"}
    assert tok.tag_vocabulary(conll.tags)[0] == "O"
    assert tok.is_token_data(DataConfig(data_dir=str(tmp_path)))  # task: auto picks token_classification
    assert not tok.is_token_data(DataConfig(train_file=str(tmp_path / "train.jsonl")))  # no 'tokens' field


def test_predict_inputs_and_plan_counts(tmp_path: Path) -> None:
    """predict reads --text and a .txt by whitespace, a CoNLL file of words alone and JSONL without tags; plan counts
    the training sentences and tags."""
    from fulltune.planning.facts import count_examples

    (tmp_path / "a.txt").write_text("John lives in Paris\n\nMary  sings\n", encoding="utf-8")
    (tmp_path / "a.conll").write_text("John\nlives\n\nMary\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"tokens": ["John", "lives"]}\n', encoding="utf-8")
    assert sentence_inputs(["John lives in  Paris"], None, DataConfig()) == [["John", "lives", "in", "Paris"]]
    assert sentence_inputs(None, str(tmp_path / "a.txt"), DataConfig()) == [
        ["John", "lives", "in", "Paris"],
        ["Mary", "sings"],
    ]
    assert sentence_inputs(None, str(tmp_path / "a.conll"), DataConfig()) == [["John", "lives"], ["Mary"]]
    assert sentence_inputs(None, str(tmp_path / "a.jsonl"), DataConfig()) == [["John", "lives"]]
    data = tmp_path / "data"
    data.mkdir()
    write_conll(data / "train.conll", 10, 0)
    n, tags, source = count_examples(_cfg(tmp_path / "run", data), "token_classification")
    assert (n, tags[0]) == (9, "O") and "train.conll" in source  # 10% held out for validation


@pytest.mark.parametrize(
    "text,error",
    [
        ("John B-PER\nlives\n", "line 2: one column"),
        ('{"tokens": ["a", "b"], "tags": ["O"]}\n', "line 1: 2 tokens but 1 tags"),
        ('{"tokens": "a b", "tags": ["O"]}\n', "field 'tokens' (data.tokens_column) is a str"),
    ],
)
def test_bad_files_say_file_and_line(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / ("train.jsonl" if text.startswith("{") else "train.conll")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(error)):
        tok.read_sentences(path, DataConfig())


def test_tags_on_first_subtoken_and_cut_said() -> None:
    tokenizer = tiny_tokenizer()
    words = [["Johannesburgers", "visit", "Paris"], ["a"] * 20]
    enc = tok.encode_words(tokenizer, words, [[1, 0, 2], [0] * 20], max_length=8)
    ids, labels = enc.input_ids[0], enc.labels[0]
    word_ids = tokenizer(words[0], is_split_into_words=True).word_ids()
    assert len(tokenizer.tokenize("Johannesburgers")) > 1  # the first word has several sub-tokens
    expected = [
        -100 if w is None or w == p else [1, 0, 2][w] for w, p in zip(word_ids, [None, *word_ids][:-1], strict=True)
    ]
    assert labels == expected and ids[0] == tokenizer.cls_token_id
    assert enc.cut == 1  # the 20-word sentence lost words to max_length 8
    dataset = tok.TokenDataset(enc, words)
    assert "1 of 2 sentences" in tok.cut_note("train", dataset, 8)
    batch = tok.TokenCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["labels"].shape == batch["input_ids"].shape and int(batch["labels"][0, -1]) == -100


class FixedLogits(torch.nn.Module):
    """A 'model' that returns the given logits (batch, seq, tags) whatever the input: fixed predictions."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        return type("Out", (), {"logits": self.logits[: input_ids.shape[0]]})()


def test_entity_metrics_are_seqeval_on_the_words() -> None:
    """Predictions fixed at the first sub-tokens give the metrics seqeval gives on the word sequences; the other
    sub-tokens' (deliberately wrong) predictions count for nothing."""
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    gold_words = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "O", "O", "B-PER"]]
    pred_words = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "I-LOC", "O", "B-PER", "I-PER"]]
    seq = 9  # [CLS], words, a second sub-token after each first word, [SEP], padding
    ids, gold, logits = torch.ones(2, seq, dtype=torch.long), torch.full((2, seq), -100), torch.zeros(2, seq, 5)
    for row, (g, p) in enumerate(zip(gold_words, pred_words, strict=True)):
        positions = [1] + list(range(3, 3 + len(g) - 1))  # position 2: the first word's second sub-token
        for pos, gt, pt in zip(positions, g, p, strict=True):
            gold[row, pos] = labels.index(gt)
            logits[row, pos, labels.index(pt)] = 5.0
        logits[row, 2, labels.index("B-LOC")] = 9.0  # not a first sub-token: ignored
    loader = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": gold}]
    m = token_metrics(
        FixedLogits(logits), loader, labels, torch.device("cpu"), resolve_precision("no", torch.device("cpu"))
    )
    assert m["targets"] == gold_words and m["predictions"] == pred_words
    assert m["f1"] == pytest.approx(f1_score(gold_words, pred_words))
    assert m["precision"] == pytest.approx(precision_score(gold_words, pred_words))
    assert m["recall"] == pytest.approx(recall_score(gold_words, pred_words))
    report = classification_report(gold_words, pred_words, output_dict=True)
    for kind in ("PER", "LOC"):
        assert m["per_entity"][kind]["f1"] == pytest.approx(report[kind]["f1-score"])
        assert m["per_entity"][kind]["support"] == report[kind]["support"]
    assert m["accuracy"] == pytest.approx(6 / 9) == accuracy_score(gold_words, pred_words) and m["tokens"] == 9


def _cfg(out: Path, data: Path, **extra: object):
    base = base_overrides(out, TINY_BERT, data__data_dir=str(data), data__batch_size=4, **extra)
    return load_config(None, base | {"checkpoint.keep_last": 0, "checkpoint.save_every_steps": 3})


def test_trains_resumes_evaluates_and_exports(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_conll(data / "train.conll", 16, 0)
    write_conll(data / "val.conll", 4, 1)
    test_sentences = write_conll(data / "test.conll", 4, 2)
    summary = train(_cfg(tmp_path / "full", data, training__num_epochs=2))  # 4 batches of 4 per epoch
    assert summary["task"] == "token_classification" and "f1" in summary["best_val"]  # task: auto, metric auto = f1
    # Resume from step 3, mid-epoch 1: the same weights as the run that did not stop.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-step-3", resumed / "checkpoint-step-3")
    train(_cfg(resumed, data, training__num_epochs=2), resume="auto")
    a, b = (load_file(str(d / "checkpoint-epoch-2" / "model.safetensors")) for d in (tmp_path / "full", resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # evaluate on the test file: metrics.json is seqeval's reading of predictions.jsonl
    m = evaluate_checkpoint(tmp_path / "full" / "best", data_dir=str(data), split="test", device="cpu")
    rows = [json.loads(line) for line in (Path(m["output_dir"]) / "predictions.jsonl").read_text().splitlines()]
    assert [r["words"] for r in rows] == [[w for w, _ in s] for s in test_sentences]
    gold, pred = [r["tags"] for r in rows], [r["predicted"] for r in rows]
    assert m["f1"] == pytest.approx(f1_score(gold, pred, zero_division=0))
    # The export in plain transformers: the logits fulltune computes, to 1e-5.
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    folder = export(tmp_path / "full" / "best", tmp_path / "export")
    plain, tokenizer = AutoModelForTokenClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    bundle = load_exported(tmp_path / "full" / "best", "cpu")
    words = sentence_inputs(["Mary Ann lives in Rio de Janeiro"], None, DataConfig())
    enc = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**enc).logits, bundle.model(**enc).logits, atol=1e-5, rtol=0)
        first = [
            i
            for i, (w, p) in enumerate(zip(enc.word_ids(0), [None, *enc.word_ids(0)][:-1], strict=True))
            if w is not None and w != p
        ]
        expected = [plain.config.id2label[int(i)] for i in plain(**enc).logits[0, first].argmax(-1)]
    assert tag_sentences(bundle, words)[0] == expected  # predict's tags
    assert tagged_row(words[0], expected)["words"] == words[0]
    assert plain.config.id2label[0] == "O" and "token-classification" in (folder / "README.md").read_text()


def test_datasets_source_with_classlabel_tags_trains(tmp_path: Path) -> None:
    """A save_to_disk folder with tokens / ner_tags (a sequence of ClassLabel) gives the words and tag names as
    written, the tags in the ClassLabel's order, and trains."""
    datasets = pytest.importorskip("datasets")
    from fulltune.training.tasks import read_labels

    names = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    sentences = [tagged(random.Random(i)) for i in range(6)]
    words, tags = [[w for w, _ in s] for s in sentences], [[t for _, t in s] for s in sentences]
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names)),
        }
    )
    ids = [[names.index(t) for t in s] for s in tags]
    table = datasets.Dataset.from_dict({"tokens": words, "ner_tags": ids}, features=features)
    datasets.DatasetDict({"train": table, "validation": table.select(range(2))}).save_to_disk(str(tmp_path / "hub"))
    hub_cfg = _cfg(tmp_path / "a", tmp_path, task="token_classification", data__dataset_name=str(tmp_path / "hub"))
    hub_cfg.data.data_dir, hub_cfg.data.tags_column = None, "ner_tags"
    labels, (splits, first) = read_labels(hub_cfg, "token_classification")
    assert labels == names  # the ClassLabel order, so ids match the dataset's
    assert first.words == words and first.tags == tags and splits["val"].words == words[:2]
    summary = train(hub_cfg)
    assert summary["task"] == "token_classification" and "f1" in summary["best_val"]
