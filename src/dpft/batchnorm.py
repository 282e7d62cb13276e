"""Replace BatchNorm (not DP: it mixes examples) by GroupNorm."""

from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def convert_batchnorm_to_groupnorm(model: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replace every ``BatchNorm*d`` in ``model`` by a ``GroupNorm`` over the
    same channels (``gcd(channels, max_groups)`` groups), in place; returns
    the model (or the new module if ``model`` itself is a BatchNorm).

    Affine parameters are copied; running statistics are dropped, so
    fine-tune after converting a pretrained BatchNorm network."""
    if isinstance(model, _BatchNorm):
        c = model.num_features
        gn = nn.GroupNorm(math.gcd(c, max_groups), c, eps=model.eps, affine=model.affine)
        if model.affine:
            gn.weight.data.copy_(model.weight.data)
            gn.bias.data.copy_(model.bias.data)
            gn.weight.requires_grad_(model.weight.requires_grad)
            gn.bias.requires_grad_(model.bias.requires_grad)
        return gn.to(device=model.weight.device if model.affine else None)
    for name, child in model.named_children():
        new = convert_batchnorm_to_groupnorm(child, max_groups)
        if new is not child:
            setattr(model, name, new)
    return model
