"""The exact generic path for parameters without a fast rule: per-example
gradients of a module's trainable parameters by recomputing the module's
forward and pulling each example's output gradient back to them (a batched
vector-Jacobian product, ``is_grads_batched``).

It keeps the module's inputs until the end of the backward pass and costs a
recomputation plus one backward per example through the part of the module
that leads to those parameters, so it is slower and heavier than the
dedicated rules, but exact.  Where the first passes find that a faster
computation gives the same per-example gradients, later steps use it
instead: a vectorized pass (``torch.func.vmap`` over the examples of the
module's forward and a vector-Jacobian product: one recomputation and one
backward, not one per example), else the forward on one example at a time
(for forwards vmap cannot batch); see :class:`_Memo`.  For a module's own
parameters that meet the examples only in broadcasting element-wise
operations, the first passes also check substitution
(:mod:`dpft.rules.substitute`: per-example gradients read from the forward
itself, no recomputation), which then comes first.

It is used for ``nn.MultiheadAttention`` (whose
``out_proj`` is applied functionally, so no module hook would see it), leaf
modules of unknown types, parameters held directly by a container module
(layer scale, class embeddings, relative position tables, SSM parameters:
the container is recomputed, its children's parameters keep their own
rules) and parametrized modules (weight norm: the module that uses the
parametrized weight is recomputed).  The first backward passes also check
that one example's output gradient reaches no other example's input.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .base import Call, Contribution, Direct, Rule, UnsupportedModuleError
from .substitute import Substitution
from .substitute import start as start_substitution


def _flat_tensors(output: Any) -> list[Tensor | None]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        out: list[Tensor | None] = []
        for o in output:
            out.extend(_flat_tensors(o))
        return out
    if isinstance(output, dict):
        out = []
        for o in output.values():
            out.extend(_flat_tensors(o))
        return out
    return [None]


class FallbackRule(Rule):
    """Exact per-example gradients via ``torch.func`` for any module whose
    forward is a function of its parameters and batched inputs.

    ``recursive`` rules cover the parameters of child modules too (their
    names are then dotted, e.g. ``out_proj.weight``)."""

    handles = None
    recursive = False
    eager: tuple[str, ...] = ()
    #: why a module takes this path (reported by ``PrivacyEngine.generic_path``)
    why = "no fast rule covers this module or parameter"
    #: how many leading positional arguments carry examples (``None``: all);
    #: the first backward passes check that these stay apart
    data_args: int | None = None

    def batch_dim(self, module: nn.Module) -> int:
        return 0

    def needs_input(self, module: nn.Module, params: frozenset[str]) -> bool:
        return True

    def save(self, call: Call, module: nn.Module, args: tuple, output: Any, params: frozenset[str]) -> None:
        call.saved["args"] = args
        call.saved["kwargs"] = dict(call.saved.pop("kwargs", {}) or {})
        for a in list(args) + list(call.saved["kwargs"].values()):
            if isinstance(a, Tensor):
                call.track(a)

    def on_grad(
        self, call: Call, grad: Tensor, params: frozenset[str]
    ) -> None:  # pragma: no cover - grads set by capture
        raise AssertionError

    def contributions(self, call: Call, params: frozenset[str]) -> dict[str, Contribution]:
        module = call.module
        n = call.batch_size
        bdim = self.batch_dim(module)
        # (dotted names: parameters of modules inside it, recursive rules or
        # modules taken over because they never ran, see Capture._absorb_idle)
        recurse = self.recursive or any("." in k for k in params)
        named = dict(module.named_parameters()) if recurse else dict(module.named_parameters(recurse=False))
        names = sorted(params)
        plist = [named[k] for k in names]
        autocast = call.saved.get("autocast")
        amp = torch.autocast(autocast[0], dtype=autocast[1]) if autocast else contextlib.nullcontext()
        check = call.saved.pop("check_mixing", None)
        subst = call.saved.pop("subst", None)
        memo = _memo(module, names)
        if subst is not None and check is None and memo.subst and subst.key in memo.subst_keys:
            try:
                got = _substituted(subst, names)
            except Exception:  # (a pull-back the first passes did not meet: stay exact)
                got = None
            if got is not None:
                return {k: Direct(g) for k, g in zip(names, got)}
        if check is None and memo.fast:
            fast = _vectorized_call(module, names, plist, call, memo, n, bdim, amp)
            if fast is not None:
                return {k: Direct(g) for k, g in zip(names, fast)}
        result, used = self._pulled_back(call, names, plist, n, bdim, amp, check)
        if not result:
            return {}
        if check is not None and subst is not None and memo.subst is not False:
            memo.verify_substitution(subst, names, result, call.saved.get("autocast") is not None)
        if check is not None and memo.fast is not False:
            memo.verify(module, names, plist, call, used, result, n, bdim, amp)
        return {k: Direct(g) for k, g in zip(names, result)}

    def _pulled_back(
        self, call: Call, names: list[str], plist: list[Tensor], n: int, bdim: int, amp: Any, check: str | None
    ) -> tuple[list[Tensor], tuple[int, ...] | None]:
        """The reference computation, exact for any module that keeps examples
        apart: the module's forward recomputed on the whole batch (the RNG
        state it saw, so identical dropout masks), then one example's output
        gradient at a time pulled back to the parameters (batched one-hot
        cotangents, ``is_grads_batched``).  Also returns the positions of the
        outputs whose gradients were pulled back as received (``None`` where
        one output's gradient had another's taken out, see :func:`_external`)."""
        module = call.module
        args, kwargs = call.saved["args"], call.saved["kwargs"]
        probes: list[tuple[Tensor, int]] = []  # (input copy, batch dim): does example i's output reach other rows?
        copies: dict[int, Tensor] = {}  # one copy per input object (self-attention: query is key is value)

        def probe(a: Any) -> Any:
            if id(a) in copies:
                return copies[id(a)]
            if isinstance(a, Tensor) and a.is_floating_point() and a.ndim > bdim and a.shape[bdim] % n == 0:
                t = a.detach().requires_grad_()
                probes.append((t, bdim))
                # (a forward that works in place on its input must not touch the leaf)
                copies[id(a)] = t.clone()
                return copies[id(a)]
            return a

        with torch.enable_grad(), _rng_restored(call.saved.get("rng")), amp:
            if check is not None:  # positional data arguments only (keyword ones are often masks)
                k = len(args) if self.data_args is None else self.data_args
                args = tuple(probe(a) for a in args[:k]) + tuple(args[k:])
            out = module.forward(*args, **kwargs)
        outs = _flat_tensors(out)
        pairs = []
        seen: set[int] = set()
        positions = []
        for i, (o, g) in enumerate(zip(outs, call.grads)):
            # (an output returned twice got the whole gradient in each of its hooks: counted once)
            if o is not None and g is not None and o.requires_grad and id(o) not in seen:
                seen.add(id(o))
                pairs.append((o, g))
                positions.append(i)
        if not pairs:
            return [], None
        received = pairs
        pairs = _external(pairs, [t for t, _ in probes] + list(plist) + _leaves(args, kwargs))
        used = tuple(positions) if all(g is g0 for (_, g), (_, g0) in zip(pairs, received)) else None
        numel = sum(g.numel() for _, g in pairs)
        chunk = max(1, min(n, (1 << 26) // max(1, numel)))
        parts: list[list[Tensor]] = [[] for _ in names]
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(n, start + chunk), device=pairs[0][1].device)
            cots = []
            for _, g in pairs:
                onehot = torch.zeros(len(idx), n, dtype=g.dtype, device=g.device)
                onehot[torch.arange(len(idx)), idx] = 1
                rows = g.shape[bdim] // n  # > 1: examples' rows flattened into the batch dim, example by example
                if rows > 1:
                    onehot = onehot.repeat_interleave(rows, dim=1)
                shape = [len(idx)] + [g.shape[bdim] if d == bdim else 1 for d in range(g.ndim)]
                cots.append(g.unsqueeze(0) * onehot.view(shape))
            gs = torch.autograd.grad(
                [o for o, _ in pairs],
                plist + [t for t, _ in probes],
                grad_outputs=cots,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            if probes:
                _check_apart(gs[len(plist) :], probes, idx, n, check, module)
                gs = gs[: len(plist)]
            for i, (gk, p) in enumerate(zip(gs, plist)):
                parts[i].append(
                    gk if gk is not None else torch.zeros(len(idx), *p.shape, dtype=p.dtype, device=p.device)
                )
        return [torch.cat(v) for v in parts], used


class _Memo:
    """What the first passes learned about one module's generic path: which
    faster computation (:func:`_vectorized`, else :func:`_looped`) agrees
    with the reference pull-back there, and for which call layout."""

    __slots__ = ("fast", "kind", "layouts", "used", "subst", "subst_keys")

    def __init__(self) -> None:
        #: substitution (:mod:`dpft.rules.substitute`): ``None`` not tried yet, ``False`` never again
        self.subst: bool | None = None
        #: the calls' :attr:`~dpft.rules.substitute.Substitution.key` on which it agreed
        self.subst_keys: set[tuple] = set()
        #: ``None``: not tried yet; ``False``: never again (failed or disagreed once)
        self.fast: bool | None = None
        #: ``"vmap"`` or ``"loop"``: the computation that agreed
        self.kind: str | None = None
        #: the layouts (:attr:`_Layout.key`) on which it agreed
        self.layouts: set[tuple] = set()
        #: the outputs whose gradients it reads (positions in the flattened output)
        self.used: tuple[int, ...] | None = None

    def verify_substitution(self, subst: Substitution, names: list[str], reference: list[Tensor], half: bool) -> None:
        """Keep substitution for calls like this one (its :attr:`key`) only if
        it agrees with the reference on every example and parameter (in every
        first pass where it was tried)."""
        got = None
        if set(names) == set(subst.leaves):
            try:
                got = _substituted(subst, names)
            except Exception:  # (a chain that cannot be pulled back: stay exact)
                got = None
        if got is not None and all(_agree(f, r, half) for f, r in zip(got, reference)):
            self.subst = True
            self.subst_keys.add(subst.key)
        else:
            self.subst = False
            self.subst_keys.clear()

    def verify(
        self,
        module: nn.Module,
        names: list[str],
        plist: list[Tensor],
        call: Call,
        used: tuple[int, ...] | None,
        reference: list[Tensor],
        n: int,
        bdim: int,
        amp: Any,
    ) -> None:
        """Run the faster computations beside the reference (a first pass) and
        keep one only if it agrees with the reference on every example and
        parameter (in every first pass)."""
        layout = _Layout.of(call, used, n, bdim) if used is not None and self.used in (None, used) else None
        agreed = None
        if layout is not None:
            half = call.saved.get("autocast") is not None
            for kind in (self.kind,) if self.kind else ("vmap", "loop"):
                try:
                    with amp:
                        fast = FAST[kind](module, names, plist, call, layout, n, bdim)
                except Exception:  # (no batching rule, a random op, data-dependent shapes: stay exact)
                    continue
                if fast is not None and all(_agree(f, r, half) for f, r in zip(fast, reference)):
                    agreed = kind
                    break
        if agreed is not None:
            self.fast, self.kind, self.used = True, agreed, used
            self.layouts.add(layout.key)
        else:
            self.fast, self.kind = False, None
            self.layouts.clear()


_MEMOS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], _Memo]]" = weakref.WeakKeyDictionary()


def _memo(module: nn.Module, names: list[str]) -> _Memo:
    per = _MEMOS.get(module)
    if per is None:
        per = _MEMOS[module] = {}
    return per.setdefault(tuple(names), _Memo())


class _Layout:
    """Which of a call's inputs carry the examples, and how its outputs'
    gradients are read: the batch dimension holds ``n`` examples of ``rows``
    rows each (``rows > 1``: windows or tokens flattened into it, example by
    example).  An input is taken as batched when its batch dimension has
    exactly ``n * rows`` entries; the first passes verify that reading
    against the reference, and a later call whose inputs read differently
    (:attr:`key`) goes back to the reference."""

    __slots__ = ("leaves", "spec", "flags", "rows", "used", "key")

    @classmethod
    def of(cls, call: Call, used: tuple[int, ...], n: int, bdim: int) -> "_Layout | None":
        grads = call.grads
        if any(grads[i] is None for i in used):
            return None
        rows = {grads[i].shape[bdim] // n for i in used if grads[i].ndim > bdim and grads[i].shape[bdim] % n == 0}
        if len(rows) != 1 or any(grads[i].ndim <= bdim for i in used):
            return None
        self = cls()
        self.rows = rows.pop()
        self.used = used
        self.leaves, self.spec = tree_flatten((tuple(call.saved["args"]), dict(call.saved["kwargs"])))
        size = n * self.rows
        self.flags = tuple(isinstance(t, Tensor) and t.ndim > bdim and t.shape[bdim] == size for t in self.leaves)
        if not any(self.flags):
            return None
        live = tuple(i for i, g in enumerate(grads) if g is not None)
        self.key = (self.flags, used, live, str(self.spec))
        return self


def _vectorized(
    module: nn.Module, names: list[str], plist: list[Tensor], call: Call, layout: _Layout, n: int, bdim: int
) -> list[Tensor]:
    """Per-example gradients of ``names`` from one vectorized pass:
    ``torch.func.vmap`` over the examples of a vector-Jacobian product of the
    module's forward on one example's rows (its inputs' and output
    gradients' batch dimension cut into ``n`` slices of ``rows``).  A
    recomputation plus one backward of the path to the parameters, instead of
    the reference's one per example.  Refuses random operations (the
    reference replays the forward's dropout masks; a vectorized forward
    would draw others)."""
    rows = layout.rows

    def split(t: Tensor) -> Tensor:
        return t.detach().unflatten(bdim, (n, rows)).movedim(bdim, 0)

    batched = [split(t) for t, f in zip(layout.leaves, layout.flags) if f]
    cotangents = [split(call.grads[i]) for i in layout.used]
    values = tuple(p.detach() for p in plist)

    def one(inputs: list[Tensor], cots: list[Tensor]) -> tuple[Tensor, ...]:
        it = iter(inputs)
        leaves = [next(it) if f else t for t, f in zip(layout.leaves, layout.flags)]
        args, kwargs = tree_unflatten(leaves, layout.spec)

        def forward(*ps: Tensor) -> tuple[Tensor, ...]:
            out = _flat_tensors(functional_call(module, dict(zip(names, ps)), args, kwargs, strict=False))
            return tuple(out[i] for i in layout.used)

        _, pull = vjp(forward, *values)
        return pull(tuple(cots))

    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (functorch's "no batching rule, slower fallback": still exact)
        return list(vmap(one, randomness="error")(batched, cotangents))


def _looped(
    module: nn.Module, names: list[str], plist: list[Tensor], call: Call, layout: _Layout, n: int, bdim: int
) -> list[Tensor] | None:
    """Per-example gradients of ``names`` from the module's forward on one
    example's rows at a time and one backward each: for forwards that
    :func:`_vectorized` cannot batch (data-dependent shapes, e.g. tokens
    routed to experts).  ``None`` (not usable) where the forward draws random
    numbers (dropout: the reference replays the forward's masks, a forward
    per example would draw others)."""
    rows = layout.rows
    leaves = [t.detach() if isinstance(t, Tensor) and f else t for t, f in zip(layout.leaves, layout.flags)]
    grads = [call.grads[i] for i in layout.used]
    dev = next((t.device for t in grads), None)
    before = rng_state(dev)
    parts: list[list[Tensor]] = [[] for _ in plist]
    with torch.enable_grad(), _rng_restored(before):
        for i in range(n):
            mine = [t.narrow(bdim, i * rows, rows) if f else t for t, f in zip(leaves, layout.flags)]
            args, kwargs = tree_unflatten(mine, layout.spec)
            outs = _flat_tensors(module.forward(*args, **kwargs))
            if i == 0 and _rng_moved(before, dev):
                return None
            pairs = [
                (outs[j], g.narrow(bdim, i * rows, rows))
                for j, g in zip(layout.used, grads)
                if outs[j] is not None and outs[j].requires_grad
            ]
            got = (
                torch.autograd.grad([o for o, _ in pairs], plist, [g for _, g in pairs], allow_unused=True)
                if pairs
                else [None] * len(plist)
            )
            for k, (g, p) in enumerate(zip(got, plist)):
                parts[k].append(torch.zeros_like(p) if g is None else g)
    return [torch.stack(v) for v in parts]


def _rng_moved(state: tuple, dev: torch.device | None) -> bool:
    """Whether the RNG state differs from ``state`` (taken by :func:`rng_state`)."""
    now = rng_state(dev)
    return not torch.equal(now[0], state[0]) or (now[1] is not None and not torch.equal(now[1], state[1]))


def _substituted(subst: Substitution, names: list[str]) -> list[Tensor] | None:
    """Per-example gradients of ``names`` from a call's substitution (see
    :mod:`dpft.rules.substitute`), ``None`` where it has none."""
    if set(names) != set(subst.leaves):
        return None
    return subst.gradients(names)


#: whether the generic path tries substitution (tests of the other computations switch it off)
SUBSTITUTE = True


def substitution(rule: Rule, module: nn.Module, params: frozenset[str], n: int | None, args: tuple) -> Any:
    """A :class:`~dpft.rules.substitute.Substitution` entered for one call of
    a generic-path ``module`` (from its forward pre-hook; its forward hook
    calls ``close``), else ``None``: only for a module's own direct
    parameters (not recursive rules), and not after it failed or disagreed."""
    if not SUBSTITUTE or not isinstance(rule, FallbackRule) or rule.recursive or any("." in k for k in params):
        return None
    names = sorted(params)
    if _memo(module, names).subst is False:
        return None
    return start_substitution(module, names, n, args)


def computation(module: nn.Module) -> str:
    """Which computation the generic path uses for ``module`` after its first
    passes: ``"substitution"``, ``"vmap"``, ``"loop"`` or ``"reference"``
    (the pull-back; also before any pass)."""
    for memo in _MEMOS.get(module, {}).values():
        if memo.subst:
            return "substitution"
        if memo.fast and memo.kind:
            return memo.kind
    return "reference"


#: the faster computations the first passes may choose, by :attr:`_Memo.kind`
FAST = {"vmap": lambda *a: _vectorized(*a), "loop": lambda *a: _looped(*a)}


def _vectorized_call(
    module: nn.Module, names: list[str], plist: list[Tensor], call: Call, memo: _Memo, n: int, bdim: int, amp: Any
) -> list[Tensor] | None:
    """The vectorized computation for a call laid out as one the first passes
    verified, else ``None`` (the caller takes the reference path)."""
    if memo.used is None:
        return None
    layout = _Layout.of(call, memo.used, n, bdim)
    if layout is None or layout.key not in memo.layouts:
        return None
    try:
        with amp:
            return FAST[memo.kind](module, names, plist, call, layout, n, bdim)
    except Exception:  # (a shape the first passes did not meet: stay exact)
        memo.fast = False
        return None


def _agree(fast: Tensor, reference: Tensor, half: bool) -> bool:
    """Whether two stacks of per-example gradients agree example by example
    to the rounding of their dtype (a wrong reading of the inputs is off by
    a large fraction of the gradient)."""
    if fast.shape != reference.shape:
        return False
    tol = 3e-2 if half else {torch.float64: 1e-9, torch.float32: 2e-3}.get(reference.dtype, 3e-2)
    f, r = fast.detach().flatten(1).double(), reference.detach().flatten(1).double()
    scale = r.norm(dim=1)
    floor = scale.max() * tol + torch.finfo(torch.float64).tiny
    return bool(((f - r).norm(dim=1) <= tol * scale + floor).all())


def fresh_cache(module: nn.Module, value: Any) -> Any:
    """``None`` for a transformers cache (``past_key_values``, Mamba's
    recurrent state) that holds nothing yet for this module's layer (read
    before the module's forward), else ``value``.  The module's forward fills the cache, so a
    recomputation given the same object would read this forward's own states
    as if they came before it (Mamba's scan then starts from its final
    state); without a cache it computes what the forward did."""
    layer = getattr(module, "layer_idx", None)
    seq = getattr(value, "get_seq_length", None)
    if layer is None or seq is None or "Cache" not in type(value).__name__ or isinstance(value, Tensor):
        return value
    try:
        empty = int(seq(layer)) == 0
    except (TypeError, ValueError, IndexError, AttributeError, RuntimeError):
        return value
    return None if empty else value


def fresh_caches(module: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` with :func:`fresh_cache` applied (called before the module's forward)."""
    if not kwargs:
        return kwargs
    return {k: fresh_cache(module, v) for k, v in kwargs.items()}


def _leaves(args: tuple, kwargs: dict) -> list[Tensor]:
    """The module's tensor inputs (where a walk of its recomputed graph stops)."""
    return [a for a in _flat_tensors(list(args) + list(kwargs.values())) if isinstance(a, Tensor)]


def _nodes_above(root: Any, stop: set[Any]) -> set[Any]:
    """The autograd nodes reachable from ``root`` without passing a node of ``stop``."""
    seen: set[Any] = set()
    todo = [root] if root is not None else []
    while todo:
        node = todo.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        todo.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return seen


def _external(pairs: list[tuple[Tensor, Tensor]], inputs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """The outputs' gradients with what reached them through the module's
    other outputs taken out.

    The hook on a module's output receives that output's whole gradient.
    When one output is computed from another (a router returns its logits
    and the top-k weights computed from them), the upstream output's gradient
    already contains the downstream one's pulled back through the module:
    pulling back both would count that path twice.  Here each upstream
    output keeps only its own (external) part, ``g_j - sum_k J_kj^T ext_k``
    over the outputs ``k`` computed from it, from the last outputs down."""
    if len(pairs) < 2:
        return pairs
    stop = {t.grad_fn for t in inputs if t.grad_fn is not None}
    nodes = [o.grad_fn for o, _ in pairs]
    # downstream[j]: the outputs whose graph reaches output j's node (through other outputs or not)
    reach = [_nodes_above(n, stop) for n in nodes]
    downstream = [
        [k for k in range(len(pairs)) if k != j and nodes[j] is not None and nodes[j] in reach[k]]
        for j in range(len(pairs))
    ]
    if not any(downstream):
        return pairs
    ext: dict[int, Tensor] = {}
    todo = list(range(len(pairs)))
    while todo:
        ready = [j for j in todo if all(k in ext for k in downstream[j])]
        if not ready:  # (a cycle cannot happen in autograd's graph)
            raise RuntimeError("dpft: the module's outputs depend on each other in a cycle")
        for j in ready:
            o, g = pairs[j]
            ks = downstream[j]
            if ks:
                internal = torch.autograd.grad(
                    [pairs[k][0] for k in ks], o, [ext[k] for k in ks], retain_graph=True, allow_unused=True
                )[0]
                if internal is not None:
                    g = g - internal
            ext[j] = g
            todo.remove(j)
    return [(o, ext[j]) for j, (o, _) in enumerate(pairs)]


def _check_apart(
    grads: Any, probes: list[tuple[Tensor, int]], idx: Tensor, n: int, name: str, module: nn.Module
) -> None:
    """Raise if pulling back example ``i``'s output gradient reaches another
    example's input: the module mixes examples (batch statistics, a mean over
    the batch, attention across it), so no per-example gradient has bounded
    influence and the DP guarantee would not hold."""
    for g, (_, bdim) in zip(grads, probes):
        if g is None:
            continue
        rows = g.movedim(1 + bdim, 1).reshape(len(idx), n, -1)  # (examples pulled back, input rows, rest)
        other = torch.ones(len(idx), n, dtype=torch.bool, device=rows.device)
        other[torch.arange(len(idx), device=rows.device), idx] = False
        if bool(rows[other].ne(0).any()):
            raise UnsupportedModuleError(
                f"dpft: module '{name}' ({type(module).__name__}) mixes examples: the output of one "
                "example depends on the inputs of others (batch statistics or a reduction over the "
                "batch dimension), so one example's influence on the update cannot be bounded and the "
                "DP guarantee would not hold. Replace the module by one that treats examples "
                "separately (e.g. GroupNorm / LayerNorm instead of batch statistics)."
            )


class _rng_restored:
    """Run a block with the CPU (and CUDA) RNG state saved at forward time."""

    def __init__(self, state):
        self.state = state

    def __enter__(self):
        if self.state is None:
            return
        cpu, cuda = self.state
        self.saved = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda is not None else None)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)

    def __exit__(self, *exc):
        if self.state is None:
            return
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1])


