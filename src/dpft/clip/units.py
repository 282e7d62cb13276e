"""User-level privacy: clip the sum of each *user's* examples, not each example.

With ``PrivacyEngine(..., privacy_unit="user")`` the protected unit is a user
(a person, an author, a movie: any group of examples).  Every physical batch
comes with one user id per example (:meth:`dpft.PrivacyEngine.set_units`, or
the ``units`` that :func:`dpft.data.user_poisson_loader` yields beside each
batch).  Over all the backward passes of one step, each user's per-example
gradients are summed into that user's gradient ``G_u = sum_{i in u} g_i``;
at the step each ``G_u`` is clipped to ``R`` (any clipping function and
style: ``K`` groups at ``R / sqrt(K)`` each) and the clipped sums get noise
``sigma R`` as usual.  Adding or removing one user changes the noised sum by
at most ``R``, so the accountant's epsilon, at the *user* sampling rate, is
a guarantee for every user, whatever the number of their examples.

How: every trainable parameter's per-example gradient is instantiated
(:func:`dpft.clip.norms.instantiate`; the flat lane of DP-BiTFiT already holds it)
and scatter-added into a per-user accumulator of shape ``(users, *shape)``
right after each backward pass.  A user's examples may therefore be spread
over any number of physical batches of the step.  Memory: one float32 (or
float64) copy of the trainable parameters per user of the step, plus one
layer's ``(physical batch, *shape)`` per-example gradient at a time -- small
for DP-BiTFiT and LoRA; for full fine-tuning of a model with ``P`` trainable
parameters, ``4 * P`` bytes per sampled user.  Row-restricted weights
(SPARTA) keep their selected rows only.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..options import PRIVACY_UNITS  # noqa: F401 (the vocabulary lives in dpft.options)
from ..precision import full_fp32
from ..rows import can_compact, restrict
from ..rules.base import Contribution, Factored
from .clipped_sum import ClippedSum
from .functions import clip_factors
from .norms import acc_dtype_of, instantiate, row_sq_norms


def as_unit_list(units: Any) -> list[Hashable]:
    """User ids of one physical batch as a list of hashable values (a 1-D
    tensor, numpy array or sequence of ints / strings)."""
    if isinstance(units, Tensor):
        if units.dim() != 1:
            raise ValueError(f"set_units: user ids must be a 1-D tensor, got shape {tuple(units.shape)}")
        if units.is_floating_point() or units.is_complex():
            raise ValueError(f"set_units: user ids must be integers, got a {units.dtype} tensor")
        return units.tolist()
    if hasattr(units, "tolist") and hasattr(units, "ndim"):  # numpy
        if units.ndim != 1:
            raise ValueError(f"set_units: user ids must be 1-D, got shape {tuple(units.shape)}")
        return units.tolist()
    if isinstance(units, (str, bytes)) or not isinstance(units, Sequence):
        raise ValueError(f"set_units: user ids must be a sequence with one id per example, got {type(units).__name__}")
    out = list(units)
    for u in out:
        if not isinstance(u, Hashable) or isinstance(u, float):
            raise ValueError(f"set_units: a user id must be an int or a string, got {u!r}")
    return out


class UserClippedSum(ClippedSum):
    """:class:`dpft.clip.clipped_sum.ClippedSum` whose clipping unit is a user.

    :meth:`add` (one call per backward pass) scatter-adds the per-example
    gradients into per-user accumulators; :meth:`finalize` (once, at the
    step) clips each user's summed gradient and fills the sums the engine
    privatizes (``sums``, ``flat``, ``row_sums``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: list[Hashable] | None = None
        self._slots: dict[Hashable, int] = {}
        self._acc: dict[Any, Tensor] = {}  # param name or ("lane", names) -> (capacity, ...)
        self._compact: set[str] = set()  # row-restricted weights accumulated on their selected rows only
        self._cap = 0
        self._final = False

    # -- per step ------------------------------------------------------------
    def set_units(self, units: Any) -> None:
        """The user ids of the examples of the next backward pass."""
        self._pending = as_unit_list(units)

    @property
    def users(self) -> int:
        """Distinct users whose examples entered the step so far."""
        return len(self._slots)

    def reset(self) -> None:
        super().reset()
        self._slots = {}
        self._acc = {}
        self._compact = set()
        self._cap = 0
        self._final = False
        # ``_pending`` is kept: ids set for a batch whose backward is still to come

    def _slot_index(self, units: list[Hashable], device: torch.device) -> Tensor:
        slots = []
        for u in units:
            s = self._slots.get(u)
            if s is None:
                s = self._slots[u] = len(self._slots)
            slots.append(s)
        if len(self._slots) > self._cap:
            cap = max(len(self._slots), 2 * self._cap, 8)
            for key, t in self._acc.items():
                grown = torch.zeros((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
                grown[: self._cap] = t
                self._acc[key] = grown
            self._cap = cap
        return torch.tensor(slots, dtype=torch.long).to(device)

    def _scatter(self, key: Any, index: Tensor, g: Tensor) -> None:
        acc = self._acc.get(key)
        if acc is None:
            acc = self._acc[key] = torch.zeros((self._cap, *g.shape[1:]), dtype=g.dtype, device=g.device)
        acc.index_add_(0, index.to(acc.device), g.to(acc.dtype))

    def add(
        self,
        contributions: dict[str, list[Contribution]],
        batch_size: int,
        scale: float,
        lane: tuple[tuple[str, ...], Tensor] | None = None,
    ) -> None:
        units, self._pending = self._pending, None
        if units is None:
            raise RuntimeError(
                "dpft: privacy_unit='user' needs the user id of every example: call "
                "engine.set_units(user_ids) before each backward() (dpft.data.user_poisson_loader "
                "yields them beside each batch)"
            )
        if len(units) != batch_size:
            raise ValueError(
                f"dpft: engine.set_units got {len(units)} user ids for a backward pass over {batch_size} examples"
            )
        if self._final:
            raise RuntimeError(
                "dpft: a backward() after the step's clipped sums were taken; call step() or zero_grad() first"
            )
        if not contributions and lane is None:
            return
        with full_fp32(), torch.no_grad():
            self._add_user(contributions, units, scale, lane)

    def _add_user(
        self,
        contributions: dict[str, list[Contribution]],
        units: list[Hashable],
        scale: float,
        lane: tuple[tuple[str, ...], Tensor] | None,
    ) -> None:
        device = lane[1].device if lane is not None else self.params[next(iter(contributions))].device
        index = self._slot_index(units, device)
        if lane is not None:
            names, flat = lane
            self._scatter(("lane", names), index, flat * scale if scale != 1.0 else flat)
        for k in list(contributions):
            cs = contributions.pop(k)  # freed once accumulated
            p = self.params[k]
            rm = self.row_masks.get(k)
            if rm is not None:
                rm = self.row_masks[k] = rm.to(p.device)
                cmp = all(can_compact(c, rm) for c in cs)
                cs = [restrict(c, rm, cmp)[0] for c in cs]
                if cmp:
                    self._compact.add(k)
            dtype = acc_dtype_of(p.dtype)
            g = instantiate(cs[0], dtype)
            for c in cs[1:]:
                g = g + instantiate(c, dtype)
            for c in cs:
                if isinstance(c, Factored):
                    c.release()
            if scale != 1.0:
                g = g * scale
            self._scatter(k, index, g)
        self.backward_passes += 1

    def finalize(self) -> None:
        """Clip every user's summed gradient and fill the step's clipped sums
        (idempotent until :meth:`reset`)."""
        if self._final:
            return
        self._final = True
        if not self._acc:
            return
        with full_fp32(), torch.no_grad():
            self._finalize()

    def _finalize(self) -> None:
        n = len(self._slots)
        accs = {key: t[:n] for key, t in self._acc.items()}
        self._acc = {}
        double = any(t.dtype == torch.float64 for t in accs.values())
        norm_dtype = torch.float64 if double else torch.float32
        device = next(iter(accs.values())).device
        parts: list[Tensor] = []
        part_groups: list[int] = []
        sq_cols: Tensor | None = None
        col_groups: dict[Any, Tensor | None] = {}
        for key, t in accs.items():
            if isinstance(key, tuple):  # a flat lane bucket: (n, total)
                names = key[1]
                if self.num_groups == 1:
                    parts.append(row_sq_norms(t).to(norm_dtype).to(device))
                    part_groups.append(0)
                    col_groups[key] = None
                else:
                    cg = self._col_group(names, t.device)
                    if sq_cols is None:
                        sq_cols = torch.zeros(n, self.num_groups, dtype=norm_dtype, device=device)
                    sq_cols.index_add_(1, cg.to(device), t.pow(2).to(norm_dtype).to(device))
                    col_groups[key] = cg
            else:
                parts.append(row_sq_norms(t).to(norm_dtype).to(device))
                part_groups.append(self.group_of[key])
        sq = self._group_sums(parts, part_groups, sq_cols, n, norm_dtype, device)
        norms = sq.sqrt()  # (users, K)
        finite = torch.isfinite(norms).all(1)
        self.nonfinite = n - finite.sum()
        weights = clip_factors(norms, self.group_norm, self.clipping_fn)
        if self.drop_nonfinite:
            # a left-out user contributes zero, which any clipped gradient may
            weights = torch.where(finite.unsqueeze(1), weights, 0.0)
            accs = {key: t.nan_to_num(0.0, 0.0, 0.0) for key, t in accs.items()}
        for key, t in accs.items():
            w = weights.to(t.device, t.dtype)
            if isinstance(key, tuple):
                cg = col_groups[key]
                total = w[:, 0] @ t if cg is None else (t * w[:, cg]).sum(0)
                self.flat[key[1]] = total
                continue
            total = torch.tensordot(w[:, self.group_of[key]], t, dims=([0], [0]))
            rm = self.row_masks.get(key)
            if rm is None:
                self._accumulate(key, total)
            else:
                self.row_sums[key] = total if key in self._compact else rm.gather(total)
