"""Clip and sum per-example gradients: from contributions to ``sum_i c_i g_i``.

Parameters whose contributions are all :class:`Direct` (biases, norm
weights, container parameters) are processed together: their per-example
gradients are concatenated into one ``(B, total)`` matrix, so norms, clip
factors and the weighted sum take a handful of kernels however many
parameters there are.  Factored parameters (weights) are processed one by
one with the ghost / instantiate choice of ``mode``.

:meth:`ClippedSum.add` runs the stages of one backward pass as named steps:
``_restrict_rows`` (SPARTA), ``_flat_buckets``, the squared norms
(``_bucket_norms``, ``_stack_norms`` for same-shaped layers, ``_layer_norms``),
``_group_sums``, ``_clip_weights`` (and the non-finite count), and the weighted
sums (``_sum_buckets``, ``_sum_stacks``, ``_sum_layers``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import stacked
from .functions import clip_factors
from .norms import HALF, HALF_SHRINK, GramCache, acc_dtype_of, cast, row_sq_norms, sq_norm, weighted_sum
from ..precision import full_fp32
from ..rows import RowMask, can_compact, restrict
from ..rules.base import Contribution, Direct, Factored, Instantiated


def _on(t: Tensor, device: torch.device) -> Tensor:
    """``t.to(device)`` without the call when ``t`` is already there."""
    return t if t.device == device else t.to(device)


def _zero_nonfinite(flat: Tensor, owned: bool) -> Tensor:
    """``flat`` with NaN/Inf entries set to 0 (in place if the buffer is the engine's own)."""
    return flat.nan_to_num_(0.0, 0.0, 0.0) if owned else flat.nan_to_num(0.0, 0.0, 0.0)


class ClippedSum:
    """Accumulates ``sum_i c_i g_i`` over the backward passes of one step."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        groups: Sequence[Sequence[str]],
        max_grad_norm: float,
        clipping_fn: str,
        mode: str,
        row_masks: dict[str, RowMask] | None = None,
    ) -> None:
        self.params = params
        self.row_masks = row_masks or {}
        self.names = list(params)
        self.group_of = {n: gi for gi, g in enumerate(groups) for n in g}
        self.num_groups = len(groups)
        self.group_norm = max_grad_norm / math.sqrt(self.num_groups)
        self.clipping_fn = clipping_fn
        #: (norms, max_norm, fn) -> per-example factors; per instance, so that an audit can plant
        #: a bug (no clipping) in one engine without touching the rest of the process
        self.clip_factors = clip_factors
        self.mode = mode
        self.sums: dict[str, Tensor] = {}
        # row-restricted weights (SPARTA): the sums of their selected rows only (rows along the mask's dim)
        self.row_sums: dict[str, Tensor] = {}
        self.flat: dict[tuple[str, ...], Tensor] = {}  # Direct parameters, concatenated
        self.backward_passes = 0
        # the number of examples of this step whose gradient was NaN/Inf (a device scalar)
        self.nonfinite: Tensor | None = None
        # True: such examples are left out of the sum on the device (their clip
        # factor is 0 and their gradient is zeroed), so the step never has to
        # wait for the flag; False: the engine refuses the whole step.  Only
        # the flat per-example buckets can be cleaned this cheaply; the engine
        # sets it when every trainable parameter is in one (DP-BiTFiT).
        self.drop_nonfinite = False
        # on CUDA the flag is also copied to pinned host memory as soon as it
        # is known, so that the step can wait for just that point of the
        # stream (not for the clipped sums queued after it)
        self._flag_host: Tensor | None = None
        self._flag_event: Any = None
        self._col_groups: dict[tuple[str, ...], Tensor] = {}
        self._split_meta: dict[tuple[str, ...], tuple] = {}
        self._part_index: dict[tuple, Tensor] = {}

    def nonfinite_now(self) -> bool:
        """Whether a per-example gradient of this step was NaN/Inf.  Waits
        for the device only up to the point where the flag was computed."""
        if self.nonfinite is None:
            return False
        if self._flag_event is not None:
            self._flag_event.synchronize()
            return bool(self._flag_host)
        return bool(self.nonfinite)

    def take_flag(self) -> tuple[Tensor, Any] | None:
        """This step's count of non-finite examples, as ``(tensor, event)``:
        read the tensor once ``event`` (``None`` on CPU) has completed.  The
        next step gets fresh buffers, so reading it later never waits."""
        if self.nonfinite is None:
            return None
        out = (self._flag_host, self._flag_event) if self._flag_event is not None else (self.nonfinite, None)
        self._flag_host = None
        return out

    def reset(self) -> None:
        self.sums = {}
        self.row_sums = {}
        self.flat = {}
        self.nonfinite = None
        self._flag_event = None
        self.backward_passes = 0

    def layout(self) -> tuple[list[tuple[tuple[str, ...], Tensor]], dict[str, Tensor]]:
        """The accumulated sums as flat buckets (each parameter in at most one)
        and per-parameter tensors (without the selected-row sums of
        row-restricted weights: those are in :attr:`row_sums`)."""
        seen: dict[str, int] = {}
        for names in self.flat:
            for k in names:
                seen[k] = seen.get(k, 0) + 1
        flats, per_param = [], dict(self.sums)
        for names, flat in self.flat.items():
            if any(seen[k] > 1 or k in self.sums for k in names):
                for k, view in self._split(names, flat):
                    per_param[k] = per_param[k] + view if k in per_param else view
            else:
                flats.append((names, flat))
        return flats, per_param

    def totals(self) -> dict[str, Tensor]:
        """The accumulated clipped sum of every parameter seen so far (full-size:
        the unselected rows of row-restricted weights are zero)."""
        flats, per_param = self.layout()
        out = dict(per_param)
        for names, flat in flats:
            out.update(self._split(names, flat))
        for k, rows in self.row_sums.items():
            full = self.row_masks[k].scatter(rows, self.params[k].shape)
            out[k] = out[k] + full if k in out else full
        return out

    def _split(self, names: tuple[str, ...], flat: Tensor):
        meta = self._split_meta.get(names)
        if meta is None:
            sizes = [self.params[k].numel() for k in names]
            shapes = [None if self.params[k].ndim == 1 else self.params[k].shape for k in names]
            meta = self._split_meta[names] = (sizes, shapes)
        sizes, shapes = meta
        # one call for all the views (a Python slice per parameter costs more)
        parts = flat.split(sizes)
        return [(k, t if shape is None else t.view(shape)) for k, t, shape in zip(names, parts, shapes)]

    def _col_group(self, names: tuple[str, ...], device: torch.device) -> Tensor:
        key = names
        if key not in self._col_groups:
            self._col_groups[key] = torch.cat(
                [torch.full((self.params[k].numel(),), self.group_of[k], dtype=torch.long) for k in names]
            ).to(device)
        return self._col_groups[key]

    def add(
        self,
        contributions: dict[str, list[Contribution]],
        batch_size: int,
        scale: float,
        lane: tuple[tuple[str, ...], Tensor] | None = None,
    ) -> None:
        """Clip the per-example gradients of one backward pass and add them.

        ``scale`` turns the captured gradients (of a mean loss) into
        per-example gradients: the physical batch size for ``mean``, 1 for ``sum``."""
        if not contributions and lane is None:
            return
        # per-example norms and clipped sums: never in TF32, never recorded by autograd
        with full_fp32(), torch.no_grad():
            self._add(contributions, batch_size, scale, lane)

    def _add(
        self,
        contributions: dict[str, list[Contribution]],
        batch_size: int,
        scale: float,
        lane: tuple[tuple[str, ...], Tensor] | None,
    ) -> None:
        """One backward pass, stage by stage: restrict rows, gather flat buckets,
        per-example norms (flat buckets, stacked layers, the other layers), clip
        weights, weighted sums (in the same three kinds)."""
        compact = self._restrict_rows(contributions)
        # norms in float64 if anything trains in float64 (the lane buffer already has that dtype)
        double = lane is not None and lane[1].dtype == torch.float64
        double = double or any(self.params[k].dtype == torch.float64 for k in contributions)
        device = lane[1].device if lane is not None else self.params[next(iter(contributions))].device
        norm_dtype = torch.float64 if double else torch.float32
        # squared norms: one column per flat bucket / factored parameter, summed
        # per group at the end (a few kernels in all, not an update per layer)
        parts: list[Tensor] = []
        part_groups: list[int] = []
        flats, factored = self._flat_buckets(contributions, batch_size, lane)
        sq_cols = self._bucket_norms(flats, parts, part_groups, batch_size, norm_dtype, device)
        stacks = self._stack_norms(contributions, factored, parts, part_groups, norm_dtype, device)
        if stacks:
            factored = [k for k in factored if k in contributions]
        inst = self._layer_norms(contributions, factored, parts, part_groups, norm_dtype, device)
        sq = self._group_sums(parts, part_groups, sq_cols, batch_size, norm_dtype, device)
        weights, flats = self._clip_weights(sq, scale, batch_size, flats)
        columns = weights.unbind(1) if factored or stacks else ()
        self._sum_buckets(flats, weights)
        self._sum_stacks(stacks, weights, columns)
        self._sum_layers(contributions, factored, inst, weights, columns, compact)
        self.backward_passes += 1

    def factors(
        self,
        contributions: dict[str, list[Contribution]],
        batch_size: int,
        scale: float,
        lane: tuple[tuple[str, ...], Tensor] | None,
        early: dict[str, Tensor],
    ) -> Tensor:
        """Two-pass clipping's first pass (:mod:`.two_pass`): the ``(B,)`` clip
        weights ``scale * c_i`` of one backward pass from per-example norms
        only (no sum is formed): of the contributions and the lane, as
        :meth:`add` takes them, and of ``early``, parameter -> ``(B,)``
        squared norms taken in the layers' backward hooks.  One clipping
        group only.  Counts the pass and the non-finite examples as :meth:`add` does."""
        if self.num_groups != 1:
            raise ValueError("two-pass clipping needs one clipping group (clipping_style='all-layer')")
        with full_fp32(), torch.no_grad():
            keys = [*contributions, *early] + list(lane[0] if lane is not None else ())
            double = any(self.params[k].dtype == torch.float64 for k in keys)
            norm_dtype = torch.float64 if double else torch.float32
            if lane is not None:
                device = lane[1].device
            elif contributions:
                device = self.params[next(iter(contributions))].device
            else:
                device = next(iter(early.values())).device
            parts: list[Tensor] = []
            part_groups: list[int] = []
            flats, factored = self._flat_buckets(contributions, batch_size, lane)
            sq_cols = self._bucket_norms(flats, parts, part_groups, batch_size, norm_dtype, device)
            if self._stack_norms(contributions, factored, parts, part_groups, norm_dtype, device):
                factored = [k for k in factored if k in contributions]
            self._layer_norms(contributions, factored, parts, part_groups, norm_dtype, device)
            contributions.clear()
            for s in early.values():
                parts.append(_on(cast(s, norm_dtype), device))
                part_groups.append(0)
            sq = self._group_sums(parts, part_groups, sq_cols, batch_size, norm_dtype, device)
            weights, _ = self._clip_weights(sq, scale, batch_size, flats)
        self.backward_passes += 1
        return weights[:, 0]

    def add_grad(self, k: str, grad: Tensor) -> None:
        """Two-pass clipping's second pass: autograd's gradient of parameter
        ``k``, which is already its clipped sum, added as it is (in the
        parameter's dtype, as autograd accumulates it)."""
        self._accumulate(k, grad)

    def add_flat(self, names: tuple[str, ...], total: int, where: tuple[int, int], grad: Tensor, dtype) -> None:
        """Two-pass clipping's second pass: autograd's gradient (the clipped
        sum) of a parameter that the usual path sums in the flat bucket
        ``names`` (the lane: ``total`` values, this one at ``where`` =
        (offset, numel)), added there, so that a step's layout, and so the
        noise each value draws from a seeded generator, is the usual path's."""
        flat = self.flat.get(names)
        if flat is None:
            flat = self.flat[names] = torch.zeros(total, dtype=dtype, device=grad.device)
        off, numel = where
        flat[off : off + numel] += grad.reshape(-1).to(dtype)

    def _restrict_rows(self, contributions: dict[str, list[Contribution]]) -> set[str]:
        """Row-restricted parameters (SPARTA): their contributions cut to the
        selected rows; returns those whose sums are compact (selected rows only)."""
        compact: set[str] = set()
        for k, rm in self.row_masks.items():
            if k in contributions:
                rm = self.row_masks[k] = rm.to(self.params[k].device)
                cmp = all(can_compact(c, rm) for c in contributions[k])
                contributions[k] = [restrict(c, rm, cmp)[0] for c in contributions[k]]
                if cmp:
                    compact.add(k)
        return compact

    def _flat_buckets(
        self,
        contributions: dict[str, list[Contribution]],
        batch_size: int,
        lane: tuple[tuple[str, ...], Tensor] | None,
    ) -> tuple[list[tuple[tuple[str, ...], Tensor, bool]], list[str]]:
        """The parameters with per-example gradients in hand (the lane, and the
        Direct-only ones concatenated per (device, dtype)) as ``(names, (B, n)
        gradients, whether the buffer is ours)``, and the other (factored) ones."""
        direct: dict[tuple, list[str]] = {}
        factored: list[str] = []
        for k, cs in contributions.items():
            if all(isinstance(c, Direct) and not isinstance(c, Instantiated) for c in cs):
                p = self.params[k]
                direct.setdefault((p.device, acc_dtype_of(p.dtype)), []).append(k)
            else:
                factored.append(k)
        buckets: list[tuple[tuple[str, ...], Tensor, bool]] = [(*lane, True)] if lane is not None else []
        for (dev, dtype), name_list in direct.items():
            names = tuple(name_list)
            cols = []
            for k in names:
                cs = contributions[k]
                g = cs[0].grad
                for c in cs[1:]:
                    g = g + c.grad
                cols.append(g.reshape(batch_size, -1).to(dtype))
            buckets.append((names, torch.cat(cols, dim=1), True) if len(cols) > 1 else (names, cols[0], False))
        return buckets, factored

    def _bucket_norms(
        self,
        buckets: list[tuple[tuple[str, ...], Tensor, bool]],
        parts: list[Tensor],
        part_groups: list[int],
        batch_size: int,
        norm_dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor | None:
        """Squared norms of the flat buckets: a part per bucket (one group), or
        the ``(B, K)`` sums of buckets that span several groups (returned).
        ``buckets`` become ``(names, gradients, column groups, ours)``."""
        sq_cols: Tensor | None = None
        for i, (names, flat, owned) in enumerate(buckets):
            col_group = None
            if self.num_groups == 1:
                parts.append(_on(cast(row_sq_norms(flat), norm_dtype), device))
                part_groups.append(0)
            else:
                col_group = self._col_group(names, flat.device)
                if sq_cols is None:
                    sq_cols = torch.zeros(batch_size, self.num_groups, dtype=norm_dtype, device=device)
                sq_cols.index_add_(1, col_group.to(device), flat.pow(2).to(norm_dtype).to(device))
            buckets[i] = (names, flat, col_group, owned)  # type: ignore[call-overload]
        return sq_cols

    def _stack_norms(
        self,
        contributions: dict[str, list[Contribution]],
        factored: list[str],
        parts: list[Tensor],
        part_groups: list[int],
        norm_dtype: torch.dtype,
        device: torch.device,
    ) -> list[tuple[stacked.Stack, list[int]]]:
        """Squared norms of same-shaped plain layers (not row-restricted), stacked
        (:mod:`.stacked`); returns the stacks with each layer's group."""
        stacks: list[tuple[stacked.Stack, list[int]]] = []
        plain = [k for k in factored if k not in self.row_masks]
        for names in stacked.plan(contributions, plain, self.mode):
            acc = acc_dtype_of(self.params[names[0]].dtype)
            for stack, sq_stack in stacked.norms(contributions, names, acc):
                gis = [self.group_of[k] for k in stack.names]
                parts.extend(_on(cast(sq_stack, norm_dtype), device).unbind(0))
                part_groups.extend(gis)
                stacks.append((stack, gis))
        return stacks

    def _layer_norms(
        self,
        contributions: dict[str, list[Contribution]],
        factored: list[str],
        parts: list[Tensor],
        part_groups: list[int],
        norm_dtype: torch.dtype,
        device: torch.device,
    ) -> dict[str, Tensor | None]:
        """Squared norms of the other factored parameters, one by one (ghost or
        instantiated, :func:`.norms.sq_norm`); returns the per-example gradients
        that were instantiated on the way (reused by the weighted sums)."""
        inst: dict[str, Tensor | None] = {}
        grams = GramCache([c for k in factored for c in contributions[k]]) if self.mode != "instantiate" else None
        for k in factored:
            p = self.params[k]
            s, g = sq_norm(contributions[k], self.mode, acc_dtype_of(p.dtype), grams)
            parts.append(_on(cast(s, norm_dtype), device))
            part_groups.append(self.group_of[k])
            inst[k] = g
        return inst

    def _clip_weights(self, sq: Tensor, scale: float, batch_size: int, flats: list) -> tuple[Tensor, list]:
        """The ``(B, K)`` clip weights from the per-group squared norms; counts
        the examples with a non-finite gradient (without a device sync) and,
        with ``drop_nonfinite``, leaves them out (weight and flat gradients zero)."""
        norms = sq.sqrt() * scale  # (B, K) per-example, per-group norms
        # a non-finite per-example gradient (NaN/Inf loss, overflow) must never
        # reach the parameters: counted here without a device sync; either the
        # example is left out below (drop_nonfinite) or the engine refuses the step
        finite = torch.isfinite(norms).all(1)
        bad = batch_size - finite.sum()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        if bad.is_cuda:
            if self._flag_host is None:
                self._flag_host = torch.zeros((), dtype=bad.dtype, pin_memory=True)
            self._flag_host.copy_(self.nonfinite, non_blocking=True)
            # on the stream that ran the copy: the flag's device, which need not be
            # the current device (a model spread over several GPUs in one process)
            self._flag_event = torch.cuda.Event()
            self._flag_event.record(torch.cuda.current_stream(bad.device))
        weights = self.clip_factors(norms, self.group_norm, self.clipping_fn) * scale  # (B, K)
        if self.drop_nonfinite:
            # a left-out example contributes zero, which any clipped gradient may: the sensitivity is unchanged
            weights = torch.where(finite.unsqueeze(1), weights, 0.0)
            return weights, [(names, _zero_nonfinite(flat, owned), cg) for names, flat, cg, owned in flats]
        return weights, [f[:3] for f in flats]

    def _sum_buckets(self, flats: list, weights: Tensor) -> None:
        """The weighted sums of the flat buckets (one product each)."""
        for names, flat, col_group in flats:
            w = weights.to(flat.device, flat.dtype)
            if col_group is None:
                total = w[:, 0] @ flat
            else:
                total = (flat * w[:, col_group]).sum(0)
            if names in self.flat:
                self.flat[names] += total
            else:
                self.flat[names] = total

    def _sum_stacks(
        self, stacks: list[tuple[stacked.Stack, list[int]]], weights: Tensor, columns: Sequence[Tensor]
    ) -> None:
        """The weighted sums of the stacked layers; the stacks are let go after."""
        for stack, gis in stacks:
            p = self.params[stack.names[0]]
            if all(g == gis[0] for g in gis):
                w = _on(columns[gis[0]], p.device)
            else:
                key = ("stack", tuple(gis), weights.device)
                idx = self._part_index.get(key)
                if idx is None:  # made once (a host-to-device copy would wait for the stream)
                    idx = self._part_index[key] = torch.tensor(gis, dtype=torch.long).to(weights.device)
                w = _on(weights.t()[idx], p.device)
            totals = stacked.weighted(stack, w, acc_dtype_of(p.dtype), HALF_SHRINK)
            for k, total in zip(stack.names, totals):
                self._accumulate(k, total)
        stacks.clear()

    def _sum_layers(
        self,
        contributions: dict[str, list[Contribution]],
        factored: list[str],
        inst: dict[str, Tensor | None],
        weights: Tensor,
        columns: Sequence[Tensor],
        compact: set[str],
    ) -> None:
        """The weighted sums of the other layers, one by one; each layer's
        activations and output gradients are let go once it is summed."""
        shrunk: Tensor | None = None  # weights * HALF_SHRINK, made once if a half-precision sum needs it
        for k in factored:
            p = self.params[k]
            gi = self.group_of[k]
            w = _on(columns[gi], p.device)
            cs = contributions.pop(k)  # this layer's activations and output gradients are freed once summed
            half = None
            # (``factor_dtype``: a lazy layer would rebuild released factors to answer ``right.dtype``)
            if any(isinstance(c, Factored) and c.factor_dtype in HALF for c in cs):
                if shrunk is None:
                    shrunk = weights * HALF_SHRINK
                half = _on(shrunk[:, gi], p.device)
            total = weighted_sum(cs, w, acc_dtype_of(p.dtype), inst.pop(k), shrunk=half)
            rm = self.row_masks.get(k)
            if rm is None:
                self._accumulate(k, total)
                continue
            # row-restricted: only the selected rows are kept (never a full-size sum)
            rows = total if k in compact else rm.gather(total)
            if k in self.row_sums:
                self.row_sums[k] += rows
            else:
                self.row_sums[k] = rows

    def _group_sums(
        self,
        parts: list[Tensor],
        part_groups: list[int],
        sq_cols: Tensor | None,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        """``(B, K)`` per-group squared norms from per-column ``(B,)`` parts."""
        if not parts:
            return (
                sq_cols if sq_cols is not None else torch.zeros(batch_size, self.num_groups, dtype=dtype, device=device)
            )
        columns = torch.stack(parts, dim=1) if len(parts) > 1 else parts[0].unsqueeze(1)
        if self.num_groups == 1:
            sq = columns.sum(1, keepdim=True) if len(parts) > 1 else columns
        else:
            key = tuple(part_groups)
            idx = self._part_index.get((key, device))
            if idx is None:
                idx = self._part_index[(key, device)] = torch.tensor(part_groups, dtype=torch.long).to(device)
            sq = torch.zeros(batch_size, self.num_groups, dtype=dtype, device=device).index_add_(1, idx, columns)
        return sq + sq_cols if sq_cols is not None else sq

    def _accumulate(self, k: str, value: Tensor) -> None:
        if k in self.sums:
            self.sums[k] += value
        else:
            self.sums[k] = value  # always a fresh tensor (or a view of one): no copy needed
