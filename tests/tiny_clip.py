"""A tiny random CLIP with both towers and a word-level tokenizer, saved as a local model folder (offline)."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import TINY_CLIP_FULL

from fulltune.config import DEFAULT_PROMPT_TEMPLATES

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"


def make_tiny_clip(folder: Path, words: list[str] = (), seed: int = 0, image_size: int = 32) -> Path:
    """CLIPModel (random, seeded) + a WordLevel tokenizer that knows the default prompts' words and `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    vocab = {BOS: 0, EOS: 1, UNK: 2}
    for text in [*DEFAULT_PROMPT_TEMPLATES, *words]:
        for piece, _ in split.pre_tokenize_str(text.replace("{}", " ")):
            vocab.setdefault(piece.lower(), len(vocab))
    assert len(vocab) <= TINY_CLIP_FULL["text_config"]["vocab_size"], len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = None
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=UNK)
    vision = dict(TINY_CLIP_FULL["vision_config"], image_size=image_size)
    config = CLIPConfig(
        vision_config=vision, text_config=TINY_CLIP_FULL["text_config"], projection_dim=TINY_CLIP_FULL["projection_dim"]
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder
