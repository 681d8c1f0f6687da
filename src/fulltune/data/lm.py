"""Causal LM data: plain text or JSONL (`text`, or `prompt`/`response` with the loss on the response only),
tokenised once and cached on disk, packed into fixed `seq_len` blocks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from fulltune.config import DataConfig
from fulltune.data.text import DataError

IGNORE = -100


def _records(path: Path, cfg: DataConfig) -> list[tuple[str, str | None]]:
    """(text, None) for plain text and `text` records; (prompt, response) for prompt/response records."""
    if path.suffix.lower() not in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"'{path}' is empty")
        return [(text, None)]
    out: list[tuple[str, str | None]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"'{path}' line {lineno}: not valid JSON ({err.msg})") from None
        if cfg.response_column in row:
            out.append((str(row.get(cfg.prompt_column, "")), str(row[cfg.response_column])))
        elif cfg.text_column in row:
            out.append((str(row[cfg.text_column]), None))
        else:
            raise DataError(
                f"'{path}' line {lineno}: expected a '{cfg.text_column}' field or "
                f"'{cfg.prompt_column}'/'{cfg.response_column}' fields; found {', '.join(row)}"
            )
    if not out:
        raise DataError(f"'{path}' is empty")
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Long plain-text files are tokenised in chunks of lines so no single call holds the whole file's encoding.
    if len(text) < 200_000:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), 2000):
        ids.extend(tokenizer("".join(lines[start : start + 2000]), add_special_tokens=False)["input_ids"])
    return ids


def tokenize_records(records: list[tuple[str, str | None]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """One token stream and its labels: prompt tokens get IGNORE labels; each record ends with EOS if known."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for first, response in records:
        if response is None:
            toks = _encode(tokenizer, first)
            ids.extend(toks)
            labels.extend(toks)
        else:
            p, r = _encode(tokenizer, first), _encode(tokenizer, response)
            ids.extend(p + r)
            labels.extend([IGNORE] * len(p) + r)
        if eos is not None:
            ids.append(eos)
            labels.append(eos)
    return ids, labels


def pack(ids: list[int], labels: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the stream into (num_blocks, seq_len) blocks; the ragged tail is dropped."""
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one block of data.seq_len={seq_len}")
    x = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    y = torch.tensor(labels[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return x, y


class BlockDataset(torch.utils.data.Dataset):
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


def load_blocks(path: Path, cfg: DataConfig, tokenizer: Any, cache_dir: Path | None, max_records: int | None = None) -> BlockDataset:
    """Tokenise and pack `path`, reusing a cache keyed by file content, tokenizer and seq_len."""
    key = hashlib.sha1()
    key.update(path.read_bytes())
    key.update(f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}:{cfg.seq_len}:{max_records}".encode())
    key.update(f"{cfg.text_column}:{cfg.prompt_column}:{cfg.response_column}".encode())
    cache = cache_dir / f"lm-{key.hexdigest()[:16]}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        blob = torch.load(cache)
        return BlockDataset(blob["input_ids"], blob["labels"])
    records = _records(path, cfg)
    if max_records is not None and len(records) > 1:
        records = records[:max_records]
    x, y = pack(*tokenize_records(records, tokenizer), cfg.seq_len)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"input_ids": x, "labels": y}, tmp)
        tmp.replace(cache)
    return BlockDataset(x, y)
