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

from .rules.base import Contribution, Direct, Factored


def acc_dtype_of(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def instantiate(c: Contribution, dtype: torch.dtype) -> Tensor:
    """The per-example gradient ``(B, *shape)`` of one contribution."""
    if isinstance(c, Direct):
        return c.grad.to(dtype)
    n, _, groups, cols = c.right.shape
    right = c.right.to(dtype)
    if c.ids is not None:
        out = torch.zeros(n * c.num_rows, cols, dtype=dtype, device=right.device)
        index = (c.ids + torch.arange(n, device=c.ids.device).unsqueeze(1) * c.num_rows).reshape(-1)
        out.index_add_(0, index, right.reshape(-1, cols))
        return out.view(n, *c.shape)
    left = c.left.to(dtype)  # type: ignore[union-attr]
    g = torch.einsum("btgp,btgd->bgpd", left, right)
    return g.reshape(n, *c.shape)


def _left_gram(u: Factored, v: Factored, dtype: torch.dtype) -> Tensor:
    """``(B, G, Tu, Tv)``: inner products of the left factors of two uses."""
    if u.ids is not None and v.ids is not None:
        return (u.ids.unsqueeze(2) == v.ids.unsqueeze(1)).to(dtype).unsqueeze(1)
    if u.ids is not None:
        return _left_gram(v, u, dtype).transpose(2, 3)
    left = u.left.to(dtype)  # type: ignore[union-attr]
    if v.ids is not None:
        # <dense row vector, onehot(id)> = the dense vector's entry at id
        n, tu = left.shape[:2]
        tv = v.ids.shape[1]
        idx = v.ids.unsqueeze(1).expand(n, tu, tv)
        return torch.gather(left[:, :, 0, :], 2, idx).unsqueeze(1)
    return torch.einsum("btgp,bsgp->bgts", left, v.left.to(dtype))  # type: ignore[union-attr]


#: largest Gram block (elements) built at once; longer sequences are processed in row chunks
GHOST_BLOCK = 1 << 25


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
    Gram matrices are built in row blocks of at most ``GHOST_BLOCK`` elements."""
    n, tu, g = u.right.shape[:3]
    tv = v.right.shape[1]
    step = max(1, GHOST_BLOCK // max(1, n * g * tv))
    total = None
    for start in range(0, tu, step):
        ub = _rows(u, start, min(tu, start + step)) if step < tu else u
        right = torch.einsum("btgd,bsgd->bgts", ub.right.to(dtype), v.right.to(dtype))
        part = (_left_gram(ub, v, dtype) * right).sum(dim=(1, 2, 3))
        total = part if total is None else total + part
    return total  # type: ignore[return-value]


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


def sq_norm(contribs: list[Contribution], mode: str, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Per-example squared norm ``(B,)`` of the summed contributions of one
    parameter, and the instantiated per-example gradient if one was built
    (reused for the clipped sum)."""
    factored = [c for c in contribs if isinstance(c, Factored)]
    use_ghost = (
        len(factored) == len(contribs)
        and mode != "instantiate"
        and (
            mode == "ghost"
            or (mode == "mixed" and prefer_ghost(factored))
        )
    )
    if use_ghost:
        return ghost_sq_norm(factored, dtype), None
    g = instantiate(contribs[0], dtype)
    for c in contribs[1:]:
        g = g + instantiate(c, dtype)
    return g.reshape(g.shape[0], -1).pow(2).sum(1), g


def weighted_sum(
    contribs: list[Contribution], weights: Tensor, dtype: torch.dtype, instantiated: Tensor | None = None
) -> Tensor:
    """``sum_i w_i g_i`` (shape of the parameter).  Factored contributions use
    one weighted matrix product each (book-keeping); no per-example gradient
    is built unless one was already instantiated for the norm."""
    w = weights.to(dtype)
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
        else:
            # under autocast the factors are half precision: one half-precision
            # matmul (fp32 accumulation inside), like the non-private weight gradient
            half = c.left.dtype in (torch.float16, torch.bfloat16) and c.right.dtype == c.left.dtype  # type: ignore[union-attr]
            cdt = c.left.dtype if half else dtype  # type: ignore[union-attr]
            left, right = c.left.to(cdt), c.right.to(cdt)  # type: ignore[union-attr]
            wv = w.to(cdt).view(-1, 1, 1, 1)
            # scale the thinner factor by the clip weights (fewer bytes to touch)
            if left.shape[3] <= right.shape[3]:
                left = left * wv
            else:
                right = right * wv
            if c.groups == 1:
                n_t = left.shape[0] * left.shape[1]
                s = (left.reshape(n_t, -1).t() @ right.reshape(n_t, -1)).reshape(c.shape).to(dtype)
            else:
                s = torch.einsum("btgp,btgd->gpd", left, right).reshape(c.shape).to(dtype)
        total = s if total is None else total + s
    return total  # type: ignore[return-value]
