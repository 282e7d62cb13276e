"""Ghost norms and book-keeping sums of many same-shaped layers at once.

A transformer has dozens of Linear layers of a few shapes (BERT-base: 48 of
768 x 768, 12 of 768 x 3072, 12 of 3072 x 768).  Per layer, the ghost norm
takes two Gram matrices and a product-sum, and the book-keeping clipped sum
a scaling and a matrix product: a handful of small kernels whose launch cost
on the CPU exceeds their GPU time when the layers are small (bf16, short
sequences, small batches).  Here the factors of same-shaped layers are
stacked (one copy kernel) and every step is one batched kernel for all of
them, in chunks of bounded memory.  The values are the same as layer by
layer: the same products, batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import ghost_kernel, tuning
from .norms import HALF, bmm_acc, is_plain, prefer_ghost, scale_thinner
from ..rules.base import Contribution, Factored


def _chunk_bytes(c: Factored) -> int:
    return tuning.CHUNK_BYTES * (2 if c.left.dtype in HALF else 1)  # type: ignore[union-attr]


def _stack(factors: list[Tensor], rows: int) -> Tensor:
    """``P`` factors ``(B, T, 1, k)`` -> ``(P, B, rows, k)``, one copy; the
    positions after ``T`` are zero (they add nothing to Gram matrices or sums)."""
    n, t, _, k = factors[0].shape
    if rows == t:
        return torch.stack(factors).squeeze(3)
    out = factors[0].new_empty(len(factors), n, rows, k)
    torch.stack([f.squeeze(2) for f in factors], out=out[:, :, :t])
    out[:, :, t:].zero_()
    return out


@dataclass
class Stack:
    """The factors of ``names`` stacked: ``left`` ``(P, B, T, p)``, ``right``
    ``(P, B, T, d)`` (half precision: ``T`` padded with zero positions, see
    :data:`~dpft.clip.tuning.ALIGN_POSITIONS`)."""

    names: list[str]
    shapes: list[torch.Size]
    left: Tensor
    right: Tensor


def _bytes(c: Factored) -> int:
    n, t = c.right.shape[:2]
    factors = n * t * (c.left.shape[3] * c.left.element_size() + c.right.shape[3] * c.right.element_size())  # type: ignore[union-attr]
    return factors + 2 * n * t * t * 4


def work(c: Factored) -> int:
    """Multiply-adds of one layer's ghost norm and clipped sum (float32: 32x)."""
    n, t = c.right.shape[:2]
    p, d = c.left.shape[3], c.right.shape[3]  # type: ignore[union-attr]
    macs = n * t * (t * (p + d) + p * d)
    return macs if c.left.dtype in HALF else 32 * macs  # type: ignore[union-attr]


def plan(contributions: dict[str, list[Contribution]], names: list[str], mode: str) -> list[list[str]]:
    """Groups (of two or more) of ``names`` whose norms are ghost norms of
    plain contributions (:func:`dpft.clip.norms.is_plain`) of one shape and dtype."""
    if mode not in ("ghost", "mixed"):
        return []
    groups: dict[tuple, list[str]] = {}
    eligible: dict[tuple, bool] = {}  # per shape: decided once (a model has a few shapes, many layers)
    for k in names:
        cs = contributions[k]
        if len(cs) != 1 or not is_plain(cs[0]):
            continue
        c = cs[0]
        assert isinstance(c, Factored) and c.left is not None
        key = (c.right.shape, c.left.shape, c.left.dtype, c.right.dtype, c.right.device)
        ok = eligible.get(key)
        if ok is None:
            n, t = c.right.shape[:2]
            ok = eligible[key] = (
                c.left.shape[0] == n
                and n * t * t <= tuning.GHOST_BLOCK
                and (mode == "ghost" or prefer_ghost([c]))
                and _bytes(c) * 2 <= _chunk_bytes(c)
                and work(c) <= tuning.BATCH_MACS
            )
        if ok:
            groups.setdefault(key, []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def _gram(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``(P, B, T, k) -> (P * B, T, T)``."""
    p, n, t, k = x.shape
    x = x.reshape(p * n, t, k)
    return bmm_acc(x, x.transpose(1, 2), dtype)


def norms(
    contributions: dict[str, list[Contribution]], names: list[str], dtype: torch.dtype
) -> list[tuple[Stack, Tensor]]:
    """Stack the factors of ``names`` (one group of :func:`plan`) in chunks and
    return each chunk with its squared per-example norms ``(P, B)``.  The
    contributions are removed from ``contributions``: the stacks replace them."""
    first = contributions[names[0]][0]
    assert isinstance(first, Factored)
    per_chunk = max(2, _chunk_bytes(first) // _bytes(first))
    out = []
    for start in range(0, len(names), per_chunk):
        chunk = names[start : start + per_chunk]
        cs = [contributions.pop(k)[0] for k in chunk]
        t = cs[0].right.shape[1]
        rows = -(-t // tuning.ALIGN_POSITIONS) * tuning.ALIGN_POSITIONS if cs[0].left.dtype in HALF else t  # type: ignore[union-attr]
        left = _stack([c.left for c in cs], rows)  # type: ignore[misc]  # (P, B, T, p)
        right = _stack([c.right for c in cs], rows)
        shapes = [c.shape for c in cs]
        del cs
        p, n = left.shape[:2]
        lv, rv = left.reshape(p * n, rows, -1), right.reshape(p * n, rows, -1)
        # float32 on CUDA: one fused kernel, no Gram matrices in memory
        fused = ghost_kernel.ghost_sq_norm(lv, rv) if ghost_kernel.usable(lv, rv, dtype) else None
        if fused is not None:
            sq = fused.view(p, n)
        else:
            sq = (_gram(left, dtype) * _gram(right, dtype)).sum(dim=(1, 2)).view(p, n)
        out.append((Stack(chunk, shapes, left, right), sq))
    return out


def weighted(stack: Stack, weights: Tensor, dtype: torch.dtype, shrink: float) -> list[Tensor]:
    """``sum_i w[j, i] G_{j,i}`` for every layer ``j`` of the stack, from its
    ``(P, B)`` (or ``(B,)``, shared) clip weights: one scaling and one batched
    matrix product.  Half-precision factors are scaled in float32 with the
    weights shrunk by ``shrink`` and rounded to nearest on store (see
    :func:`dpft.clip.norms.weighted_sum`)."""
    left, right = stack.left, stack.right
    p, n, t = left.shape[:3]
    half = left.dtype in HALF and right.dtype == left.dtype
    if not half:
        left, right = left.to(dtype), right.to(dtype)
    w = (weights * shrink if half else weights.to(dtype)).view(-1, n, 1, 1)
    left, right = scale_thinner(left, right, w, half)
    stack.left = stack.right = None  # type: ignore[assignment]  # freed once summed
    total = bmm_acc(left.reshape(p, n * t, -1).transpose(1, 2), right.reshape(p, n * t, -1), dtype)
    return [s.reshape(shape) for s, shape in zip(total.unbind(0), stack.shapes)]
