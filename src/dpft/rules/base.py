"""What a layer rule produces: per-example gradient *contributions*.

A trainable parameter may be used several times in one forward pass (tied
embeddings, a module called twice).  Every use yields one contribution; the
per-example gradient of the parameter is the sum of its contributions, and
its per-example norm is the norm of that sum (never the sum of norms).

Two kinds of contribution exist:

* :class:`Direct` -- the per-example gradient itself, ``(B, *param.shape)``.
  Used for biases and norm-layer weights, where it is as cheap as the
  output gradient.
* :class:`Factored` -- the per-example gradient as a sum over positions of
  outer products, ``G_i = sum_t left[i, t] (x) right[i, t]`` (per group of a
  grouped convolution).  ``left`` spans the parameter's first dimension,
  ``right`` the rest.  ``left`` may be given implicitly as token ids (one-hot
  rows, for embeddings) so that no dense one-hot is ever built.  Norms of
  factored contributions are computed either by the "ghost" identity
  ``||G_i||^2 = <L_i L_i^T, R_i R_i^T>`` or by instantiating ``G_i``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


#: the half-precision dtypes (autocast's)
HALF = (torch.float16, torch.bfloat16)


class UnsupportedModuleError(TypeError):
    """A trainable parameter belongs to a module dpft cannot handle exactly."""


@dataclass
class Direct:
    """Per-example gradient of a whole parameter, shape ``(B, *param.shape)``."""

    grad: Tensor


@dataclass
class Instantiated(Direct):
    """A weight's per-example gradient ``(B, *param.shape)`` built during the
    backward pass (long sequences: the layer's input and output gradient,
    ``B*T*(P+D)`` values, are freed at once instead of kept to the end of the
    pass).  Clipped like any per-example gradient, but one parameter at a
    time (never concatenated with the small direct parameters)."""


@dataclass
class Factored:
    """Per-example gradient ``G_i = sum_t left[i,t,g] (x) right[i,t,g]``.

    Shapes: ``left`` ``(B, T, G, P)`` (or ``None`` when ``ids`` is given),
    ``right`` ``(B, T, G, D)``; ``ids`` ``(B, T)`` long, meaning
    ``left[i, t, 0] = onehot(ids[i, t], num_rows)``.  The instantiated
    gradient ``(B, G, P, D)`` reshapes to ``(B, *shape)``: group ``g`` owns
    rows ``g*P .. (g+1)*P`` of the parameter's first dimension.
    """

    right: Tensor
    shape: torch.Size
    left: Tensor | None = None
    ids: Tensor | None = None
    num_rows: int = 0

    @property
    def positions(self) -> int:
        return self.right.shape[1]

    @property
    def groups(self) -> int:
        return self.right.shape[2]

    @property
    def rows(self) -> int:
        return self.num_rows if self.ids is not None else self.left.shape[3]  # type: ignore[union-attr]

    @property
    def cols(self) -> int:
        return self.right.shape[3]

    @property
    def factor_dtype(self) -> torch.dtype:
        """The dtype of ``right`` (a lazy layer answers without building it)."""
        return self.right.dtype

    @property
    def held(self) -> int:
        """Values per example the layer keeps for this contribution (what
        building its per-example gradient frees)."""
        width = self.cols + (self.rows if self.ids is None else 1)
        return self.positions * self.groups * width

    # Optional faster paths of a layer (see ``rules.conv.ConvFactored``); ``None``
    # means "use the generic matrix products on ``left`` / ``right``".
    def per_example(self, dtype: torch.dtype, grouped: bool = False) -> Tensor | None:
        """The instantiated per-example gradient ``(B, *shape)``, or ``None``.
        ``grouped``: a layer with a batch-in-groups kernel may use it."""
        return None

    def weighted(self, weights: Tensor, dtype: torch.dtype) -> Tensor | None:
        """``sum_i weights[i] G_i`` (shape ``shape``), or ``None``."""
        return None

    def sum_needs_factors(self, dtype: torch.dtype) -> bool:
        """Whether the weighted sum in ``dtype`` reads ``left`` / ``right``."""
        return True

    def release(self) -> None:
        """Drop factors a lazy layer built for the norm (rebuilt if asked for again)."""

    def select_rows(self, index: Tensor) -> "Factored | None":
        """The contribution of the rows ``index`` of dim 0 alone, or ``None``."""
        return None


class LazyFactored(Factored):
    """A factored contribution whose ``left`` / ``right`` are built from what
    the layer kept only when a norm asks for them (:meth:`build`), and dropped
    by :meth:`release` (rebuilt if asked for again): one layer's factors at a
    time are alive.  Subclasses set ``self._factors = None`` and define
    :meth:`build` and ``positions``."""

    _factors: tuple[Tensor, Tensor] | None

    def build(self) -> tuple[Tensor, Tensor]:
        """``(left, right)`` in :class:`Factored`'s layout."""
        raise NotImplementedError

    def _get(self) -> tuple[Tensor, Tensor]:
        if self._factors is None:
            self._factors = self.build()
        return self._factors

    @property  # type: ignore[override]
    def left(self) -> Tensor:
        return self._get()[0]

    @property  # type: ignore[override]
    def right(self) -> Tensor:
        return self._get()[1]

    def release(self) -> None:
        self._factors = None


