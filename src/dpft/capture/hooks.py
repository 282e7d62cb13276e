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

The planning (:mod:`.plan`), the refusals and self-checks (:mod:`.checks`) and
the torch-internals corner (:mod:`.autograd`) live beside this module;
:class:`Capture` takes the first two as mixins, so a hook calls no further.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..clip import norms
from ..clip.two_pass import Fingerprints
from ..clip.norms import (
    acc_dtype_of,
    instantiation_frees,
    instantiation_pays,
    prefer_ghost,
)
from ..distributed import is_dtensor
from ..precision import full_fp32
from ..rules import ESCALATED, FALLBACK, Call, Contribution, Direct
from ..rules.base import HALF, Factored, UnsupportedModuleError, clear_half_copies
from ..rules.embedding import EmbeddingRule
from ..rules.fallback import FallbackRule, _flat_tensors, fresh_caches, rng_state, substitution
from .autograd import (
    _add_grad_hook,
    _autocast_state,
    _no_pull_back,
    _OpTap,
    _Pack,
    _saving_hooks_active,
    _Tap,
)
from .checks import (
    BATCHNORM_MESSAGE,
    BatchNormError,
    SelfChecks,
    _fingerprint,
    _named,
    _Print,
)
from .plan import Binding, LanePlanning, plan_model


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
            return a[0]
    return None


def _device_of(module: nn.Module, args: tuple, kwargs: dict) -> torch.device | None:
    """The device a module's forward runs on, for the RNG and autocast state a
    recomputation replays: its first tensor argument's, positional or keyword
    (Hugging Face calls its stacks with keywords only), else its parameters'."""
    t = _first_tensor(args, kwargs)
    if t is None:
        t = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if t is None else t.device


Sink = Callable[[dict[str, list[Contribution]], int, "tuple[tuple[str, ...], Tensor] | None"], None]


def _flat_batch_view(x: Tensor, n: int) -> bool:
    """Whether ``x`` is a flat view of a contiguous batch-first tensor of ``n``
    examples (``h.view(-1, d)`` of a ``(B, T, d)`` tensor): its rows are the
    examples' rows, example by example (the probe the recomputation pulls each
    example's output rows back to: mixture-of-experts blocks with a shared
    expert, whose sibling layers leave no batch-first tensor nearby to check against)."""
    base = x._base
    return (
        base is not None
        and base.ndim > 0
        and base.shape[0] == n
        and base.is_contiguous()
        and x.is_contiguous()
        and x.data_ptr() == base.data_ptr()
        and x.numel() == base.numel()
    )