def rng_state(device: torch.device | None) -> tuple:
    """The RNG state a module's forward will consume (CPU and current CUDA device)."""
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
    return (torch.get_rng_state(), cuda)


class ParametrizedRule(FallbackRule):
    """A module with ``torch.nn.utils.parametrize`` parametrizations (weight
    norm, spectral norm, orthogonal, ...): its parametrized weights are computed
    from the parametrizations' own parameters in its forward, so the module is
    recomputed as a whole; covers the parametrizations' parameters and its own."""

    why = "parametrized weight (recomputed with its parametrizations)"

    recursive = True


class EnclosingRule(FallbackRule):
    """An enclosing module recomputed for parameters of a module inside it
    whose output does not carry the examples (a relative position table, a
    bias shared by the whole batch): the per-example gradients appear only
    where that output meets the examples, in the enclosing module's output."""

    why = "recomputed for a batch-independent output of a module inside it"

    recursive = True


class RoutedExpertsRule(FallbackRule):
    """A mixture-of-experts block that holds its experts as separate modules
    (a ``ModuleList`` named ``experts``, each expert's ``nn.Linear`` layers
    called on the tokens routed to it: older Mixtral, Qwen2-MoE, DeepSeek
    style).  An expert's input rows are the tokens of several examples,
    gathered by the router: neither batch-first nor example by example, so no
    per-layer rule may claim them (even when the number of routed tokens
    happens to equal the batch size).  The block is recomputed as a whole,
    which maps each token back to its example: exact per-example gradients
    for the router, the experts and any shared expert."""

    why = "mixture of experts (tokens routed to per-expert modules)"

    recursive = True


