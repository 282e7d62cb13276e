"""``torch.compile`` with a :class:`dpft.PrivacyEngine` attached.

dpft captures what per-example gradients need with Python hooks: module
forward (pre-)hooks, gradient hooks on the layers' outputs, a
``TorchFunctionMode`` for layers whose class overrides its parent's forward,
and saved-tensor hooks under activation checkpointing.  TorchDynamo, left to
itself, *traces* such hooks: their side effects (switching ``requires_grad``,
registering gradient hooks on intermediate tensors, keeping the inputs) are
then replayed on tensors that are not the ones the compiled graph computes,
which fails, or worse could capture the wrong values.  So while a model runs
under ``torch.compile`` every dpft hook is made opaque to Dynamo
(``torch._dynamo.disable``): Dynamo breaks the graph at each hooked layer, the
hook runs eagerly on the real tensors, and the code between hooked layers
(attention, activations, residual adds, ...) is compiled.  Exactness is
unchanged: the gradient hooks fire in the ordinary autograd backward pass of
the compiled segments.  Modules whose forward dpft replays (the generic path)
or reads operator by operator (a class that overrides its parent's forward)
run eagerly as a whole, so that their random numbers (dropout) and operator
calls are those dpft sees.

Both orders work:

* ``PrivacyEngine(torch.compile(model), ...)``: the engine hooks the compiled
  module's ``_orig_mod`` (parameter names are the original model's) and makes
  its hooks opaque at once;
* ``torch.compile(model)`` after ``PrivacyEngine(model, ...)``: a hook on the
  model notices the first forward that runs under Dynamo and makes the hooks
  opaque before any hooked layer is traced.

Refused, with a message saying what to do: compiled autograd (Dynamo tracing
the backward pass would run dpft's gradient hooks on traced values), and
``torch.compile(..., fullgraph=True)`` (one graph cannot hold dpft's hooks;
Dynamo's own error names the hook).

What dpft registers, and how each stays out of Dynamo's traces:

* module forward pre-hooks and hooks (the model's ``_root_pre``/``_root_post``;
  each hooked layer's ``_pre``/``_post``, ``_tap_pre``/``_tap_post``,
  ``_expand_pre``/``_expand_post``; the BatchNorm check; ``_anc_pre``/``_anc_post``
  on the modules enclosing a generic-path module or an embedding, and on the
  parents watched in the first passes (MoE routing, rows taken as examples,
  children that never run)): :meth:`CompileSupport.make_opaque` walks every
  module's hook dictionaries and wraps each hook bound to the capture in
  ``torch._dynamo.disable``, whatever list the capture keeps its handle in;
* the compile watch itself (a pre-hook on the model): disabled, not recursively;
* gradient hooks on tensors (layer outputs, the model's outputs, generic-path
  outputs): registered by those opaque hooks on real tensors, they fire in
  autograd's backward pass, which Dynamo does not trace (compiled autograd,
  which would, is refused);
* gradient and post-accumulate hooks on parameters (the first passes'
  cross-check): run by autograd's ``AccumulateGrad``, likewise never traced;
* the autograd Functions ``_Tap`` and ``_Pack``, the operator tap (a
  ``TorchFunctionMode``) and the rows-as-examples verification (pull-backs
  with ``torch.autograd.grad``, not attempted through a compiled graph):
  only ever run inside the opaque hooks; the forward of a module read by the
  operator tap, or replayed by the generic path, runs eagerly as a whole;
* the optimizer's ``step``/``zero_grad`` and the end-of-backward sink: outside
  any compiled region.

The first passes run every compiled forward eagerly
(``torch.compiler.set_stance("force_eager")`` from ``attach`` until they end,
or until ``detach``; the stance is process-wide, so other compiled code runs
eagerly in those steps too): their rows-as-examples check pulls gradients
back through the forward's graph, which a compiled graph does not allow.
After them, a batch whose size first equals a layer's leading dimension
cannot be checked in a compiled forward and is refused, naming the layer.

Dynamo does not guard on module hooks by default: a graph traced for a
module without dpft's hooks (this model before the engine was attached, or
another instance of the same classes) would be reused for the hooked model,
and its hooks would never run.  So while any engine is attached Dynamo guards
on them (``torch._dynamo.config.skip_nnmodule_hook_guards = False``; its own
value is restored when the last engine detaches), and attaching or detaching
an engine clears Dynamo's caches (``torch.compiler.reset()``) when anything
has been compiled: the next call recompiles.  Dynamo's per-function cache
limit is raised while attached (see :func:`_guard_hooks`): past it Dynamo
silently runs whole blocks eagerly.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any

import torch
from torch import nn

try:
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _get_callback
except ImportError:  # pragma: no cover - a torch without Dynamo

    def _get_callback() -> Any:
        return None


__all__ = ["CompileSupport", "CompiledAutogradError", "dpft_hooks", "unwrap"]

#: why a hook is opaque (Dynamo prints it where it breaks the graph)
REASON = "dpft capture hook: runs eagerly on the real tensors (one graph break per hooked layer)"


class CompiledAutogradError(RuntimeError):
    """Compiled autograd would trace dpft's gradient hooks."""


