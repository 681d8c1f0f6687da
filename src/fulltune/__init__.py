"""fulltune: full-parameter fine-tuning of pretrained transformers, and its rivals (partial, linear probe, LoRA)."""

__version__ = "0.1.0"
