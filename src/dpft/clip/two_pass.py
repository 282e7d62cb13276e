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

Pass 2 is exact only if every loss term reaches the trainable weights
through the wrapped output.  A term computed from a tensor the model stored
(a regularizer on an activation) would reach them in pass 2 without its clip
factor.  So every step checks it: each hooked layer's output gradient is
projected onto a few fixed random directions per example in both passes
(:func:`project`, summed over a layer's calls), and pass 2's projections must
be pass 1's times the clip weights (:class:`Fingerprints`); where they are
not, the step's sums are dropped and the backward pass raises
(:class:`TwoPassMismatch`), naming the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import tuning
from .norms import HALF, HALF_SHRINK

#: random directions per example in a fingerprint (a term that changes the
#: output gradient is missed by all of them with probability about tol^K)
K = 4


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


def applied(w: Tensor, dtype: torch.dtype) -> Tensor:
    """The weights :func:`reweight` multiplies an output gradient of ``dtype``
    by (shrunk in half precision), in float32 or float64."""
    w = w.double() if w.dtype == torch.float64 else w.float()
    return w * HALF_SHRINK if dtype in HALF else w


_DIRECTIONS: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}


def _directions(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(n, K)`` fixed standard-normal directions (the same in both passes)."""
    key = (n, device, dtype)
    d = _DIRECTIONS.get(key)
    if d is None:
        gen = torch.Generator().manual_seed(0x2FA55 + n)
        d = _DIRECTIONS[key] = torch.randn(n, K, generator=gen, dtype=torch.float64).to(device, dtype)
    return d


def project(grad: Tensor, batch: int) -> tuple[Tensor, Tensor] | None:
    """Example ``i``'s rows of ``grad`` (leading dimension ``batch``) projected
    onto ``K`` fixed random directions, ``(batch, K)``, and the squared size
    those projections have by chance, ``(batch, K)``: the gradient, seen as
    ``(batch, M, d)``, is multiplied by ``(d, K)`` directions along its last
    dimension and the ``(batch, M, K)`` result by ``(M, K)`` along positions
    (a rank-one direction per column; one read of ``grad``).  ``None`` for a
    gradient whose leading dimension is not the batch."""
    if grad.ndim == 0 or grad.shape[0] != batch or grad.numel() == 0:
        return None
    g = grad.reshape(batch, -1, grad.shape[-1]) if grad.ndim > 1 else grad.reshape(batch, 1, 1)
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        y = torch.matmul(g, _directions(g.shape[2], g.device, g.dtype)).to(acc)  # (batch, M, K)
        fp = (y * _directions(g.shape[1], g.device, acc)).sum(1)
        return fp, y.square().sum(1)


class TwoPassMismatch(RuntimeError):
    """Pass 2 of two-pass clipping saw an output gradient that is not pass 1's
    times the clip weights: some loss term does not come through the model's
    output, and pass 2 would not clip it."""


class Fingerprints:
    """The projections (:func:`project`) of every hooked layer's output
    gradient in both passes of one backward pass, by layer and batch size.

    Pass 1's are folded in with the clip weights (:meth:`expect`); pass 2's
    accumulate in :attr:`seen`; :meth:`mismatch` compares them at the end."""

    def __init__(self) -> None:
        self.want: dict[tuple[str, int], list[Tensor]] = {}
        self.seen: dict[tuple[str, int], list[Tensor]] = {}
        self.dtypes: set[torch.dtype] = set()
        self.worst = 0.0  # largest |pass 2 - w pass 1| / allowance seen (1 = the tolerance)

    @staticmethod
    def add(into: dict[tuple[str, int], list[Tensor]], name: str, grad: Tensor, batch: int) -> None:
        """Accumulate ``grad``'s projections under ``name``."""
        got = project(grad, batch)
        if got is None:
            return
        slot = into.get((name, batch))
        if slot is None:
            into[(name, batch)] = [got[0], got[1], grad.dtype]  # type: ignore[list-item]
        else:
            slot[0] = slot[0] + got[0]
            slot[1] = slot[1] + got[1]

    def expect(self, first: dict[tuple[str, int], list[Tensor]], w: Tensor) -> None:
        """Fold pass 1's projections ``first`` in, times the clip weights ``w``
        as :func:`reweight` applies them."""
        for key, (fp, ss, dtype) in first.items():  # type: ignore[misc]
            wa = applied(w.to(fp.device), dtype).to(fp.dtype).view(-1, 1)  # type: ignore[arg-type]
            self.dtypes.add(dtype)  # type: ignore[arg-type]
            slot = self.want.get(key)
            if slot is None:
                self.want[key] = [fp * wa, ss * wa.square()]
            else:
                slot[0] = slot[0] + fp * wa
                slot[1] = slot[1] + ss * wa.square()

    def mismatch(self) -> str:
        """The first layer whose pass-2 projections differ from the expected
        ones by more than the tolerance (:data:`dpft.clip.tuning.TWO_PASS_TOL`
        of their chance size), or that only one pass reached, named with what
        was wrong; ``""`` if none.  Clears both sides."""
        want, seen, dtypes = self.want, self.seen, self.dtypes
        self.want, self.seen, self.dtypes = {}, {}, set()
        tol = max((tuning.TWO_PASS_TOL[str(d).replace("torch.", "")] for d in dtypes), default=0.0)
        keys, ratios, bad = [], [], ""
        for key in sorted(set(want) | set(seen)):
            if key not in want or key not in seen:
                side = "pass 2 only" if key not in want else "pass 1 only"
                bad = bad or f"'{key[0]}': its output gradient came in {side}"
                continue
            fp_w, ss_w = want[key]
            fp_s, ss_s = seen[key][0], seen[key][1]
            allow = tol * (ss_w.sqrt() + ss_s.sqrt()) + torch.finfo(fp_w.dtype).tiny
            keys.append(key[0])
            ratios.append(((fp_s - fp_w).abs() / allow).amax().float())
        if ratios:
            r = torch.stack(ratios)
            worst = float(r.max())  # (one synchronisation per step)
            self.worst = max(self.worst, worst)
            if worst > 1.0 and not bad:
                name = keys[int((r > 1.0).nonzero()[0, 0])]
                bad = f"'{name}': its output gradient in pass 2 was not pass 1's times the clip factors"
        return bad


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
