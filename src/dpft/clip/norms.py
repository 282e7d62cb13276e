"""Per-example squared norms and clipped sums of gradient contributions.

For a parameter with contributions ``u = 1..U`` (its uses in one forward
pass) the per-example gradient is ``g_i = sum_u G_{u,i}``.  This module
computes ``||g_i||^2`` exactly -- cross terms between uses included -- either
by instantiating ``g_i`` or, for factored contributions, by the ghost
identity on Gram matrices, and the weighted sum ``sum_i w_i g_i`` without
ever instantiating ``g_i`` for factored contributions (book-keeping).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ghost_kernel, tuning
from ..ops import bmm_acc, cast
from ..rules.base import HALF, Contribution, Direct, Factored


def acc_dtype_of(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def row_sq_norms(g: Tensor) -> Tensor:
    """``(B, ...) -> (B,)``: squared norm of each example's slice, in one
    reduction kernel (``g.pow(2).sum`` would write and read a temporary as
    large as ``g``: for an instantiated per-example gradient, ``B*P*D`` values)."""
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).square()


def instantiate(c: Contribution, dtype: torch.dtype) -> Tensor:
    """The per-example gradient ``(B, *shape)`` of one contribution."""
    if isinstance(c, Direct):
        return c.grad.to(dtype)
    fast = c.per_example(dtype, grouped=tuning.GROUPED_CONV)
    if fast is not None:
        return fast
    n, _, groups, cols = c.right.shape
    if c.ids is not None:
        right = c.right.to(dtype)
        out = torch.zeros(n * c.num_rows, cols, dtype=dtype, device=right.device)
        index = (c.ids + torch.arange(n, device=c.ids.device).unsqueeze(1) * c.num_rows).reshape(-1)
        out.index_add_(0, index, right.reshape(-1, cols))
        return out.view(n, *c.shape)
    left = c.left  # type: ignore[union-attr]
    p = left.shape[3]
    # (B, T, G, p), (B, T, G, d) -> (B*G, p, T) @ (B*G, T, d)
    lt = left.permute(0, 2, 3, 1).reshape(n * groups, p, -1)
    rt = c.right.permute(0, 2, 1, 3).reshape(n * groups, -1, cols)
    return bmm_acc(lt, rt, dtype).reshape(n, *c.shape)


def _left_gram(u: Factored, v: Factored, dtype: torch.dtype) -> Tensor:
    """``(B, G, Tu, Tv)``: inner products of the left factors of two uses."""
    if u.ids is not None and v.ids is not None:
        return (u.ids.unsqueeze(2) == v.ids.unsqueeze(1)).to(dtype).unsqueeze(1)
    if u.ids is not None:
        return _left_gram(v, u, dtype).transpose(2, 3)
    if v.ids is not None:
        left = u.left.to(dtype)  # type: ignore[union-attr]
        # <dense row vector, onehot(id)> = the dense vector's entry at id
        n, tu = left.shape[:2]
        tv = v.ids.shape[1]
        idx = v.ids.unsqueeze(1).expand(n, tu, tv)
        return torch.gather(left[:, :, 0, :], 2, idx).unsqueeze(1)
    return _gram(u.left, v.left, dtype)  # type: ignore[arg-type]


def _gram(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, Tx, G, k), (B, Ty, G, k) -> (B, G, Tx, Ty)``: inner products per example and group."""
    n, tx, g, k = x.shape
    ty = y.shape[1]
    xt = x.permute(0, 2, 1, 3).reshape(n * g, tx, k)
    yt = y.permute(0, 2, 3, 1).reshape(n * g, k, ty)
    return bmm_acc(xt, yt, dtype).view(n, g, tx, ty)


def _rows(c: Factored, start: int, stop: int) -> Factored:
    """The positions ``start:stop`` of a contribution (a row block of its Gram matrices)."""
    return Factored(
        right=c.right[:, start:stop],
        shape=c.shape,
        left=c.left[:, start:stop] if c.left is not None else None,
        ids=c.ids[:, start:stop] if c.ids is not None else None,
        num_rows=c.num_rows,
    )