def is_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` holds its experts as a list of modules with
    parameters (see :class:`RoutedExpertsRule`)."""
    for name, child in module.named_children():
        if "expert" in name.lower() and isinstance(child, (nn.ModuleList, nn.ModuleDict)) and len(child) >= 2:
            if sum(1 for e in child.children() if any(True for _ in e.parameters())) >= 2:
                return True
    return False


class MultiheadAttentionRule(FallbackRule):
    """``nn.MultiheadAttention``: covers its own projections and ``out_proj``."""

    why = "nn.MultiheadAttention (out_proj applied functionally)"

    recursive = True
    data_args = 3  # query, key, value (a positional attn_mask is shared by the batch)

    def batch_dim(self, module: nn.Module) -> int:
        return 0 if module.batch_first else 1

    def save(self, call: Call, module: nn.Module, args: tuple, output: Any, params: frozenset[str]) -> None:
        kwargs = call.saved.get("kwargs") or {}
        mask = kwargs.get("attn_mask")
        if isinstance(mask, Tensor) and mask.ndim == 3:
            raise NotImplementedError(
                "dpft: nn.MultiheadAttention with a 3-d attn_mask (batch*heads, L, S) is not "
                "supported; pass a 2-d mask and a key_padding_mask instead."
            )
        super().save(call, module, args, output, params)
