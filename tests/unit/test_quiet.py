"""What a person does not want to read: a library's deprecation warning about fulltune's own calls (LoRA wrapping, which
`plan` and every LoRA run do)."""

from __future__ import annotations

import warnings

from conftest import TINY_BERT
from transformers import AutoConfig, AutoModelForSequenceClassification

from fulltune.config import load_config
from fulltune.model.lora import wrap_lora


def test_wrapping_a_model_with_lora_warns_nothing():
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**TINY_BERT, num_labels=2))
    cfg = load_config(None, {"method.name": "lora"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = wrap_lora(model, cfg, "text_classification")
    assert any("lora_A" in name for name, _ in wrapped.named_parameters())
