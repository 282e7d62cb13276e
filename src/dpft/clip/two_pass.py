"""Two-pass clipping: the clipped sum as autograd's own gradient.

Under activation checkpointing the usual path keeps, to the end of the
backward pass, either each full weight's per-example gradient (``B x 4``
bytes per weight) or its input and output gradient, while the non-private
run frees a segment's tensors with its backward.  Two-pass clipping (ghost
clipping's two backward passes) keeps neither:

1. pass 1 backpropagates the model output's gradient ``g`` through the
   model; each layer's per-example squared norm is taken in its backward
   hook and its captures are dropped at once (``Capture.early_norms``);
   at the end the clip weights ``w_i = scale * c_i`` are known
   (:meth:`dpft.clip.clipped_sum.ClippedSum.factors`); autograd's weight
   gradients of this pass are dropped as they are accumulated;
2. pass 2 backpropagates ``w_i g_i`` (each example's rows of the output
   gradient scaled by its weight) with dpft's hooks passive: autograd's
   gradient of every trainable parameter is then ``sum_i c_i g_i``, the
   clipped sum, which the engine takes as it is accumulated.

The user's loop calls ``loss.backward()`` once: the model output is wrapped
in :class:`Reweight`, an identity whose backward runs pass 1 as a nested
backward pass (through :class:`Handle`, a scalar tied to the output's graph
that holds none of the output's storage) and returns ``w * g``, so that the
outer backward pass is pass 2.  Exact when the output's leading dimension is
the examples (row ``i`` depends on example ``i`` only, which dpft's hooks
assume of every layer anyway) and there is one clipping group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .norms import HALF, HALF_SHRINK


class Handle(torch.autograd.Function):
    """A scalar whose backward sends the gradient left in ``box`` into the
    graph of ``x`` (pass 1), without keeping ``x``'s storage alive."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, box: list) -> Tensor:
        ctx.box = box
        return x.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor, None]:
        return ctx.box.pop(), None


class Reweight(torch.autograd.Function):
    """Identity forward; backward returns ``run(g)`` (pass 1, then the
    reweighted gradient that the outer backward pass carries on with)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, run: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.run = run
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return ctx.run(g), None


def reweight(g: Tensor, w: Tensor) -> Tensor:
    """``g`` with example ``i``'s rows (leading dimension) scaled by ``w[i]``.
    In half precision the product is formed in float32 and rounded on store,
    with the weights shrunk by :data:`~dpft.clip.norms.HALF_SHRINK` first,
    so that no scaled entry exceeds its exact value."""
    shape = (-1,) + (1,) * (g.ndim - 1)
    if g.dtype in HALF:
        wv = (w.float() * HALF_SHRINK).view(shape)
        return torch.mul(g, wv, out=torch.empty_like(g))
    return g * w.to(g.dtype).view(shape)


def single_output(output: Any) -> tuple[Tensor, Callable[[Tensor], Any]] | None:
    """The one tensor of the model's ``output`` that requires grad, and a
    function that puts a replacement in its place; ``None`` if there is not
    exactly one (a tensor, or one of the top-level values of a tuple, list or
    dict such as Hugging Face's ``ModelOutput``).  A model that also returns
    its loss (``labels=``) has two: two-pass clipping is then not used."""

    def grads(v: Any) -> bool:
        return isinstance(v, Tensor) and v.requires_grad

    if isinstance(output, Tensor):
        return (output, lambda new: new) if grads(output) else None
    if isinstance(output, (tuple, list)):
        hits = [i for i, v in enumerate(output) if grads(v)]
        nested = any(isinstance(v, (tuple, list, dict)) and grads_any(v) for v in output)
        if len(hits) != 1 or nested:
            return None
        (i,) = hits

        def put(new: Tensor) -> Any:
            items = list(output)
            items[i] = new
            return type(output)(items) if type(output) in (tuple, list) else type(output)(*items)

        return output[i], put
    if isinstance(output, dict):
        hits = [k for k, v in output.items() if grads(v)]
        nested = any(isinstance(v, (tuple, list, dict)) and grads_any(v) for v in output.values())
        if len(hits) != 1 or nested:
            return None
        (k,) = hits

        def put_item(new: Tensor) -> Any:
            output[k] = new  # (a ModelOutput updates its attribute too)
            return output

        return output[k], put_item
    return None


def grads_any(value: Any) -> bool:
    """Whether a nested tuple/list/dict holds a tensor that requires grad."""
    if isinstance(value, Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(grads_any(v) for v in value)
    if isinstance(value, dict):
        return any(grads_any(v) for v in value.values())
    return False
