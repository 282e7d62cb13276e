"""Row restriction (SPARTA): only selected rows of a weight train.

A *row* is an output feature: dim 0 of ``nn.Linear`` / ``nn.Conv*d`` /
``nn.Embedding`` weights (output channels, vocabulary rows) and dim 1 of
transformers' ``Conv1D`` weight (stored as (in, out)).  Unselected rows take
no part in per-example norms, get no noise and never change.  For factored
contributions the work shrinks with the selection: the output-gradient
columns of the selected rows alone enter the norms and the clipped sum.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .rules.base import Contribution, Direct, Factored


@dataclass
class RowMask:
    """A boolean mask over the rows (``dim``) of one parameter."""

    mask: Tensor  # bool, (rows,)
    dim: int

    def __post_init__(self) -> None:
        self.index = self.mask.nonzero().flatten()
        self.unselected = (~self.mask).nonzero().flatten()

    def to(self, device: torch.device) -> "RowMask":
        if self.mask.device == device:
            return self
        return RowMask(self.mask.to(device), self.dim)

    def view_for(self, t: Tensor, offset: int = 0) -> Tensor:
        """The mask shaped to broadcast over ``t`` along ``dim + offset``."""
        shape = [1] * t.ndim
        shape[self.dim + offset] = -1
        return self.mask.view(shape).to(t.dtype)

    def scatter(self, compact: Tensor, shape: torch.Size) -> Tensor:
        """Place a compact (selected rows only) tensor into a zero tensor of ``shape``."""
        full = torch.zeros(shape, dtype=compact.dtype, device=compact.device)
        return full.index_copy_(self.dim, self.index.to(compact.device), compact)


def can_compact(c: Contribution, rm: RowMask) -> bool:
    """Whether :func:`restrict` can drop the unselected rows (not just zero them)."""
    if isinstance(c, Direct) or c.ids is not None:
        return False
    if rm.dim == 0:
        return c.groups == 1
    return rm.dim == 1 and c.groups == 1 and len(c.shape) == 2


def restrict(c: Contribution, rm: RowMask, compact: bool = True) -> tuple[Contribution, bool]:
    """The contribution of the selected rows only; the flag says whether it is
    compact (to be scattered back with :meth:`RowMask.scatter`) rather than
    zeroed on the unselected rows."""
    if isinstance(c, Direct):
        return Direct(c.grad * rm.view_for(c.grad, offset=1)), False
    if c.ids is not None:  # embedding: rows are token ids
        keep = rm.mask.to(c.ids.device)[c.ids].to(c.right.dtype)
        return replace(c, right=c.right * keep.view(*keep.shape, 1, 1)), False
    idx = rm.index.to(c.right.device)
    shape = list(c.shape)
    shape[rm.dim] = len(idx)
    if rm.dim == 0:
        if c.groups == 1 and compact:
            return replace(c, left=c.left.index_select(3, idx), shape=torch.Size(shape)), True  # type: ignore[union-attr]
        g, p = c.groups, c.left.shape[3]  # type: ignore[union-attr]
        m = rm.mask.to(c.right.device).view(g, p).to(c.left.dtype)  # type: ignore[union-attr]
        return replace(c, left=c.left * m), False  # type: ignore[operator]
    if rm.dim == 1 and c.groups == 1 and len(c.shape) == 2:  # HF Conv1D: rows on the right factor
        if compact:
            return replace(c, right=c.right.index_select(3, idx), shape=torch.Size(shape)), True
        return replace(c, right=c.right * rm.mask.to(c.right.dtype)), False
    raise NotImplementedError(f"dpft: row restriction along dim {rm.dim} of a parameter of shape {tuple(c.shape)}")
