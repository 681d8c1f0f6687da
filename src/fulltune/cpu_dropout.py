"""Dropout for training on a CPU: the same layer, its mask drawn from 16-bit random numbers, four per 64-bit draw.

torch's CPU dropout draws one Mersenne-twister number per element (`bernoulli_`, about 6 ns an element on one core
of the development machines): on a BERT-sized model with short sequences that is a tenth of a training step. Here
one full-range 64-bit draw from the same generator gives four 16-bit numbers, and an element is dropped when its
number falls under round(p * 65536): the drop probability is p to within 2**-17 (0.1 -> 0.1000061), the kept
elements are scaled by 1 / (1 - that probability), so the layer stays unbiased. The draws come from torch's default
CPU generator, so seeding and exact resume work as before; the masks are not the ones torch would draw.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_LEVELS = 2**16


class _MaskedScale(torch.autograd.Function):
    """x * mask, where mask holds 0 or the keep scale in x's dtype (as torch's CPU dropout keeps it): backward is
    one multiplication."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class CPUDropout(nn.Dropout):
    """`nn.Dropout` whose training-mode mask is drawn four elements per 64-bit random number on CPU tensors; other
    devices (and `inplace=True`) take torch's own dropout."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace or not x.is_floating_point():
            return super().forward(x)
        dropped = round(self.p * _LEVELS)
        if dropped >= _LEVELS:
            return x * 0
        n = x.numel()
        # randint's upper bound is exclusive: 2**64 - 1 values, so one of the 2**64 bit patterns never comes up.
        draws = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        numbers = draws.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
        mask = (numbers >= dropped - _LEVELS // 2).to(x.dtype).mul_(_LEVELS / (_LEVELS - dropped))
        return _MaskedScale.apply(x, mask)


def use_cpu_dropout(model: nn.Module) -> int:
    """Replace every plain `nn.Dropout` with p > 0 in `model` by a `CPUDropout` of the same p; returns how many.
    Dropout holds no parameters or buffers, so state dicts, saving and loading are unchanged."""
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                replacement = CPUDropout(child.p, child.inplace)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                swapped += 1
    return swapped
