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

from ..ops import bmm_acc
from ..precision import full_fp32
from .base import Call, Contribution, Direct, Factored, Instantiated, LazyFactored, Rule, batchify, reduce_into
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
    if not any(flat) and all(k == 1 for k in kernel_size) and all(s == 1 for s in stride):
        # a pointwise convolution: the positions are the columns of the input
        # itself; a transposed view (matrix products read it as it is) rather
        # than a copy of the whole input
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
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


class ConvFactored(LazyFactored):
    """The weight gradient of an ``nn.Conv1d/2d/3d`` call, kept as the layer's
    input and output gradient.  The unfolded factors (``left`` / ``right``:
    the input unfolded with the kernel, ``C_in * prod(kernel)`` values per
    position) are built only when a norm needs them and dropped as soon as it
    is known (:meth:`release`), so that one layer's unfolded input at a time
    is alive.  Per-example gradients come from the factors; the weighted sum
    (book-keeping) of a layer left to the ghost norm comes from the
    convolution's own weight-gradient kernel, which never materializes the
    unfolded input (a layer whose per-example gradient was built, in its
    backward hook or for its norm, is summed from that gradient).  ``index``:
    the selected output channels (SPARTA rows)."""

    def __init__(self, module: nn.Module, x: Tensor, g: Tensor, n: int, index: Tensor | None = None) -> None:
        self.module, self.x, self.g, self.n, self.index = module, x, g, n, index
        shape = list(module.weight.shape)
        if index is not None:
            shape[0] = len(index)
        self.shape = torch.Size(shape)
        self.ids = None
        self.num_rows = 0
        self._factors: tuple[Tensor, Tensor] | None = None

    def _grad(self) -> Tensor:
        return self.g if self.index is None else self.g.index_select(1, self.index.to(self.g.device))

    def build(self) -> tuple[Tensor, Tensor]:
        return ConvRule.factors(self.module, self.x, self._grad(), self.n)

    @property
    def positions(self) -> int:
        return math.prod(self.g.shape[2:])

    @property
    def factor_dtype(self) -> torch.dtype:
        return self.x.dtype  # ``right`` is the unfolded input

    @property
    def held(self) -> int:
        # the input and the output gradient as they are (the unfolded input is built on demand)
        return (self.x.numel() + self.g.numel()) // self.n

    @property
    def groups(self) -> int:
        return self.module.groups

    @property
    def rows(self) -> int:
        return self.shape[0] // self.module.groups

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    def select_rows(self, index: Tensor) -> "ConvFactored | None":
        if self.module.groups != 1 or self.index is not None:
            return None
        return ConvFactored(self.module, self.x, self.g, self.n, index)

    def _fast(self, dtype: torch.dtype) -> bool:
        # half precision keeps the generic path (float32 products of the half
        # values); float32/64 use the convolution kernels in full precision
        return self.x.dtype == self.g.dtype == dtype and dtype in (torch.float32, torch.float64)

    def _wgrad(self, x: Tensor, g: Tensor, weight_size: list[int], groups: int) -> Tensor:
        m = self.module
        nd = x.ndim - 2
        k, dil, stride = _tuple(m.kernel_size, nd), _tuple(m.dilation, nd), _tuple(m.stride, nd)
        pads = conv_padding(m.padding, k, dil)
        if m.padding_mode != "zeros" or any(a != b for a, b in pads):
            flat = [p for pair in reversed(pads) for p in pair]
            x = F.pad(x, flat) if m.padding_mode == "zeros" else F.pad(x, flat, mode=m.padding_mode)
            padding = [0] * nd
        else:
            padding = [a for a, _ in pads]
        weight = g.new_empty(1).expand(weight_size)
        with full_fp32():  # not TF32 (cuDNN's default for float32)
            return torch.ops.aten.convolution_backward(
                g, x, weight, None, list(stride), padding, list(dil), False, [0] * nd, groups, (False, True, False)
            )[1]

    def sum_needs_factors(self, dtype: torch.dtype) -> bool:
        return not self._fast(dtype)

    def per_example(self, dtype: torch.dtype, grouped: bool = False) -> Tensor | None:
        """``grouped``: from the weight-gradient kernel with the batch folded
        into the groups (no unfolded input at all); the clipping stage passes
        ``dpft.clip.tuning.GROUPED_CONV``."""
        if not (grouped and self._fast(dtype)):
            return self._per_example_direct(dtype)
        n, x, g = self.n, self.x, self._grad()
        # the batch folded into the groups: example i's channels form groups i*G .. (i+1)*G
        xb = x.reshape(1, n * x.shape[1], *x.shape[2:])
        gb = g.reshape(1, n * g.shape[1], *g.shape[2:])
        size = [n * self.shape[0], *self.shape[1:]]
        return self._wgrad(xb, gb, size, n * self.module.groups).view(n, *self.shape)

    def _per_example_direct(self, dtype: torch.dtype) -> Tensor | None:
        """Ungrouped convolutions: the output gradient ``(B, O, L)`` as it is
        times the unfolded input ``(B, L, C*K)``.  The generic path also
        copies the output gradient twice, into the factor layout and back.
        (``F.unfold`` is not used: on CUDA it launches one kernel per example.)"""
        m = self.module
        if m.groups != 1:
            return None
        n = self.n
        cols = unfold_nd(self.x, m.kernel_size, m.dilation, m.padding, m.stride, m.padding_mode)  # (B, L, C*K)
        g = self._grad()
        left = g.reshape(n, g.shape[1], -1)
        if left.shape[2] != cols.shape[1]:  # pragma: no cover - the convolution's own arithmetic
            return None
        return bmm_acc(left, cols, dtype).view(n, *self.shape)

    def weighted(self, weights: Tensor, dtype: torch.dtype) -> Tensor | None:
        if not self._fast(dtype):
            return None
        g = self._grad()
        w = weights.to(g.dtype).view(-1, *([1] * (g.ndim - 1)))
        return self._wgrad(self.x, g * w, list(self.shape), self.module.groups)