def _ghost_pair(u: Factored, v: Factored, dtype: torch.dtype) -> Tensor:
    """``sum_{t,s} <L_t, L_s> <R_t, R_s>`` per example; the ``(B, G, Tu, Tv)``
    Gram matrices are built in row blocks of at most :data:`~dpft.clip.tuning.GHOST_BLOCK` elements."""
    n, tu, g = u.right.shape[:3]
    tv = v.right.shape[1]
    step = max(1, tuning.GHOST_BLOCK // max(1, n * g * tv))
    total = None
    for start in range(0, tu, step):
        ub = _rows(u, start, min(tu, start + step)) if step < tu else u
        right = _gram(ub.right, v.right, dtype)
        part = (_left_gram(ub, v, dtype) * right).sum(dim=(1, 2, 3))
        total = part if total is None else total + part
    return total  # type: ignore[return-value]


def _key(t: Tensor) -> tuple:
    """Identity of a factor's values (valid while the tensor is alive)."""
    return (t.data_ptr(), t.shape, t.stride(), t.dtype)


def is_plain(c: Contribution) -> bool:
    """A dense single-group factored contribution without a layer-specific path
    (Linear, GPT-2 Conv1D, LoRA): its Gram matrices may be shared."""
    return type(c) is Factored and c.ids is None and c.right.shape[2] == 1


class GramCache:
    """Self-Gram matrices ``X X^T`` of factors used by several layers of one
    backward pass (the query, key and value projections of BERT-style and
    Llama-style attention read the same input; so do Llama's gate and up
    projections): each is computed once and kept only until its last use."""

    def __init__(self, contributions: list[Contribution]) -> None:
        self.uses: dict[tuple, int] = {}
        for c in contributions:
            if is_plain(c):
                for t in (c.left, c.right):
                    k = _key(t)  # type: ignore[arg-type]
                    self.uses[k] = self.uses.get(k, 0) + 1
        self.store: dict[tuple, Tensor] = {}

    def shared(self, t: Tensor) -> bool:
        """Whether the Gram matrix of ``t`` serves more than the layer asking."""
        k = _key(t)
        return self.uses.get(k, 0) > 1 or any(key[0] == k for key in self.store)

    def gram(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``(B, T, 1, k) -> (B, T, T)``."""
        k = _key(t)
        g = self.store.pop((k, dtype), None)
        if g is None:
            x = t.reshape(t.shape[0], t.shape[1], t.shape[3])
            g = bmm_acc(x, x.transpose(1, 2), dtype)
        n = self.uses.pop(k, 0)  # uses left, this one included
        if n > 1:
            self.uses[k] = n - 1
            self.store[(k, dtype)] = g
        return g


def _fused(c: Factored, dtype: torch.dtype, grams: GramCache | None) -> Tensor | None:
    """``||G_i||^2`` of one plain contribution in one fused kernel
    (:mod:`dpft.clip.ghost_kernel`) where that applies and neither of its Gram
    matrices is shared with another layer; None otherwise.  No ``T x T``
    matrix is built, so any sequence length fits in memory."""
    left = c.left.reshape(c.left.shape[0], c.left.shape[1], c.left.shape[3])  # type: ignore[union-attr]
    right = c.right.reshape(c.right.shape[0], c.right.shape[1], c.right.shape[3])
    if not ghost_kernel.usable(left, right, dtype):
        return None
    if grams is not None and (grams.shared(c.left) or grams.shared(c.right)):  # type: ignore[arg-type]
        return None
    return ghost_kernel.ghost_sq_norm(left, right)


def _ghost_plain(c: Factored, dtype: torch.dtype, grams: GramCache | None) -> Tensor:
    """``||G_i||^2`` of one plain contribution (see :func:`is_plain`) from its two Gram matrices."""
    if grams is None:
        grams = GramCache([])
    return (grams.gram(c.left, dtype) * grams.gram(c.right, dtype)).sum(dim=(1, 2))  # type: ignore[arg-type]


def ghost_sq_norm(contribs: list[Factored], dtype: torch.dtype) -> Tensor:
    """``||sum_u G_u||^2`` per example from Gram matrices (no instantiation)."""
    total = None
    for i, u in enumerate(contribs):
        for j in range(i, len(contribs)):
            term = _ghost_pair(u, contribs[j], dtype)
            if j != i:
                term = 2 * term
            total = term if total is None else total + term
    return total  # type: ignore[return-value]


def prefer_ghost(contribs: list[Factored]) -> bool:
    """Mixed ghost norm: ghost if ``2 T^2 < P D`` (``T`` = all positions of all uses)."""
    t = sum(c.positions for c in contribs)
    c0 = contribs[0]
    return 2 * t * t < c0.rows * c0.cols * c0.groups


def instantiation_fits(c: Factored, kept: int = 0) -> bool:
    """Whether the per-example gradient is at most :data:`~dpft.clip.tuning.INSTANTIATE_MEMORY`
    times the values it frees: the layer's factors (:attr:`Factored.held`,
    per example) less ``kept``, the values per example of an input that other
    layers keep (query/key/value projections all read theirs)."""
    return c.rows * c.cols * c.groups <= tuning.INSTANTIATE_MEMORY * (c.held - kept)


def instantiation_frees(c: Factored, dtype: torch.dtype) -> bool:
    """Whether the per-example gradient, accumulated in ``dtype``, takes no
    more bytes than the layer's factors it frees (:attr:`Factored.held`
    values per example in :attr:`Factored.factor_dtype`): activation
    checkpointing's rule for building it in the backward hook (DP-LoRA's
    ``r x d`` gradients always; full weights at long enough sequences)."""
    return c.rows * c.cols * c.groups * dtype.itemsize <= c.held * c.factor_dtype.itemsize


def instantiation_pays(c: Factored, kept: int = 0) -> bool:
    """Book-keeping's choice for a layer whose input and output gradient can be
    freed as soon as its per-example gradient is built (one use).  Building
    ``G_i`` costs the same matrix product as the book-keeping clipped sum
    (which then becomes a cheap weighted reduction of ``G_i``) plus writing
    and reading ``B*P*D`` float32 values (written once, read by the norm and
    by the weighted sum); the ghost norm costs the Gram matrices,
    ``2 T^2 (P + D)`` flops per example, with ``T`` beyond one tile rounded
    up to whole tiles (:data:`~dpft.clip.tuning.GRAM_TILE`).  Instantiate when the Gram matrices
    take longer and :func:`instantiation_fits` (for a Linear layer that reads
    its own input: ``P*D <= 2 T*(P + D)``).  The per-example gradients of the
    layers instantiated this way are kept to the end of the backward pass,
    by when the activations that non-private training also keeps are freed.
    Short sequences keep the ghost norm (the rule ``2 T^2 < P D`` keeps it up
    to ``T ~ sqrt(P D / 2)``)."""
    if not instantiation_fits(c, kept):
        return False
    t, p, d = c.positions, c.rows, c.cols  # per group (the group count cancels out)
    rate = tuning.FLOPS_PER_BYTE["half" if c.factor_dtype in HALF else "float"]
    tile = tuning.GRAM_TILE
    tiled = -(-t // tile) * tile if t > tile else t  # (small products: smaller tiles)
    return 2 * tiled * tiled * (p + d) > rate * 12 * p * d


def sq_norm(
    contribs: list[Contribution], mode: str, dtype: torch.dtype, grams: GramCache | None = None
) -> tuple[Tensor, Tensor | None]:
    """Per-example squared norm ``(B,)`` of the summed contributions of one
    parameter, and the instantiated per-example gradient if one was built
    (reused for the clipped sum).  ``grams`` shares Gram matrices between
    parameters whose factors are the same tensor."""
    factored = [c for c in contribs if isinstance(c, Factored)]
    use_ghost = (
        len(factored) == len(contribs)
        and mode != "instantiate"
        and (mode == "ghost" or (mode == "mixed" and prefer_ghost(factored)))
    )
    if use_ghost:
        c0 = factored[0]
        if len(factored) == 1 and is_plain(c0):
            fused = _fused(c0, dtype, grams)
            if fused is not None:
                return fused, None
            if c0.right.shape[0] * c0.positions**2 <= tuning.GHOST_BLOCK:
                return _ghost_plain(c0, dtype, grams), None
        sq = ghost_sq_norm(factored, dtype)
        for c in factored:
            if not c.sum_needs_factors(dtype):
                c.release()
        return sq, None
    g = instantiate(contribs[0], dtype)
    for c in contribs[1:]:
        g = g + instantiate(c, dtype)
    for c in factored:
        c.release()  # the instantiated gradient serves the weighted sum
    return row_sq_norms(g), g


#: half-precision clip weights are shrunk by this factor before the factor
#: they scale is rounded to nearest (twice bfloat16's largest relative rounding
#: error), so that no scaled entry exceeds its exact value
HALF_SHRINK = 1 - 2.0**-7


def scale_thinner(left: Tensor, right: Tensor, w: Tensor, half: bool) -> tuple[Tensor, Tensor]:
    """Multiply the factor with fewer columns (fewer bytes to touch) by the
    per-example clip weights ``w`` (broadcastable over its leading dims).  In
    half precision the product is formed in float32 and rounded to nearest on
    store, in one kernel; the caller passes weights already shrunk by
    :data:`HALF_SHRINK`, so that no entry is scaled above its exact value."""
    if left.shape[-1] <= right.shape[-1]:
        return (torch.mul(left, w, out=torch.empty_like(left)) if half else left * w), right
    return left, (torch.mul(right, w, out=torch.empty_like(right)) if half else right * w)


def weighted_sum(
    contribs: list[Contribution],
    weights: Tensor,
    dtype: torch.dtype,
    instantiated: Tensor | None = None,
    shrunk: Tensor | None = None,
) -> Tensor:
    """``sum_i w_i g_i`` (shape of the parameter).  Factored contributions use
    one weighted matrix product each (book-keeping); no per-example gradient
    is built unless one was already instantiated for the norm.  ``shrunk``
    (optional) is ``weights * HALF_SHRINK`` computed once by the caller for
    the half-precision path."""
    w = cast(weights, dtype)
    if instantiated is not None:
        return torch.tensordot(w, instantiated, dims=([0], [0]))
    total = None
    for c in contribs:
        if isinstance(c, Direct):
            s = torch.tensordot(w, c.grad.to(dtype), dims=([0], [0]))
        elif c.ids is not None:
            cols = c.right.shape[3]
            wr = (c.right.to(dtype) * w.view(-1, 1, 1, 1)).reshape(-1, cols)
            s = torch.zeros(c.num_rows, cols, dtype=dtype, device=wr.device)
            s.index_add_(0, c.ids.reshape(-1), wr)
            s = s.view(c.shape)
        elif (fast := c.weighted(w, dtype)) is not None:
            s = fast
        else:
            # under autocast the factors are half precision: one half-precision
            # matmul (fp32 accumulation inside), like the non-private weight gradient
            half = c.left.dtype in HALF and c.right.dtype == c.left.dtype  # type: ignore[union-attr]
            cdt = c.left.dtype if half else dtype  # type: ignore[union-attr]
            left, right = cast(c.left, cdt), cast(c.right, cdt)  # type: ignore[arg-type]
            if half:  # weights shrunk by HALF_SHRINK (see scale_thinner)
                wv = (cast(shrunk, w.dtype) if shrunk is not None else w * HALF_SHRINK).view(-1, 1, 1, 1)
            else:
                wv = w.view(-1, 1, 1, 1)
            left, right = scale_thinner(left, right, wv, half)
            n_t = left.shape[0] * left.shape[1]
            # (G, p, B*T) @ (G, B*T, d): one matrix product per group
            lt = left.reshape(n_t, c.groups, -1).permute(1, 2, 0)
            rt = right.reshape(n_t, c.groups, -1).transpose(0, 1)
            s = bmm_acc(lt, rt, dtype).reshape(c.shape)
        total = s if total is None else total + s
    return total  # type: ignore[return-value]
