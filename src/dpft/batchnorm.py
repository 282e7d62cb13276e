"""Replace BatchNorm (not DP: it mixes examples) by GroupNorm, keeping the network.

Plain ``BatchNorm*d`` (and ``SyncBatchNorm``) layers become ``nn.GroupNorm``.
A BatchNorm subclass whose ``forward`` does more than normalise keeps that
extra computation: timm's ``BatchNormAct2d`` (normalise, then its ``drop`` and
``act`` submodules; efficientnet, regnet, ... use it for every activation)
becomes a :class:`GroupNormAct` holding the same ``drop`` and ``act`` modules.
Any other subclass that overrides ``forward`` is refused with an error naming
it, rather than silently dropping what its ``forward`` adds.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedParameter

# (module, qualified name) of the classes whose ``forward`` is "batch norm, then
# ``self.drop`` (if any), then ``self.act`` (if any)": timm's, found without importing timm
_KNOWN_NORM_ACT = {
    ("timm.layers.norm_act", "BatchNormAct2d"),
    ("timm.layers.norm_act", "SyncBatchNormAct"),
    ("timm.models.layers.norm_act", "BatchNormAct2d"),  # timm < 0.9
    ("timm.models.layers.norm_act", "SyncBatchNormAct"),
}
_REGISTERED_NORM_ACT: set[type] = set()
_PLAIN_FORWARDS = (_BatchNorm, nn.SyncBatchNorm)


class GroupNormAct(nn.GroupNorm):
    """``nn.GroupNorm`` followed by ``drop`` and then ``act``: what a BatchNorm
    with a fused activation (timm's ``BatchNormAct2d``) becomes.

    ``forward(x) = act(drop(group_norm(x, num_groups, weight, bias, eps)))``,
    the same computation as timm's ``GroupNormAct``.  The parameters keep
    their names (``weight``, ``bias``), and ``drop`` / ``act`` are the very
    submodules of the BatchNorm it replaces."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        drop: nn.Module | None = None,
        act: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def register_batchnorm_act(cls: type) -> type:
    """Declare that ``cls`` (a BatchNorm subclass with its own ``forward``)
    computes batch norm, then its ``drop`` submodule (if it has one), then its
    ``act`` submodule (if it has one), and nothing else, so that
    :func:`convert_batchnorm_to_groupnorm` turns it into a :class:`GroupNormAct`.
    timm's ``BatchNormAct2d`` is known without registering.  Returns ``cls``
    (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, _BatchNorm)):
        raise TypeError(f"register_batchnorm_act: {cls!r} is not a BatchNorm class")
    _REGISTERED_NORM_ACT.add(cls)
    return cls


def _forward_owner(cls: type) -> type:
    for c in cls.__mro__:
        if "forward" in c.__dict__:
            return c
    return nn.Module  # pragma: no cover - every module class has one


def _kind(module: _BatchNorm) -> str:
    """``"plain"`` (normalises only), ``"act"`` (normalise, drop, act) or ``"unknown"``."""
    owner = _forward_owner(type(module))
    if owner in _PLAIN_FORWARDS:
        return "plain"
    if owner in _REGISTERED_NORM_ACT or (owner.__module__, owner.__qualname__) in _KNOWN_NORM_ACT:
        return "act"
    return "unknown"


def _groupnorm_for(bn: _BatchNorm, max_groups: int) -> nn.GroupNorm:
    c = bn.num_features
    ref = bn.weight if bn.affine else bn.running_mean
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    groups = math.gcd(c, max_groups)
    if _kind(bn) == "act":
        drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
        new: nn.GroupNorm = GroupNormAct(groups, c, eps=bn.eps, affine=bn.affine, drop=drop, act=act, **factory)
    else:
        new = nn.GroupNorm(groups, c, eps=bn.eps, affine=bn.affine, **factory)
    if bn.affine:
        # the very parameters (values, dtype, device, requires_grad; an optimizer holding them still works)
        new.weight = bn.weight
        new.bias = bn.bias
    new.train(bn.training)
    return new


def convert_batchnorm_to_groupnorm(model: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm in ``model`` by a GroupNorm over the same
    channels (``gcd(channels, max_groups)`` groups), in place; returns the
    model (or the new module if ``model`` itself is a BatchNorm).

    * ``BatchNorm1d/2d/3d``, their lazy and ``SyncBatchNorm`` versions, and
      subclasses that keep their ``forward``: ``nn.GroupNorm``.
    * timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` (and classes declared
      with :func:`register_batchnorm_act`): :class:`GroupNormAct`, a GroupNorm
      subclass that applies the original ``drop`` and ``act`` submodules after
      normalising, so no activation is lost.
    * Any other BatchNorm subclass with its own ``forward``: ``TypeError``
      naming it, before anything changes (dpft cannot tell what that
      ``forward`` adds, and dropping it would silently change the network).

    The affine parameters are the BatchNorm's own (same tensors, dtype,
    device and ``requires_grad``); the new norms have the dtype and device of
    the BatchNorm they replace, and its train/eval mode.  Running statistics
    are dropped, so fine-tune after converting a pretrained BatchNorm network.
    A BatchNorm used at several places of the model becomes one GroupNorm
    used at the same places."""
    if max_groups < 1:
        raise ValueError(f"convert_batchnorm_to_groupnorm: max_groups must be >= 1, got {max_groups!r}")
    found = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, _BatchNorm)]
    for name, m in found:  # check them all before changing anything
        label = name or type(model).__name__
        if _kind(m) == "unknown":
            cls = type(m).__name__
            raise TypeError(
                f"convert_batchnorm_to_groupnorm: module '{label}' ({cls}, a BatchNorm subclass) has its own forward, "
                f"which may compute more than the normalisation; replacing it by a GroupNorm could silently change "
                f"the network. Replace it by hand, or, if its forward is batch norm then its `drop` and `act` "
                f"submodules, declare it: dpft.batchnorm.register_batchnorm_act({cls})"
            )
        if m.affine and isinstance(m.weight, UninitializedParameter):
            raise ValueError(
                f"convert_batchnorm_to_groupnorm: module '{label}' ({type(m).__name__}) is not "
                "initialised yet; run one forward pass before converting"
            )
    new: dict[int, nn.GroupNorm] = {}
    for name, m in found:
        gn = new.get(id(m))
        if gn is None:
            gn = new[id(m)] = _groupnorm_for(m, max_groups)
        if not name:
            return gn
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, gn)
    return model