class ConvRule(Rule):
    """``nn.Conv1d/2d/3d``: any stride, padding (incl. 'same' and padding modes),
    dilation and groups."""

    handles = ("weight", "bias")
    casts_input = True
    #: the weight's per-example gradient may be built in the backward hook
    #: (see ``Capture._instantiate_early``): then the clipped sum is a
    #: weighted sum of it, not a weight-gradient convolution at the end
    instantiates_early = True

    def eager_into(self, call: Call, grad: Tensor, name: str, out: Tensor, accumulate: bool) -> None:
        reduce_into(grad, tuple(range(2, grad.ndim)), out, accumulate)

    def on_grad(self, call: Call, grad: Tensor, params: frozenset[str]) -> None:
        if "bias" in params:
            call.results["bias"] = sum_spatial(grad)
        if "weight" in params:
            call.saved["grad"] = grad

    @staticmethod
    def factors(m: nn.Module, x: Tensor, g: Tensor, n: int) -> tuple[Tensor, Tensor]:
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
            early = call.results.get("weight")  # instantiated during backward
            out["weight"] = Instantiated(early) if early is not None else self.weight_contribution(call)
        return out

    def weight_contribution(self, call: Call) -> Factored:
        n = call.batch_size
        x = batchify(call.saved["input"], n)
        if x.shape[0] != n:  # pragma: no cover - batchify guarantees it
            raise RuntimeError("dpft: conv input batch mismatch")
        return ConvFactored(call.module, x, call.saved["grad"], n)


class ConvTransposeRule(ConvRule):
    """``nn.ConvTranspose1d/2d/3d``.  The weight (C_in, C_out/G, *k) gradient is
    ``sum_l x_l (x) unfold(grad_out)_l``: the output gradient unfolded with the
    kernel, stride, dilation and padding of the convolution this layer is the
    transpose of gives exactly one window per input position."""

    @staticmethod
    def factors(m: nn.Module, x: Tensor, g: Tensor, n: int) -> tuple[Tensor, Tensor]:
        cols = unfold_nd(g, m.kernel_size, m.dilation, m.padding, m.stride)
        length = cols.shape[1]
        xl = x.reshape(n, x.shape[1], -1)
        if xl.shape[2] != length:
            raise RuntimeError(f"dpft: ConvTranspose window count {length} != input positions {xl.shape[2]}")
        return xl.transpose(1, 2).reshape(n, length, m.groups, -1), cols.reshape(n, length, m.groups, -1)

    def weight_contribution(self, call: Call) -> Factored:
        m: nn.Module = call.module
        n = call.batch_size
        left, right = self.factors(m, batchify(call.saved["input"], n), call.saved["grad"], n)
        return Factored(left=left, right=right, shape=m.weight.shape)

    def save(self, call: Call, module: nn.Module, args: tuple, output: Tensor, params: frozenset[str]) -> None:
        if module.padding_mode != "zeros":
            raise NotImplementedError("dpft: ConvTranspose with padding_mode != 'zeros'")
        super().save(call, module, args, output, params)


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
