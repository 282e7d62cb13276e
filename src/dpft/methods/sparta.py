"""SPARTA (Makni et al. 2025): sparse DP fine-tuning of selected weight rows.

:func:`restrict` marks which rows of which weights train; the engine then
computes per-example norms and clipped sums from the selected rows only,
adds noise only to them, and keeps the other rows unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..rows import RowMask
from ..rules.linear import is_hf_conv1d

ATTR = "_dpft_rows"


def row_dim(module: nn.Module, local_name: str) -> int:
    """The dimension of ``module.<local_name>`` that indexes output features."""
    return 1 if is_hf_conv1d(module) and local_name == "weight" else 0


def restrict(model: nn.Module, masks: Mapping[str, Tensor]) -> list[str]:
    """Train only the rows selected by ``masks`` (parameter name -> bool mask
    over its rows) of the listed weights; sets ``requires_grad=True`` on them.

    Call before creating the :class:`dpft.PrivacyEngine`.  Rows are dim 0
    (output features / channels / vocabulary entries), except for
    transformers' ``Conv1D`` weights (stored (in, out)): dim 1.  Returns the
    names restricted."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    done = []
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"restrict: no parameter named {name!r} in the model")
        p = params[name]
        mod_name, _, local = name.rpartition(".")
        dim = row_dim(modules[mod_name], local)
        m = torch.as_tensor(mask)
        if m.dtype != torch.bool:
            raise ValueError(f"restrict: mask for {name!r} must be boolean, got {m.dtype}")
        if p.ndim == 0 or tuple(m.shape) != (p.shape[dim],):
            raise ValueError(
                f"restrict: mask for {name!r} must have shape ({p.shape[dim] if p.ndim else 0},) "
                f"(rows along dim {dim} of shape {tuple(p.shape)}), got {tuple(m.shape)}"
            )
        p.requires_grad_(True)
        setattr(p, ATTR, RowMask(m.to(p.device), dim))
        done.append(name)
    return done


def unrestrict(model: nn.Module) -> None:
    """Remove all row restrictions (the parameters stay trainable)."""
    for p in model.parameters():
        if hasattr(p, ATTR):
            delattr(p, ATTR)


def row_masks(params: Mapping[str, nn.Parameter]) -> dict[str, RowMask]:
    """The row masks of the given parameters (those restricted)."""
    return {n: getattr(p, ATTR) for n, p in params.items() if hasattr(p, ATTR)}
