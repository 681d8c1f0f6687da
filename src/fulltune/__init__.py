"""fulltune: full-parameter fine-tuning of pretrained transformers, and its rivals (partial, linear probe, LoRA).

From Python: `fulltune.train(config, **overrides)` returns a `TrainResult` (run folder, best checkpoint, metrics);
`fulltune.evaluate(checkpoint, ...)` and `fulltune.predict(checkpoint, inputs)` return what the commands print
(fulltune.api). They load on first use, so that `import fulltune` itself stays light (no torch)."""

from __future__ import annotations

__version__ = "0.1.0"

_API = ("train", "evaluate", "predict", "TrainResult")
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> object:
    """fulltune.train, .evaluate, .predict, .TrainResult: loaded from fulltune.api on first use (PEP 562)."""
    if name in _API:
        from fulltune import api

        return getattr(api, name)
    raise AttributeError(f"module 'fulltune' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
