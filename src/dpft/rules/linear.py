"""Rules for layers computing ``y = x W^T + b`` along the last dimension:
``nn.Linear`` (and subclasses, e.g. LoRA adapters' Linear layers) and
transformers' GPT-2 ``Conv1D`` (``y = x W + b``, weight stored transposed)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Call, Contribution, Direct, Factored, Instantiated, Rule, batchify, reduce_into


def acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sum_positions(grad: Tensor) -> Tensor:
    """``(B, *, p) -> (B, p)``: sum over all positions, accumulated in float32/64."""
    if grad.ndim == 2:
        return grad.to(acc_dtype(grad))
    return grad.sum(dim=tuple(range(1, grad.ndim - 1)), dtype=acc_dtype(grad))


class LinearRule(Rule):
    """``nn.Linear``: bias from output gradients alone; weight factored as
    ``b_i^T a_i`` (left = output gradient rows, right = input)."""

    handles = ("weight", "bias")
    #: the weight's per-example gradient may be built in the backward hook (see Capture)
    instantiates_early = True
    casts_input = True
    transposed = False  # HF Conv1D stores the weight as (in, out)

    def rows_ok(self, module: nn.Module, x: Tensor) -> bool:
        return True

    def on_grad(self, call: Call, grad: Tensor, params: frozenset[str]) -> None:
        if "bias" in params:
            call.results["bias"] = sum_positions(grad)
        if "weight" in params:
            call.saved["grad"] = grad

    def eager_into(self, call: Call, grad: Tensor, name: str, out: Tensor, accumulate: bool) -> None:
        reduce_into(grad, tuple(range(1, grad.ndim - 1)), out, accumulate)

    def contributions(self, call: Call, params: frozenset[str]) -> dict[str, Contribution]:
        out: dict[str, Contribution] = {}
        if "bias" in params:
            out["bias"] = Direct(call.results["bias"])
        if "weight" in params and "weight" in call.results:  # instantiated during backward
            out["weight"] = Instantiated(call.results["weight"])
        elif "weight" in params:
            n = call.batch_size
            a = batchify(call.saved["input"], n)
            b = call.saved["grad"]
            a = a.reshape(n, -1, 1, a.shape[-1])
            b = b.reshape(n, -1, 1, b.shape[-1])
            weight = call.module.weight
            if self.transposed:
                out["weight"] = Factored(left=a, right=b, shape=weight.shape)
            else:
                out["weight"] = Factored(left=b, right=a, shape=weight.shape)
        return out


class HFConv1DRule(LinearRule):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` of shape (in, out)."""

    transposed = True


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (or a subclass), recognized without importing transformers."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)
