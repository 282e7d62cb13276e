"""Planning: which rule owns which trainable parameter, and the flat lane.

:func:`plan_model` binds every trainable parameter use to a rule (a fast rule
of :mod:`dpft.rules`, a container's broadcast parameter, or the exact generic
path); :class:`LanePlanning` lays out the flat lane, the one ``(B, total)``
buffer that eagerly reduced per-example gradients (biases, norm weights) are
written into, and plans it again when a module's parameters move to an
enclosing module's recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ..rules import (
    BUILTIN,
    FALLBACK,
    PARAMETRIZED,
    Call,
    Contribution,
    Direct,
    Rule,
    find_rule,
)
from ..rules.embedding import check_embedding
from ..rules.fallback import FallbackRule
from ..rules.functional import overriding_parent
from .checks import BATCHNORM_MESSAGE, BatchNormError


class _ExpandRule(Rule):
    """Parameters with a leading broadcast dim of 1 held by a container
    module (ViT's ``cls_token`` / ``pos_embed``): the container sees a
    per-example expanded view during its forward, whose gradient is the
    per-example gradient."""

    def on_grad(self, call: Call, grad: Tensor, params: frozenset[str]) -> None:
        (name,) = tuple(params)
        call.results[name] = grad

    def contributions(self, call: Call, params: frozenset[str]) -> dict[str, Contribution]:
        return {k: Direct(call.results[k].unsqueeze(1)) for k in params}


EXPAND = _ExpandRule()


@dataclass
class Binding:
    """One module and the trainable parameters its rule covers."""

    module: nn.Module
    name: str
    rule: Rule
    params: frozenset[str]  # local names (dotted for recursive rules)
    keys: dict[str, str]  # local name -> canonical parameter name
    expand: bool = False
    toggled: list[nn.Parameter] = field(default_factory=list)
    stash: dict[str, nn.Parameter] = field(default_factory=dict)
    rng: Any = None
    autocast: Any = None
    kwargs: dict = field(default_factory=dict)
    fallback: bool = False
    needs_save: bool = True
    lane: list[tuple[str, str, int, int, tuple[int, ...]]] = field(
        default_factory=list
    )  # (local, key, offset, numel, shape)
    slow: frozenset[str] = frozenset()  # params handed to the sink as contributions
    early: frozenset[str] = frozenset()  # weights that may be instantiated in the backward hook
    early_by_shape: dict = field(default_factory=dict)  # (output-gradient shape, dtype) -> instantiated early?
    done: Any = None  # the rule's hook to drop saved inputs once eager results are out
    off: bool = False  # some of its parameters are switched off for autograd in a whole forward
    book_keeping: bool = False  # its weights are switched off in its forward (after the first passes)
    rows: int = 0  # rows per example where its output flattens examples' rows into dim 0
    #: flattened rows: None (not seen yet), "" (verified example by example), else what is wrong
    verdict: str | None = None
    #: rows taken as examples (leading dimension equal to the batch size): None (not
    #: verified yet: verified in the first forward where they are seen, the first
    #: passes or later), "" (verified: row r feeds example r's output alone), else what is wrong
    own: str | None = None
    above: int = 0  # where ``own`` found rows that are not examples: the module recomputed for it (by id)
    #: the parent class whose operator the rule computes, where the module's
    #: class overrides its forward: the operator call is caught inside it
    tap: type | None = None
    mode: Any = None  # the active :class:`_OpTap` during the module's forward
    ran: int = 0  # forwards of the module seen (see Capture._absorb_idle)
    #: generic-path container: the bindings of modules inside it, and their ``ran`` when its forward began
    inner: list = field(default_factory=list)
    snapshot: tuple = ()
    absorbed: bool = False  # its parameters were taken over by an enclosing generic-path module
    reason: str = ""  # why its output went to an enclosing module (said if none can take it)
    unused: bool = False  # did not run and its parameters got no gradient (see Capture._unused_back)


def _module_params(module: nn.Module, recursive: bool) -> dict[str, nn.Parameter]:
    if recursive:
        return dict(module.named_parameters())
    return {k: p for k, p in module._parameters.items() if p is not None}


def plan_model(model: nn.Module) -> tuple[list[Binding], dict[str, str]]:
    """Assign every trainable parameter use to a rule.

    Returns the bindings and ``owner``: canonical parameter name -> name of
    the (first) module owning it.  Raises :class:`UnsupportedModuleError`
    naming the module and parameter when a trainable parameter cannot be
    handled exactly, and :class:`BatchNormError` for trainable BatchNorm."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    bindings: list[Binding] = []
    owner: dict[str, str] = {}
    skip: set[int] = set()
    for mname, module in model.named_modules():
        if id(module) in skip:
            continue
        rule = PARAMETRIZED if parametrize.is_parametrized(module) else find_rule(module)
        recursive = isinstance(rule, FallbackRule) and rule.recursive
        params = {k: p for k, p in _module_params(module, recursive).items() if p.requires_grad}
        if recursive:
            skip.update(id(m) for m in module.modules())
        if not params:
            continue
        label = mname or type(module).__name__
        if isinstance(module, _BatchNorm):
            raise BatchNormError(
                f"dpft: module '{label}' ({type(module).__name__}) has trainable parameters. " + BATCHNORM_MESSAGE
            )
        if isinstance(module, nn.Embedding):
            check_embedding(module, label)
        expand = False
        if rule is not None and not all(rule.supports(module, k) for k in params):
            # a parameter its rule does not know: the whole module takes the exact generic path
            rule = FALLBACK
        if rule is None:
            if list(module.children()) and all(p.ndim >= 2 and p.shape[0] == 1 for p in params.values()):
                rule, expand = EXPAND, True
            else:
                # a leaf of unknown type, or parameters held directly by a container
                # (layer scale, class embedding, relative position tables, SSM
                # parameters): the generic path recomputes the module's forward
                # and pulls each example's output gradient back to them
                rule = FALLBACK
        keys = {k: canonical[id(p)] for k, p in params.items()}
        for k in keys.values():
            owner.setdefault(k, label)
        if expand:
            for k in params:
                bindings.append(Binding(module, label, rule, frozenset([k]), {k: keys[k]}, expand=True))
        else:
            parent = overriding_parent(module)
            tap = parent if parent is not None and BUILTIN.get(parent) is rule else None
            bindings.append(Binding(module, label, rule, frozenset(params), keys, tap=tap))
    return bindings, owner


class LanePlanning:
    """The lane's layout and the re-planning when parameters change hands
    (a mixin of :class:`dpft.capture.Capture`)."""

    def _plan_lane(self, no_lane: set[str]) -> None:
        """The flat lane: parameters whose per-example gradients are reduced
        eagerly in the hooks (biases, norm weights, container tokens) are
        written straight into one ``(B, total)`` buffer per backward pass, so
        norms, clipping and the weighted sum cost a handful of kernels."""
        params = dict(self.model.named_parameters())
        eager_uses: dict[str, int] = {}
        all_uses: dict[str, int] = {}
        for b in self.bindings:
            b.fallback = isinstance(b.rule, FallbackRule)
            eager = set(b.params) if b.expand else set(b.rule.eager) & set(b.params)
            for local, key in b.keys.items():
                all_uses[key] = all_uses.get(key, 0) + 1
                if local in eager:
                    eager_uses[key] = eager_uses.get(key, 0) + 1
        keys = [k for k in eager_uses if eager_uses[k] == all_uses[k] and k not in no_lane]
        kinds = {(params[k].device, params[k].dtype == torch.float64) for k in keys}
        if len(kinds) != 1:
            keys = []  # mixed devices / precisions: no lane (the general path handles them)
        self.lane_keys = tuple(keys)
        self.lane_offsets: dict[str, tuple[int, int]] = {}
        self.lane_index: dict[str, int] = {}
        self._lane_shapes = [tuple(params[k].shape) for k in keys]
        offset = 0
        for i, k in enumerate(keys):
            self.lane_offsets[k] = (offset, params[k].numel())
            self.lane_index[k] = i
            offset += params[k].numel()
        self.lane_total = offset
        # lane parameters autograd need not differentiate once the uses are
        # cross-checked (book-keeping): their per-example gradients come from
        # the output gradients in the hooks; not those of expanded container
        # parameters (their hook sits on the expanded copy)
        expanded = {key for b in self.bindings if b.expand for key in b.keys.values()}
        self._lane_params = [params[k] for k in keys if k not in expanded]
        for b in self.bindings:
            b.off = any(key in self.lane_offsets and key not in expanded for key in b.keys.values())
        self.lane_dtype = torch.float64 if keys and params[keys[0]].dtype == torch.float64 else torch.float32
        self.lane_device = params[keys[0]].device if keys else None
        for b in self.bindings:
            # (local name, key, index of its view of the lane buffer); a
            # module's bias first (a normalization weight's shortcut reuses its sum)
            b.lane = sorted(
                [(local, key, self.lane_index[key]) for local, key in b.keys.items() if key in self.lane_offsets],
                key=lambda entry: entry[0] != "bias",
            )
            b.slow = frozenset(local for local, key in b.keys.items() if key not in self.lane_offsets)
            b.early = frozenset(
                local
                for local in b.slow
                if local == "weight"
                and self.norm_mode in ("mixed", "instantiate")
                and b.rule.instantiates_early
                and not b.fallback
                and all_uses[b.keys[local]] == 1
                and b.keys[local] not in no_lane
            )
            b.needs_save = b.fallback or b.rule.needs_save(b.module, b.params)
            # (a module that saved nothing has nothing to drop after its eager sums)
            b.done = getattr(b.rule, "done", None) if not b.slow and b.needs_save else None
        self._lane_buf: Tensor | None = None
        self._lane_views: tuple[Tensor, ...] = ()  # per lane parameter, made with the buffer
        self._lane_seen: set[str] = set()

    def _replan_lane(self, moved: set[str]) -> None:
        """The flat lane planned again after the parameters ``moved`` left
        their modules' rules for a recomputation, or came back (before the
        backward pass, or at its end)."""
        offs = {id(x): x.off for x in self.bindings}
        self._plan_lane(self._no_lane)
        for x in self.bindings:
            x.off = x.off or offs[id(x)]
        ruled = {id(self._param(k)) for b in self.bindings for k in b.keys.values()}
        taken = {id(self._param(k)) for cs in self._idle_in.values() for c in cs for k in c.keys.values()}
        taken |= {id(self._param(k)) for b in self.bindings if b.fallback for k in b.keys.values()}
        self._switchable = self._lane_params + [p for p in self._off_weights if id(p) in ruled and id(p) not in taken]

    def _watch(self, module: nn.Module, snap: list[int]) -> None:
        """The first passes: hooked children of ``module`` that did not run
        during its forward although their parameters train (the parent used
        their weights directly) are handed to ``module``'s recomputation, in
        this forward and every later one."""
        children = self._watched[id(module)][1]
        # (a module holding a parameter that other hooked modules also hold, e.g. T5's
        # ``shared`` tied to ``embed_tokens`` and ``lm_head``, is an alias: their hooks see the uses)
        idle = [
            c
            for c, r in zip(children, snap)
            if c.ran == r
            and not c.absorbed
            and not c.unused
            and c in self.bindings
            and not any(self._holders.get(k, 0) > 1 for k in c.keys.values())
        ]
        if not idle:
            return
        for c in idle:
            c.absorbed = True
            self.bindings.remove(c)
        self._idle_in.setdefault(id(module), []).extend(idle)
        self._replan_lane({k for c in idle for k in c.keys.values()})

    def _unused_back(self, got: set[str]) -> None:
        """After a first backward pass: a module taken over because it did
        not run (see :meth:`_watch`) whose parameters got no gradient at all
        is simply unused in this model's forward (CLIP's text tower under an
        image classifier, a pooler no head reads): it gets its own hooks
        back, so that its parent is not recomputed at every step for nothing."""
        back = []
        for key, cs in list(self._idle_in.items()):
            for c in [c for c in cs if not any(k in got for k in c.keys.values())]:
                cs.remove(c)
                c.absorbed, c.unused = False, True
                self.bindings.append(c)
                back.append(c)
            if not cs:
                del self._idle_in[key]
        if back:
            self._replan_lane(set())
            keys = {k for c in back for k in c.keys.values()}
            self._escalated = {k: e for k, e in self._escalated.items() if not keys & set(e.keys.values())}

    def _absorb_idle(self, b: Binding) -> None:
        """In the first passes: modules inside the generic-path container ``b``
        that did not run during its forward, although their parameters train
        (Mamba's ``dt_proj``, whose weight and bias the mixer uses directly),
        are taken over by ``b``: its recomputation covers their parameters
        too, from this forward on (their own hooks would never see a use)."""
        idle = [c for c, r in zip(b.inner, b.snapshot) if c.ran == r and not c.absorbed]
        b.snapshot = ()
        if not idle:
            return
        prefix = {id(m): k + "." for k, m in b.module.named_modules() if k}
        moved: set[str] = set()
        for c in idle:
            c.absorbed = True
            for local, key in c.keys.items():
                b.keys[prefix[id(c.module)] + local] = key
                moved.add(key)
            self.bindings.remove(c)
        b.params = frozenset(b.keys)
        b.inner = [c for c in b.inner if not c.absorbed]
        self._replan_lane(moved)

    def no_early(self, keys: list[str]) -> None:
        """Never instantiate these parameters in the backward hook."""
        drop = set(keys)
        for b in self.bindings:
            b.early = frozenset(local for local in b.early if b.keys[local] not in drop)

    def generic_path(self) -> dict[str, str]:
        """The trainable parameters whose per-example gradients take the exact
        generic path (a recomputation of their module, see
        :mod:`dpft.rules.fallback`) instead of a fast rule: canonical name ->
        the module recomputed and why.  Before the first step this is the
        plan; modules that switch to the generic path in a forward (a weight
        that never reached its operator, a batch-independent output taken over
        by an enclosing module) show after it."""
        out: dict[str, str] = {}
        for b in self.bindings:
            if b.fallback:
                why = b.rule.why
                if type(b.rule) is FallbackRule:
                    why = (
                        "parameters held directly by a module with children (layer scale, class token, "
                        "position table, SSM parameter)"
                        if any(True for _ in b.module.children())
                        else "a module type without a fast rule, or a weight it does not pass to its operator"
                    )
                for local, key in b.keys.items():
                    out[key] = f"module '{b.name}' ({type(b.module).__name__}): {why}"
        for esc in self._escalated.values():
            for local, key in esc.keys.items():
                out[key] = f"module '{esc.name}' ({type(esc.module).__name__}): {esc.rule.why}"
        return out

    def _param(self, key: str) -> nn.Parameter:
        if not hasattr(self, "_params"):
            self._params = dict(self.model.named_parameters())
        return self._params[key]
