"""The torch-internals corner of the capture: autograd functions and private hooks.

Everything here leans on torch details that are not public API (a tensor's
hook dictionary, the saved-tensor hooks' stack, autocast state, the
``TorchFunctionMode`` that catches an operator inside an overriding forward).
Each piece falls back to the public way where torch does not cooperate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..rules.base import UnsupportedModuleError
from ..rules.functional import CONVERSIONS, OPS, OPS_OF

if TYPE_CHECKING:
    from .hooks import Capture
    from .plan import Binding


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


def _saving_hooks_active() -> bool:
    """Whether saved-tensor hooks (:class:`torch.autograd.graph.saved_tensors_hooks`)
    decide how autograd keeps the tensors saved now: non-reentrant activation
    checkpointing (``torch.utils.checkpoint(..., use_reentrant=False)``, the
    default of Hugging Face's ``gradient_checkpointing_enable``) in its
    forward and its recomputation, or ``save_on_cpu`` offloading.  Where torch
    does not say, False (the inputs are kept as usual)."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - another torch
        return False


class _Pack(torch.autograd.Function):
    """Saves a layer's captured inputs as autograd saves its own tensors,
    through the active saved-tensor hooks: under non-reentrant activation
    checkpointing nothing is kept in the forward pass, and reading them back
    in the backward pass (``out.grad_fn.saved_tensors``) returns the
    recomputed values, like every tensor the segment's backward reads.  The
    recomputation packs the same tensors in the same order, so checkpoint's
    count of saved tensors matches.  ``anchor`` (a scalar leaf that requires
    grad) makes autograd record the node; its output feeds nothing, so its
    backward never runs."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, *tensors: Tensor) -> Tensor:
        ctx.save_for_backward(*tensors)
        ctx.count = len(tensors)
        return anchor.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, ...]:  # pragma: no cover - never reached
        return (None,) * (1 + ctx.count)


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


def _no_pull_back(outs: list[Tensor]) -> str:
    """What in the autograd graph behind ``outs`` a pull-back keeping the
    graph (``torch.autograd.grad(..., retain_graph=True)``) cannot go
    through: ``"reentrant checkpointing"``, ``"torch.compile"`` (a compiled
    graph's backward may donate its buffers), or ``""``."""
    seen: set[int] = set()
    stack = [t.grad_fn for t in outs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if "CheckpointFunction" in name:
            return "reentrant checkpointing"
        if "CompiledFunction" in name:
            return "torch.compile"
        stack.extend(f for f, _ in node.next_functions)
    return ""


def _reachable_before_checkpoints(outs: list[Tensor]) -> tuple[set[int], set[int]]:
    """The autograd nodes (ids) behind ``outs`` that a pull-back reaches
    without going through a reentrant checkpointed region, and the leaves
    (ids of the tensors) it reaches so."""
    nodes: set[int] = set()
    leaves: set[int] = set()
    stack = [t.grad_fn for t in outs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in nodes or "CheckpointFunction" in type(node).__name__:
            continue
        nodes.add(id(node))
        var = getattr(node, "variable", None)  # (an AccumulateGrad node: its leaf)
        if isinstance(var, Tensor):
            leaves.add(id(var))
        stack.extend(f for f, _ in node.next_functions)
    return nodes, leaves


class _OpTap(TorchFunctionMode):
    """Active during the forward of a module whose class overrides its
    parent's ``forward`` (see :mod:`dpft.rules.functional`): catches the
    parent's operator called with the module's weight and hands that call
    (its own input and output) to the rule, as if the parent's forward had
    run.  A call whose other arguments differ from what the rule reads off the
    module is refused."""

    def __init__(self, capture: "Capture", b: Binding) -> None:
        super().__init__()
        self.capture, self.b = capture, b
        self.ops = OPS_OF[b.tap]  # type: ignore[index]
        self.weight = b.module._parameters.get("weight")
        self.aliases: list[Tensor] = []  # value-preserving conversions of the weight (kept alive: ids)
        self.hits = 0  # operator calls caught with the weight

    def _is_weight(self, t: Any) -> bool:
        return t is self.weight or any(t is a for a in self.aliases)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self.ops:
            spec = OPS[func]
            bound = spec.bind(args, kwargs)
            if self.weight is not None and self._is_weight(bound.get("weight")):
                b = self.b
                why = spec.check(b.module, bound)
                if why is not None:
                    raise UnsupportedModuleError(
                        f"dpft: module '{b.name}' ({type(b.module).__name__}) overrides the forward of "
                        f"{b.tap.__name__} and calls {getattr(func, '__name__', func)} with {why}; "  # type: ignore[union-attr]
                        "dpft's per-example rule would compute another function's gradient. Freeze its "
                        "parameters or register a rule for this class with dpft.register_rule."
                    )
                self.hits += 1
                replaced = self.capture._post(b, b.module, (bound["input"],), out)
                if replaced is not None:
                    out = replaced
        elif func in CONVERSIONS and args and self._is_weight(args[0]) and isinstance(out, Tensor):
            self.aliases.append(out)
        return out
