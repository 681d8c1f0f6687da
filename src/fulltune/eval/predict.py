"""`fulltune predict`: top-k labels with probabilities for images or texts (or sentence pairs), every label above its
threshold for a multi-label classifier, a number for a regression, or generated text for causal LMs, from an exported
checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from fulltune.config import DataConfig
from fulltune.data import images as img
from fulltune.data.chat import is_chat_jsonl, prompt_ids, read_conversations
from fulltune.data.lm import frame_prompt
from fulltune.data.multilabel import read_thresholds
from fulltune.data.text import TABLE_EXTENSIONS, PadCollator, TokenizedDataset, encode, read_table, read_text_file
from fulltune.errors import ConfigError, DataError
from fulltune.model.bundle import ModelBundle


def _image_inputs(bundle: ModelBundle, paths: list[Path], skip: bool) -> tuple[torch.Tensor | None, list[bool]]:
    """Pixel values of the images that decode, and which did. With skip=False an image that fails is an error."""
    pixels, ok = [], []
    for p in paths:
        try:
            pixels.append(img.eval_transform(img.load_rgb(p, bundle.image_spec.size, draft=False), bundle.image_spec))
            ok.append(True)
        except DataError as err:
            if not skip:
                raise
            print(f"skipped unreadable image: {err}", file=sys.stderr)
            ok.append(False)
    return (torch.stack(pixels) if pixels else None), ok


def image_paths(target: str) -> list[Path]:
    p = Path(target)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in img.IMAGE_EXTENSIONS)
        good = [f for f in files if img._readable(f)]
        for f in files:
            if f not in set(good):
                print(f"skipped unreadable image: {f}", file=sys.stderr)
        if not good:
            raise DataError(f"folder '{p}' has no readable images" if files else f"folder '{p}' has no images")
        return good
    if not p.is_file():
        raise DataError(f"image '{p}' does not exist")
    if not img._readable(p):
        raise DataError(f"image '{p}' cannot be decoded (damaged, truncated, or over PIL's pixel limit)")
    return [p]


def text_inputs(
    texts: list[str] | None,
    file: str | None,
    data: dict[str, Any],
    causal_lm: bool = False,
    text_pairs: list[str] | None = None,
) -> list[Any]:
    """The texts (or prompts) to predict: every --text given (with its --text_pair for a model of sentence pairs),
    else --file read as `evaluate --file` reads it: a CSV/TSV/JSONL table by the run's column (data.text_column and,
    for sentence pairs, data.text_pair_column; a causal LM's data.prompt_column, or its text column for plain-text
    records), with the run's data.encoding; a .txt file (or one without a table extension) holds one text per line.
    A sentence pair is a (first, second) tuple. `data` is the run's data section (the export's fulltune_run.json)."""
    pair_column = None if causal_lm else data.get("text_pair_column")
    if texts:
        return _given(list(texts), text_pairs, pair_column)
    if file is None:
        raise DataError("give --text, --file, --image or --prompt")
    p = Path(file)
    if not p.is_file():
        raise DataError(f"file '{p}' does not exist")
    encoding = data.get("encoding") or "utf-8"
    if TABLE_EXTENSIONS.get(p.suffix.lower(), "txt") != "txt":
        rows, columns = read_table(p, "auto", encoding)
        wanted = [data.get("prompt_column", "prompt"), data.get("text_column", "text")] if causal_lm else []
        wanted = wanted or [data.get("text_column", "text")]
        column = next((c for c in wanted if c in columns), None)
        if column is None or (pair_column and pair_column not in columns):
            keys = " or ".join(f"'{c}'" for c in wanted) + (f" and '{pair_column}'" if pair_column else "")
            raise DataError(f"'{p}': no column {keys} (the run's columns); the file has columns: {', '.join(columns)}")
        out = []
        for r, row in enumerate(rows, start=1):
            cells = [row.get(c) for c in (column, pair_column) if c]
            if any(not isinstance(v, str) or not v.strip() for v in cells):
                raise DataError(
                    f"'{p}' row {r} (line {row['_line']}): no text in column '{column}'"
                    + (f" or '{pair_column}'" if pair_column else "")
                )
            out.append(tuple(cells) if pair_column else cells[0])
        return out
    if pair_column:
        raise DataError(
            f"'{p}': this model reads sentence pairs: give a table with columns '{data.get('text_column')}'"
            f" and '{pair_column}', or --text A --text_pair B"
        )
    lines = [line.strip() for line in read_text_file(p, encoding).splitlines() if line.strip()]
    if not lines:
        raise DataError(f"file '{p}' is empty")
    return lines


def _given(texts: list[str], pairs: list[str] | None, pair_column: str | None) -> list[Any]:
    """--text values, each with its --text_pair when the model reads sentence pairs."""
    if pair_column and len(pairs or []) != len(texts):
        raise DataError(
            f"this model reads sentence pairs: give one --text_pair per --text ({len(texts)} --text, "
            f"{len(pairs or [])} --text_pair)"
        )
    if pairs and not pair_column:
        raise DataError("--text_pair: this model reads single texts (its run had no data.text_pair_column)")
    return list(zip(texts, pairs, strict=True)) if pairs else texts


def encode_texts(bundle: ModelBundle, items: list[Any]) -> dict[str, torch.Tensor]:
    """A padded batch of texts or (first, second) sentence pairs, encoded as training encoded them
    (`text.encode`, cut at the run's data.max_length)."""
    pairs = [x[1] for x in items] if isinstance(items[0], tuple) else None
    texts = [x[0] for x in items] if pairs is not None else list(items)
    ids, types = encode(bundle.tokenizer, texts, pairs, max_length(bundle))
    dataset = TokenizedDataset(ids, None, None, types)
    return PadCollator(bundle.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


@torch.no_grad()
def regress(bundle: ModelBundle, inputs: list[Any], batch_size: int = 32) -> list[float]:
    """A regression's predicted number for each text (or sentence pair)."""
    model, device = bundle.model, next(bundle.model.parameters()).device
    out: list[float] = []
    for start in range(0, len(inputs), batch_size):
        batch = {k: v.to(device) for k, v in encode_texts(bundle, inputs[start : start + batch_size]).items()}
        out.extend(model(**batch).logits.float().squeeze(-1).tolist())
    return out


def max_length(bundle: ModelBundle) -> int:
    """The run's data.max_length (from the export's fulltune_run.json): inputs are cut where training cut them."""
    return int(((bundle.extra.get("fulltune_config") or {}).get("data") or {}).get("max_length") or 512)


@torch.no_grad()
def classify(
    bundle: ModelBundle, inputs: list[Any], top_k: int, batch_size: int = 32, skip_unreadable: bool = False
) -> list[list[tuple[str, float]] | None]:
    """Top-k (label, probability) for each input (image paths or texts). With skip_unreadable, an image that fails to
    decode gets None (said on stderr) instead of ending the command."""
    if top_k < 1:
        raise DataError(f"--top_k must be >= 1, got {top_k}")
    model, device = bundle.model, next(bundle.model.parameters()).device
    id2label = bundle.model.config.id2label
    k = min(top_k, len(id2label))
    results: list[list[tuple[str, float]] | None] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        ok = [True] * len(chunk)
        if bundle.task == "image_classification":
            pixels, ok = _image_inputs(bundle, chunk, skip_unreadable)
            if pixels is None:
                results.extend([None] * len(chunk))
                continue
            logits = model(pixel_values=pixels.to(device)).logits
        else:
            enc = {k: v.to(device) for k, v in encode_texts(bundle, chunk).items()}
            logits = model(**enc).logits
        top = logits.float().softmax(-1).topk(k, dim=-1)
        rows = iter(zip(top.values.tolist(), top.indices.tolist(), strict=True))
        for decoded in ok:
            if not decoded:
                results.append(None)
                continue
            values, indices = next(rows)
            results.append([(id2label[i], v) for i, v in zip(indices, values, strict=True)])
    return results


@torch.no_grad()
def multi_label_rows(bundle: ModelBundle, texts: list[Any], batch_size: int = 32) -> list[dict[str, Any]]:
    """What predict prints for a multi-label classifier: {"input", "labels": [{"label", "probability"}]} per text,
    every label whose sigmoid probability reaches its threshold (thresholds.json beside the weights, else the run's
    eval.threshold), most probable first."""
    model, device = bundle.model, next(bundle.model.parameters()).device
    names = [bundle.model.config.id2label[i] for i in range(len(bundle.model.config.id2label))]
    default = (((bundle.extra.get("fulltune_config") or {}).get("eval") or {}).get("threshold")) or 0.5
    thresholds = read_thresholds(Path(bundle.source), names, default)
    rows = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        enc = {k: v.to(device) for k, v in encode_texts(bundle, chunk).items()}  # as training encoded them
        prob = model(**enc).logits.float().sigmoid().tolist()  # (chunk, labels)
        for text, p in zip(chunk, prob, strict=True):
            above = sorted(((v, i) for i, v in enumerate(p) if v >= thresholds[i]), reverse=True)
            shown = {"input": text[0], "text_pair": text[1]} if isinstance(text, tuple) else {"input": text}
            rows.append(shown | {"labels": [{"label": names[i], "probability": round(v, 4)} for v, i in above]})
    return rows


@torch.no_grad()
def generate(
    bundle: ModelBundle, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0
) -> str:
    """Greedy decoding at temperature 0, else sampling with temperature and nucleus top_p. The prompt is framed as
    training framed its records (`frame_prompt`: no [CLS]/[SEP]); generation stops at the end-of-record token."""
    return _continue(bundle, frame_prompt(bundle.tokenizer, prompt), max_new_tokens, temperature, top_p)


@torch.no_grad()
def chat_generate(
    bundle: ModelBundle,
    messages: list[dict[str, str]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> str:
    """The assistant's next turn: the conversation rendered with the export's chat template and the generation
    prompt (`data.chat.prompt_ids`, what plain `apply_chat_template(..., add_generation_prompt=True)` gives), then
    `generate` until the end token that closed each assistant turn in training."""
    if not getattr(bundle.tokenizer, "chat_template", None):
        raise ConfigError("--chat: this checkpoint's tokenizer has no chat template (it was not trained on chat data)")
    return _continue(bundle, prompt_ids(bundle.tokenizer, messages), max_new_tokens, temperature, top_p)


def _continue(bundle: ModelBundle, ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float) -> str:
    """The decoded tokens `model.generate` adds to the 1-D prompt `ids`."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens {max_new_tokens}: expected a whole number >= 1")
    model, tok = bundle.model, bundle.tokenizer
    device = next(model.parameters()).device
    input_ids = ids[None].to(device)  # (1, prompt tokens)
    # The end and pad tokens come from the model's generation config (`set_end_token`), as in a plain `generate`.
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)
    attention_mask = torch.ones_like(input_ids)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs, use_cache=True)
    return tok.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


def chat_inputs(questions: list[str] | None, file: str | None, data: dict[str, Any]) -> list[list[dict[str, str]]]:
    """The conversations `predict` answers: each --chat question as one user turn, else every record of a chat
    JSONL --file (the run's data.messages_column) up to its last turn that is not the assistant's."""
    if questions:
        return [[{"role": "user", "content": q}] for q in questions]
    out = []
    for messages in read_conversations(Path(file or ""), _chat_columns(data), need_answer=False):
        while messages and messages[-1]["role"] == "assistant":  # a reference answer: the model gives its own
            messages = messages[:-1]
        out.append(messages)
    return out


def is_chat_file(file: str | None, data: dict[str, Any]) -> bool:
    """Whether --file holds conversations (the run's data.messages_column), which `predict` answers as chat."""
    return file is not None and is_chat_jsonl(Path(file), _chat_columns(data))


def _chat_columns(data: dict[str, Any]) -> DataConfig:
    """The run's chat field and encoding (`data`: the export's fulltune_run.json data section)."""
    return DataConfig(
        messages_column=data.get("messages_column") or "messages", encoding=data.get("encoding") or "utf-8"
    )