COMPILED_AUTOGRAD_MESSAGE = (
    "dpft: compiled autograd is enabled (torch._dynamo.config.compiled_autograd or "
    "torch._dynamo.compiled_autograd._enable): it traces the backward pass, and dpft's per-example "
    "gradient hooks would run on traced values, not on each step's gradients. Turn compiled autograd "
    "off while the engine is attached; torch.compile of the model's forward is supported."
)


def _dynamo() -> Any:
    return importlib.import_module("torch._dynamo")


def _optimized_module_type() -> type | None:
    mod = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(mod, "OptimizedModule", None) if mod is not None else None


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(module, compiled)``: the module under ``torch.compile``'s wrapper
    (``model._orig_mod``, repeatedly) and whether there was one."""
    cls = _optimized_module_type()
    compiled = False
    while cls is not None and isinstance(model, cls):
        model, compiled = model._orig_mod, True
    return model, compiled


def _compiled_autograd_running() -> bool:
    """Whether compiled autograd is switched on by its context manager or is
    running (module flags: cheap enough for every forward and backward)."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return ca is not None and bool(
        getattr(ca, "compiled_autograd_enabled", False) or getattr(ca, "in_compiled_autograd_region", False)
    )


def compiled_autograd_on() -> bool:
    """Whether Dynamo's compiled autograd would trace the next backward pass
    (also ``torch._dynamo.config.compiled_autograd``, whose read costs ~10 µs)."""
    if _compiled_autograd_running():
        return True
    dynamo = sys.modules.get("torch._dynamo")
    return bool(dynamo is not None and getattr(dynamo.config, "compiled_autograd", False))


