"""A word-level tokenizer and a text corpus made on the spot, for GPU checks and throughput runs that must not
download anything: the GPU machine has transformers and `tokenizers` but no hub access and no MiniLM package.

Every word of the corpus is one token of the tokenizer, so `n_tokens` words pack into exactly `n_tokens // seq_len`
blocks. The corpus repeats a few hundred fixed "sentences" in a seeded order, so a model can learn it and a falling
loss says that training works.
"""

from __future__ import annotations

import random
from pathlib import Path


def word(i: int) -> str:
    return f"w{i}"


def write_tokenizer(out_dir: Path, vocab_size: int) -> Path:
    """A `save_pretrained` tokenizer folder with ids 0..vocab_size-1: <unk>, <s>, </s>, <pad>, then w4, w5, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({word(i): i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.model_max_length = 1 << 20  # long blocks are cut by the packer, not the tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def write_corpus(path: Path, n_tokens: int, vocab_size: int, seed: int = 0, sentences: int = 256) -> Path:
    """About `n_tokens` words (one per token), one sentence of 8-32 words per line."""
    rng = random.Random(seed)
    pool = [[word(rng.randrange(4, vocab_size)) for _ in range(rng.randint(8, 32))] for _ in range(sentences)]
    lines, count = [], 0
    while count < n_tokens:
        s = pool[rng.randrange(len(pool))]
        lines.append(" ".join(s))
        count += len(s)  # a plain text file is one record: one token per word, <s> and </s> once around it
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
