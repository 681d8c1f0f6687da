"""The training methods by name (the values of method.name): the ones `compare` and `plan` run unless told, the
ones a `compare` variant may start from, the learning-rate multiple `compare` gives each and the learning-rate range
`tune` searches for each. Kept apart from the code that runs them so that a command's --help can list them without
loading torch."""

from __future__ import annotations

METHODS = ("linear_probe", "partial", "lora", "full")
"""The methods `compare` and `plan` run unless told, cheapest first (qlora needs CUDA: asked for by name)."""

VARIANT_METHODS = ("linear_probe", "partial", "lora", "qlora", "full")
"""Every method a `compare` variant (METHOD[:key=value...]) may start from."""

# LoRA's update starts at zero and is rank-limited: about ten times full's rate is the usual choice. A linear probe
# trains only a new head on frozen features, which are often small (MiniLM's pooler outputs average |x| ~ 0.05):
# AdamW moves each weight by about the LR per step, so at 10x the head barely leaves its initialisation in a few
# epochs (measured: majority-class accuracy on the docstring demo at 1e-3; 1e-2 trains). `partial` trains
# pretrained top blocks like full does and keeps full's rate.
DEFAULT_LR_MULT = {"full": 1.0, "partial": 1.0, "lora": 10.0, "qlora": 10.0, "linear_probe": 100.0}
"""`compare`'s learning rate per method, as a multiple of training.base_learning_rate (--lr_per_method changes it)."""

SEARCH_LR_RANGE = {
    "full": (1e-5, 5e-4),
    "partial": (1e-5, 5e-4),
    "lora": (1e-4, 3e-3),
    "qlora": (1e-4, 3e-3),
    "linear_probe": (1e-3, 1e-1),
}
"""`tune`'s default search range (low, high; log scale) of training.base_learning_rate per method."""
