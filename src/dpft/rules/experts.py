"""Fused mixture-of-experts weights: per-example gradients as factored
contributions, verified against the generic path before they are used.

Current transformers hold a mixture of experts' weights in one module of
3-D parameters (``MixtralExperts``, ``Qwen2MoeExperts``, ``OlmoeExperts``
and the other classes decorated by ``use_experts_implementation``):
``gate_up_proj`` ``(E, 2I, H)`` (or ``up_proj``), ``down_proj`` ``(E, H, I)``,
called as ``experts(hidden_states (N, H), top_k_index (N, K), top_k_weights
(N, K))`` on the ``N = B*T`` token rows of the batch, each token sent to
``K`` experts.  The router (``gate``, e.g. ``MixtralTopKRouter``) is a
linear map of the same rows followed by a softmax and a top-k.

Both take the generic path (:mod:`dpft.rules.fallback`) by default, which
recomputes them example by example and builds each per-example gradient
densely (``B`` times every expert's weights).  Here, each pair (token,
chosen expert) contributes an outer product to its expert's slice of the
weight: for ``down_proj[e]`` the routing-weighted output gradient times the
expert's hidden activation, for ``gate_up_proj[e]`` the gradient at the
pre-activation times the token (the expert's MLP recomputed per expert, as
its non-private backward does).  The pairs are kept compact
(:class:`RoutedFactored`) and read as a :class:`~dpft.rules.base.Factored`
contribution with one group per expert and, per example, as many positions
as the example sent tokens to its most used expert (built only for the
norm), so norms take the ghost identity (or instantiation) and the clipped
sum is one weighted product per expert: no ``B x`` all-experts tensor.
Row ``r`` of the ``N`` rows belongs to example ``r // T`` (examples' rows
flattened example by example, which the capture verifies for the module's
output).  The router's weight gets ``sum_rows dlogits (x) x`` from the
gradient of its logits output (which includes what came back through the
routing weights computed from them).

These rules re-implement the module's arithmetic, so they are used only after
the first backward passes found them equal, example by example and
parameter by parameter, to the generic path's reference pull-back (which
those passes compute anyway); on any disagreement, error or unexpected
layout the module stays on the generic path for good.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import bmm_acc
from .base import HALF, Call, Contribution, Direct, Factored, LazyFactored
from .fallback import FallbackRule, _agree, _memo

#: half-precision clip weights shrunk by this factor before scaling a factor
#: (``dpft.clip.norms.HALF_SHRINK``, which the rules may not import): no
#: scaled entry exceeds its exact value
_HALF_SHRINK = 1 - 2.0**-7


class Verified:
    """What the first passes found for one module: whether the factored rule
    agreed with the reference, and how often each path ran (book-keeping for
    tests and for :meth:`dpft.PrivacyEngine.generic_path`'s readers)."""

    __slots__ = ("ok", "keys", "fast_calls", "reference_calls", "why_not")

    def __init__(self) -> None:
        #: ``None``: not compared yet; ``True``: agreed in every comparison; ``False``: never again
        self.ok: bool | None = None
        #: the call layouts (:meth:`_VerifiedRule.key`) on which it agreed
        self.keys: set[tuple] = set()
        self.fast_calls = 0
        self.reference_calls = 0
        #: why it was refused (an exception's message, or "disagreed with the reference")
        self.why_not = ""


_STATES: "weakref.WeakKeyDictionary[nn.Module, Verified]" = weakref.WeakKeyDictionary()


def verified(module: nn.Module) -> Verified:
    """The verification state of ``module`` (made on first use)."""
    state = _STATES.get(module)
    if state is None:
        state = _STATES[module] = Verified()
    return state


def example_of_rows(rows: int, n: int, device: torch.device) -> Tensor:
    """``(rows,)``: the example of each of a call's token rows (``n``
    examples' rows flattened example by example)."""
    return torch.arange(rows, device=device) // (rows // n)


class _VerifiedRule(FallbackRule):
    """A generic-path module with a faster factored computation of its
    per-example gradients (:meth:`fast`), used once the first passes found it
    equal to the reference."""

    eager: tuple[str, ...] = ()

    def key(self, call: Call) -> tuple | None:
        """The call's layout as far as :meth:`fast` reads it, or ``None`` where
        it does not apply (the reference runs)."""
        raise NotImplementedError

    def skips_autograd(self, module: nn.Module) -> bool:
        """Whether autograd may leave out the module's parameter gradients
        (book-keeping, after the first passes): neither this rule nor the
        reference it falls back to reads them, once the rule was verified."""
        return verified(module).ok is True

    def fast(self, call: Call, params: frozenset[str]) -> dict[str, Contribution]:
        """The contributions of ``params`` computed by the module's own arithmetic."""
        raise NotImplementedError

    def contributions(self, call: Call, params: frozenset[str]) -> dict[str, Contribution]:
        module = call.module
        state = verified(module)
        check = call.saved.get("check_mixing")
        key = self.key(call) if state.ok is not False else None
        if check is None:
            if state.ok and key is not None and key in state.keys:
                try:
                    with _amp(call):
                        out = self.fast(call, params)
                    state.fast_calls += 1
                    return out
                except Exception as e:  # (a shape the first passes did not meet: stay exact)
                    state.ok, state.why_not = False, f"{type(e).__name__}: {e}"
            state.reference_calls += 1
            return super().contributions(call, params)
        # the first passes: the reference, and the factored rule beside it
        call.saved.pop("check_mixing")
        names = sorted(params)
        named = dict(module.named_parameters(recurse=False))
        plist = [named[k] for k in names]
        amp = _amp(call)
        n = call.batch_size
        result, used = self._pulled_back(call, names, plist, n, 0, amp, check)
        state.reference_calls += 1
        if not result:
            return {}
        reference = dict(zip(names, result))
        agreed = False
        if key is not None:
            try:
                with amp:
                    mine = self.fast(call, params)
                half = call.saved.get("autocast") is not None
                agreed = set(mine) == set(names) and all(_agrees(mine[k], reference[k], half) for k in names)
                if not agreed:
                    state.why_not = "disagreed with the reference pull-back"
            except Exception as e:  # (an interface other than the one read here: stay exact)
                state.why_not = f"{type(e).__name__}: {e}"
        if agreed:
            state.ok = True
            state.keys.add(key)
        else:
            state.ok = False
            state.keys.clear()
            # the generic path's own faster computations, as FallbackRule's first passes try them
            memo = _memo(module, names)
            if memo.fast is not False:
                memo.verify(module, names, plist, call, used, result, n, 0, amp)
        return {k: Direct(g) for k, g in reference.items()}


class RoutedFactored(LazyFactored):
    """One fused expert weight's per-example gradient, kept compact: the
    pairs (token, expert) sorted by expert, then example, each with its left
    vector (the weight's first dimension) and right vector.  The padded
    layout of :class:`~dpft.rules.base.Factored` (``(B, slots, E, .)``,
    ``slots`` = the most pairs one example sent to one expert) is built only
    when a norm needs it and dropped after (:meth:`release`); the clipped sum
    is one weighted product per expert over its own pairs (no padding)."""

    def __init__(
        self,
        left: Tensor,
        right: Tensor,
        shape: torch.Size,
        n: int,
        example: Tensor,
        pos: Tensor,
        expert: Tensor,
        counts: list[int],
        slots: int,
    ) -> None:
        self.lc, self.rc, self.shape, self.n = left, right, torch.Size(shape), n
        self.example, self.pos, self.expert, self.counts, self.slots = example, pos, expert, counts, slots
        self.ids = None
        self.num_rows = 0
        self._factors: tuple[Tensor, Tensor] | None = None

    def _padded(self, v: Tensor) -> Tensor:
        out = v.new_zeros(self.n, self.slots, len(self.counts), v.shape[1])
        out[self.example, self.pos, self.expert] = v
        return out

    def build(self) -> tuple[Tensor, Tensor]:
        return self._padded(self.lc), self._padded(self.rc)

    @property
    def positions(self) -> int:
        return self.slots

    @property
    def groups(self) -> int:
        return len(self.counts)

    @property
    def rows(self) -> int:
        return self.lc.shape[1]

    @property
    def cols(self) -> int:
        return self.rc.shape[1]

    @property
    def factor_dtype(self) -> torch.dtype:
        return self.rc.dtype

    @property
    def held(self) -> int:
        return (self.lc.numel() + self.rc.numel()) // self.n

    def sum_needs_factors(self, dtype: torch.dtype) -> bool:
        return False

    def weighted(self, weights: Tensor, dtype: torch.dtype) -> Tensor | None:
        left, right = self.lc, self.rc
        w = weights[self.example].unsqueeze(1)
        half = left.dtype in HALF and right.dtype == left.dtype
        if half:
            # (as the engine's generic weighted sum: the thinner factor scaled by the
            # shrunk weights in float32 and rounded once; half-precision products)
            w = w.float() * _HALF_SHRINK
            if left.shape[1] <= right.shape[1]:
                left = torch.mul(left, w, out=torch.empty_like(left))
            else:
                right = torch.mul(right, w, out=torch.empty_like(right))
        else:
            left, right = left.to(dtype), right.to(dtype)
            if left.shape[1] <= right.shape[1]:
                left = left * w.to(dtype)
            else:
                right = right * w.to(dtype)
        out = torch.zeros(len(self.counts), left.shape[1], right.shape[1], dtype=dtype, device=left.device)
        start = 0
        for e, c in enumerate(self.counts):
            if c:
                sl = slice(start, start + c)
                out[e] = bmm_acc(left[sl].t().unsqueeze(0), right[sl].unsqueeze(0), dtype)[0]
                start += c
        return out.view(self.shape)


def _amp(call: Call) -> Any:
    autocast = call.saved.get("autocast")
    return torch.autocast(autocast[0], dtype=autocast[1]) if autocast else contextlib.nullcontext()


def _agrees(c: Contribution, reference: Tensor, half: bool) -> bool:
    """Whether a contribution's per-example gradients agree with the
    reference's ``(n, *shape)`` by the generic path's criterion
    (:func:`~dpft.rules.fallback._agree`), built one example at a time (no
    second ``B x`` weight tensor, in float64, beside the reference's)."""
    if isinstance(c, Direct):
        return _agree(c.grad, reference, half)
    if tuple(c.shape) != tuple(reference.shape[1:]):
        return False
    left, right = c.left, c.right  # type: ignore[union-attr]
    diff, scale = [], []
    for i in range(reference.shape[0]):
        mine = torch.einsum("tgp,tgd->gpd", left[i].double(), right[i].double()).reshape(c.shape)
        ref = reference[i].double()
        diff.append(torch.linalg.vector_norm(mine - ref))
        scale.append(torch.linalg.vector_norm(ref))
        del mine, ref
    c.release()
    # rows (difference, norm) against (0, norm): ``_agree`` compares each example's
    # difference with its norm (and the largest one), at the reference dtype's tolerance
    d, r = torch.stack(diff), torch.stack(scale)
    return _agree(
        torch.stack([d, r], 1).to(reference.dtype), torch.stack([torch.zeros_like(r), r], 1).to(reference.dtype), half
    )


def _arg(call: Call, i: int, name: str) -> Any:
    args, kwargs = call.saved["args"], call.saved["kwargs"]
    return args[i] if len(args) > i else kwargs[name]


# -- the experts ---------------------------------------------------------------------------


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module of the ``use_experts_implementation``
    interface that :class:`FusedExpertsRule` reads: 3-D ``gate_up_proj`` (or
    ``up_proj``) and ``down_proj`` of ``num_experts`` experts, optional
    biases, no norm after each expert, not split across devices."""
    e = getattr(module, "num_experts", None)
    if not isinstance(e, int) or not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed")):
        return False
    if getattr(module, "has_post_expert_norm", False) or getattr(module, "_is_expert_parallel", False):
        return False
    up = "gate_up_proj" if module.has_gate else "up_proj"
    want = {up, "down_proj"} | ({up + "_bias", "down_proj_bias"} if module.has_bias else set())
    params = {k for k, p in module._parameters.items() if p is not None}
    if params != want or any(True for c in module.children() for _ in c.parameters()):
        return False  # (an activation module is a child: one with parameters is not read here)
    return all(module._parameters[k].ndim == 3 and module._parameters[k].shape[0] == e for k in (up, "down_proj"))


class FusedExpertsRule(_VerifiedRule):
    """Fused experts (see the module docstring): factored per-expert
    contributions once the first passes verified them, the generic path
    before and wherever they did not agree."""

    why = (
        "fused mixture-of-experts weights: recomputed in the first passes, then per-expert "
        "factored contributions verified against that recomputation"
    )

    def key(self, call: Call) -> tuple | None:
        grads = call.grads
        try:
            x, idx, w = (_arg(call, i, k) for i, k in enumerate(("hidden_states", "top_k_index", "top_k_weights")))
        except (KeyError, IndexError):
            return None
        n = call.batch_size
        if len(grads) != 1 or grads[0] is None or not all(isinstance(t, Tensor) for t in (x, idx, w)):
            return None
        if x.ndim != 2 or idx.ndim != 2 or w.shape != idx.shape or idx.shape[0] != x.shape[0]:
            return None
        if idx.is_floating_point() or x.shape[0] % n or grads[0].shape != x.shape:
            return None
        return (len(call.saved["args"]), tuple(sorted(call.saved["kwargs"])), idx.shape[1])

    def fast(self, call: Call, params: frozenset[str]) -> dict[str, Contribution]:
        m = call.module
        x = _arg(call, 0, "hidden_states").detach()
        idx = _arg(call, 1, "top_k_index")
        w = _arg(call, 2, "top_k_weights").detach()
        g = call.grads[0]
        n, (rows, k) = call.batch_size, idx.shape
        e_count = m.num_experts
        dev = x.device
        token = torch.arange(rows, device=dev).repeat_interleave(k)  # (S,) pairs (token, slot)
        example = example_of_rows(rows, n, dev)[token]
        expert = idx.reshape(-1)
        keep = expert < e_count  # (a sentinel expert index: no expert ran)
        token, example, expert, weight = token[keep], example[keep], expert[keep], w.reshape(-1)[keep]
        order = torch.argsort(expert * n + example, stable=True)
        token, example, expert, weight = token[order], example[order], expert[order], weight[order]
        counts = torch.bincount(expert, minlength=e_count).tolist()  # (one host sync, as the forward's loop)
        up_name = "gate_up_proj" if m.has_gate else "up_proj"
        up_w, down_w = m._parameters[up_name].detach(), m._parameters["down_proj"].detach()
        up_b = m._parameters[up_name + "_bias"].detach() if m.has_bias else None
        xs, hs, acts, gs = [], [], [], []  # per pair, sorted by (expert, example)
        start = 0
        for e, c in enumerate(counts):
            if not c:
                continue
            sl = slice(start, start + c)
            start += c
            xe = x[token[sl]]
            we, wd = up_w[e], down_w[e]
            if m.is_transposed:
                we, wd = we.t(), wd.t()
            with torch.enable_grad():
                h = F.linear(xe, we, up_b[e] if up_b is not None else None).detach().requires_grad_()
                a = m._apply_gate(h) if m.has_gate else m.act_fn(h)
            # the gradient at the expert's output: the token's output gradient times its routing weight
            ge = g[token[sl]] * weight[sl, None].to(g.dtype)
            da = ge.to(a.dtype) @ wd.to(a.dtype)  # (linear's input gradient: out = a @ wd^T)
            (dh,) = torch.autograd.grad(a, h, da)
            xs.append(xe.to(h.dtype))  # (under autocast: the half-precision rows the layer multiplied)
            hs.append(dh.detach())
            acts.append(a.detach())
            gs.append(ge.to(a.dtype))
            del h, a
        if not xs:  # no token reached an expert: zero gradients
            return {p: Direct(torch.zeros(n, *m._parameters[p].shape, dtype=x.dtype, device=dev)) for p in params}
        xs_, dh_, a_, g_ = torch.cat(xs), torch.cat(hs), torch.cat(acts), torch.cat(gs)
        # each pair's position among its example's pairs with the same expert (the padded layout's T)
        cell = expert * n + example
        _, cell_counts = torch.unique_consecutive(cell, return_counts=True)
        starts = torch.cumsum(cell_counts, 0) - cell_counts
        pos = torch.arange(cell.shape[0], device=dev) - starts.repeat_interleave(cell_counts)
        slots = int(cell_counts.max())
        out: dict[str, Contribution] = {}
        for name, (left, right) in (
            (up_name, (xs_, dh_) if m.is_transposed else (dh_, xs_)),
            ("down_proj", (a_, g_) if m.is_transposed else (g_, a_)),
        ):
            if name in params:
                shape = m._parameters[name].shape
                out[name] = RoutedFactored(left, right, shape, n, example, pos, expert, counts, slots)
        for name, v in ((up_name + "_bias", dh_), ("down_proj_bias", g_)):
            if name in params:
                acc = torch.float64 if v.dtype == torch.float64 else torch.float32
                d = torch.zeros(n, e_count, v.shape[1], dtype=acc, device=dev)
                d.index_put_((example, expert), v.to(acc), accumulate=True)
                out[name] = Direct(d)
        return out


# -- the router ----------------------------------------------------------------------------


def is_linear_router(module: nn.Module) -> bool:
    """A transformers top-k router (``...Router``) whose trainable parameters
    are a 2-D ``weight`` (and a ``bias``) of its own and that has no children:
    :class:`LinearRouterRule` reads its first output as ``F.linear`` of its
    input rows (verified before use)."""
    if not type(module).__name__.endswith("Router") or any(True for _ in module.children()):
        return False
    params = {k: p for k, p in module._parameters.items() if p is not None}
    w = params.get("weight")
    return w is not None and w.ndim == 2 and set(params) <= {"weight", "bias"}


class LinearRouterRule(_VerifiedRule):
    """A router's weight: ``sum_rows dlogits (x) x`` per example, the
    gradient of the logits it returns first (which includes what came back
    through the routing weights computed from them inside the router) times
    its input rows; used once the first passes verified it."""

    why = (
        "mixture-of-experts router: recomputed in the first passes, then a factored linear "
        "contribution verified against that recomputation"
    )

    def key(self, call: Call) -> tuple | None:
        args = call.saved["args"]
        grads = call.grads
        w = call.module._parameters["weight"]
        if len(args) != 1 or call.saved["kwargs"] or not isinstance(args[0], Tensor) or not grads:
            return None
        x, g = args[0], grads[0]
        if g is None or x.shape[-1] != w.shape[1] or g.ndim != 2 or g.shape[1] != w.shape[0]:
            return None
        if x.numel() // x.shape[-1] != g.shape[0] or g.shape[0] % call.batch_size:
            return None
        return (tuple(t is not None for t in grads),)

    def fast(self, call: Call, params: frozenset[str]) -> dict[str, Contribution]:
        m = call.module
        n = call.batch_size
        x = call.saved["args"][0].detach()
        g = call.grads[0]
        x = x.reshape(n, -1, 1, x.shape[-1])  # rows flattened example by example
        g = g.reshape(n, -1, 1, g.shape[-1])
        out: dict[str, Contribution] = {}
        if "weight" in params:
            w = m._parameters["weight"]
            # (under autocast: the half-precision input the layer multiplied)
            dt = g.dtype if g.dtype in HALF else torch.promote_types(x.dtype, g.dtype)
            out["weight"] = Factored(right=x.to(dt), shape=w.shape, left=g.to(dt))
        if "bias" in params:
            out["bias"] = Direct(g.sum(dim=(1, 2), dtype=torch.float64 if g.dtype == torch.float64 else torch.float32))
        return out
