"""Rules for normalization layers with an affine part ``y = x_hat * w + b``:
LayerNorm (also channel-first subclasses such as timm's LayerNorm2d),
GroupNorm, InstanceNorm*d and RMSNorm (torch's and transformers' Llama/T5/...
variants).  Bias gradient: the output gradient summed over positions; weight
gradient: ``sum_t b_t * x_hat_t`` with ``x_hat`` recomputed from the saved input
(GroupNorm: from the input and the group statistics of the forward pass)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Contribution, Direct, Rule, reduce_into
from .linear import acc_dtype


def _reduce(prod: Tensor, dims: tuple[int, ...]) -> Tensor:
    if not dims:
        return prod.to(acc_dtype(prod))
    return prod.sum(dim=dims, dtype=acc_dtype(prod))


class _AffineNormRule(Rule):
    handles = ("weight", "bias")
    eager = ("weight", "bias")
    skip_weight_grad = False

    def reduce_dims(self, call: Call, grad: Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def normalized(self, call: Call) -> Tensor:
        raise NotImplementedError

    def pair(self, call: Call, grad: Tensor) -> tuple[Tensor, Tensor] | None:
        """The per-example weight and bias gradients ``(B, C)`` in one pass,
        where the layer has such a shortcut (else ``None``)."""
        return None

    def _pair(self, call: Call, grad: Tensor) -> tuple[Tensor, Tensor] | None:
        """:meth:`pair`, computed once per call (the weight and the bias ask)."""
        saved = call.saved
        p = saved.get("pair")
        if p is None and "moments" in saved:
            p = saved["pair"] = self.pair(call, grad) or ()
        return p or None

    def on_grad(self, call: Call, grad: Tensor, params: frozenset[str]) -> None:
        dims = self.reduce_dims(call, grad)
        p = self._pair(call, grad) if "weight" in params else None
        if "bias" in params:
            call.results["bias"] = p[1] if p else _reduce(grad, dims)
        if "weight" in params:
            if p:
                w = p[0]
            else:
                xhat = self.normalized(call)
                dt = torch.promote_types(grad.dtype, xhat.dtype)
                w = _reduce(grad.to(dt) * xhat.to(dt), dims)
            call.results["weight"] = w
            self.done(call)  # reduced eagerly: the input is no longer needed

    def contributions(self, call: Call, params: frozenset[str]) -> dict[str, Contribution]:
        return {name: Direct(call.results[name]) for name in params}

    def eager_into(self, call: Call, grad: Tensor, name: str, out: Tensor, accumulate: bool) -> None:
        saved = call.saved
        p = self._pair(call, grad) if "moments" in saved else None
        if p:
            reduce_into(p[0] if name == "weight" else p[1], (), out, accumulate)
            return
        dims = saved.get("dims")  # the same for the weight and the bias of one call
        if dims is None:
            dims = saved["dims"] = self.reduce_dims(call, grad)
        if name == "bias":
            if accumulate or not dims or out.ndim != grad.ndim - len(dims):
                reduce_into(grad, dims, out, accumulate)
            else:  # the common case, without reduce_into's checks (this runs per layer and step)
                torch.sum(grad, dim=dims, dtype=out.dtype, out=out)
            return
        xhat = self.normalized(call)
        dt = torch.promote_types(grad.dtype, xhat.dtype)
        reduce_into(grad.to(dt) * xhat.to(dt), dims, out, accumulate)

    def done(self, call: Call) -> None:
        call.saved.pop("input", None)
        call.saved.pop("stats", None)
        call.saved.pop("moments", None)
        call.saved.pop("pair", None)
        call.versions = ()


class LayerNormRule(_AffineNormRule):
    """``nn.LayerNorm`` and subclasses.  Normalized dims are the trailing ones
    (the usual layout) or, for a 1-d normalized shape, dim 1 (channel-first
    subclasses like timm's ``LayerNorm2d``)."""

    def save(self, call: Call, module: nn.Module, args: tuple, output: Tensor, params: frozenset[str]) -> None:
        if "weight" in params:
            call.save_input("input", args[0])

    def rows_ok(self, module: nn.Module, x: Tensor) -> bool:
        shape = tuple(module.normalized_shape)
        return x.ndim > len(shape) and tuple(x.shape[-len(shape) :]) == shape

    def reduce_dims(self, call: Call, grad: Tensor) -> tuple[int, ...]:
        shape = tuple(call.module.normalized_shape)
        k = len(shape)
        if tuple(grad.shape[-k:]) == shape:
            call.saved["layout"] = "last"
            return tuple(range(1, grad.ndim - k))
        if k == 1 and grad.ndim > 2 and grad.shape[1] == shape[0]:
            call.saved["layout"] = "first"
            return tuple(range(2, grad.ndim))
        raise RuntimeError(f"dpft: cannot locate normalized dims {shape} in LayerNorm output {tuple(grad.shape)}")

    def normalized(self, call: Call) -> Tensor:
        m = call.module
        x = call.saved["input"]
        if call.saved["layout"] == "first":
            xt = x.movedim(1, -1)
            return F.layer_norm(xt, m.normalized_shape, None, None, m.eps).movedim(-1, 1)
        if x.is_contiguous():
            # the ATen operator itself (F.layer_norm's Python-side checks cost host time)
            return torch.native_layer_norm(x, m.normalized_shape, None, None, m.eps)[0]
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)


#: ones per (dtype, device), grown as needed: the weight argument of
#: ``native_group_norm_backward`` (it needs one; the sums asked for do not read it)
_ONES: dict[tuple, Tensor] = {}


