"""The functional operator behind each built-in rule, for subclasses that
override ``forward``.

A rule computes the per-example gradient of one operator: ``nn.Embedding``'s
rule that of ``F.embedding(ids, weight)``, ``nn.Linear``'s that of
``F.linear(x, weight, bias)``.  A subclass that overrides ``forward`` may do
more around that operator: Gemma scales the embedding by sqrt(hidden), BioGPT
and BART compute the position ids inside ``forward`` from other arguments,
timm's ``GroupNormAct`` applies an activation after the normalization, timm's
``LayerNorm2d`` permutes channels around it.  The module's output gradient is
then not the operator's output gradient, and its first argument is not the
operator's input: the rule would compute another function's gradient.

For such a module dpft watches its forward and catches the operator call
itself (a ``TorchFunctionMode``, see :class:`dpft.capture.Capture`): the rule
then sees the operator's own input and output, exactly as for the parent
class.  :data:`OPS` says, per operator, where its input, weight and bias are
and which of its arguments must equal the module attributes the rule reads;
a call whose arguments differ is refused instead of guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


def _tuple(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


@dataclass(frozen=True)
class OpSpec:
    """Where one functional operator takes its arguments.

    ``names``: its positional parameter names, in order.  ``check(module,
    bound)`` returns ``None`` when the call computes what the rule assumes
    from the module's attributes, else the first difference, in words."""

    names: tuple[str, ...]
    check: Callable[[nn.Module, dict[str, Any]], str | None]

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = dict(zip(self.names, args))
        bound.update(kwargs)
        return bound


def _same(what: str, got: Any, want: Any) -> str | None:
    return None if got == want else f"{what}={got!r} where the module has {want!r}"


def _check_linear(m: nn.Module, a: dict[str, Any]) -> str | None:
    return None


def _check_embedding(m: nn.Module, a: dict[str, Any]) -> str | None:
    pad = a.get("padding_idx")
    if pad is not None and pad < 0:
        pad += m.weight.shape[0]
    for what, got, want in (
        ("padding_idx", pad, m.padding_idx),
        ("max_norm", a.get("max_norm"), None),
        ("scale_grad_by_freq", bool(a.get("scale_grad_by_freq", False)), False),
        ("sparse", bool(a.get("sparse", False)), False),
    ):
        if (msg := _same(what, got, want)) is not None:
            return msg
    return None


def _check_layer_norm(m: nn.Module, a: dict[str, Any]) -> str | None:
    return _same("normalized_shape", tuple(a["normalized_shape"]), tuple(m.normalized_shape)) or _same(
        "eps", float(a.get("eps", 1e-5)), float(m.eps)
    )


def _check_group_norm(m: nn.Module, a: dict[str, Any]) -> str | None:
    return _same("num_groups", a["num_groups"], m.num_groups) or _same("eps", float(a.get("eps", 1e-5)), float(m.eps))


def _check_rms_norm(m: nn.Module, a: dict[str, Any]) -> str | None:
    eps = a.get("eps")
    return _same("normalized_shape", tuple(a["normalized_shape"]), tuple(m.normalized_shape)) or _same(
        "eps", eps, m.eps
    )


def _check_conv(m: nn.Module, a: dict[str, Any]) -> str | None:
    n = len(m.kernel_size)
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (the module pads before the operator)"
    pad = a.get("padding", 0)
    want_pad = m.padding if isinstance(m.padding, str) else _tuple(m.padding, n)
    got_pad = pad if isinstance(pad, str) else _tuple(pad, n)
    return (
        _same("stride", _tuple(a.get("stride", 1), n), _tuple(m.stride, n))
        or _same("padding", got_pad, want_pad)
        or _same("dilation", _tuple(a.get("dilation", 1), n), _tuple(m.dilation, n))
        or _same("groups", a.get("groups", 1), m.groups)
    )


_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

#: operator -> how to read it; keyed by the function object torch passes to
#: ``__torch_function__`` (for Python-level functionals, the function itself)
OPS: dict[Callable, OpSpec] = {
    F.linear: OpSpec(("input", "weight", "bias"), _check_linear),
    F.embedding: OpSpec(
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), _check_embedding
    ),
    F.layer_norm: OpSpec(("input", "normalized_shape", "weight", "bias", "eps"), _check_layer_norm),
    F.group_norm: OpSpec(("input", "num_groups", "weight", "bias", "eps"), _check_group_norm),
    F.conv1d: OpSpec(_CONV, _check_conv),
    F.conv2d: OpSpec(_CONV, _check_conv),
    F.conv3d: OpSpec(_CONV, _check_conv),
}
if hasattr(F, "rms_norm"):
    OPS[F.rms_norm] = OpSpec(("input", "normalized_shape", "weight", "eps"), _check_rms_norm)

#: which operators each parent class's rule computes
OPS_OF: dict[type, tuple[Callable, ...]] = {
    nn.Linear: (F.linear,),
    nn.Embedding: (F.embedding,),
    nn.LayerNorm: (F.layer_norm,),
    nn.GroupNorm: (F.group_norm,),
    nn.Conv1d: (F.conv1d,),
    nn.Conv2d: (F.conv2d,),
    nn.Conv3d: (F.conv3d,),
}
if hasattr(nn, "RMSNorm") and hasattr(F, "rms_norm"):
    OPS_OF[nn.RMSNorm] = (F.rms_norm,)

#: value-preserving conversions of a parameter that a forward may apply
#: before the operator (timm's Linear: ``self.weight.to(x.dtype)``); the
#: gradient of the converted tensor is the parameter's
CONVERSIONS = frozenset((Tensor.to, Tensor.type_as, Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16))


def overriding_parent(module: nn.Module) -> type | None:
    """The built-in parent class whose rule claims ``module`` when
    ``module``'s class overrides that parent's ``forward`` (the rule then
    sees only the parent's operator, caught inside the forward), else ``None``."""
    cls = type(module)
    for parent in cls.__mro__:
        if parent in OPS_OF:
            return parent if cls.forward is not parent.forward else None
    return None