def _dynamo_used() -> bool:
    """Whether Dynamo has compiled anything in this process (caches to clear)."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return False
    stats = utils.counters.get("stats", {})
    return bool(stats.get("unique_graphs", 0) or stats.get("calls_captured", 0))


def _callback_active() -> bool:
    """Whether Dynamo's frame evaluation callback is set (a ``torch.compile``
    region is running, and the code calling us was not compiled into a graph)."""
    cb = _get_callback()
    return cb is not None and cb is not False


#: Dynamo's per-function cache limit while an engine is attached (its default: 8)
RECOMPILE_LIMIT = 64

_GUARDING: list[Any] = [0, None, None]  # attached engines, Dynamo's own settings before the first


def _guard_hooks(on: bool) -> None:
    """Dynamo's settings while any engine is attached, its own restored when
    the last one detaches.

    * It guards on module hooks (``skip_nnmodule_hook_guards=False``): a graph
      compiled for a module without dpft's hooks (another instance of the same
      class, or this one before attaching) is otherwise reused for a hooked
      one, and its hooks never run.
    * Its per-function cache limit is at least :data:`RECOMPILE_LIMIT`
      (``recompile_limit``, 8 by default): the graph breaks at dpft's hooks
      make each hooked module's forward, and code that several modules share
      (Hugging Face's forward decorators), functions Dynamo compiles on their
      own, one cache entry per module type and argument layout, each once
      static and once with a dynamic batch size, and again once the first
      passes' hooks are removed; a tiny GPT-2 needs 12 for one function.  Past
      the limit Dynamo runs that function *and everything it calls* eagerly
      from then on (whole transformer blocks), silently.  The entries do not
      grow with depth or with the number of distinct batch sizes."""
    config = _dynamo().config
    if on:
        if _GUARDING[0] == 0:
            _GUARDING[1] = config.skip_nnmodule_hook_guards
            config.skip_nnmodule_hook_guards = False
            _GUARDING[2] = getattr(config, "recompile_limit", None)
            if _GUARDING[2] is not None and _GUARDING[2] < RECOMPILE_LIMIT:
                config.recompile_limit = RECOMPILE_LIMIT
        _GUARDING[0] += 1
    else:
        _GUARDING[0] -= 1
        if _GUARDING[0] == 0:
            config.skip_nnmodule_hook_guards = _GUARDING[1]
            if _GUARDING[2] is not None:
                config.recompile_limit = _GUARDING[2]


class CompileSupport:
    """Makes an attached :class:`~dpft.capture.Capture`'s hooks opaque to
    Dynamo when the model runs under ``torch.compile`` (see the module
    docstring); one per engine attachment."""

    def __init__(self, capture: Any, compiled: bool) -> None:
        self.capture = capture
        self.compiled = compiled  # the engine was given a compiled module
        self.opaque = False
        self._eager_forwards: list[nn.Module] = []
        self._watch_handle: Any = None
        self._sink: Any = None
        self._stance: Any = None  # Dynamo's stance before the first passes forced eager ones

    # -- attach / detach ----------------------------------------------------
    def attach(self) -> None:
        _guard_hooks(True)
        if _dynamo_used():
            torch.compiler.reset()  # graphs traced without the hooks must not run with them
        # skipped by Dynamo (not traced) but run with its callback still set,
        # which is how it tells a compiled forward from an eager one
        watch = _dynamo().disable(self._watch, recursive=False, reason=REASON)
        self._watch_handle = self.capture.model.register_forward_pre_hook(watch, prepend=True, with_kwargs=True)
        # compiled autograd switched on around backward() only: refused when
        # the backward pass hands its per-example gradients over
        self._sink = sink = self.capture.sink

        def checked_sink(*args: Any) -> None:
            if _compiled_autograd_running() or (self.opaque and compiled_autograd_on()):
                raise CompiledAutogradError(COMPILED_AUTOGRAD_MESSAGE)
            sink(*args)
            if self._stance is not None and self.capture._passes >= self.capture.check_passes:
                self._restore_stance()

        self.capture.sink = checked_sink
        self._force_eager()
        if self.compiled:
            self.make_opaque()

    def _force_eager(self) -> None:
        """The first passes run every compiled forward eagerly
        (``torch.compiler.set_stance("force_eager")``, process-wide, until they
        end): their checks pull gradients back through the forward's graph,
        which a compiled graph does not allow, and a layer whose rows are not
        examples (a table shared by the batch, a sequence-first layer whose
        length equals the batch size) would otherwise go unchecked."""
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is None or self.capture.check_passes <= 0:
            return
        try:
            current = _dynamo().eval_frame._stance
        except (ImportError, AttributeError):  # pragma: no cover - another torch
            return
        self._stance = current
        set_stance("force_eager")

    def _restore_stance(self) -> None:
        prev, self._stance = self._stance, None
        if prev is not None:
            torch.compiler.set_stance(
                prev.stance, skip_guard_eval_unsafe=prev.skip_guard_eval_unsafe, force_backend=prev.backend
            )

    def detach(self) -> None:
        self._restore_stance()
        if self._watch_handle is not None:
            self._watch_handle.remove()
            self._watch_handle = None
        if self._sink is not None:
            self.capture.sink, self._sink = self._sink, None
        for m in self._eager_forwards:
            m.__dict__.pop("forward", None)
        self._eager_forwards = []
        if _dynamo_used():
            torch.compiler.reset()  # graphs traced with the hooks must not run without them
        _guard_hooks(False)

    # -- the switch ---------------------------------------------------------
    def _watch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _callback_active():  # a compiled forward
            if not self.opaque:
                _make_opaque_eagerly(self)
            if compiled_autograd_on():
                raise CompiledAutogradError(COMPILED_AUTOGRAD_MESSAGE)
        elif _compiled_autograd_running():
            raise CompiledAutogradError(COMPILED_AUTOGRAD_MESSAGE)

    def make_opaque(self) -> None:
        """Replace every module hook of the capture by a Dynamo-disabled
        wrapper (same handle ids: removing a handle still removes it), and run
        the forward of generic-path and operator-tap modules eagerly."""
        if self.opaque:
            return
        cap = self.capture
        for d in _hook_dicts(cap.model):
            for key, fn in list(d.items()):
                if _owned(fn, cap) and not getattr(fn, "_torchdynamo_disable", False):
                    d[key] = _dynamo().disable(fn, reason=REASON)
        for b in cap.bindings:
            m = b.module
            if (b.fallback or b.tap is not None) and "forward" not in m.__dict__ and m is not cap.model:
                # the generic path replays this forward (its dropout masks must be
                # eager ones); an operator tap reads its operators one by one
                m.forward = _dynamo().disable(m.forward, reason=REASON)
                self._eager_forwards.append(m)
        self.opaque = True
        if compiled_autograd_on():
            raise CompiledAutogradError(COMPILED_AUTOGRAD_MESSAGE)


def _owned(fn: Any, *owners: Any) -> bool:
    """Whether hook ``fn`` is one of ``owners``'s: a bound method of one, or a
    ``functools.partial`` of one (the capture's per-binding hooks), or either
    wrapped by ``torch._dynamo.disable``."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif hasattr(fn, "__wrapped__") and not hasattr(fn, "__self__"):
            fn = fn.__wrapped__
        else:
            break
    return any(getattr(fn, "__self__", None) is o for o in owners)


def _hook_dicts(model: nn.Module) -> list[dict]:
    """Every module hook dictionary of ``model`` and its submodules that a
    forward runs (pre-hooks and hooks; dpft registers no module backward hooks)."""
    return [d for m in model.modules() for d in (m._forward_pre_hooks, m._forward_hooks)]


def dpft_hooks(support: CompileSupport) -> list[tuple[str, str, Any]]:
    """``(module name, "pre" or "post", hook)`` for every module hook dpft has
    on the model now (the capture's and the compile watch): an audit, as under
    ``torch.compile`` each must be opaque to Dynamo (``_torchdynamo_disable``)."""
    out = []
    for name, m in support.capture.model.named_modules():
        for kind, d in (("pre", m._forward_pre_hooks), ("post", m._forward_hooks)):
            out.extend((name, kind, fn) for fn in d.values() if _owned(fn, support.capture, support))
    return out


def _make_opaque_eagerly(support: CompileSupport) -> None:
    _dynamo().disable(support.make_opaque, reason=REASON)()
