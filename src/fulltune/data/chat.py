"""Chat-format supervised fine-tuning data: JSONL records whose `messages` field (data.messages_column) holds a
conversation, a list of {role, content} (OpenAI style), rendered with a chat template (the tokenizer's own, or a
named one). The loss is on the assistant turns only, each ending in the end-of-record token (`lm.declare_eos`),
one conversation per sequence, or several packed into one with position ids restarting at each conversation.

A conversation's assistant spans are found by rendering it prefix by prefix: the text up to a turn with the
generation prompt, then up to the end of that turn; the pieces between are tokenised apart, so a span's first and
last tokens are exact. Labels sit under their own token (labels[i] is token i or IGNORE), as in `data.lm`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fulltune.config import Config, DataConfig
from fulltune.data.lm import IGNORE, framing_tokens
from fulltune.data.records import TaskData, capped, capped_splits, worker_count
from fulltune.data.text import first_jsonl_record, jsonl_objects, read_text_file
from fulltune.errors import ConfigError, DataError

# Named templates for tokenizers without one. Each turn ends with the tokenizer's end token (data.eos_token), so a
# model learns to stop where `generate` stops: chatml's <|im_end|> and Llama 3's <|eot_id|> where the tokenizer's
# end token is that one, as in Qwen's and Llama 3 Instruct's own templates.
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{% if bos_token %}{{ bos_token }}{% endif %}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
}
ROLES = ("system", "user", "assistant", "tool")


def is_chat_jsonl(path: Path, cfg: DataConfig) -> bool:
    """Whether `path` is JSONL whose first record holds a list under data.messages_column (a conversation): what
    `task: auto` reads as causal_lm chat data."""
    if path.suffix.lower() not in (".jsonl", ".json") or not path.is_file():
        return False
    row = first_jsonl_record(path, cfg.encoding)
    return row is not None and isinstance(row.get(cfg.messages_column), list)


def read_conversations(path: Path, cfg: DataConfig, need_answer: bool = True) -> list[list[dict[str, str]]]:
    """The conversations of a chat JSONL file, each a list of {"role", "content"} strings; a record that is not one
    (or, with `need_answer`, has no assistant turn to learn from) is one error naming the file and line."""
    text = read_text_file(path, cfg.encoding)
    key, out = cfg.messages_column, []
    for lineno, row in jsonl_objects(path, text):
        where = f"'{path}' line {lineno}"
        messages = row.get(key)
        if not isinstance(messages, list) or not messages:
            found = ", ".join(row) or "none"
            raise DataError(f"{where}: expected '{key}', a list of {{role, content}} messages; found fields {found}")
        turns = []
        for i, m in enumerate(messages):
            ok = isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            if not ok or m["role"] not in ROLES:
                raise DataError(
                    f'{where}: {key}[{i}] is {json.dumps(m)[:60]}, expected {{"role": {" | ".join(ROLES)}, '
                    '"content": a string}'
                )
            turns.append({"role": m["role"], "content": m["content"]})
        if need_answer and not any(t["role"] == "assistant" for t in turns):
            raise DataError(f"{where}: the conversation has no 'assistant' turn to learn from")
        out.append(turns)
    if not out:
        raise DataError(f"'{path}' is empty")
    return out


def use_template(tokenizer: Any, cfg: DataConfig) -> str:
    """Set the template that renders conversations on `tokenizer` (data.chat_template: a named one; auto: the
    tokenizer's own, else chatml), so a checkpoint's tokenizer saves it; return the log line that says which."""
    name = cfg.chat_template
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            return "chat template: the tokenizer's own (data.chat_template auto)"
        name = "chatml"
        said = "chatml (data.chat_template auto: the tokenizer has none)"
    elif name in TEMPLATES:
        said = f"{name} (data.chat_template)"
    else:
        raise ConfigError(f"config key 'data.chat_template': {name!r}; expected auto, {', '.join(TEMPLATES)}")
    tokenizer.chat_template = TEMPLATES[name]
    return f"chat template: {said}, each turn ending in {tokenizer.eos_token!r}"


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_turn) pieces, found prefix by prefix: the text before
    assistant turn i is the render of the turns before it with the generation prompt, the turn ends where the render
    of turns 0..i ends. A template that renders earlier turns differently once later ones follow is refused."""
    whole = _render(tokenizer, messages, False)
    out: list[tuple[str, bool]] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, turn = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        start, end = len(head), len(turn)
        if not (turn.startswith(head) and whole.startswith(turn) and start >= done):
            raise ConfigError(
                "the chat template renders a conversation's earlier turns differently once later turns follow, so "
                "the assistant turns cannot be found; set data.chat_template to chatml or llama3"
            )
        out += [(whole[done:start], False), (whole[start:end], True)]
        done = end
    out.append((whole[done:], False))
    return [(text, assistant) for text, assistant in out if text]


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D ids and labels of one conversation: labels are the assistant turns' tokens up to and including the end
    token that closes each (appended where the template wrote none), IGNORE elsewhere."""
    _, eos = framing_tokens(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for text, assistant in segments(tokenizer, messages):
        toks = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if not assistant:
            ids += toks
            labels += [IGNORE] * len(toks)
            continue
        cut = toks.index(eos) + 1 if eos in toks else len(toks)
        answer = toks[:cut] if eos in toks else [*toks, eos]
        ids += answer + toks[cut:]  # what follows the end token (chatml's newline) is context, never a target
        labels += answer + [IGNORE] * len(toks[cut:])
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> torch.Tensor:
    """The 1-D ids `predict --chat` generates from: the conversation rendered with the generation prompt, as plain
    `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives them."""
    text = _render(tokenizer, messages, True)
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


class ChatDataset(torch.utils.data.Dataset):
    """Token sequences of conversations: input_ids and labels (1-D each, one length per row), and with packing
    position_ids restarting at each conversation in the row."""

    def __init__(
        self, input_ids: list[torch.Tensor], labels: list[torch.Tensor], position_ids: list[torch.Tensor] | None
    ) -> None:
        self.input_ids, self.labels, self.position_ids = input_ids, labels, position_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i]}
        if self.position_ids is not None:
            item["position_ids"] = self.position_ids[i]
        return item


def collate_chat(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(B, longest row) tensors, padded on the right: ids 0 and IGNORE labels, which a causal model's earlier logits
    never see; position ids (packed rows) go on counting the last conversation's."""
    longest = max(it["input_ids"].numel() for it in items)

    def padded(key: str, value: int) -> torch.Tensor:
        rows = [it[key] for it in items]
        return torch.stack([torch.cat([r, r.new_full((longest - r.numel(),), value)]) for r in rows])

    batch = {"input_ids": padded("input_ids", 0), "labels": padded("labels", IGNORE)}
    if "position_ids" in items[0]:
        rows = [it["position_ids"] for it in items]
        batch["position_ids"] = torch.stack(
            [torch.cat([p, p[-1] + 1 + torch.arange(longest - p.numel())]) for p in rows]
        )
    return batch


def encode_conversations(
    conversations: list[list[dict[str, str]]], tokenizer: Any, seq_len: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int]:
    """(ids, labels, cut, dropped): each conversation tokenised and cut at `seq_len` tokens; `cut` counts those
    that were longer, `dropped` those left with no assistant token to predict (they are not kept)."""
    ids, labels, cut, dropped = [], [], 0, 0
    for messages in conversations:
        x, y = tokenize_conversation(tokenizer, messages)
        if x.numel() > seq_len:
            cut += 1
            x, y = x[:seq_len], y[:seq_len]
        if int((y[1:] != IGNORE).sum()) == 0:  # the first label of a row is never a target
            dropped += 1
            continue
        ids.append(x)
        labels.append(y)
    return ids, labels, cut, dropped


def pack_conversations(
    ids: list[torch.Tensor], labels: list[torch.Tensor], seq_len: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Conversations (each at most `seq_len` tokens) packed in order into rows of at most `seq_len` tokens, a new
    row when the next one does not fit; position ids restart at 0 at each conversation, which is what tells
    transformers' attention (sdpa, eager and flash alike, with no attention mask) where one ends."""
    rows: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    used = seq_len
    for x, y in zip(ids, labels, strict=True):
        if used + x.numel() > seq_len:
            rows.append(([], []))
            used = 0
        rows[-1][0].append(x)
        rows[-1][1].append(y)
        used += x.numel()
    packed_ids = [torch.cat(xs) for xs, _ in rows]
    packed_labels = [torch.cat(ys) for _, ys in rows]
    positions = [torch.cat([torch.arange(x.numel()) for x in xs]) for xs, _ in rows]
    return packed_ids, packed_labels, positions


def chat_split(
    conversations: list[list[dict[str, str]]], tokenizer: Any, seq_len: int, packing: bool, name: str
) -> tuple[ChatDataset, list[str]]:
    """A split's dataset and the log lines that say what the cut at data.seq_len and the packing did."""
    ids, labels, cut, dropped = encode_conversations(conversations, tokenizer, seq_len)
    notes = []
    if cut:
        notes.append(
            f"{name}: {cut} of {len(conversations)} conversations longer than data.seq_len={seq_len} tokens, cut "
            f"there (later turns not {'trained on' if name == 'train' else 'scored'})"
            + (f"; {dropped} left with no assistant token, skipped" if dropped else "")
        )
    if not ids:
        raise DataError(f"{name}: no conversation has an assistant token within data.seq_len={seq_len} tokens")
    if not packing:
        return ChatDataset(ids, labels, None), notes
    packed = pack_conversations(ids, labels, seq_len)
    notes.append(
        f"{name}: {len(ids)} conversations packed into {len(packed[0])} sequences of at most {seq_len} tokens "
        "(data.packing; position ids restart at each conversation)"
    )
    return ChatDataset(*packed), notes


def chat_task_data(cfg: Config, tokenizer: Any, files: dict[str, str | None]) -> TaskData:
    """A chat run's TaskData: the template set on the tokenizer; train under data.max_samples conversations (packed
    with data.packing), val under data.max_eval_samples and test whole, each conversation its own row."""
    d = cfg.data
    notes = [use_template(tokenizer, d)]

    def read(split: str) -> list[list[dict[str, str]]] | None:
        return read_conversations(Path(files[split]), d) if files[split] else None

    train, val, caps = capped_splits(cfg, read("train"), read("val"), _cap, len, "conversations")
    train_ds, said = chat_split(train, tokenizer, d.seq_len, d.packing, "train")
    notes += said
    splits: dict[str, ChatDataset | None] = {}
    for name, convs in (("val", val), ("test", read("test"))):
        splits[name], said = chat_split(convs, tokenizer, d.seq_len, False, name) if convs else (None, [])
        notes += said
    return TaskData(
        train=train_ds,
        val=splits["val"],
        test=splits["test"],
        collate=collate_chat,
        lengths=None if d.packing else [x.numel() for x in train_ds.input_ids],
        num_workers=worker_count(cfg, 0),
        info={"caps": caps + notes},
    )


def _cap(conversations: list[Any], n: int | None, seed: int) -> list[Any]:
    return [conversations[i] for i in capped(len(conversations), n, seed)]


def file_batches(path: Path, cfg: DataConfig, tokenizer: Any, seq_len: int, batch_size: int) -> list[dict]:
    """A chat file's conversations as evaluation batches (each conversation its own row, cut at `seq_len`), what
    `eval.perplexity.block_perplexity` scores: perplexity over the assistant tokens, as training's validation."""
    use_template(tokenizer, cfg)
    ids, labels, _, _ = encode_conversations(read_conversations(path, cfg), tokenizer, seq_len)
    if not ids:
        raise DataError(f"'{path}': no conversation has an assistant token within {seq_len} tokens")
    rows = [{"input_ids": x, "labels": y} for x, y in zip(ids, labels, strict=True)]
    return [collate_chat(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
