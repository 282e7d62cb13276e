"""Module hooks that capture what per-example gradients need.

For every module that owns a trainable parameter a forward hook attaches a
gradient hook to the module's *output*; the rule turns the output gradient
into per-example gradient contributions.  Activations are kept only when a
weight of that module trains: in bias-only mode (DP-BiTFiT) nothing is kept
beyond the eagerly reduced ``(B, p)`` per-example bias gradients.

Output-tensor hooks (not module backward hooks) are used on purpose: they
keep working when the output is later modified in place (``x += shortcut``,
``ReLU(inplace=True)``), where module backward hooks fail.

At the end of each backward pass (an autograd engine callback) the collected
contributions are handed to a sink (the engine), which clips and sums them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .rules import FALLBACK, Call, Contribution, Direct, Rule, find_rule
from . import norms
from .norms import acc_dtype_of, instantiation_pays, prefer_ghost
from .precision import full_fp32
from .rules.base import HALF, Factored, UnsupportedModuleError, clear_half_copies
from .rules.embedding import check_embedding
from .rules.fallback import FallbackRule, _flat_tensors, rng_state


class BatchNormError(TypeError):
    """BatchNorm in training mode mixes examples and cannot be made DP."""


BATCHNORM_MESSAGE = (
    "BatchNorm normalizes with statistics of the whole batch, so one example's output (and "
    "gradient) depends on the other examples: per-example clipping does not bound the "
    "sensitivity and the result is not differentially private. Replace it with GroupNorm: "
    "`model = dpft.convert_batchnorm_to_groupnorm(model)`, or keep BatchNorm frozen in eval "
    "mode (running statistics, no trainable BatchNorm parameters)."
)


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
    lane: list[tuple[str, str, int, int, tuple[int, ...]]] = field(default_factory=list)  # (local, key, offset, numel, shape)
    slow: frozenset[str] = frozenset()  # params handed to the sink as contributions
    early: frozenset[str] = frozenset()  # weights that may be instantiated in the backward hook
    early_by_shape: dict = field(default_factory=dict)  # (output-gradient shape, dtype) -> instantiated early?
    done: Any = None  # the rule's hook to drop saved inputs once eager results are out
    off: bool = False  # some of its parameters are switched off for autograd in a whole forward


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
        rule = find_rule(module)
        recursive = isinstance(rule, FallbackRule) and rule.recursive
        params = {k: p for k, p in _module_params(module, recursive).items() if p.requires_grad}
        if recursive:
            skip.update(id(m) for m in module.modules())
        if not params:
            continue
        label = mname or type(module).__name__
        if isinstance(module, _BatchNorm):
            raise BatchNormError(f"dpft: module '{label}' ({type(module).__name__}) has trainable parameters. " + BATCHNORM_MESSAGE)
        if isinstance(module, nn.Embedding):
            check_embedding(module, label)
        expand = False
        if rule is not None and not all(rule.supports(module, k) for k in params):
            bad = [k for k in params if not rule.supports(module, k)]
            if not list(module.children()):
                rule = FALLBACK
            else:
                raise UnsupportedModuleError(
                    f"dpft: parameter '{bad[0]}' of module '{label}' ({type(module).__name__}) is "
                    "not handled by its rule; freeze it (requires_grad=False)."
                )
        if rule is None:
            if not list(module.children()):
                rule = FALLBACK
            elif all(p.ndim >= 2 and p.shape[0] == 1 for p in params.values()):
                rule, expand = EXPAND, True
            else:
                bad = next(k for k, p in params.items() if not (p.ndim >= 2 and p.shape[0] == 1))
                raise UnsupportedModuleError(
                    f"dpft: trainable parameter '{(mname + '.' if mname else '') + bad}' is held "
                    f"directly by module '{label}' ({type(module).__name__}), which has child modules "
                    "and no per-example rule; dpft cannot compute its per-example gradient exactly. "
                    "Freeze it (requires_grad=False), or register a rule with dpft.register_rule."
                )
        keys = {k: canonical[id(p)] for k, p in params.items()}
        for k in keys.values():
            owner.setdefault(k, label)
        if expand:
            for k in params:
                bindings.append(Binding(module, label, rule, frozenset([k]), {k: keys[k]}, expand=True))
        else:
            bindings.append(Binding(module, label, rule, frozenset(params), keys))
    return bindings, owner


def _autocast_state(device: torch.device | None) -> tuple[str, torch.dtype] | None:
    """The autocast context active for ``device`` (re-entered when a fallback recomputes)."""
    kind = device.type if device is not None else "cpu"
    try:
        if torch.is_autocast_enabled(kind):
            return kind, torch.get_autocast_dtype(kind)
    except (TypeError, RuntimeError):  # device types without autocast
        return None
    return None


class _HookDict(dict):
    """A tensor's hook dictionary (weak-referenceable, like torch's OrderedDict)."""


def is_dtensor(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor (an FSDP2-sharded parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(p, DTensor)


class _Tap(torch.autograd.Function):
    """``out`` made part of the graph through ``weight`` (whose gradient it
    never gives): the output of a book-keeping layer computed with its
    parameters switched off, when no input requires grad either (``weight``:
    the layer's weight, or a scalar leaf for a switched-off lane).  ``out`` is returned
    itself (marked as modified in place, so that later in-place operations on
    it stay allowed); a view is copied first, as autograd requires."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, weight: Tensor) -> Tensor:
        if out._base is not None:
            return out.clone()
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _add_grad_hook(t: Tensor, fn: Callable[[Tensor], None]) -> None:
    """``t.register_hook(fn)`` without the removable handle (these hooks are
    never removed: they go with the graph), which costs a few microseconds
    per hooked module and step.  Plain tensors with a ``grad_fn`` take the
    short way through the same hook dictionary ``register_hook`` uses; any
    other case (tensor subclasses, hooks already present) the public one."""
    node = t.grad_fn
    if node is not None and type(t) is Tensor and t._backward_hooks is None:
        try:
            # a dict subclass can be weakly referenced, as later register_hook
            # calls on the same tensor need; -1 is no handle id (those count up from 0)
            hooks = _HookDict()
            hooks[-1] = fn
            t._backward_hooks = hooks
            node._register_hook_dict(t)
            return
        except (AttributeError, RuntimeError, TypeError):
            t._backward_hooks = None  # type: ignore[assignment]
    t.register_hook(fn)


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
            return a[0]
    return None


Sink = Callable[[dict[str, list[Contribution]], int, "tuple[tuple[str, ...], Tensor] | None"], None]


class Capture:
    """Installs and removes the hooks; hands per-backward contributions to ``sink``."""

    def __init__(
        self,
        model: nn.Module,
        sink: Sink,
        *,
        book_keeping: bool = False,
        no_lane: set[str] | frozenset[str] = frozenset(),
        norm_mode: str = "ghost",
    ) -> None:
        self.model = model
        self.sink = sink
        self.book_keeping = book_keeping
        # "mixed" / "instantiate": a weight whose per-example gradient will be
        # instantiated is instantiated as soon as its output gradient arrives
        self.norm_mode = norm_mode
        self.bindings, self.owner = plan_model(model)
        self._plan_lane(set(no_lane))
        self.batch_size: int | None = None
        self.enabled = True
        self._received: list[tuple[Binding, Call]] = []
        self._queued = False
        self._handles: list[Any] = []
        self._param_handles: list[Any] = []
        self._autograd: dict[str, Tensor | None] = {}
        self.check_passes = 2  # backward passes in which sums are cross-checked
        self._passes = 0
        self._half = False
        # parameters switched off for autograd during one forward (see _root_pre)
        self._off: list[nn.Parameter] = []
        self._switchable: list[nn.Parameter] = []  # the lane and the weights _root_pre switches off
        self._pre_handles: list[Any] = []
        # a hooked module ran outside the model's forward (activation
        # checkpointing recomputes blocks during the backward pass): then the
        # switches stay per module, so that a recomputation sees the
        # parameters as the forward did (checkpoint compares what both saved)
        self._outside_root = False
        # FSDP2 swaps unsharded copies of the parameters in for each forward:
        # switching the registered (sharded) ones would not reach them
        self._sharded = any(is_dtensor(p) for p in model.parameters())
        self._tap_leaves: dict[torch.device, Tensor] = {}
        # inputs of layers that may be instantiated early, by identity: how many
        # such layers read each (query/key/value share theirs), since the last
        # backward pass; an input read by several is not freed by one of them
        self._input_uses: dict[int, int] = {}
        self._handler = self._on_grad  # one bound method for every call's hook (see Call.fire)

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

    # -- installation -------------------------------------------------------
    def attach(self) -> None:
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        # weights that every one of their modules switches off under book-keeping
        # (a weight also read by the fallback or another rule stays on)
        skips = {
            id(b): self.book_keeping and b.rule.skip_weight_grad and not b.expand
            and not isinstance(b.rule, FallbackRule) and any(k != "bias" for k in b.params)
            for b in self.bindings
        }
        users: dict[str, list[tuple[Binding, str]]] = {}
        for b in self.bindings:
            for local, key in b.keys.items():
                users.setdefault(key, []).append((b, local))
        off_keys = {
            key for key, us in users.items()
            if all(skips[id(b)] and local != "bias" and "." not in local for b, local in us)
        }
        self._switchable = self._lane_params + [self._param(k) for k in users if k in off_keys]
        for b in self.bindings:
            if b.expand:
                h.append(b.module.register_forward_pre_hook(partial(self._expand_pre, b)))
                h.append(b.module.register_forward_hook(partial(self._expand_post, b), always_call=True))
                continue
            if isinstance(b.rule, FallbackRule):
                h.append(b.module.register_forward_pre_hook(partial(self._pre, b), with_kwargs=True))
            elif skips[id(b)]:
                # per module in the first backward passes (a use of the weight
                # outside the module still reaches autograd, which the parameter
                # hooks catch); after them, switched off with the lane in
                # ``_root_pre`` and this hook removed
                handle = b.module.register_forward_pre_hook(partial(self._pre, b), with_kwargs=True)
                h.append(handle)
                if all(b.keys[k] in off_keys for k in b.params if k != "bias" and "." not in k):
                    self._pre_handles.append(handle)
                    b.off = True
            h.append(b.module.register_forward_hook(partial(self._post, b)))
        # after the bindings' hooks: a model that is itself a hooked layer has its
        # output handled (``_post``) before the forward's state is cleared
        h.append(self.model.register_forward_hook(self._root_post, always_call=True))
        covered = {k for b in self.bindings for k in b.keys.values()}
        self._param_handles = []
        for name, p in self.model.named_parameters():
            if p.requires_grad and name in covered:
                self._param_handles.append(p.register_hook(partial(self._on_param_grad, name)))
        for name, m in self.model.named_modules():
            if isinstance(m, _BatchNorm):
                h.append(m.register_forward_pre_hook(partial(self._batchnorm_pre, name)))

    def detach(self) -> None:
        for h in self._handles + self._param_handles:
            h.remove()
        self._handles = []
        self._param_handles = []
        self._pre_handles = []
        self._restore_all()

    def _restore_all(self) -> None:
        for p in self._off:
            p.requires_grad_(True)
        self._off = []
        for b in self.bindings:
            for p in b.toggled:
                p.requires_grad_(True)
            b.toggled = []
            for k, p in b.stash.items():
                b.module._parameters[k] = p
            b.stash = {}

    # -- forward hooks ------------------------------------------------------
    def _active(self) -> bool:
        return self.enabled and torch.is_grad_enabled()

    def _batchnorm_pre(self, name: str, module: nn.Module, args: tuple) -> None:
        if module.training and self.enabled and torch.is_grad_enabled():
            raise BatchNormError(f"dpft: module '{name}' ({type(module).__name__}) is in training mode. " + BATCHNORM_MESSAGE)

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active():
            return
        t = _first_tensor(args, kwargs)
        if t is None or t.ndim == 0:
            raise RuntimeError("dpft: the model's forward got no batched tensor argument; cannot tell the batch size")
        self.batch_size = int(t.shape[0])
        if (self.book_keeping and self._passes >= self.check_passes and not self._off and not self._outside_root
                and not self._sharded):
            # Book-keeping for the lane (biases, norm weights) and the weights:
            # autograd computes no summed gradient for them (for a bias, a
            # reduction over the whole output gradient; an AccumulateGrad and a
            # parameter hook per parameter), only input gradients; the hooks get
            # the output gradients all the same (``_post`` ties an output to the
            # graph where nothing else does).  Only after the first backward
            # passes, which cross-check our sums against autograd's (the
            # parameter hooks are removed after them).
            for p in self._switchable:
                if p.requires_grad:
                    p.requires_grad_(False)
                    self._off.append(p)

    def _root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        # the batch size belongs to this forward only: a later call of a submodule
        # on its own must not inherit it (a stale size would "broadcast" a
        # one-example output into copies that are each clipped separately)
        self.batch_size = None
        if self._off:
            for p in self._off:
                p.requires_grad_(True)
            self._off = []
        # safety net: a forward that raised midway must not leave weights frozen
        if any(b.toggled or b.stash for b in self.bindings):
            self._restore_all()

    def _leaf(self, device: torch.device) -> Tensor:
        """A scalar that requires grad, for :class:`_Tap` where the layer's own
        parameters are switched off (it never receives a gradient).  On the
        output's device: a node with inputs on two devices would make the
        backward pass hop between autograd's device threads."""
        leaf = self._tap_leaves.get(device)
        if leaf is None:
            leaf = self._tap_leaves[device] = torch.zeros((), device=device, requires_grad=True)
        return leaf

    def _pre(self, b: Binding, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active():
            return
        if isinstance(b.rule, FallbackRule):
            dev = next((a.device for a in args if isinstance(a, Tensor)), None)
            b.rng = rng_state(dev)
            b.kwargs = kwargs
            b.autocast = _autocast_state(dev)
        elif self.book_keeping:
            # Book-keeping: autograd need not compute the (non-private) weight
            # gradient; we compute the clipped sum ourselves.  Where nothing
            # else makes the output require grad (the model's first layer:
            # input without grad), ``_post`` ties it to the graph with
            # :class:`_Tap`, which costs nothing, so the output gradient still
            # reaches our hook (autograd would otherwise compute the weight
            # gradient of that layer only to have it thrown away: a slow
            # cuDNN kernel for an RGB stem, a dense table for an embedding).
            for k in b.params:
                if k != "bias" and "." not in k:
                    p = module._parameters[k]
                    if p.requires_grad:
                        p.requires_grad_(False)
                        b.toggled.append(p)

    def _post(self, b: Binding, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.batch_size is None and not self._outside_root and self._active():
            self._outside_root = True
        tapped: Any = None
        toggled = b.toggled
        if toggled or (self._off and b.off):
            if toggled:
                for p in toggled:
                    p.requires_grad_(True)
                b.toggled = []
            if isinstance(output, Tensor) and not output.requires_grad and output.is_floating_point():
                anchor = toggled[0] if toggled else self._leaf(output.device)
                output = tapped = _Tap.apply(output, anchor)
        if not (self.enabled and torch.is_grad_enabled()):
            return tapped
        n = self.batch_size
        if b.fallback:
            flat = _flat_tensors(output)
            if not any(t is not None and t.requires_grad for t in flat):
                return None
            call = Call(module, b.rule, n if n is not None else flat[0].shape[0])
            call.saved["kwargs"] = b.kwargs
            call.saved["rng"] = b.rng
            call.saved["autocast"] = b.autocast
            b.kwargs, b.rng = {}, None
            b.rule.save(call, module, args, output, b.params)
            call.grads = [None] * len(flat)
            for i, t in enumerate(flat):
                if t is not None and t.requires_grad:
                    t.register_hook(partial(self._on_fallback_grad, b, call, i))
            return None
        if not isinstance(output, Tensor):
            raise UnsupportedModuleError(
                f"dpft: module '{b.name}' ({type(module).__name__}) returned {type(output).__name__}, "
                "expected a tensor"
            )
        if not output.requires_grad:
            return None
        lead = output.shape[0]
        if n is None:
            n = lead
        replaced = tapped
        if lead != n:
            if lead == 1:
                # broadcast over the batch (e.g. GPT-2 position embeddings with
                # (1, T) position ids): expand so each example gets its own gradient
                output = replaced = output.expand(n, *output.shape[1:])
            else:
                raise RuntimeError(
                    f"dpft: output of module '{b.name}' has leading dimension {lead}, "
                    f"but the batch size is {n}; dpft needs the batch dimension first "
                    "(e.g. batch_first=True)."
                )
        call = Call(module, b.rule, n)
        if b.needs_save:
            b.rule.save(call, module, args, output, b.params)
        if (b.early and self.book_keeping and args and isinstance(args[0], Tensor)
                and (output.shape, output.dtype) not in b.early_by_shape):
            # counted only while this layer's choice for this shape is open (it
            # is made once, in the backward hook); an id is unique while the
            # input lives, and the saved call keeps it alive
            uses = self._input_uses
            if len(uses) > 1 << 16:  # forwards without a backward pass (counts are only a memory hint)
                uses.clear()
            key = call.saved["input_id"] = id(args[0])
            uses[key] = uses.get(key, 0) + 1
        call.handler, call.binding = self._handler, b
        _add_grad_hook(output, call.fire)
        return replaced

    def _expand_pre(self, b: Binding, module: nn.Module, args: tuple) -> None:
        if not self._active():
            return
        n = self.batch_size
        if n is None:
            raise RuntimeError("dpft: batch size unknown before the forward of " + b.name)
        (k,) = tuple(b.params)
        p = module._parameters[k]
        e = p.expand(n, *p.shape[1:])
        call = Call(module, b.rule, n)
        e.register_hook(partial(self._on_grad, b, call))
        b.stash[k] = p
        module._parameters[k] = e  # type: ignore[assignment]  # restored in _expand_post

    def _expand_post(self, b: Binding, module: nn.Module, args: tuple, output: Any) -> None:
        for k, p in b.stash.items():
            module._parameters[k] = p
        b.stash = {}

    # -- backward -----------------------------------------------------------
    def _on_grad(self, b: Binding, call: Call, grad: Tensor) -> None:
        if not self.enabled:
            return
        if call.batch_size == 0:
            raise ValueError(
                "dpft: backward() of a batch with 0 examples; an empty Poisson batch has no "
                "forward/backward: call engine.record_empty_batch() instead, then optimizer.step()")
        if b.expand and self._passes < self.check_passes and grad.shape[0] > 1:
            self._check_expand(b, grad)
        if grad.dtype in HALF:
            self._half = True
        if b.slow:
            b.rule.on_grad(call, grad, b.slow)
            if b.early and b.early_by_shape.get((grad.shape, grad.dtype), True):
                self._instantiate_early(b, call, (grad.shape, grad.dtype))
        lane = b.lane
        if lane:
            views = self._lane_views
            n = call.batch_size
            if not views:
                views = self._new_lane(n)
            elif self._lane_buf.shape[0] != n:  # type: ignore[union-attr]
                raise RuntimeError(f"dpft: one backward pass mixed batches of sizes {self._lane_buf.shape[0]} and {n}")  # type: ignore[union-attr]
            seen = self._lane_seen
            eager_into = b.rule.eager_into
            for local, key, index in lane:
                eager_into(call, grad, local, views[index], key in seen)
                seen.add(key)
            if b.done is not None:
                b.done(call)
        if b.slow:
            self._received.append((b, call))
        if not self._queued:
            self._queue()

    def _new_lane(self, n: int) -> tuple[Tensor, ...]:
        """The lane buffer of this backward pass, ``(n, total)`` zeros, and
        every lane parameter's view of it, ``(n, *shape)`` (made in one call,
        not sliced in each hook)."""
        buf = self._lane_buf = torch.zeros(n, self.lane_total, dtype=self.lane_dtype, device=self.lane_device)
        views = buf.split([math.prod(shape) for shape in self._lane_shapes], dim=1)
        self._lane_views = tuple(
            v if len(shape) == 1 else v.view(n, *shape) for v, shape in zip(views, self._lane_shapes)
        )
        return self._lane_views

    def no_early(self, keys: list[str]) -> None:
        """Never instantiate these parameters in the backward hook."""
        drop = set(keys)
        for b in self.bindings:
            b.early = frozenset(local for local in b.early if b.keys[local] not in drop)

    def _instantiate_early(self, b: Binding, call: Call, key: tuple[torch.Size, torch.dtype]) -> None:
        """Build the weight's per-example gradient now if the norm will be taken
        by instantiation anyway (the mixed rule's choice, made on this use's
        positions: the weight has no other use), and free the layer's input
        and output gradient: ``B*P*D`` values kept instead of ``B*T*(P+D)``,
        much less for long sequences.  Same kernels, same result."""
        (local,) = b.early
        c = b.rule.contributions(call, b.early)[local]
        # decided once per output-gradient shape and dtype (the cost rule
        # depends on both) and kept: a layer left to the ghost norm costs no
        # contribution built twice per step after its first call, and the
        # readers of an input are counted only while a choice is open
        now = b.early_by_shape.get(key)
        if now is None:
            # (where the mixed rule instantiates anyway, building the gradient
            # now never takes more memory than at the end, with the factors kept)
            now = b.early_by_shape[key] = isinstance(c, Factored) and (
                self.norm_mode == "instantiate"
                or not prefer_ghost([c])
                or (self.book_keeping and instantiation_pays(c, kept=self._kept_numel(call)))
            )
        if not now or not isinstance(c, Factored):
            return
        call.check_versions(b.name)  # the input must be what the forward pass multiplied
        with full_fp32(), torch.no_grad():
            call.results[local] = norms.instantiate(c, acc_dtype_of(self._param(b.keys[local]).dtype))
        del c
        call.saved.pop("input", None)
        call.saved.pop("grad", None)
        call.versions = ()

    def _kept_numel(self, call: Call) -> int:
        """Values per example of the layer's input if other layers read it too
        (they keep it: building this layer's per-example gradient frees only
        its output gradient), else 0."""
        key = call.saved.get("input_id")
        if key is None or self._input_uses.get(key, 0) > 1:
            x = call.saved.get("input")
            return x.numel() // max(1, x.shape[0]) if isinstance(x, Tensor) and x.ndim else 0
        return 0

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

    def _on_fallback_grad(self, b: Binding, call: Call, index: int, grad: Tensor) -> None:
        if not self.enabled:
            return
        first = all(g is None for g in call.grads)
        call.grads[index] = grad
        if first:
            self._received.append((b, call))
        self._queue()

    def _on_param_grad(self, key: str, grad: Tensor) -> None:
        if not self.enabled:
            return
        self._autograd[key] = grad if self._passes < self.check_passes else None
        self._queue()

    def _check_uses(self, out: dict[str, list[Contribution]], lane: Tensor | None, seen: set[str]) -> None:
        """Catch uses of a trainable parameter that bypass its module's hooks
        (e.g. ``F.linear(x, other.weight)``): autograd delivered a gradient
        that dpft has no per-example account of."""
        autograd, self._autograd = self._autograd, {}
        half, self._half = self._half, False
        for key, grad in autograd.items():
            cs = out.get(key)
            if cs is None and key not in seen:
                raise UnsupportedModuleError(
                    f"dpft: parameter '{key}' received a gradient through a use that no dpft hook saw "
                    "(used functionally outside its module, or by a module that does not call it?  Or the "
                    "module's output is a view, e.g. a Linear's on 3-D input, changed in place afterwards: "
                    "make that operation out of place); its per-example gradient is unknown. Freeze it or "
                    "route the use through the module."
                )
            if grad is None:
                continue
            if cs is None:
                off, numel = self.lane_offsets[key]
                ours = lane[:, off : off + numel].sum(0).view(grad.shape)  # type: ignore[index]
            elif all(isinstance(c, Direct) for c in cs):
                ours = sum(c.grad.sum(0) for c in cs)
            else:
                continue
            want = grad.to(ours.dtype)
            tol = 5e-2 if half or grad.dtype in HALF else 1e-3
            err = float((ours - want).norm())
            if err > tol * float(want.norm()) + 1e-6 * (1 + float(ours.norm())):
                raise UnsupportedModuleError(
                    f"dpft: parameter '{key}' is also used outside the module dpft hooks for it "
                    f"(its summed per-example gradients differ from autograd's by {err:.3g}); "
                    "its per-example gradient would be wrong. Freeze it or route every use through the module."
                )

    def _queue(self) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)

    def _backward_end(self) -> None:
        self._queued = False
        clear_half_copies()
        self._input_uses = {}
        received, self._received = self._received, []
        lane, self._lane_buf = self._lane_buf, None
        self._lane_views = ()
        seen, self._lane_seen = self._lane_seen, set()
        if not received and lane is None:
            if self._autograd:
                self._check_uses({}, None, seen)
            return
        sizes = {call.batch_size for _, call in received}
        if lane is not None:
            sizes.add(lane.shape[0])
        if len(sizes) != 1:
            raise RuntimeError(f"dpft: one backward pass mixed batches of sizes {sorted(sizes)}")
        n = sizes.pop()
        out: dict[str, list[Contribution]] = {}
        self.enabled = False
        try:
            for b, call in received:
                call.check_versions(b.name)
                if b.fallback and self._passes < self.check_passes:
                    call.saved["check_mixing"] = b.name  # the first passes also check that examples stay apart
                contribs = b.rule.contributions(call, b.slow)
                # from here on the contributions hold the only references, so
                # that the sink can free each layer's tensors once it is summed
                call.saved.clear()
                call.results.clear()
                call.versions = ()
                call.grads = ()
                for local, c in contribs.items():
                    key = b.keys[local]
                    if isinstance(c, Direct):
                        expected = (n, *self._param(key).shape)
                        if tuple(c.grad.shape) != expected:
                            raise RuntimeError(
                                f"dpft: per-example gradient of '{key}' from module '{b.name}' has shape "
                                f"{tuple(c.grad.shape)}, expected {expected}"
                            )
                    out.setdefault(key, []).append(c)
        finally:
            self.enabled = True
        del received
        self._check_uses(out, lane, seen)
        self._passes += 1
        if self._passes >= self.check_passes and self._pre_handles and not self._outside_root and not self._sharded:
            # from the next forward on, ``_root_pre`` switches the weights off
            for h in self._pre_handles:
                h.remove()
            self._pre_handles = []
        if self._passes > self.check_passes and self._param_handles:
            # the uses were cross-checked: stop paying for the parameter hooks
            for h in self._param_handles:
                h.remove()
            self._param_handles = []
        self.sink(out, n, (self.lane_keys, lane) if lane is not None else None)

    def _param(self, key: str) -> nn.Parameter:
        if not hasattr(self, "_params"):
            self._params = dict(self.model.named_parameters())
        return self._params[key]