def _ones(size: int, like: Tensor) -> Tensor:
    key = (like.dtype, like.device)
    ones = _ONES.get(key)
    if ones is None or ones.numel() < size:
        ones = _ONES[key] = torch.ones(
            max(size, 2 * (0 if ones is None else ones.numel())), dtype=like.dtype, device=like.device
        )
    return ones[:size]


class GroupNormRule(_AffineNormRule):
    """``nn.GroupNorm``.  Where the weight trains, both per-example gradients
    come from one call of PyTorch's own GroupNorm backward kernel with the
    batch folded into the channels (``N = 1``, ``C = B*C``, ``B*G`` groups):
    its weight and bias gradients are then per example and channel.  It
    reads the output gradient and the input once, with the group means and
    inverse standard deviations that the forward pass saved for autograd,
    instead of recomputing the normalized input (two more reads of the
    input, a temporary as large written and read) and summing the output
    gradient a second time for the bias."""

    def save(self, call: Call, module: nn.Module, args: tuple, output: Tensor, params: frozenset[str]) -> None:
        super().save(call, module, args, output, params)
        if "weight" in params:
            node = output.grad_fn
            if node is not None and type(node).__name__ == "NativeGroupNormBackward0":
                try:
                    call.saved["moments"] = (node._saved_result1, node._saved_result2)
                except (AttributeError, RuntimeError):  # pragma: no cover - another autograd
                    pass

    def pair(self, call: Call, grad: Tensor) -> tuple[Tensor, Tensor] | None:
        mean, rstd = call.saved["moments"]
        x = call.saved.get("input")
        if (
            x is None
            or x.shape != grad.shape
            or x.dtype != grad.dtype
            or x.ndim < 3
            or grad.dtype not in (torch.float32, torch.float64)
            or not (x.is_contiguous() and grad.is_contiguous())
        ):
            return None
        n, c = grad.shape[:2]
        groups = call.module.num_groups
        if mean.shape != (n, groups) or mean.dtype != grad.dtype:
            return None
        _, w, b = torch.ops.aten.native_group_norm_backward(
            grad, x, mean, rstd, _ones(n * c, grad), 1, n * c, grad.numel() // (n * c), n * groups, [False, True, True]
        )
        return w.view(n, c), b.view(n, c)

    def reduce_dims(self, call: Call, grad: Tensor) -> tuple[int, ...]:
        return tuple(range(2, grad.ndim))

    def normalized(self, call: Call) -> Tensor:
        m = call.module
        x = call.saved["input"]
        if x.ndim < 3:
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        # the ATen operator itself: F.group_norm's Python-side checks cost more
        # host time than the kernel launch (ResNets are host-bound on fast GPUs)
        n, c = x.shape[:2]
        hw = math.prod(x.shape[2:])
        if not (x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))):
            x = x.contiguous()  # the operator takes either layout as it is, nothing else
        return torch.native_group_norm(x, None, None, n, c, hw, m.num_groups, m.eps)[0]


class InstanceNormRule(_AffineNormRule):
    def needs_save(self, module: nn.Module, params: frozenset[str]) -> bool:
        return True

    def reduce_dims(self, call: Call, grad: Tensor) -> tuple[int, ...]:
        return tuple(range(2, grad.ndim))

    def save(self, call: Call, module: nn.Module, args: tuple, output: Tensor, params: frozenset[str]) -> None:
        if args[0].ndim == len(module.weight.shape) + 1 and args[0].ndim < 3:
            raise RuntimeError("dpft: unbatched input to InstanceNorm is not supported")
        call.saved["use_input_stats"] = module.training or not module.track_running_stats
        if "weight" in params:
            call.save_input("input", args[0])
            if not call.saved["use_input_stats"]:
                call.saved["stats"] = (module.running_mean.clone(), module.running_var.clone())

    def normalized(self, call: Call) -> Tensor:
        m = call.module
        x = call.saved["input"]
        if call.saved["use_input_stats"]:
            return F.instance_norm(x, None, None, None, None, True, 0.0, m.eps)
        mean, var = call.saved["stats"]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + m.eps)


class RMSNormRule(_AffineNormRule):
    """torch's ``nn.RMSNorm`` and transformers' RMSNorm variants (Llama, T5,
    Mistral, Qwen, Gemma's ``1 + w`` form: the gradient w.r.t. ``w`` is the same)."""

    def save(self, call: Call, module: nn.Module, args: tuple, output: Tensor, params: frozenset[str]) -> None:
        if "weight" in params:
            call.save_input("input", args[0])

    def rows_ok(self, module: nn.Module, x: Tensor) -> bool:
        k = module.weight.ndim
        return x.ndim > k and tuple(x.shape[-k:]) == tuple(module.weight.shape)

    def reduce_dims(self, call: Call, grad: Tensor) -> tuple[int, ...]:
        k = call.module.weight.ndim
        return tuple(range(1, grad.ndim - k))

    def normalized(self, call: Call) -> Tensor:
        m = call.module
        x = call.saved["input"]
        if isinstance(m, getattr(nn, "RMSNorm", ())):
            return F.rms_norm(x, m.normalized_shape, None, m.eps)
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
        xf = x.to(torch.float32) if x.dtype != torch.float64 else x
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return xhat.to(x.dtype)


def is_hf_rmsnorm(module: nn.Module) -> bool:
    """transformers' RMSNorm-style modules (LlamaRMSNorm, T5LayerNorm, ...),
    recognized by name and attributes since each model defines its own class."""
    name = type(module).__name__
    if not (name.endswith("RMSNorm") or name == "T5LayerNorm"):
        return False
    return hasattr(module, "weight") and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))


INSTANCE_NORM_TYPES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
