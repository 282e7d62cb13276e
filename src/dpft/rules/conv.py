"""Rules for ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``.

Bias: per-example gradient is the output gradient summed over spatial
positions (no activations needed).  Weight: an N-d unfold turns the
convolution into a matrix product per position, grouped convolutions into a
block-diagonal one, so the weight gradient is a :class:`Factored`
contribution with one factor pair per group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Contribution, Direct, Factored, Rule, batchify, reduce_into
from .linear import acc_dtype


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def conv_padding(padding, kernel_size, dilation) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, matching PyTorch's conventions
    for integer, ``'valid'`` and ``'same'`` padding."""
    nd = len(kernel_size)
    if padding == "valid":
        return [(0, 0)] * nd
    if padding == "same":
        pads = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in _tuple(padding, nd)]


def unfold_nd(x: Tensor, kernel_size, dilation, padding, stride, padding_mode: str = "zeros") -> Tensor:
    """``(B, C, *spatial) -> (B, L, C * prod(kernel))`` with the (c, k...) column
    order of ``weight.view(C_out, -1)``; works for 1, 2 and 3 spatial dims."""
    nd = x.ndim - 2
    kernel_size, dilation, stride = _tuple(kernel_size, nd), _tuple(dilation, nd), _tuple(stride, nd)
    pads = conv_padding(padding, kernel_size, dilation)
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        if padding_mode == "zeros":
            x = F.pad(x, flat)
        else:
            x = F.pad(x, flat, mode=padding_mode)
    for i in range(nd):
        size = dilation[i] * (kernel_size[i] - 1) + 1
        x = x.unfold(2 + i, size, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    b, c = x.shape[:2]
    spatial = x.shape[2 : 2 + nd]
    # (B, C, L..., K...) -> (B, L..., C, K...)
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)
    return x.reshape(b, math.prod(spatial), c * math.prod(kernel_size))


def sum_spatial(grad: Tensor) -> Tensor:
    """``(B, C, *spatial) -> (B, C)``, accumulated in float32/64."""
    if grad.ndim == 2:
        return grad.to(acc_dtype(grad))
    return grad.sum(dim=tuple(range(2, grad.ndim)), dtype=acc_dtype(grad))


class ConvRule(Rule):
    """``nn.Conv1d/2d/3d``: any stride, padding (incl. 'same' and padding modes),
    dilation and groups."""

    handles = ("weight", "bias")
    casts_input = True

    def eager_into(self, call: Call, grad: Tensor, name: str, out: Tensor, accumulate: bool) -> None:
        reduce_into(grad, tuple(range(2, grad.ndim)), out, accumulate)

    def on_grad(self, call: Call, grad: Tensor, params: frozenset[str]) -> None:
        if "bias" in params:
            call.results["bias"] = sum_spatial(grad)
        if "weight" in params:
            call.saved["grad"] = grad

    def factors(self, m: nn.Module, x: Tensor, g: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """``(left, right)`` of shapes ``(B, L, G, C_out/G)`` and ``(B, L, G, C_in/G * K)``."""
        cols = unfold_nd(x, m.kernel_size, m.dilation, m.padding, m.stride, m.padding_mode)
        length = cols.shape[1]
        left = g.reshape(n, g.shape[1], length).transpose(1, 2).reshape(n, length, m.groups, -1)
        return left, cols.reshape(n, length, m.groups, -1)

    def contributions(self, call: Call, params: frozenset[str]) -> dict[str, Contribution]:
        out: dict[str, Contribution] = {}
        if "bias" in params:
            out["bias"] = Direct(call.results["bias"])
        if "weight" in params:
            m: nn.Module = call.module
            n = call.batch_size
            left, right = self.factors(m, batchify(call.saved["input"], n), call.saved["grad"], n)
            out["weight"] = Factored(left=left, right=right, shape=m.weight.shape)
        return out


class ConvTransposeRule(ConvRule):
    """``nn.ConvTranspose1d/2d/3d``.  The weight (C_in, C_out/G, *k) gradient is
    ``sum_l x_l (x) unfold(grad_out)_l``: the output gradient unfolded with the
    kernel, stride, dilation and padding of the convolution this layer is the
    transpose of gives exactly one window per input position."""

    def factors(self, m: nn.Module, x: Tensor, g: Tensor, n: int) -> tuple[Tensor, Tensor]:
        cols = unfold_nd(g, m.kernel_size, m.dilation, m.padding, m.stride)
        length = cols.shape[1]
        xl = x.reshape(n, x.shape[1], -1)
        if xl.shape[2] != length:
            raise RuntimeError(f"dpft: ConvTranspose window count {length} != input positions {xl.shape[2]}")
        return xl.transpose(1, 2).reshape(n, length, m.groups, -1), cols.reshape(n, length, m.groups, -1)

    def save(self, call: Call, module: nn.Module, args: tuple, output: Tensor, params: frozenset[str]) -> None:
        if module.padding_mode != "zeros":
            raise NotImplementedError("dpft: ConvTranspose with padding_mode != 'zeros'")
        super().save(call, module, args, output, params)


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
