"""Causal LM data: plain text or JSONL (`text`, or `prompt`/`response` with the loss on the response only),
tokenised once and cached on disk, packed into fixed `seq_len` blocks.

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
from fulltune.data.text import jsonl_objects
from fulltune.errors import DataError
from fulltune.files.rundir import recover_run_dir
from fulltune.files.safestate import StateFileError, load_tensors

IGNORE = -100
_CHUNK_CHARS = 200_000


def read_records(path: Path, cfg: DataConfig) -> list[tuple[str, str | None]]:
    """(text, None) for a plain text file and for `text` records; (prompt, response) for prompt/response records."""
    if path.suffix.lower() not in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"'{path}' is empty")
        return [(text, None)]
    out: list[tuple[str, str | None]] = []

    def field(row: dict, key: str, lineno: int, default: Any = None) -> str:
        value = row.get(key, default)
        if not isinstance(value, str):  # null, a number or a list would be trained as "None", "3" or "['a']"
            raise DataError(f"'{path}' line {lineno}: '{key}' is {json.dumps(value)[:40]}, expected a string")
        return value

    for lineno, row in jsonl_objects(path, path.read_text(encoding="utf-8")):
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


def framing_tokens(tokenizer: Any) -> tuple[int | None, int | None]:
    """(bos, eos) put around each record: EOS if the tokenizer has one; BOS only if it differs from EOS (GPT-2
    uses one token for both, and doubling it would teach the model a pattern it never sees at inference)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos if bos is not None and bos != eos else None), eos


def tokenize_records(records: list[tuple[str, str | None]], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One 1-D token stream and its labels: each record is [BOS] text [EOS]; BOS and prompt tokens get IGNORE."""
    bos, eos = framing_tokens(tokenizer)
    ids: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []

    def add(toks: list[int], target: bool) -> None:
        t = torch.tensor(toks, dtype=torch.long)
        ids.append(t)
        labels.append(t if target else torch.full_like(t, IGNORE))

    for first, response in records:
        if bos is not None:
            add([bos], False)
        if response is not None:
            # Prompt and response are encoded apart so the boundary (where the loss starts) is exact.
            for toks in _encode(tokenizer, first):
                add(toks, False)
            for toks in _encode(tokenizer, response):
                add(toks, True)
        else:
            for toks in _encode(tokenizer, first):
                add(toks, True)
        if eos is not None:
            add([eos], True)
    if not ids:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(ids), torch.cat(labels)


def pack(ids: torch.Tensor, labels: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the stream into (num_blocks, seq_len) blocks; the ragged tail is dropped."""
    n = ids.numel() // seq_len
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
    path: Path, cfg: DataConfig, tokenizer: Any, cache_dir: Path | None, max_blocks: int | None = None, seed: int = 0
) -> BlockDataset:
    """Tokenise and pack `path`, reusing a cache keyed by the file's bytes, the tokenizer, seq_len, the cap and the
    JSON field names. `max_blocks` keeps that many blocks drawn (by `seed`) from the whole file, in file order: the
    first N blocks would all come from the file's beginning (one chapter, one play, one topic)."""
    return cached_blocks(
        path.read_bytes(), lambda: read_records(path, cfg), cfg, tokenizer, cache_dir, max_blocks, seed
    )


def cached_blocks(
    source_key: bytes | None,
    records: Callable[[], Iterable[tuple[str, str | None]]],
    cfg: DataConfig,
    tokenizer: Any,
    cache_dir: Path | None,
    max_blocks: int | None = None,
    seed: int = 0,
) -> BlockDataset:
    """Pack the token stream of `records()` into blocks, cached under `source_key` (the source's bytes or
    fingerprint; None: no cache) with everything else that shapes the blocks."""
    key = hashlib.sha1()
    key.update(source_key or b"")
    key.update(f"{_tokenizer_fingerprint(tokenizer)}:{framing_tokens(tokenizer)}:{cfg.seq_len}".encode())
    key.update(f"{max_blocks}:{seed if max_blocks is not None else ''}".encode())
    key.update(f"{cfg.text_column}:{cfg.prompt_column}:{cfg.response_column}".encode())
    # safetensors, never a pickle: a cache folder can be shared or planted, and loading it must not run code
    cache = cache_dir / f"lm-{key.hexdigest()[:16]}.safetensors" if cache_dir and source_key is not None else None
    if cache is not None and cache.is_file():
        try:
            blob = load_tensors(cache)
            return BlockDataset(blob["input_ids"], blob["labels"])
        except (StateFileError, KeyError):
            pass  # a damaged cache is rebuilt below
    x, y = pack(*tokenize_records(list(records()), tokenizer), cfg.seq_len)
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


def stream_blocks(records: Iterable[tuple[str, str | None]], tokenizer: Any, seq_len: int) -> Iterator[dict[str, Any]]:
    """The blocks `pack` would cut from the token stream of `records`, packed as the records come (a stream's
    records never all sit in memory); the ragged tail is dropped."""
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


def tokenize_text_file(
    path: str | Path, tokenizer: Any, add_bos: bool = True, chunk_chars: int = 1_000_000
) -> torch.LongTensor:
    """Tokenise a whole UTF-8 text file into one 1-D LongTensor of ids.

    The file is read and tokenised in chunks of whole lines (about ``chunk_chars`` characters each) so memory stays
    bounded by the chunk plus the int64 ids. Line breaks are kept as ``"\\n"`` characters in the text the tokenizer
    sees (``"\\r\\n"`` is normalised to ``"\\n"``), nothing is stripped or joined, so the ids match tokenising the
    whole file at once for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen). Tokenizers that prepend a dummy prefix
    space to every call (SentencePiece Llama 2) see one extra space at each chunk boundary. Only the tokenizer's
    BOS (if ``add_bos`` and it has one) is added, once, at the very start; no EOS is appended.
    """
    # newline=None: universal newlines, "\r\n" and "\r" arrive as "\n" (as in training's read_text)
    with open(path, encoding="utf-8", newline=None) as f:
        return tokenize_lines(f, tokenizer, add_bos, chunk_chars)


def tokenize_lines(
    lines: Iterable[str], tokenizer: Any, add_bos: bool = True, chunk_chars: int = 1_000_000
) -> torch.LongTensor:
    """What `tokenize_text_file` gives for a file holding `lines` (each with its line end), from any iterable of
    lines (a dataset split's rows, say)."""
    pieces: list[torch.Tensor] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None:
        pieces.append(torch.tensor([bos], dtype=torch.long))
    for text in line_chunks(lines, chunk_chars):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # no max-length warning
        pieces.append(torch.tensor(ids, dtype=torch.long))
    if not pieces:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(pieces)
