"""The capture's refusals and self-checks.

What cannot be made private is refused in one line naming the module and the
fix (trainable BatchNorm, a parameter used outside its module, rows that are
not examples, a container parameter indexed instead of broadcast); in the
first backward passes every per-example sum is cross-checked against
autograd's own gradient (:meth:`SelfChecks._check_uses`).  The methods are a
mixin of :class:`dpft.capture.Capture`: they read the capture's state.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..clip import norms
from ..clip.norms import acc_dtype_of
from ..precision import full_fp32
from ..rules import Contribution, Direct
from ..rules.base import HALF, UnsupportedModuleError
from ..rules.fallback import _flat_tensors
from .autograd import _no_pull_back, _reachable_before_checkpoints, _saving_hooks_active

if TYPE_CHECKING:
    from .plan import Binding


class BatchNormError(TypeError):
    """BatchNorm in training mode mixes examples and cannot be made DP."""


BATCHNORM_MESSAGE = (
    "BatchNorm normalizes with statistics of the whole batch, so one example's output (and "
    "gradient) depends on the other examples: per-example clipping does not bound the "
    "sensitivity and the result is not differentially private. Replace it with GroupNorm: "
    "`model = dpft.convert_batchnorm_to_groupnorm(model)`, or keep BatchNorm frozen in eval "
    "mode (running statistics, no trainable BatchNorm parameters)."
)


#: random directions each gradient is projected on by the first passes' self-check
CHECK_PROJECTIONS = 3

_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Print:
    """A gradient reduced to its projections on fixed random directions
    (float64, ``(CHECK_PROJECTIONS,)``) and its norm."""

    proj: Tensor
    norm: Tensor
    half: bool


class UncheckedRowsWarning(UserWarning):
    """The model's output holds no batch-first tensor: the check that each
    layer's rows are examples cannot run (see ``SelfChecks._own_rows``)."""


def _model_tensors(output: Any) -> list[Tensor]:
    """The tensors of a model's output: those :func:`_flat_tensors` finds,
    and the tensor attributes of a plain object holding them."""
    flat = [t for t in _flat_tensors(output) if t is not None]
    if not flat and not isinstance(output, (Tensor, tuple, list, dict)) and hasattr(output, "__dict__"):
        flat = [v for v in vars(output).values() if isinstance(v, Tensor)]
    return flat


def _ignore_grad(b: Any, call: Any, grad: Tensor) -> None:
    """The hook of a call whose uses an enclosing module's recomputation covers."""


def _fingerprint(g: Tensor, key: str) -> _Print:
    """``g``'s projections on directions drawn from a generator seeded by the
    parameter's name (the same for autograd's gradient and dpft's sum), in
    chunks: a mismatch ``d`` shows as projections of size about ``|d|``.
    The directions are drawn in float32 (independent standard normal entries
    all the same, several times cheaper to draw than in float64) and promoted:
    the products and sums are float64, so the gradient loses no precision."""
    flat = g.detach().reshape(-1)
    gen = torch.Generator(device=flat.device)
    gen.manual_seed(zlib.crc32(key.encode()))
    proj = torch.zeros(CHECK_PROJECTIONS, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK].double()
        r = torch.randn(CHECK_PROJECTIONS, part.numel(), generator=gen, dtype=torch.float32, device=flat.device)
        proj += r.double() @ part
    return _Print(proj, torch.linalg.vector_norm(flat, dtype=torch.float64), g.dtype in HALF)