class Capture(LanePlanning, SelfChecks):
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
        self._no_lane = set(no_lane)
        self._holders: dict[str, int] = {}  # parameter -> how many bindings hold it (tied weights: several)
        for b in self.bindings:
            for key in b.keys.values():
                self._holders[key] = self._holders.get(key, 0) + 1
        self._plan_lane(self._no_lane)
        for b in self.bindings:
            if isinstance(b.rule, FallbackRule) and not b.rule.recursive and not b.expand:
                inside = {id(m) for m in b.module.modules()} - {id(b.module)}
                b.inner = [c for c in self.bindings if id(c.module) in inside and not c.expand]
        self.batch_size: int | None = None
        self.enabled = True
        # a pull-back of the rows check (dpft.capture.checks) is running: the grad
        # hooks are off (``enabled`` False) but a checkpointed region it recomputes
        # runs the forward hooks as the backward pass's recomputation would, so that
        # checkpoint sees the same tensors saved as in the forward
        self._probe = False
        self._ckpt_seen = False  # a forward of the first passes ran a checkpointed region
        self._last_batch: int | None = None  # the batch size of the last forward of the model
        self._warned_unchecked = False  # UncheckedRowsWarning given (a model returning no batch-first tensor)
        self._received: list[tuple[Binding, Call]] = []
        self._queued = False
        self._handles: list[Any] = []
        self._param_handles: list[Any] = []
        self._autograd: dict[str, _Print | None] = {}
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
        # batch-first (or verified example-major flattened) outputs of hooked
        # layers in this forward, in the first passes: where flattened rows
        # are checked against (see _rows_problem)
        self._anchors: deque[Tensor] = deque(maxlen=2)  # (the nearest ones: bounded memory)
        # enclosing modules that may take over parameters whose module returned
        # no per-example output (see _escalate): their inputs in this forward
        names = dict(model.named_modules())
        self._names = {id(m): k for k, m in names.items()}
        self._parents = {id(m): (k.rpartition(".")[0], names[k.rpartition(".")[0]]) for k, m in names.items() if k}
        self._stash: dict[int, tuple] = {}
        self._pending: dict[int, list[Binding]] = {}
        self._escalated: dict[tuple, Binding] = {}
        self._watched: dict[int, tuple[nn.Module, list[Binding]]] = {}
        self._watch_snap: dict[int, list[int]] = {}
        self._batch_first_now: set[int] = set()  # bindings with a batch-first output in this forward
        self._escalated_now: set[int] = set()  # bindings whose output went to an enclosing module in this forward
        self._targets: set[int] = set()  # modules that took over parameters of a module inside them
        self._idle_in: dict[int, list[Binding]] = {}  # module id -> hooked children it recomputes (never ran)
        # the first passes: outputs whose leading dimension equals the batch size, taken
        # as one row per example, to verify at the end of the forward (see _own_rows)
        self._unverified: list[tuple[Binding, Tensor, Any]] = []  # (binding, output, its call)
        self._kept: dict[
            int, tuple
        ] = {}  # the first passes: enclosing modules' inputs and outputs (see _take_over_now)
        self._refusal = ""  # rows found not to be examples, none to take them over (see _own_rows)
        # the generic path's substitution (dpft.rules.substitute) by binding id: active
        # during the module's forward, then finished until its call is made
        self._subst_ok: set[int] = set()
        self._subst: dict[int, Any] = {}
        self._subst_done: dict[int, Any] = {}
        # two-pass clipping (the engine's, see dpft.clip.two_pass): in its first
        # backward pass a dict, parameter -> (B,) squared per-example norm taken
        # in the layer's backward hook (its captures dropped at once); and
        # whether book-keeping must leave the weights on (autograd's gradient
        # of the second pass is the clipped sum)
        self.early_norms: dict[str, Tensor] | None = None
        self.weights_on = False
        # its second pass: the backward hooks do nothing (the forward hooks run
        # as in the forward, so that a checkpoint's recomputation saves the same)
        self.passive = False
        # and in both passes: layer -> projections of its output gradient (see
        # dpft.clip.two_pass.Fingerprints), accumulated while this is a dict
        self.fingerprints: dict | None = None
        # (two-pass clipping's first pass: the parameters whose norms a hook took,
        # seen by the end-of-pass check of the uses; values unused, None)
        self._early_prints: dict[str, Any] = {}
        self.multi_use: set[str] = set()  # parameters with several calls in one backward pass

    # -- installation -------------------------------------------------------
    def attach(self) -> None:
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        # weights that every one of their modules switches off under book-keeping
        # (a weight also read by the fallback or another rule stays on)
        skips = {
            id(b): self.book_keeping
            and b.rule.skip_weight_grad
            and not b.expand
            and b.tap is None
            and not isinstance(b.rule, FallbackRule)
            and any(k != "bias" for k in b.params)
            for b in self.bindings
        }
        users: dict[str, list[tuple[Binding, str]]] = {}
        for b in self.bindings:
            for local, key in b.keys.items():
                users.setdefault(key, []).append((b, local))
        off_keys = {
            key
            for key, us in users.items()
            if all(skips[id(b)] and local != "bias" and "." not in local for b, local in us)
        }
        self._off_weights = [self._param(k) for k in users if k in off_keys]
        self._switchable = self._lane_params + self._off_weights
        for b in self.bindings:
            if b.tap is not None:
                h.append(b.module.register_forward_pre_hook(partial(self._tap_pre, b), with_kwargs=True))
                h.append(b.module.register_forward_hook(partial(self._tap_post, b), always_call=True))
                continue
            if b.expand:
                h.append(b.module.register_forward_pre_hook(partial(self._expand_pre, b)))
                h.append(b.module.register_forward_hook(partial(self._expand_post, b), always_call=True))
                continue
            if isinstance(b.rule, FallbackRule):
                h.append(b.module.register_forward_pre_hook(partial(self._pre, b), with_kwargs=True))
                # (before ``_post``: the substitution's mode is left before the call is made)
                h.append(b.module.register_forward_hook(partial(self._subst_post, b), always_call=True))
                self._subst_ok.add(id(b))
            elif skips[id(b)]:
                b.book_keeping = True
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
        # the modules enclosing a generic-path binding or an embedding (whose
        # output may not carry the examples: a relative position table) keep
        # their inputs during the forward, in case one must take over (_escalate)
        enclosing: dict[int, nn.Module] = {}
        for b in self.bindings:
            if b.fallback or isinstance(b.rule, EmbeddingRule):
                parent = self._parents.get(id(b.module))
                while parent is not None:
                    enclosing[id(parent[1])] = parent[1]
                    parent = self._parents.get(id(parent[1]))
        # in the first passes, the parent of every other hooked module too:
        # a module that never runs while its parameters train (used
        # functionally by its parent, e.g. Mamba's ``dt_proj``) is handed to
        # that parent's recomputation (see _watch)
        self._watched = {}
        for b in self.bindings:
            parent = self._parents.get(id(b.module))
            if parent is not None and not b.expand and not b.fallback:
                self._watched.setdefault(id(parent[1]), (parent[1], []))[1].append(b)
        self._watch_handles: dict[int, list[Any]] = {}
        self._enclosing = set(enclosing)
        for m in enclosing.values():
            h.append(m.register_forward_pre_hook(self._anc_pre, with_kwargs=True))
            h.append(m.register_forward_hook(self._anc_post, always_call=True))
        for key, (m, _) in self._watched.items():
            if key not in enclosing:
                # (before _root_post, which ends the forward's state: a model that is itself a target)
                self._watch_handles[key] = [
                    m.register_forward_pre_hook(self._anc_pre, with_kwargs=True),
                    m.register_forward_hook(self._anc_post, always_call=True),
                ]
        h.append(self.model.register_forward_hook(self._root_post, always_call=True))
        covered = {k for b in self.bindings for k in b.keys.values()}
        self._param_handles = []
        for name, p in self.model.named_parameters():
            if p.requires_grad and name in covered:
                self._param_handles.append(p.register_hook(partial(self._on_param_grad, name)))
                self._param_handles.append(p.register_post_accumulate_grad_hook(self._drop_grad))
        for name, m in self.model.named_modules():
            if isinstance(m, _BatchNorm):
                h.append(m.register_forward_pre_hook(partial(self._batchnorm_pre, name)))

    def detach(self) -> None:
        for h in (
            self._handles + self._param_handles + [h for hs in getattr(self, "_watch_handles", {}).values() for h in hs]
        ):
            h.remove()
        self._watch_handles = {}
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
        return (self.enabled or self._probe) and torch.is_grad_enabled()

    def _batchnorm_pre(self, name: str, module: nn.Module, args: tuple) -> None:
        if module.training and self.enabled and torch.is_grad_enabled():
            raise BatchNormError(
                f"dpft: module '{name}' ({type(module).__name__}) is in training mode. " + BATCHNORM_MESSAGE
            )

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self._active():
            return
        t = _first_tensor(args, kwargs)
        if t is None or t.ndim == 0:
            raise RuntimeError("dpft: the model's forward got no batched tensor argument; cannot tell the batch size")
        self.batch_size = self._last_batch = int(t.shape[0])
        replaced = None
        if (
            self._passes < self.check_passes
            and t.is_floating_point()
            and not t.requires_grad
            and not self._outside_root
        ):
            # the first passes: the model's input (pixels, features) made a leaf that requires
            # grad, the earliest batch-first tensor to check flattened rows against
            # (MobileViT's patches with frozen layers before them, see _rows_problem)
            # (the model gets a copy: in-place changes of its input stay allowed)
            leaf = t.detach().requires_grad_()
            self._anchors.append(leaf)
            x = leaf.clone()
            if any(a is t for a in args):
                replaced = (tuple(x if a is t else a for a in args), kwargs)
            elif any(v is t for v in kwargs.values()):
                replaced = (args, {k: x if v is t else v for k, v in kwargs.items()})
        if (
            self.book_keeping
            and self._passes >= self.check_passes
            and not self._off
            and not self._outside_root
            and not self._sharded
            and not self.weights_on
        ):
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
        return replaced

    def _root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        # the batch size belongs to this forward only: a later call of a submodule
        # on its own must not inherit it (a stale size would "broadcast" a
        # one-example output into copies that are each clipped separately)
        self.batch_size = None
        self._anchors.clear()
        unverified, self._unverified = self._unverified, []
        if unverified and self._active():
            probe = not self._outside_root
            if not (probe and self._own_rows(unverified, output)) and self._passes >= self.check_passes:
                # (not verifiable in this model's forwards: not tried again at every step)
                for b, _, _ in unverified:
                    if b.own is None:
                        b.own = ""
        self._kept = {}
        self._batch_first_now = set()
        self._escalated_now = set()
        self._stash, self._pending = {}, {}
        if self._active():
            # the end-of-backward callback belongs to the backward pass that
            # starts from the model's output: queued by the first hook to
            # fire, which under reentrant activation checkpointing may run in
            # the nested backward pass of the last segment (when nothing
            # outside the segments trains, e.g. LoRA with frozen embeddings
            # and head); queued there, it would clip each segment on its own
            for t in _flat_tensors(output):
                if t is not None and t.requires_grad and t.grad_fn is not None:
                    _add_grad_hook(t, self._on_output_grad)
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
        if not self._active() or b.absorbed:
            return
        if isinstance(b.rule, FallbackRule):
            if b.inner and self._passes < self.check_passes:
                b.snapshot = tuple(c.ran for c in b.inner)
            dev = _device_of(module, args, kwargs)
            b.rng = rng_state(dev)
            b.kwargs = fresh_caches(module, kwargs)
            b.autocast = _autocast_state(dev)
            self._subst_done.pop(id(b), None)
            active = self._subst.get(id(b))
            if active is not None:  # (the module called inside its own forward: not substituted)
                active.nested += 1
                active.failed = "the module is called inside its own forward"
            elif id(b) in self._subst_ok and not (self._outside_root or self._sharded or _saving_hooks_active()):
                mode = substitution(b.rule, module, b.slow, self.batch_size, args)
                if mode is not None:
                    self._subst[id(b)] = mode

            skips = getattr(b.rule, "skips_autograd", None)
            if (
                self.book_keeping
                and self._passes >= self.check_passes
                and not self.weights_on
                and skips is not None
                and any(isinstance(a, Tensor) and a.requires_grad for a in args)
                and skips(module)
            ):
                # a generic-path module whose faster computation the first passes
                # verified (fused experts): autograd need not compute its weights'
                # (non-private) gradients either; ``_post`` switches them back on.
                # Only where an input needs a gradient: the outputs then still do
                # (else a router's outputs would need none, and its call be lost)
                for k in b.params:
                    p = module._parameters.get(k)
                    if p is not None and p.requires_grad and self._holders.get(b.keys[k], 0) == 1:
                        p.requires_grad_(False)
                        b.toggled.append(p)
        elif self.book_keeping and self._passes >= self.check_passes and not self.weights_on:
            # (not in the first backward passes: there autograd's weight
            # gradient is the reference each per-example sum is checked against)
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

    def _subst_post(self, b: Binding, module: nn.Module, args: tuple, output: Any) -> None:
        mode = self._subst.get(id(b))
        if mode is not None and mode.nested:
            mode.nested -= 1
        elif mode is not None:
            del self._subst[id(b)]
            mode.close(output)
            self._subst_done[id(b)] = mode

    def _post(self, b: Binding, module: nn.Module, args: tuple, output: Any) -> Any:
        if b.absorbed:
            return None
        b.ran += 1
        if self.batch_size is None and not self._outside_root and self._active():
            self._outside_root = True
        if self._passes < self.check_passes and self.batch_size is not None:
            if not self._ckpt_seen and self.enabled and (_saving_hooks_active() or not torch.is_grad_enabled()):
                # a forward of the first passes ran a checkpointed region:
                # non-reentrant (saved-tensor hooks) or reentrant (a layer run
                # without gradients inside a forward with them) (the engine's
                # two-pass choice reads it; checked in the first passes only,
                # as a call per layer and step would cost)
                self._ckpt_seen = True
        tapped: Any = None
        toggled = b.toggled
        # (not while the engine computes contributions: a generic-path module
        # recomputed then, vectorized or not, needs no tap)
        on = self.enabled or self._probe
        if toggled or (self._off and b.off and on):
            if toggled:
                for p in toggled:
                    p.requires_grad_(True)
                b.toggled = []
            if isinstance(output, Tensor) and not output.requires_grad and output.is_floating_point():
                anchor = toggled[0] if toggled else self._leaf(output.device)
                output = tapped = _Tap.apply(output, anchor)
        elif (
            b.book_keeping
            and on
            and not self.weights_on
            and isinstance(output, Tensor)
            and output._base is not None
            and output.requires_grad
        ):
            # the first backward passes, where book-keeping leaves the weight on
            # (autograd's gradient is the reference of the self-check): a view
            # is copied as it will be once the weight is off, so that an
            # in-place change after the layer (``h.tanh_()``) works alike
            output = tapped = _Tap.apply(output, self._leaf(output.device))
        if not (on and torch.is_grad_enabled()):
            return tapped
        n = self.batch_size
        if b.fallback:
            if b.snapshot:
                self._absorb_idle(b)
            flat = _flat_tensors(output)
            if not any(t is not None and t.requires_grad for t in flat):
                return None
            if n is not None and not self._batched(b, flat, n, args):
                self._escalate(b)
                return None
            call = self._fallback_call(
                b, module, args, (b.kwargs, b.rng, b.autocast), flat, n if n is not None else flat[0].shape[0]
            )
            subst = self._subst_done.pop(id(b), None)
            if subst is not None:
                call.saved["subst"] = subst
            b.kwargs, b.rng = {}, None
            return None
        if not isinstance(output, Tensor):
            raise UnsupportedModuleError(
                f"dpft: module '{b.name}' ({type(module).__name__}) returned {type(output).__name__}, expected a tensor"
            )
        if not output.requires_grad:
            return None
        lead = output.shape[0]
        if n is None:
            # (no root forward around this call.  A recomputation by reentrant
            # checkpointing, in the backward pass: the examples are those of the
            # last forward, and a layer whose leading dimension differs is refused
            # as in a forward, never taken to be a batch of its own.  Otherwise a
            # non-reentrant recomputation, whose forward already decided, or a module
            # called on its own; a layer seen with examples' rows flattened keeps its factor)
            if self._last_batch is not None and torch._C._current_graph_task_id() != -1 and not _saving_hooks_active():
                n = self._last_batch
            else:
                n = lead // b.rows if b.rows and lead % b.rows == 0 else lead
        replaced = tapped
        rows = 0
        if lead != n:
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if lead == 1:
                if id(b) in self._batch_first_now and not isinstance(b.rule, EmbeddingRule):
                    self._mixed_use(b)
                if (
                    not isinstance(b.rule, EmbeddingRule)
                    and self.batch_size is not None
                    and not any(self._holders.get(k, 0) > 1 for k in b.keys.values())
                    and self._escalate(b, strict=False)
                ):
                    # a layer applied to a tensor shared by the batch (DeBERTa's
                    # pos_key_proj on the relative position embeddings): the model's
                    # code may combine its output with shape-dependent operations
                    # (repeat, bmm), so its shape stays; the enclosing module's
                    # recomputation gives each example its gradient
                    self._escalated_now.add(id(b))
                    return replaced
                # broadcast over the batch (e.g. GPT-2 position embeddings with
                # (1, T) position ids): expand so each example gets its own gradient
                output = replaced = output.expand(n, *output.shape[1:])
            elif lead % n == 0 and x is not None and x.shape[0] == lead and b.rule.rows_ok(module, x):
                # examples' rows flattened into the leading dimension ((B*T, d) in
                # OPT, windows (B*nW, N, d) in Swin): each example's rows must be
                # one contiguous block, verified the first time (the verdict is
                # kept: the layout is the model's, a later step cannot change it)
                problem = b.verdict
                if problem is None:
                    if self.batch_size is None:  # a recomputation, never seen in a forward
                        problem = f"dpft: module '{b.name}': rows of a layer first seen in a recomputation"
                    else:
                        problem = b.verdict = self._rows_problem(b, x, output, n) or ""
                if problem:
                    b.reason = problem
                    # (a layer with lane parameters not inside an activation-checkpointed
                    # region: its recomputation would save what this forward did not)
                    if (
                        self.batch_size is not None
                        and not (b.lane and _saving_hooks_active())
                        and self._escalate(b, strict=False)
                    ):
                        return replaced  # (an enclosing module's recomputation takes these parameters)
                    raise UnsupportedModuleError(problem)
                if self.batch_size is not None:
                    self._anchors.append(output)  # verified: example j's rows are block j
                rows = b.rows = lead // n
                args = (x.unflatten(0, (n, rows)), *args[1:])
            elif self.batch_size is not None and self._escalate(b, strict=False):
                return replaced  # (an enclosing module's recomputation takes these parameters)
            else:
                raise UnsupportedModuleError(
                    f"dpft: output of module '{b.name}' ({type(module).__name__}) has leading dimension "
                    f"{lead}, but the batch size is {n}; dpft needs the batch dimension first (e.g. "
                    "batch_first=True), or examples' rows flattened example by example into it."
                )
        elif self.batch_size is not None and output.requires_grad:
            if id(b) in self._escalated_now:
                self._mixed_use(b)
            if b.own:
                if b.above and self._escalate(b, strict=False):
                    return replaced  # (the enclosing module's recomputation takes these parameters)
                raise UnsupportedModuleError(b.own)
            self._anchors.append(output)
            self._batch_first_now.add(id(b))
            if b.own is None and n > 1:  # (the first passes; later, a layer seen so for the first time)
                self._unverified.append((b, output, None))
        elif (
            b.own is None
            and n > 1
            and n == self._last_batch
            and output.requires_grad
            and torch._C._current_graph_task_id() != -1
            and not _saving_hooks_active()
        ):
            # a recomputation by reentrant checkpointing of a layer no forward verified
            b.own = self._recomputed_rows_problem(b, output, n)
            if b.own:
                raise UnsupportedModuleError(b.own)
        call = Call(module, b.rule, n, rows=rows)
        # under activation checkpointing (a recomputation by reentrant
        # checkpointing runs outside the model's forward; non-reentrant
        # checkpointing saves through its hooks) the weight's per-example
        # gradient is built as soon as its output gradient arrives wherever
        # it fits (see ``_instantiate_early``): the layer's captures are then
        # freed with the segment's activations, not kept to the end of the pass
        ckpt = self.batch_size is None
        if b.needs_save:
            try:
                b.rule.save(call, module, args, output, b.params)
            except (IndexError, TypeError, ValueError) as e:
                raise _named(b, e) from e
            if call.versions and _saving_hooks_active():
                self._pack(call, output)
                ckpt = True
        if ckpt and b.early:
            call.saved["ckpt"] = True
        elif (
            b.early
            and self.book_keeping
            and args
            and isinstance(args[0], Tensor)
            and (output.shape, output.dtype) not in b.early_by_shape
        ):
            # counted only while this layer's choice for this shape is open (it
            # is made once, in the backward hook); an id is unique while the
            # input lives, and the saved call keeps it alive
            uses = self._input_uses
            if len(uses) > 1 << 16:  # forwards without a backward pass (counts are only a memory hint)
                uses.clear()
            key = call.saved["input_id"] = id(args[0])
            uses[key] = uses.get(key, 0) + 1
        call.handler, call.binding = self._handler, b
        if self._unverified and self._unverified[-1][0] is b and self._unverified[-1][1] is output:
            self._unverified[-1] = (b, output, call)
        _add_grad_hook(output, call.fire)
        return replaced

    def _pack(self, call: Call, output: Tensor) -> None:
        """Hand the inputs the rule saved (those it tracks) to the active
        saved-tensor hooks instead of keeping them (see :class:`_Pack`);
        ``_on_grad`` reads them back."""
        tracked = call.versions[0::2]
        names = [k for k, v in call.saved.items() if isinstance(v, Tensor) and any(v is t for t in tracked)]
        if not names or len(names) != len(tracked):
            return  # (a rule that tracks what it does not save by name: kept as usual)
        out = _Pack.apply(self._leaf(output.device), *[call.saved.pop(k).detach() for k in names])
        call.saved["packed"] = (names, out)
        # checkpoint recomputes the values the forward pass used (it checks
        # their metadata); an in-place change after the forward is not seen
        call.versions = ()

    def _tap_pre(self, b: Binding, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if b.fallback or b.absorbed:  # moved to the generic path (below)
            return self._pre(b, module, args, kwargs)
        if self._active():
            dev = _device_of(module, args, kwargs)
            b.kwargs, b.rng, b.autocast = fresh_caches(module, kwargs), rng_state(dev), _autocast_state(dev)
            b.mode = _OpTap(self, b)
            b.mode.__enter__()

    def _tap_post(self, b: Binding, module: nn.Module, args: tuple, output: Any) -> Any:
        if b.fallback or b.absorbed:
            return self._post(b, module, args, output)
        b.ran += 1
        mode, b.mode = b.mode, None
        if mode is None:
            return None
        mode.__exit__(None, None, None)
        state, b.kwargs, b.rng = (b.kwargs, b.rng, b.autocast), {}, None
        if mode.hits or b.lane or output is None:
            return None
        # the weight never entered the parent's operator as it is (timm's
        # StdConv2d standardizes it first): the module takes the exact generic
        # path from now on, this forward's call included
        flat = _flat_tensors(output)
        if not any(t is not None and t.requires_grad for t in flat):
            return None
        b.rule, b.fallback, b.early = FALLBACK, True, frozenset()
        n = self.batch_size
        if n is not None and not self._batched(b, flat, n, args):
            self._escalate(b)
            return None
        self._fallback_call(b, module, args, state, flat, n if n is not None else flat[0].shape[0])
        return None

    def _fallback_call(self, b: Binding, module: nn.Module, args: tuple, state: tuple, flat: list, n: int) -> Call:
        """A generic-path call of ``module``: keep its inputs (and the RNG and
        autocast state its forward saw) and hook every output that needs a gradient."""
        call = Call(module, b.rule, n)
        call.saved["kwargs"], call.saved["rng"], call.saved["autocast"] = state
        b.rule.save(call, module, args, None, b.params)
        call.grads = [None] * len(flat)
        for i, t in enumerate(flat):
            if t is not None and t.requires_grad:
                t.register_hook(partial(self._on_fallback_grad, b, call, i))
        return call

    def _batched(self, b: Binding, flat: list, n: int, args: tuple = ()) -> bool:
        """Whether the outputs needing a gradient carry the examples: leading
        dimension ``n``, or examples' rows flattened into it (verified in the
        first passes, see :meth:`_rows_problem`; for a generic-path module
        with a batch-first data argument, by the recomputation's check that
        each example's output rows reach its own input alone)."""
        dim = b.rule.batch_dim(b.module) if isinstance(b.rule, FallbackRule) else 0
        outs = [t for t in flat if t is not None and t.requires_grad]
        if not all(t.ndim > dim and t.shape[dim] % n == 0 for t in outs):
            return False
        flat_rows = [t for t in outs if t.shape[dim] != n]
        if flat_rows:
            if b.verdict is None:  # verified the first time, the verdict kept (see _post)
                b.verdict = next(
                    (
                        p
                        for t in flat_rows
                        if (p := self._rows_problem(b, t, t, n) if dim == 0 else "batch dim not first")
                    ),
                    "",
                )
                if b.verdict and self._checked_by_recomputation(b, args, n, dim):
                    # the first passes' recomputation pulls each example's rows back to
                    # that batch-first argument and refuses rows that reach another example
                    b.verdict = ""
            if b.verdict:
                return False
        if self.batch_size is not None:
            self._anchors.extend(outs)
            if len(flat_rows) < len(outs):
                if b.own:
                    raise UnsupportedModuleError(b.own)
                if b.own is None and n > 1 and dim == 0:
                    self._unverified.extend((b, t, None) for t in outs if t.shape[0] == n)
        return True

    def _checked_by_recomputation(self, b: Binding, args: tuple, n: int, dim: int) -> bool:
        """Whether the generic path's first passes will verify ``b``'s row
        layout: a positional data argument it probes (see
        :func:`dpft.rules.fallback._check_apart`) is batch-first (``n`` rows,
        not flattened), and those checks are still ahead."""
        rule = b.rule
        if not isinstance(rule, FallbackRule) or self._passes >= self.check_passes or self.batch_size is None:
            return False
        k = len(args) if rule.data_args is None else rule.data_args
        return any(
            isinstance(a, Tensor)
            and a.is_floating_point()
            and a.ndim > dim
            and (a.shape[dim] == n or (dim == 0 and _flat_batch_view(a, n)))
            for a in args[:k]
        )

    def _escalate(self, b: Binding, strict: bool = True) -> bool:
        """``b``'s module returned no per-example output (a relative position
        table, a bias shared by the batch): its parameters' per-example
        gradients appear only where the output meets the examples.  Hand them
        to the nearest enclosing module running in this forward, whose
        recomputation (the generic path) pulls each example's output gradient
        back to them; see :meth:`_anc_post`."""
        parent = self._parents.get(id(b.module))
        while parent is not None and (id(parent[1]) not in self._stash or (b.above and id(parent[1]) != b.above)):
            parent = self._parents.get(id(parent[1]))
        if parent is None:
            if not strict:
                return False
            if b.reason:
                raise UnsupportedModuleError(
                    b.reason + " (Nor does any module enclosing it return a per-example output it could be "
                    "recomputed for.)"
                )
            raise UnsupportedModuleError(
                f"dpft: module '{b.name}' ({type(b.module).__name__}) returned no per-example output and no "
                "enclosing module can be recomputed for it; freeze its parameters."
            )
        self._pending.setdefault(id(parent[1]), []).append(b)
        self._targets.add(id(parent[1]))
        return True

    def _anc_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        watched = self._watched.get(id(module))
        if watched is not None and self._passes < self.check_passes and self._active():
            self._watch_snap[id(module)] = [b.ran for b in watched[1]]
        if self._active() and self.batch_size is not None:
            dev = _device_of(module, args, kwargs)
            kwargs = fresh_caches(module, kwargs)
            self._stash[id(module)] = (args, kwargs, (kwargs, rng_state(dev), _autocast_state(dev)))

    def _anc_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        snap = self._watch_snap.pop(id(module), None)
        if snap is not None and output is not None:  # (not after a forward that raised)
            self._watch(module, snap)
        stash = self._stash.pop(id(module), None)
        if stash is not None and output is not None and self._unverified:
            self._kept[id(module)] = (stash, output)
        pending = self._pending.pop(id(module), None)
        idle = self._idle_in.get(id(module))
        if idle:
            pending = (pending or []) + idle
        if not pending or stash is None or not self._active():
            return
        name = self._names[id(module)]
        local = {id(m): (k + "." if k else "") for k, m in module.named_modules()}
        keys = {local[id(b.module)] + k: key for b in pending for k, key in b.keys.items()}
        esc = self._escalated.get((id(module), frozenset(keys)))
        if esc is None:
            esc = self._escalated[(id(module), frozenset(keys))] = Binding(
                module,
                name or type(module).__name__,
                ESCALATED,
                frozenset(keys),
                keys,
                fallback=True,
                slow=frozenset(keys),
            )
        flat = _flat_tensors(output)
        if not any(t is not None and t.requires_grad for t in flat):
            return
        n = self.batch_size
        if not self._batched(esc, flat, n, stash[0]):  # type: ignore[arg-type]
            esc.reason = next((b.reason for b in pending if b.reason), esc.reason)
            self._escalate(esc)
            return
        self._fallback_call(esc, module, stash[0], stash[2], flat, n)  # type: ignore[arg-type]

    def _rows_are_examples(self, live: list[Tensor], outs: list[Tensor], n: int) -> bool:
        """Whether every row of ``live`` feeds its own example's outputs alone;
        False too where the pull-back cannot go through (a reentrant
        checkpointed region on the way: then the module is refused)."""
        try:
            return not self._reach_others(live, outs, n)
        except RuntimeError:
            if not _no_pull_back(outs):
                raise
            return False

    def _take_over_now(self, b: Binding, kept: dict[int, tuple], outs: list[Tensor], n: int) -> bool:
        """``b``'s rows turned out not to be examples, at the end of a first
        forward: hand its parameters to the nearest enclosing module that ran
        in this forward and whose outputs are one row per example (verified
        as in :meth:`_own_rows`), in this forward (its outputs still wait for
        their backward pass) and every later one (``b.above``)."""
        parent = self._parents.get(id(b.module))
        while parent is not None:
            m = parent[1]
            got = kept.get(id(m))
            if got is not None:
                stash, out = got
                flat = _flat_tensors(out)
                live = [t for t in flat if t is not None and t.requires_grad]
                if (
                    live
                    and all(t.ndim > 0 and t.shape[0] == n for t in live)
                    and self._rows_are_examples(live, outs, n)
                ):
                    local = {id(x): (k + "." if k else "") for k, x in m.named_modules()}
                    keys = {local[id(b.module)] + k: key for k, key in b.keys.items()}
                    esc = self._escalated.get((id(m), frozenset(keys)))
                    if esc is None:
                        esc = self._escalated[(id(m), frozenset(keys))] = Binding(
                            m,
                            self._names[id(m)] or type(m).__name__,
                            ESCALATED,
                            frozenset(keys),
                            keys,
                            fallback=True,
                            slow=frozenset(keys),
                        )
                    esc.own = ""
                    b.above = id(m)
                    self._targets.add(id(m))
                    self._fallback_call(esc, m, stash[0], stash[2], flat, n)
                    return True
            parent = self._parents.get(id(m))
        return False

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
        if self.fingerprints is not None:
            rows = grad.unflatten(0, (call.batch_size, call.rows)) if call.rows else grad
            Fingerprints.add(self.fingerprints, b.name, rows, call.batch_size)
        if self.passive:
            return
        if call.batch_size == 0:
            raise ValueError(
                "dpft: backward() of a batch with 0 examples; an empty Poisson batch has no "
                "forward/backward: call engine.record_empty_batch() instead, then optimizer.step()"
            )
        try:
            packed = call.saved.pop("packed", None)
            if packed is not None:  # recomputed by checkpoint (or brought back by the hooks)
                names, out = packed
                call.saved.update(zip(names, out.grad_fn.saved_tensors))
            if call.rows:
                grad = grad.unflatten(0, (call.batch_size, call.rows))
            if b.expand and self._passes < self.check_passes and grad.shape[0] > 1:
                self._check_expand(b, grad)
            if grad.dtype in HALF:
                self._half = True
            normed = False
            if b.slow:
                b.rule.on_grad(call, grad, b.slow)
                if self.early_norms is not None:
                    normed = self._norms_now(b, call)
                if b.early and not normed:
                    key = (grad.shape, grad.dtype, True) if call.saved.get("ckpt") else (grad.shape, grad.dtype)
                    if b.early_by_shape.get(key, True):
                        self._instantiate_early(b, call, key)
            lane = b.lane
            if lane:
                views = self._lane_views
                n = call.batch_size
                if not views:
                    views = self._new_lane(n)
                elif self._lane_buf.shape[0] != n:  # type: ignore[union-attr]
                    raise RuntimeError(
                        f"dpft: one backward pass mixed batches of sizes {self._lane_buf.shape[0]} and {n}"
                    )  # type: ignore[union-attr]
                seen = self._lane_seen
                eager_into = b.rule.eager_into
                for local, key, index in lane:
                    eager_into(call, grad, local, views[index], key in seen)
                    seen.add(key)
                if b.done is not None:
                    b.done(call)
            if b.slow and not normed:
                self._received.append((b, call))
            if not self._queued:
                self._queue()
        except (IndexError, TypeError, ValueError, RuntimeError) as e:
            raise _named(b, e) from e

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

    def _instantiate_early(self, b: Binding, call: Call, key: tuple) -> None:
        """Build the weight's per-example gradient now if the norm will be taken
        by instantiation anyway (the mixed rule's choice, made on this use's
        positions: the weight has no other use), and free the layer's input
        and output gradient: ``B*P*D`` values kept instead of ``B*T*(P+D)``,
        much less for long sequences.  Same kernels, same result.

        Under activation checkpointing (``key`` ends with True) also wherever
        :func:`~dpft.clip.norms.instantiation_frees` memory: the alternative keeps the
        layer's input and output gradient to the end of the backward pass,
        while the non-private run frees them with the segment's activations
        (DP-LoRA's per-example gradients, ``r x d``, are far smaller)."""
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
                or (len(key) == 3 and instantiation_frees(c, acc_dtype_of(self._param(b.keys[local]).dtype)))
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

    def _norms_now(self, b: Binding, call: Call) -> bool:
        """Two-pass clipping's first pass: the squared per-example norms of
        ``b``'s weights, taken now, into :attr:`early_norms`; the layer's
        input and output gradient are dropped at once.  Not for a parameter
        with several uses in one backward pass (tied, or a layer called
        twice, seen in the first passes): the norm of a sum is not a sum of
        norms, so those go to the end of the pass as before."""
        if b.fallback or any(self._holders.get(b.keys[k], 0) > 1 or b.keys[k] in self.multi_use for k in b.slow):
            return False
        call.check_versions(b.name)
        contribs = b.rule.contributions(call, b.slow)
        call.saved.clear()
        call.results.clear()
        call.versions = ()
        early = self.early_norms
        assert early is not None
        with full_fp32(), torch.no_grad():
            for local, c in contribs.items():
                key = b.keys[local]
                if key in early:
                    raise RuntimeError(
                        f"dpft: parameter '{key}' was used twice in one backward pass under two-pass "
                        "clipping, unlike in the first steps; pass two_pass='off' to the engine"
                    )
                early[key] = norms.sq_norm([c], self.norm_mode, acc_dtype_of(self._param(key).dtype))[0]
                self._early_prints[key] = None  # (seen by a hook: its gradient is accounted for)
        return True

    def _kept_numel(self, call: Call) -> int:
        """Values per example of the layer's input if other layers read it too
        (they keep it: building this layer's per-example gradient frees only
        its output gradient), else 0."""
        key = call.saved.get("input_id")
        if key is None or self._input_uses.get(key, 0) > 1:
            x = call.saved.get("input")
            return x.numel() // max(1, x.shape[0]) if isinstance(x, Tensor) and x.ndim else 0
        return 0

    def _on_fallback_grad(self, b: Binding, call: Call, index: int, grad: Tensor) -> None:
        if not self.enabled:
            return
        if self.fingerprints is not None:
            Fingerprints.add(self.fingerprints, f"{b.name} (output {index})", grad, call.batch_size)
        if self.passive:
            return
        first = all(g is None for g in call.grads)
        call.grads[index] = grad
        if first:
            self._received.append((b, call))
        self._queue()

    def _on_output_grad(self, grad: Tensor) -> None:
        if self.enabled and not self.passive:
            self._queue()

    def _on_param_grad(self, key: str, grad: Tensor) -> None:
        if not self.enabled or self.passive:  # (two-pass clipping's pass 2: the clipped sum)
            return
        # (the first passes keep a fingerprint of autograd's gradient, not the
        # gradient: no model-sized copy next to dpft's own sums)
        self._autograd[key] = _fingerprint(grad, key) if self._passes < self.check_passes else None

    def _drop_grad(self, p: Tensor) -> None:
        """Free autograd's (non-private) gradient once the first passes have
        read it: the step writes the private one."""
        if self.passive:  # two-pass clipping's pass 2: the clipped sum, the engine takes it
            return
        if self.enabled:
            p.grad = None
        self._queue()

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
        # (two-pass clipping's first pass: the batch sizes of the norms taken in the hooks)
        early = {int(s.shape[0]) for s in self.early_norms.values()} if self.early_norms else set()
        if not received and lane is None and not early:
            self._refuse()
            if self._autograd:
                self._check_uses({}, None, seen, 0)
            return
        sizes = {call.batch_size for _, call in received} | early
        if lane is not None:
            sizes.add(lane.shape[0])
        if len(sizes) != 1:
            raise RuntimeError(f"dpft: one backward pass mixed batches of sizes {sorted(sizes)}")
        n = sizes.pop()
        out: dict[str, list[Contribution]] = {}
        if self._passes < self.check_passes:
            # (the first passes: a module's own check that it keeps examples apart names it,
            # before an enclosing module recomputed for another one's sake says the same of itself)
            received.sort(key=lambda bc: bc[0].rule is ESCALATED)
        self.enabled = False
        try:
            for b, call in received:
                call.check_versions(b.name)
                if b.fallback and self._passes < self.check_passes:
                    call.saved["check_mixing"] = b.name  # the first passes also check that examples stay apart
                try:
                    contribs = b.rule.contributions(call, b.slow)
                except (IndexError, TypeError, ValueError, RuntimeError) as e:
                    raise _named(b, e) from e
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
                        if key in self.lane_offsets:
                            # a lane parameter's use taken over by an enclosing module's recomputation
                            if lane is None:
                                lane = torch.zeros(n, self.lane_total, dtype=self.lane_dtype, device=self.lane_device)
                            off, numel = self.lane_offsets[key]
                            lane[:, off : off + numel] += c.grad.reshape(n, -1).to(lane.dtype)
                            seen.add(key)
                            continue
                    out.setdefault(key, []).append(c)
        finally:
            self.enabled = True
        del received
        self.multi_use.update(k for k, cs in out.items() if len(cs) > 1)
        self._refuse()
        got = set(self._autograd) if self._idle_in and self._passes < self.check_passes else None
        self._check_uses(out, lane, seen, n)
        self._passes += 1
        if self._passes >= self.check_passes and self._pre_handles and not self._outside_root and not self._sharded:
            # from the next forward on, ``_root_pre`` switches the weights off
            for h in self._pre_handles:
                h.remove()
            self._pre_handles = []
        if self._passes >= self.check_passes and self._watched:
            # the parents watched in the first passes: kept only where they took a child over
            keep = self._idle_in.keys() | self._targets
            for key in [k for k in self._watch_handles if k not in keep]:
                for h in self._watch_handles.pop(key):
                    h.remove()
            self._watched = {}
        if self._passes > self.check_passes and self._param_handles:
            # the uses were cross-checked: stop paying for the parameter hooks
            for h in self._param_handles:
                h.remove()
            self._param_handles = []
        self.sink(out, n, (self.lane_keys, lane) if lane is not None else None)
        if got is not None:  # (after the sink: the lane's layout may change)
            self._unused_back(got)
