"""Row restriction (SPARTA): only selected rows of a weight train.

A *row* is an output feature: dim 0 of ``nn.Linear`` / ``nn.Conv*d`` /
``nn.Embedding`` weights (output channels, vocabulary rows) and dim 1 of
transformers' ``Conv1D`` weight (stored as (in, out)).  Unselected rows take
no part in per-example norms, get no noise and never change.  For factored
contributions the work shrinks with the selection: the output-gradient
columns of the selected rows alone enter the norms and the clipped sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

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

    @property
    def count(self) -> int:
        """Number of selected rows."""
        return len(self.index)

    def compact_shape(self, shape: torch.Size | tuple[int, ...]) -> torch.Size:
        """``shape`` with the row dimension cut down to the selected rows."""
        out = list(shape)
        out[self.dim] = self.count
        return torch.Size(out)

    def gather(self, full: Tensor) -> Tensor:
        """The selected rows of a full-size tensor (a new, compact tensor)."""
        return full.index_select(self.dim, self.index.to(full.device))

    def scatter(self, compact: Tensor, shape: torch.Size) -> Tensor:
        """Place a compact (selected rows only) tensor into a zero tensor of ``shape``."""
        full = torch.zeros(shape, dtype=compact.dtype, device=compact.device)
        return full.index_copy_(self.dim, self.index.to(compact.device), compact)


def select_last(t: Tensor, index: Tensor) -> Tensor:
    """``t.index_select(-1, index)``, fast: the selection of output-gradient
    columns is on the sparse training path at every step, and torch's
    ``index_select`` along the last dimension of a 4-D tensor is up to ~30x
    slower (CPU) than the same selection on a 2-D view.  A contiguous ``t``
    is selected as a ``(rows, cols)`` matrix; a strided one (e.g. a
    convolution's channel-first output gradient seen as ``(B, T, 1, C)``)
    along its outermost-in-memory dimension."""
    k = len(index)
    if t.is_contiguous():
        return t.reshape(-1, t.shape[-1]).index_select(1, index).view(*t.shape[:-1], k)
    return t.movedim(-1, 0).index_select(0, index).movedim(0, -1)


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
    if compact and can_compact(c, rm) and rm.count == c.shape[rm.dim]:
        return c, True  # every row selected: nothing to cut (and no copy)
    if rm.dim == 0 and compact and c.groups == 1:
        sel = c.select_rows(rm.index)
        if sel is not None:
            return sel, True
    if type(c) is not Factored:  # a layer's lazy form: the generic one from here on
        c = Factored(right=c.right, shape=c.shape, left=c.left, ids=c.ids, num_rows=c.num_rows)
    idx = rm.index.to(c.right.device)
    shape = list(c.shape)
    shape[rm.dim] = len(idx)
    if rm.dim == 0:
        if c.groups == 1 and compact:
            return replace(c, left=select_last(c.left, idx), shape=torch.Size(shape)), True  # type: ignore[arg-type]
        g, p = c.groups, c.left.shape[3]  # type: ignore[union-attr]
        m = rm.mask.to(c.right.device).view(g, p).to(c.left.dtype)  # type: ignore[union-attr]
        return replace(c, left=c.left * m), False  # type: ignore[operator]
    if rm.dim == 1 and c.groups == 1 and len(c.shape) == 2:  # HF Conv1D: rows on the right factor
        if compact:
            return replace(c, right=select_last(c.right, idx), shape=torch.Size(shape)), True
        return replace(c, right=c.right * rm.mask.to(c.right.dtype)), False
    raise NotImplementedError(f"dpft: row restriction along dim {rm.dim} of a parameter of shape {tuple(c.shape)}")


# ---------------------------------------------------------------------------
# Where a restriction lives: shared by dpft.methods.sparta (which sets it) and
# the engine (which reads it), so that the engine imports no method.

#: the attribute of a restricted parameter holding its :class:`RowMask`
ATTR = "_dpft_rows"
#: the attribute of a compacted optimizer holding ``id(weight) -> twin`` (see dpft.sparta.RowCompact)
TWINS = "_dpft_twins"
#: the attribute of a module noting the masks of its restricted parameters (see :func:`reattach`)
REGISTRY = "_dpft_row_registry"


def reattach(model: nn.Module) -> None:
    """Give every restricted parameter of ``model`` its row mask back where a
    copy lost it (``copy.deepcopy`` of a model drops attributes of its
    Parameters; the owning modules keep a note of the masks)."""
    for module in model.modules():
        reg = module.__dict__.get(REGISTRY)
        if not reg:
            continue
        for local, rm in reg.items():
            p = module._parameters.get(local)
            if p is not None and not hasattr(p, ATTR):
                setattr(p, ATTR, rm if rm.mask.device == p.device else rm.to(p.device))


def row_masks(params: Mapping[str, nn.Parameter]) -> dict[str, RowMask]:
    """The row masks of the given parameters (those restricted)."""
    return {n: getattr(p, ATTR) for n, p in params.items() if hasattr(p, ATTR)}


def compact_rows(optimizer: torch.optim.Optimizer | None) -> dict[int, Tensor]:
    """``id(weight) -> compact row tensor`` for the weights ``optimizer`` holds
    compactly (empty for any other optimizer): those
    :func:`dpft.sparta.compact_optimizer` made, which hold the ``TWINS`` attribute."""
    twins = vars(optimizer).get(TWINS) if optimizer is not None else None
    return {k: t.rows for k, t in twins.items()} if twins else {}