Contribution = Direct | Factored


@dataclass(slots=True, eq=False)
class Call:
    """One forward call of a hooked module, filled in by forward and backward hooks.

    Made for every hooked module at every forward pass and alive until its
    backward hook has run, so it holds as few garbage-collected containers as
    it can: ``grads`` and ``versions`` are empty tuples until used, and the
    backward hook is the bound method :meth:`fire` (not a ``partial``).
    Objects that live across Python's young-generation collections are
    promoted; enough promoted objects trigger a full collection, which walks
    every object of the process (tens to hundreds of milliseconds once a
    model and its libraries are loaded)."""

    module: nn.Module
    rule: "Rule"
    batch_size: int
    saved: dict[str, Any] = field(default_factory=dict)
    grads: "list[Tensor | None] | tuple" = ()
    results: dict[str, Tensor] = field(default_factory=dict)  # eagerly reduced per-example grads
    #: rows per example where the layer's output flattens examples' rows into
    #: its leading dimension (the output gradient is unflattened to ``(B, rows, ...)``)
    rows: int = 0
    versions: tuple = ()  # (tensor, version, tensor, version, ...)
    #: ``handler(binding, call, grad)``, called by :meth:`fire` with ``binding``
    handler: Any = None
    binding: Any = None

    def fire(self, grad: Tensor) -> None:
        """The backward hook on the module's output."""
        self.handler(self.binding, self, grad)

    def save_input(self, name: str, tensor: Tensor) -> None:
        """Keep ``tensor`` for the backward pass and remember its version,
        so that a later in-place change is detected instead of silently
        giving a wrong gradient."""
        self.saved[name] = tensor
        self.track(tensor)

    def track(self, tensor: Tensor) -> None:
        """Remember ``tensor``'s version (see :meth:`check_versions`)."""
        self.versions = (*self.versions, tensor, tensor._version)  # one flat tuple

    def check_versions(self, module_name: str) -> None:
        v = self.versions
        for tensor, version in zip(v[0::2], v[1::2]):
            if tensor._version != version:
                raise RuntimeError(
                    f"dpft: the input of module '{module_name}' was modified in place after "
                    "its forward pass; dpft needs the original input to compute per-example "
                    "gradients of its weights. Make the operation that follows it out-of-place."
                )


#: half-precision copies of float32 inputs, per source tensor: layers reading
#: one input (query/key/value) keep one copy, so their Gram matrices can be shared
_HALF_COPIES: dict[int, tuple[Any, int, torch.dtype, Tensor]] = {}


