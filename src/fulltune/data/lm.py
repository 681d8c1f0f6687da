"""Causal LM data: plain text or JSONL (`text`, or `prompt`/`response` with the loss on the response only),
tokenised once and cached on disk, packed into fixed `seq_len` blocks.

The framing of a record is one thing everywhere (training, perplexity, `predict --prompt`): [BOS] prompt-or-text
(no other special tokens) [response] EOS, the EOS being the tokenizer's or the token data.eos_token declares.
Labels sit under their own token (labels[i] is token i or IGNORE); the loss shifts them, so the first label of a
block is never a target.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fulltune.config import DataConfig
from fulltune.data.text import first_jsonl_record, jsonl_objects, read_text_file
from fulltune.errors import ConfigError, DataError
from fulltune.files.rundir import recover_run_dir
from fulltune.files.safestate import StateFileError, load_tensors

IGNORE = -100
_CHUNK_CHARS = 200_000


def read_records(path: Path, cfg: DataConfig) -> list[tuple[str, str | None]]:
    """(text, None) for a plain text file and for `text` records; (prompt, response) for prompt/response records."""
    text = read_text_file(path, cfg.encoding)  # a byte that is not data.encoding is one error naming the file
    if path.suffix.lower() not in (".jsonl", ".json"):
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines
        if not text.strip():
            raise DataError(f"'{path}' is empty")
        return [(text, None)]
    out: list[tuple[str, str | None]] = []

    def field(row: dict, key: str, lineno: int, default: Any = None) -> str:
        value = row.get(key, default)
        if not isinstance(value, str):  # null, a number or a list would be trained as "None", "3" or "['a']"
            raise DataError(f"'{path}' line {lineno}: '{key}' is {json.dumps(value)[:40]}, expected a string")
        return value

    for lineno, row in jsonl_objects(path, text):
        if cfg.response_column in row:
            out.append((field(row, cfg.prompt_column, lineno, ""), field(row, cfg.response_column, lineno)))
        elif cfg.text_column in row:
            out.append((field(row, cfg.text_column, lineno), None))
        else:
            raise DataError(
                f"'{path}' line {lineno}: expected a '{cfg.text_column}' field or "
                f"'{cfg.prompt_column}'/'{cfg.response_column}' fields; found {', '.join(row) or 'none'}"
            )
    if not out:
        raise DataError(f"'{path}' is empty")
    return out


def is_lm_jsonl(path: Path, cfg: DataConfig) -> bool:
    """Whether `path` is JSONL whose first record is a prompt/response pair with no label (a causal LM's data, not
    a classifier's table): what `task: auto` reads."""
    if path.suffix.lower() not in (".jsonl", ".json") or not path.is_file():
        return False
    row = first_jsonl_record(path, cfg.encoding)
    return row is not None and cfg.response_column in row and cfg.label_column not in row


def line_chunks(lines: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """Join `lines` (with their line ends) into runs of about `chunk_chars` characters.

    A run is only closed right before a line that starts with a non-whitespace character, so runs of blank lines
    or indentation (which byte-level BPE merges into one token) are never split: tokenising the runs one by one
    gives the ids of tokenising the whole text at once.
    """
    buf: list[str] = []
    size = 0
    for line in lines:
        if size >= chunk_chars and line[:1] and not line[:1].isspace():
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


def _encode(tokenizer: Any, text: str) -> Iterator[list[int]]:
    """Token ids of `text`, in runs of lines so that no single call holds a whole file's encoding."""
    for chunk in line_chunks(text.splitlines(keepends=True), _CHUNK_CHARS):
        # verbose=False: the "longer than the model's maximum length" warning does not apply, blocks are cut later
        yield tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]


def declare_eos(tokenizer: Any, cfg: DataConfig) -> None:
    """Make `tokenizer.eos_token` the token that ends each record (data.eos_token; auto: the tokenizer's own EOS,
    else its separator token, e.g. BERT's [SEP]). Set on the tokenizer, so an export saves it and plain
    `generate` stops there. A tokenizer with neither, and no data.eos_token, is refused."""
    name = cfg.eos_token
    if name == "auto":
        if tokenizer.eos_token is not None:
            return
        name = tokenizer.sep_token
        if name is None:
            raise ConfigError(
                f"config key 'data.eos_token': the tokenizer '{getattr(tokenizer, 'name_or_path', '')}' has no "
                "end-of-sequence or separator token; name one of its tokens that ends each record (a causal LM "
                "learns to stop there)"
            )
    elif tokenizer.convert_tokens_to_ids(name) in (None, tokenizer.unk_token_id) and name != tokenizer.unk_token:
        raise ConfigError(f"config key 'data.eos_token': {name!r} is not a token of the tokenizer's vocabulary")
    tokenizer.eos_token = name


def framing_tokens(tokenizer: Any) -> tuple[int | None, int]:
    """(bos, eos) put around each record: EOS always (a model learns to stop); BOS only if the tokenizer has one
    that differs from EOS (GPT-2 uses one token for both, and doubling it would teach the model a pattern it never
    sees at inference)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(
            "config key 'data.eos_token': the tokenizer has no end-of-sequence token; name one of its tokens "
            "that ends each record"
        )
    return (bos if bos is not None and bos != eos else None), eos


def frame_prompt(tokenizer: Any, text: str) -> torch.Tensor:
    """The 1-D ids a record's prompt (or whole text) gets in training, perplexity and `predict --prompt` alike:
    [BOS] then the text's tokens, with no other special tokens ([CLS]/[SEP] are never added)."""
    bos, _ = framing_tokens(tokenizer)
    pieces = [torch.tensor([bos], dtype=torch.long)] if bos is not None else []
    pieces += [torch.tensor(toks, dtype=torch.long) for toks in _encode(tokenizer, text)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def tokenize_records(records: list[tuple[str, str | None]], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One 1-D token stream and its labels: each record is `frame_prompt` (then its response) then EOS; BOS and
    prompt tokens get IGNORE."""
    bos, eos = framing_tokens(tokenizer)
    ids: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for first, response in records:
        head = frame_prompt(tokenizer, first)
        ids.append(head)
        head_labels = torch.full_like(head, IGNORE) if response is not None else head.clone()
        if bos is not None:
            head_labels[0] = IGNORE
        labels.append(head_labels)
        if response is not None:
            # Prompt and response are encoded apart so the boundary (where the loss starts) is exact.
            for toks in _encode(tokenizer, response):
                ids.append(torch.tensor(toks, dtype=torch.long))
                labels.append(ids[-1])
        ids.append(torch.tensor([eos], dtype=torch.long))
        labels.append(ids[-1])
    if not ids:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(ids), torch.cat(labels)


def file_tokens(path: Path, cfg: DataConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The token stream of a text or JSONL file and its labels, framed as training frames it (what perplexity
    scores)."""
    return tokenize_records(read_records(Path(path), cfg), tokenizer)


def pack(
    ids: torch.Tensor, labels: torch.Tensor, seq_len: int, keep_tail: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the stream into (num_blocks, seq_len) blocks. The ragged tail is dropped, or with `keep_tail` (the
    blocks validation scores) kept as a last block padded on the right with IGNORE labels: a causal model's
    logits at a position do not see later ones, so the padding changes nothing that is scored."""
    n, tail = divmod(ids.numel(), seq_len)
    if keep_tail and tail >= 2:  # a 1-token tail predicts nothing
        pad = seq_len - tail
        ids = torch.cat([ids, ids.new_zeros(pad)])
        labels = torch.cat([labels, labels.new_full((pad,), IGNORE)])
        n += 1
    if n == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one block of data.seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len), labels[: n * seq_len].view(n, seq_len)


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks: input_ids and labels, both (num_blocks, seq_len)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def collate_blocks(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.stack([it["input_ids"] for it in items]),
        "labels": torch.stack([it["labels"] for it in items]),
    }


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    # The full serialised tokenizer where there is one: two tokenizers sharing a name (or none) must not share a cache.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha1(backend.to_str().encode()).hexdigest()
    return f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"


def load_blocks(
    path: Path,
    cfg: DataConfig,
    tokenizer: Any,
    cache_dir: Path | None,
    max_blocks: int | None = None,
    seed: int = 0,
    keep_tail: bool = False,
) -> BlockDataset:
    """Tokenise and pack `path`, reusing a cache keyed by the file's bytes, the tokenizer, seq_len, the cap and the
    JSON field names. `max_blocks` keeps that many blocks drawn (by `seed`) from the whole file, in file order: the
    first N blocks would all come from the file's beginning (one chapter, one play, one topic). `keep_tail`: see
    `pack`."""
    return cached_blocks(
        path.read_bytes(), lambda: read_records(path, cfg), cfg, tokenizer, cache_dir, max_blocks, seed, keep_tail
    )


def cached_blocks(
    source_key: bytes | None,
    records: Callable[[], Iterable[tuple[str, str | None]]],
    cfg: DataConfig,
    tokenizer: Any,
    cache_dir: Path | None,
    max_blocks: int | None = None,
    seed: int = 0,
    keep_tail: bool = False,
) -> BlockDataset:
    """Pack the token stream of `records()` into blocks, cached under `source_key` (the source's bytes or
    fingerprint; None: no cache) with everything else that shapes the blocks."""
    key = hashlib.sha1()
    key.update(source_key or b"")
    key.update(f"{_tokenizer_fingerprint(tokenizer)}:{framing_tokens(tokenizer)}:{cfg.seq_len}".encode())
    key.update(f"{max_blocks}:{seed if max_blocks is not None else ''}".encode())
    key.update(f"{cfg.text_column}:{cfg.prompt_column}:{cfg.response_column}:{cfg.encoding}:{keep_tail}".encode())
    # safetensors, never a pickle: a cache folder can be shared or planted, and loading it must not run code
    cache = cache_dir / f"lm-{key.hexdigest()[:16]}.safetensors" if cache_dir and source_key is not None else None
    if cache is not None and cache.is_file():
        try:
            blob = load_tensors(cache)
            return BlockDataset(blob["input_ids"], blob["labels"])
        except (StateFileError, KeyError):
            pass  # a damaged cache is rebuilt below
    x, y = pack(*tokenize_records(list(records()), tokenizer), cfg.seq_len, keep_tail)
    if max_blocks is not None and max_blocks < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_blocks].sort().values
        x, y = x[keep], y[keep]  # (max_blocks, seq_len); indexing copies, so the cache holds only these
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        recover_run_dir(cache.parent)  # a cache a killed process was writing is removed, never left for ever
        tmp = cache.parent / f".{cache.name}.tmp-{os.getpid()}"  # ranks writing one cache never share a temp file
        save_file({"input_ids": x.contiguous(), "labels": y.contiguous()}, str(tmp))
        tmp.replace(cache)
    return BlockDataset(x, y)


def stream_blocks(
    records: Iterable[tuple[str, str | None]], tokenizer: Any, seq_len: int, keep_tail: bool = False
) -> Iterator[dict[str, Any]]:
    """The blocks `pack` would cut from the token stream of `records`, packed as the records come (a stream's
    records never all sit in memory); the ragged tail is dropped, or kept padded as `pack` keeps it."""
    held_ids: list[torch.Tensor] = []
    held_labels: list[torch.Tensor] = []
    held = 0
    for record in records:
        ids, labels = tokenize_records([record], tokenizer)
        held_ids.append(ids)
        held_labels.append(labels)
        held += ids.numel()
        if held < seq_len:
            continue
        ids, labels = torch.cat(held_ids), torch.cat(held_labels)
        n = held // seq_len
        for i in range(n):
            cut = slice(i * seq_len, (i + 1) * seq_len)
            yield {"input_ids": ids[cut].clone(), "labels": labels[cut].clone()}
        held_ids, held_labels = [ids[n * seq_len :]], [labels[n * seq_len :]]
        held -= n * seq_len
    if keep_tail and held >= 2:
        ids, labels = pack(torch.cat(held_ids), torch.cat(held_labels), seq_len, keep_tail=True)
        yield {"input_ids": ids[0], "labels": labels[0]}