def _batch_first_leaves(output: Tensor, n: int) -> list[Tensor]:
    """The leaves of ``output``'s graph that require grad and are not
    parameters, with ``n`` rows: in a recomputation by reentrant
    checkpointing, the segment's inputs (detached from the rest of the graph)."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        leaf = getattr(node, "variable", None)
        if isinstance(leaf, Tensor):
            if not isinstance(leaf, torch.nn.Parameter) and leaf.ndim > 0 and leaf.shape[0] == n:
                found[id(leaf)] = leaf
            continue
        stack.extend(f for f, _ in node.next_functions)
    return list(found.values())


def _named(b: Binding, e: Exception) -> Exception:
    """``e`` as an error that names the module (dpft's own errors pass as they are)."""
    if isinstance(e, (UnsupportedModuleError, torch.OutOfMemoryError)) or str(e).startswith("dpft:"):
        return e
    return UnsupportedModuleError(
        f"dpft: module '{b.name}' ({type(b.module).__name__}): its per-example gradients could not be "
        f"computed ({type(e).__name__}: {e}). Freeze its parameters, or report this module to dpft."
    )


class SelfChecks:
    """The refusals and cross-checks of :class:`dpft.capture.Capture` (a mixin)."""

    def _mixed_use(self, b: Binding) -> None:
        """``b``'s layer ran on the batch and, in the same forward, on a tensor
        shared by the batch (DeBERTa with ``share_att_key``: query_proj on the
        relative position embeddings): the shared use's gradient can only come
        from an enclosing module's recomputation, which would count the batch
        use twice."""
        raise UnsupportedModuleError(
            f"dpft: module '{b.name}' ({type(b.module).__name__}) is applied both to the batch and, in the same "
            "forward, to a tensor shared by the whole batch (leading dimension 1, e.g. relative position "
            "embeddings); dpft cannot give each example its own gradient of the shared use without changing "
            "the shape the model's code sees. Freeze this module's parameters (e.g. train it with LoRA instead)."
        )

    def _rows_problem(self, b: Binding, x: Tensor, output: Tensor, n: int) -> str | None:
        """Verify that rows ``j*k .. (j+1)*k - 1`` of ``output`` belong to
        example ``j`` alone: either the layer's input ``x`` is a flat view of
        a contiguous batch-first tensor (token ids reshaped to ``(B*T,)``), or,
        pulled back to the nearest batch-first tensor before this layer
        (another hooked layer's output), a random gradient on those rows
        reaches example ``j`` and no other.  A time-major flattening
        (``(T*B, d)``) or windows mixing examples would be caught.  Only in
        the first backward passes' forwards; a few examples are probed.
        Returns what is wrong, or ``None``."""
        base = x._base
        if (
            base is not None
            and base.shape[0] == n
            and base.is_contiguous()
            and x.is_contiguous()
            and x.data_ptr() == base.data_ptr()
            and x.numel() == base.numel()
        ):
            return None
        if _saving_hooks_active():
            # a pull-back here would make non-reentrant checkpointing recompute
            # its region in the middle of the region's own forward
            return (
                f"dpft: module '{b.name}' ({type(b.module).__name__}) has {output.shape[0]} rows for {n} "
                "examples inside an activation-checkpointed region, where dpft can verify which rows are "
                "whose only if the layer's input is a flat view of a batch-first tensor; it will not guess. "
                "Keep the batch dimension first, checkpoint without this layer, or freeze it."
            )
        k = output.shape[0] // n
        probes = sorted({0, n - 1, n // 2})
        for anchor in reversed(self._anchors):
            for j in probes:
                cot = torch.zeros_like(output)
                # (from a generator of dpft's own: the model's RNG stream, which dropout
                # reads and the generic path replays, must not move)
                gen = torch.Generator(device=cot.device)
                gen.manual_seed(j)
                cot[j * k : (j + 1) * k] = torch.randn(
                    cot[j * k : (j + 1) * k].shape, generator=gen, dtype=cot.dtype, device=cot.device
                )
                with self._probing():  # (this pull-back must not reach dpft's own grad hooks)
                    (g,) = torch.autograd.grad(output, anchor, cot, retain_graph=True, allow_unused=True)
                if g is None:
                    break  # this anchor is not upstream of the layer: try an earlier one
                reached = g.detach().reshape(n, -1).ne(0).any(dim=1)
                reached[j] = False
                if bool(reached.any()):
                    return (
                        f"dpft: module '{b.name}' ({type(b.module).__name__}) has {output.shape[0]} rows for "
                        f"{n} examples, and rows {j * k}..{(j + 1) * k - 1} depend on other examples than "
                        f"example {j}: the rows are not flattened example by example, so dpft cannot tell "
                        "whose they are. Keep the batch dimension first, or freeze this module."
                    )
            else:
                return None
        return (
            f"dpft: module '{b.name}' ({type(b.module).__name__}) has {output.shape[0]} rows for {n} "
            "examples and no batch-first tensor before it to check which rows are whose; dpft will "
            "not guess. Keep the batch dimension first, or freeze this module."
        )

    def _own_rows(self, unverified: list[tuple[Binding, Tensor, Any]], output: Any) -> bool:
        """At the end of a forward where some outputs were taken as one row per
        example for the first time (the first passes, or a later batch whose
        size first equals a layer's leading dimension): verify that the
        outputs taken as one row per example (leading dimension equal to the
        batch size) are: a random gradient on example ``j``'s rows of the
        model's batch-first outputs, pulled back to them, must reach row ``j``
        alone.  A table shared by the batch, a layer run sequence-first or
        tokens routed from several examples whose count merely equals the
        batch size are caught (their per-example gradients would be silently
        wrong).  The verdict is kept per module.  A module whose rows are not
        examples is handed to the nearest enclosing module whose outputs are
        (its recomputation, the exact generic path, from this forward on:
        see :meth:`_take_over_now`), else refused, naming it.  Where the model
        returns no batch-first tensor (a loss only), or the graph holds a
        reentrant activation-checkpointed region, nothing can be verified
        here: returns False.  A compiled graph (the first passes run
        eagerly, see :mod:`dpft.compiled`: a later batch size) gets the first
        unverified module refused at the end of the backward pass (True: not
        trusted)."""
        outs = [t for t in _model_tensors(output) if t.requires_grad and t.ndim > 0]
        n = next((t.shape[0] for _, t, _ in unverified), 0)
        outs = [t for t in outs if t.shape[0] == n]
        kept, self._kept = self._kept, {}
        if not outs and n >= 2 and not self._warned_unchecked:
            self._warned_unchecked = True
            warnings.warn(
                "dpft: the model's forward returned no tensor with one row per example (only a scalar loss?), "
                "so dpft cannot check that each layer's rows are examples: a table shared by the batch or a "
                "sequence-first layer whose length equals the batch size would get wrong per-example gradients. "
                "Return the per-example outputs as well (e.g. `return loss, logits`).",
                UncheckedRowsWarning,
                stacklevel=2,
            )
        if not outs or n < 2:
            return False
        blocked = _no_pull_back(outs)
        if blocked == "torch.compile":
            # (the first passes run eagerly, see dpft.compiled: this is a later batch
            # whose size first equals these modules' leading dimension)
            b = next((b for b, _, _ in unverified if b.own is None), None)
            if b is not None:
                self._refusal = self._refusal or (
                    f"dpft: module '{b.name}' ({type(b.module).__name__}) returned {n} rows for a batch of {n} "
                    "examples, a batch size first met after the first steps, in a torch.compile'd forward, "
                    "where dpft cannot check that they are one row per example (a table shared by the batch "
                    "or a sequence-first layer whose length equals the batch size would get wrong per-example "
                    "gradients). This step's gradients were not used. Avoid that batch size, or run that "
                    "step uncompiled (torch.compiler.set_stance('force_eager'))."
                )
            return True  # (refused, not trusted: the next such batch is refused again)
        if blocked:
            # reentrant checkpointing: a pull-back cannot go through its regions,
            # but the modules downstream of every one of them can be checked
            nodes, leaves = _reachable_before_checkpoints(outs)

            def reachable(b: Binding, t: Tensor) -> bool:
                (target,) = self._small_params([(b, t, None)])
                if t.grad_fn is None or id(t.grad_fn) not in nodes:
                    return False
                return id(target) in leaves if target.grad_fn is None else id(target.grad_fn) in nodes

            unverified = [(b, t, c) for b, t, c in unverified if reachable(b, t)]
            if not unverified:
                return False
        try:
            wrong = self._reach_others([t for _, t, _ in unverified], outs, n, self._small_params(unverified))
        except RuntimeError:
            if not blocked:
                raise
            return False  # (a path to them goes through a reentrant region after all: as before, unchecked)
        for b, t, _ in unverified:
            r = wrong.get(id(t))
            if r is not None and not b.own:
                b.own = (
                    f"dpft: module '{b.name}' ({type(b.module).__name__}) returned {n} rows for a batch of "
                    f"{n} examples, but its row {r} feeds the output of another example than example {r}: they "
                    "are not one row per example (a table shared by the batch, a sequence-first layout, or "
                    "tokens of several examples whose count happens to equal the batch size), and dpft will "
                    "not guess whose they are. Keep the batch dimension first, use a batch size that differs "
                    "from that length, or freeze this module."
                )
        for b in {id(b): b for b, _, _ in unverified if b.own}.values():
            calls = [c for x, _, c in unverified if x is b]
            if (
                b.fallback
                or any(c is None for c in calls)
                # (a layer inside a non-reentrant checkpointed segment: its inputs went to
                # checkpoint's saved-tensor hooks, and the recomputation must save the same)
                or any("packed" in c.saved for c in calls)
                or any(self._holders.get(k, 0) > 1 for k in b.keys.values())
                or not self._take_over_now(b, kept, outs, n)
            ):
                # refused at the end of this backward pass, before any step: there the
                # generic path's own checks may name a module that mixes examples first
                self._refusal = self._refusal or b.own
                continue
            for c in calls:
                c.handler = _ignore_grad  # (the enclosing module's recomputation gives these uses' gradients)
        for b, _, _ in unverified:
            if b.own is None:
                b.own = ""
        return True

    @contextlib.contextmanager
    def _probing(self) -> Iterator[None]:
        """A pull-back of dpft's own: its grad hooks do nothing (``enabled``
        off), while a non-reentrant checkpointed region that it recomputes runs
        the forward hooks as the backward pass's recomputation does (the same
        tensors saved, which checkpoint checks), leaving no trace."""
        state = self.enabled, self._probe, self._outside_root
        self.enabled, self._probe = False, True
        try:
            yield
        finally:
            self.enabled, self._probe, self._outside_root = state

    def _small_params(self, unverified: list[tuple[Binding, Tensor, Any]]) -> list[Tensor]:
        """What :meth:`_reach_others` differentiates for ``unverified``: the
        smallest trainable parameter of each module, or the module's output
        where it has none that requires grad now or takes the generic path
        (whose substitution reads its parameters' gradients)."""
        found: dict[int, Tensor] = {}
        for b, t, _ in unverified:
            ps = [] if b.fallback else [self._param(k) for k in b.keys.values()]
            ps = [p for p in ps if isinstance(p, Tensor) and p.requires_grad]
            p = min(ps, key=lambda q: q.numel()) if ps else t
            found[id(p)] = p
        return list(found.values())

    def _reach_others(
        self, inputs: list[Tensor], outs: list[Tensor], n: int, via: list[Tensor] | None = None
    ) -> dict[int, int]:
        """Pull random gradients on the rows of a set ``S`` of examples of
        ``outs`` (the model's batch-first outputs) back to ``inputs``: those
        (by id) that get a non-zero gradient on a row ``r`` outside ``S`` (row
        ``r`` feeds another example's output than example ``r``'s), with that
        ``r``.  ``S`` runs over the examples whose index has bit ``k`` set, then
        those whose index has it clear, for every bit: a row ``r`` feeding
        example ``e != r`` is caught where ``e``'s and ``r``'s bits differ
        (2 * ceil(log2 n) pull-backs, in the first forward only).

        Each input's gradient is read by a hook as the pull-back passes it and
        dropped at once: the pull-back differentiates ``via`` (parameters of
        the modules that returned ``inputs``, so that autograd runs every node
        between ``outs`` and them; default ``inputs`` themselves), and holds no
        more than a backward pass does, not every input's gradient at once (a
        whole model's activations, under activation checkpointing too)."""
        inputs = list({id(t): t for t in inputs}.values())
        wrong: dict[int, int] = {}
        for bit in range(max(1, (n - 1).bit_length())):
            for side in (1, 0):
                rows = torch.tensor([(i >> bit) & 1 == side for i in range(n)])
                cots = []
                for i, o in enumerate(outs):
                    # (a generator of dpft's own: the model's RNG stream must not move)
                    gen = torch.Generator(device=o.device)
                    gen.manual_seed(1000 * bit + 10 * side + i)
                    cot = torch.randn(o.shape, generator=gen, dtype=o.dtype, device=o.device)
                    cots.append(cot * rows.to(o.device).view(n, *[1] * (o.ndim - 1)))
                del cot
                hits: dict[int, Tensor] = {}

                def tap(key: int, g: Tensor, hits: dict[int, Tensor] = hits) -> None:
                    # (non-finite values count as none: an example whose inputs are
                    # NaN gets 0 * NaN on its own rows, which says nothing of the others)
                    h = (g.ne(0) & g.isfinite()).reshape(n, -1).any(1)
                    hits[key] = h | hits[key] if key in hits else h

                handles = [
                    t.register_hook(partial(tap, id(t))) for t in inputs if t.requires_grad and id(t) not in wrong
                ]
                try:
                    with self._probing():  # (this pull-back must not reach dpft's own grad hooks)
                        torch.autograd.grad(outs, via or inputs, cots, retain_graph=True, allow_unused=True)
                finally:
                    for h in handles:
                        h.remove()
                del cots
                for key, h in hits.items():
                    hit = h & ~rows.to(h.device)
                    if bool(hit.any()):
                        wrong[key] = int(hit.nonzero()[0, 0])
        return wrong

    def _recomputed_rows_problem(self, b: Binding, output: Tensor, n: int) -> str:
        """A layer first seen in a recomputation by reentrant checkpointing
        (the forward ran without gradients): its output, ``n`` rows for a
        batch of ``n``, cannot be pulled back from the model's outputs.  It is
        checked against the recomputed segment's batch-first inputs instead:
        row ``j`` must depend on example ``j`` of them and on no other (a
        table shared by the batch depends on none, a sequence-first layer on
        all).  Returns the refusal, or "" when the rows are examples."""
        leaves = _batch_first_leaves(output, n)
        if not leaves:
            return self._not_examples(b, n, "its rows depend on no example's input")
        reached: Tensor | None = None
        for bit in range(max(1, (n - 1).bit_length())):
            for side in (1, 0):
                rows = torch.tensor([(i >> bit) & 1 == side for i in range(n)], device=output.device)
                gen = torch.Generator(device=output.device)
                gen.manual_seed(7919 * bit + side)
                cot = torch.randn(output.shape, generator=gen, dtype=output.dtype, device=output.device)
                cot = cot * rows.view(n, *[1] * (output.ndim - 1))
                with self._probing():
                    grads = torch.autograd.grad(output, leaves, cot, retain_graph=True, allow_unused=True)
                for g in grads:
                    if g is None:
                        continue
                    hit = (g.ne(0) & g.isfinite()).reshape(n, -1).any(1)
                    reached = hit & rows if reached is None else reached | (hit & rows)
                    if bool((hit & ~rows).any()):
                        return self._not_examples(b, n, "its rows depend on other examples than their own")
        if reached is None or not bool(reached.all()):
            return self._not_examples(b, n, "some of its rows depend on no example's input")
        return ""

    def _not_examples(self, b: Binding, n: int, why: str) -> str:
        return (
            f"dpft: module '{b.name}' ({type(b.module).__name__}) returned {n} rows for a batch of {n} examples "
            f"in a recomputation by reentrant activation checkpointing, but {why} (a table shared by the batch, "
            "a sequence-first layout, or rows whose count happens to equal the batch size); inside a reentrant "
            "region dpft cannot take them over. Use non-reentrant checkpointing (use_reentrant=False, "
            "Hugging Face's default), a batch size that differs from that length, or freeze this module."
        )

    def _check_expand(self, b: Binding, grad: Tensor) -> None:
        """A parameter held by a container is expanded over the batch during
        the container's forward, so that each example's use gets its own
        gradient.  If the container indexes its leading dimension instead of
        broadcasting it (``self.pos_embed[0]``), every example's gradient lands
        on example 0 and the per-example norms would be wrong (sensitivity up
        to 2R).  In the first backward passes, a gradient that reached example
        0 alone is refused."""
        nonzero = grad.detach().reshape(grad.shape[0], -1).ne(0).any(dim=1)
        if bool(nonzero[0]) and not bool(nonzero[1:].any()):
            (local,) = tuple(b.params)
            raise UnsupportedModuleError(
                f"dpft: parameter '{b.keys[local]}' of module '{b.name}' received the gradient of "
                f"every example through example 0 (the {grad.shape[0]} examples' uses should each get "
                f"their own): the module seems to index the parameter's leading dimension (e.g. "
                f"`self.{local}[0]`) instead of broadcasting it over the batch (e.g. `x + self.{local}`). "
                "dpft cannot tell the examples' gradients apart; broadcast it, or freeze it."
            )

    def _check_uses(self, out: dict[str, list[Contribution]], lane: Tensor | None, seen: set[str], n: int) -> None:
        """Catch uses of a trainable parameter that bypass its module's hooks
        (e.g. ``F.linear(x, other.weight)``): autograd delivered a gradient
        that dpft has no per-example account of.  In the first backward passes
        the per-example gradients of every parameter, summed over the
        examples, must also equal autograd's gradient (every contribution
        kind: biases, norm weights, embeddings, weight matrices): a rule that
        computed another function's gradient is caught before any step."""
        autograd, self._autograd = self._autograd, {}
        half, self._half = self._half, False
        early, self._early_prints = self._early_prints, {}  # (two-pass clipping's first pass)
        for key, want in autograd.items():
            cs = out.get(key)
            if cs is None and key not in seen and key not in early:
                raise UnsupportedModuleError(
                    f"dpft: parameter '{key}' received a gradient through a use that no dpft hook saw "
                    "(used functionally outside its module, or by a module that does not call it?  Or the "
                    "module's output is a view, e.g. a Linear's on 3-D input, changed in place afterwards: "
                    "make that operation out of place); its per-example gradient is unknown. Freeze it or "
                    "route the use through the module."
                )
            if want is None:
                continue
            if key in early and cs is None:
                mine = early[key]
            elif cs is None:
                off, numel = self.lane_offsets[key]
                ours = lane[:, off : off + numel].sum(0)  # type: ignore[index]
            elif all(isinstance(c, Direct) for c in cs):
                ours = sum(c.grad.sum(0) for c in cs)
            else:
                dt = acc_dtype_of(self._param(key).dtype)
                device = next(c.grad.device if isinstance(c, Direct) else c.right.device for c in cs)
                with full_fp32(), torch.no_grad():
                    ours = norms.weighted_sum(cs, torch.ones(n, dtype=dt, device=device), dt)
            if key not in early or cs is not None:
                mine = _fingerprint(ours, key)
            tol = 5e-2 if half or want.half else 1e-3
            # the projections of a difference d have norm about |d| sqrt(K)
            err = float((mine.proj - want.proj).norm()) / math.sqrt(CHECK_PROJECTIONS)
            scale = float(want.norm)
            if err > 3 * tol * scale + 1e-6 * (1 + float(mine.norm)):
                cpu_half = (half or want.half) and want.proj.device.type == "cpu"
                raise UnsupportedModuleError(
                    f"dpft: the per-example gradients of parameter '{key}' (module '{self.owner.get(key, '?')}'), "
                    f"summed over the examples, differ from autograd's gradient by about {err:.3g} (relative "
                    f"{err / max(scale, 1e-30):.3g}): the parameter is also used outside the module "
                    "dpft hooks for it, or that module computes something its per-example rule does not model. "
                    "Its per-example gradient would be wrong. Freeze it, or route every use through the module."
                    + (
                        " On a CPU in half precision autograd's own gradient can be this far off: PyTorch's CPU "
                        "LayerNorm backward sums its weight and bias gradients in bfloat16, which loses most "
                        "digits where the output gradient cancels (e.g. timm's Swin). Train in float32 on a CPU."
                        if cpu_half
                        else ""
                    )
                )

    def _refuse(self) -> None:
        """Raise the refusal :meth:`_own_rows` found in this pass's forward."""
        if self._refusal:
            message, self._refusal = self._refusal, ""
            raise UnsupportedModuleError(message)