def half_copy(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.detach().to(dtype)``, made once per (tensor, version, dtype).  An
    entry lives no longer than ``x`` (a weak reference removes it) and the
    table is cleared at the end of every backward pass."""
    key = id(x)
    hit = _HALF_COPIES.get(key)
    if hit is not None and hit[0]() is x and hit[1] == x._version and hit[2] is dtype:
        return hit[3]
    y = x.detach().to(dtype)
    _HALF_COPIES[key] = (weakref.ref(x, lambda _, k=key: _HALF_COPIES.pop(k, None)), x._version, dtype, y)
    return y


def clear_half_copies() -> None:
    _HALF_COPIES.clear()


class Rule:
    """A per-layer rule: what to keep in forward, how to turn the output
    gradient into per-example gradient contributions.

    ``params`` passed to the methods are the *trainable* parameter names of the
    module (a subset of ``module._parameters``) that this rule is responsible for.
    """

    #: names of direct parameters this rule can handle; ``None`` = any
    handles: tuple[str, ...] | None = None

    def supports(self, module: nn.Module, name: str) -> bool:
        return self.handles is None or name in self.handles

    #: book-keeping: autograd skips this module's non-bias parameter gradients
    #: (they are matrix products there; normalization layers get theirs in the
    #: same fused kernel as the input gradient, so nothing is saved, and torch
    #: 2.11's LayerNorm backward fails on very large inputs when only the bias
    #: gradient is requested)
    skip_weight_grad: bool = True

    #: whether ``contributions`` accepts a weight instantiated into ``call.results["weight"]``
    instantiates_early: bool = False

    #: parameters whose per-example gradient the rule produces eagerly as a
    #: :class:`Direct` in ``call.results`` (eligible for the engine's flat lane)
    eager: tuple[str, ...] = ("bias",)

    def rows_ok(self, module: nn.Module, x: Tensor) -> bool:
        """Whether the rule is right for input ``x`` of this module with its
        leading dimension split into (examples, rows): true where the layer
        works along its trailing dimensions only (Linear, LayerNorm over the
        last dims, RMSNorm, Embedding)."""
        return False

    def needs_input(self, module: nn.Module, params: frozenset[str]) -> bool:
        """Whether the module's input must be kept (a weight trains)."""
        return bool(params - {"bias"})

    def needs_save(self, module: nn.Module, params: frozenset[str]) -> bool:
        """Whether :meth:`save` must run in the forward hook at all."""
        return self.needs_input(module, params)

    #: the layer multiplies in its output's dtype: under autocast a float32
    #: input was cast to half precision inside the layer (Linear, Conv, ...)
    casts_input: bool = False

    def save(self, call: Call, module: nn.Module, args: tuple, output: Tensor, params: frozenset[str]) -> None:
        """Keep what backward needs (called in the forward hook)."""
        if self.needs_input(module, params):
            x = args[0]
            if self.casts_input and isinstance(output, Tensor) and output.dtype in HALF and x.dtype == torch.float32:
                # keep the half-precision value the layer actually multiplied
                # (autocast rounds the input the same way): half the memory,
                # and the per-example products run on half-precision kernels
                x = half_copy(x, output.dtype)
            call.save_input("input", x)

    def on_grad(self, call: Call, grad: Tensor, params: frozenset[str]) -> None:
        """Called when the output gradient arrives.  Reduce eagerly what is
        cheap (biases) so that nothing large is kept; keep ``grad`` only when
        a weight needs it."""
        raise NotImplementedError

    def contributions(self, call: Call, params: frozenset[str]) -> dict[str, Contribution]:
        """Per-example gradient contributions, keyed by parameter name."""
        raise NotImplementedError

    def eager_into(self, call: Call, grad: Tensor, name: str, out: Tensor, accumulate: bool) -> None:
        """Write (or add, if ``accumulate``) the per-example gradient of the
        eager parameter ``name`` into ``out`` of shape ``(B, *param.shape)``."""
        self.on_grad(call, grad, frozenset([name]))
        r = call.results.pop(name).view(out.shape)
        if accumulate:
            out += r
        else:
            out.copy_(r)


def reduce_into(t: Tensor, dims: tuple[int, ...], out: Tensor, accumulate: bool) -> None:
    """``out (+)= t.sum(dims)`` accumulated in ``out``'s dtype, without a temporary when possible."""
    if not dims and not accumulate and t.shape == out.shape:
        out.copy_(t)  # converts the dtype too
        return
    if accumulate or not dims:
        r = t.sum(dim=dims, dtype=out.dtype) if dims else t.to(out.dtype)
        if accumulate:
            out += r.view(out.shape)
        else:
            out.copy_(r.view(out.shape))
        return
    if out.ndim != t.ndim - len(dims):
        out = out.view(*[t.shape[i] for i in range(t.ndim) if i not in dims])
    torch.sum(t, dim=dims, dtype=out.dtype, out=out)


def batchify(x: Tensor, batch_size: int) -> Tensor:
    """Expand a batch-broadcast tensor (leading dim 1) to ``batch_size``."""
    if x.shape[0] == batch_size:
        return x
    if x.shape[0] == 1:
        return x.expand(batch_size, *x.shape[1:])
    raise RuntimeError(f"dpft: expected a leading batch dimension of {batch_size} or 1, got shape {tuple(x.shape)}")
