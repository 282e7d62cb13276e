"""Substitution: the generic path's computation without recomputation, for a
module's own parameters that meet the examples only in broadcasting
element-wise operations (layer scale ``x * gamma``, a relative position bias
added to attention logits, a norm's ``weight * x``).

While the module's forward runs, a :class:`Substitution` (a
``TorchFunctionMode``) follows the tensors computed from the module's
trainable direct parameters alone (batch-free: views, indexing by buffers,
arithmetic with constants).  Where such a tensor ``T`` meets a tensor whose
leading dimension holds the examples' rows (``n`` of them, or ``n * k``
example by example: Swin's windows) in a broadcasting element-wise operation
(``mul``, ``add``, ``sub``, ``div``, ``addcmul``, ``where``, in place or not;
``scaled_dot_product_attention``'s ``attn_mask``), and ``T`` broadcasts along
that dimension (size 1 or absent), the operation gets
``T.expand(rows, ...)`` instead: the same values, so the forward computes
what it did, and the gradient autograd writes to that expanded tensor is
``T``'s gradient row by row.  Summed over each example's rows, it is that
example's gradient of ``T``; pulled back through the batch-free chain from
the parameters to ``T`` (recorded on detached copies of the parameters, a
"shadow" of the chain, so the model's own graph is not needed again), it is
the example's gradient of the parameters.  No recomputation of the module,
one small batched pull-back.

Anything else, and the call is not substituted (:attr:`Substitution.failed`
says why), so the generic path's other computations serve it: such a tensor
in any other operation with a tensor that needs a gradient (a matmul, a
convolution, an unknown function), meeting rows that are not a multiple of
the batch size or a tensor that already has rows, an in-place change of such
a tensor, a random or stateful operation on it, or such a tensor returned by
the module.  The generic path uses substitution only after it agreed with
the reference pull-back on every example and parameter in the first passes,
and only for a call that substitutes at the same operations with the same
shapes (:attr:`Substitution.key`) as one that agreed; see
:mod:`dpft.rules.fallback`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Substitution"]


def _funcs(*names: str) -> frozenset[Any]:
    found = set()
    for name in names:
        for owner in (torch, torch.Tensor):
            f = getattr(owner, name, None)
            if f is not None:
                found.add(f)
    return frozenset(found)


#: broadcasting element-wise operations where a batch-free operand may be
#: replaced by its expansion along the rows (every operand is broadcast the same way)
ELEMENTWISE = _funcs(
    *"mul mul_ multiply add add_ sub sub_ subtract div div_ divide true_divide".split(),
    *"addcmul addcmul_ addcdiv addcdiv_ where lerp lerp_ maximum minimum".split(),
    *"__mul__ __rmul__ __imul__ __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__".split(),
    *"__truediv__ __rtruediv__ __itruediv__".split(),
)
_SDPA = F.scaled_dot_product_attention
#: operations that draw random numbers or change state beside their output: never
#: repeated on the shadow chain (the forward would change), so a call with one fails
_STATEFUL = frozenset(
    "bernoulli rand_like randn_like randint_like normal multinomial poisson rrelu batch_norm instance_norm".split()
    + ["__setitem__"]
)
_INPLACE_DUNDER = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__"})


class _Site:
    """One substitution: the shadow of the substituted tensor and, once the
    backward has passed, each example's gradient of it ``(n, *T.shape)``."""

    __slots__ = ("shadow", "shape", "n", "grad")

    def __init__(self, shadow: Tensor, shape: torch.Size, n: int) -> None:
        self.shadow, self.shape, self.n = shadow, shape, n
        self.grad: Tensor | None = None

    def hook(self, grad: Tensor) -> None:
        n = self.n
        k = grad.shape[0] // n
        per = grad.reshape(n, k, *grad.shape[1:]).sum(1) if k > 1 else grad
        per = per.reshape(n, *self.shape)
        self.grad = per if self.grad is None else self.grad + per


def _tensors(xs: Any) -> list[Tensor]:
    out: list[Tensor] = []
    for a in xs:
        if isinstance(a, Tensor):
            out.append(a)
        elif type(a) in (list, tuple):
            out.extend(b for b in a if isinstance(b, Tensor))
    return out


class Substitution(TorchFunctionMode):
    """Follows one call of a generic-path module's forward (entered in its
    forward pre-hook, :meth:`close` in its forward hook) and substitutes
    where it can; see the module docstring.  ``params``: the module's
    trainable direct parameters by name; ``n``: the batch size."""

    def __init__(self, params: dict[str, nn.Parameter], n: int) -> None:
        super().__init__()
        self.n = n
        #: detached copies of the parameters: the leaves of the shadow chain
        self.leaves = {k: p.detach().requires_grad_() for k, p in params.items()}
        #: id of a batch-free tensor computed from the parameters -> its shadow
        self.tracked: dict[int, Tensor] = {id(p): self.leaves[k] for k, p in params.items()}
        self._alive: list[Tensor] = list(params.values())  # (the tracked tensors, kept alive: ids stay theirs)
        self.sites: list[_Site] = []
        #: why the call is not substituted (``None``: it is)
        self.failed: str | None = None
        self._key: list[tuple] = []
        self.nested = 0  # calls of the module inside its own forward, still running (see Capture._pre)
        #: the operations that touched the parameters' tensors and the substitutions' shapes
        self.key: tuple = ()

    # -- the mode -----------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if kwargs is None:
            kwargs = {}
        if self.failed is None:
            tracked = self.tracked
            for a in args:
                if id(a) in tracked or (type(a) in (list, tuple) and any(id(b) in tracked for b in a)):
                    return self._tracked_call(func, args, kwargs)
            if kwargs and any(id(v) in tracked for v in kwargs.values()):
                return self._tracked_call(func, args, kwargs)
        return func(*args, **kwargs)

    def _fail(self, why: str) -> None:
        self.failed = why
        self.tracked, self._alive = {}, []

    def _tracked_call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if not torch.is_grad_enabled():  # (nothing computed now reaches the parameters' gradients)
            return func(*args, **kwargs)
        name = getattr(func, "__name__", None) or repr(func)
        if _compiling():
            self._fail("traced by torch.compile")
            return func(*args, **kwargs)
        tracked = self.tracked
        leaves = _tensors(args) + _tensors(kwargs.values())
        if any(_wrapped(t) for t in leaves):
            self._fail(f"{name} under torch.func transforms")
            return func(*args, **kwargs)
        inplace = (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDER or "out" in kwargs
        if "dropout" in name or name in _STATEFUL:
            self._fail(f"{name} (random or stateful) on a tensor computed from the parameters")
            return func(*args, **kwargs)
        if inplace and args and id(args[0]) in tracked:
            self._fail(f"{name} changes a tensor computed from the parameters in place")
            return func(*args, **kwargs)
        others = [t for t in leaves if id(t) not in tracked]
        if func in ELEMENTWISE:
            done, out = self._elementwise(name, func, args, kwargs, leaves, others)
            if done:
                return out
        elif func is _SDPA:
            return self._attention(func, args, kwargs)
        if inplace:
            self._fail(f"{name} writes a tensor computed from the parameters into another")
            return func(*args, **kwargs)
        if any(t.requires_grad for t in others):
            self._fail(f"{name} combines a tensor computed from the parameters with one that needs a gradient")
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        self._track(name, func, args, kwargs, out)
        return out

    def _elementwise(
        self,
        name: str,
        func: Any,
        args: tuple,
        kwargs: dict,
        leaves: list[Tensor],
        others: list[Tensor],
    ) -> tuple[bool, Any]:
        """Substitute the batch-free operands of a broadcasting element-wise
        operation that meets the rows: ``(True, result)``; ``(False, None)``
        where the operation is itself batch-free (nothing met)."""
        ndim = max(t.ndim for t in leaves)
        rows = max((t.shape[0] for t in others if t.ndim == ndim and ndim > 0), default=1)
        n = self.n
        if rows < n or rows % n:
            if any(t.requires_grad for t in others):
                self._fail(f"{name} meets {rows} rows, not a multiple of the batch size {n}")
                return True, func(*args, **kwargs)
            return False, None
        tracked = self.tracked
        for t in leaves:
            if id(t) in tracked and t.ndim == ndim and t.shape[0] != 1:
                self._fail(f"{name}: a tensor computed from the parameters already has {t.shape[0]} rows")
                return True, func(*args, **kwargs)

        def swap(a: Any) -> Any:
            if isinstance(a, Tensor) and id(a) in tracked:
                return self._expand(name, a, ndim, rows)
            return a

        return True, func(*[swap(a) for a in args], **{k: swap(v) for k, v in kwargs.items()})

    def _attention(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """``scaled_dot_product_attention`` with a batch-free ``attn_mask``
        (added to the logits ``(rows, ..., L, S)``): substituted like an
        element-wise operand."""
        tracked = self.tracked
        qkv = list(args[:3]) + [kwargs[k] for k in ("query", "key", "value") if k in kwargs]
        at = 3 if len(args) > 3 else None
        mask = args[3] if at is not None else kwargs.get("attn_mask")
        if any(id(t) in tracked for t in qkv) or mask is None or id(mask) not in tracked:
            self._fail("scaled_dot_product_attention with a tensor computed from the parameters as q, k or v")
            return func(*args, **kwargs)
        q = qkv[0]
        rows, n = q.shape[0], self.n
        ndim = q.ndim
        if rows < n or rows % n or mask.ndim > ndim or (mask.ndim == ndim and mask.shape[0] != 1):
            self._fail(f"scaled_dot_product_attention: a mask of shape {tuple(mask.shape)} for {rows} rows")
            return func(*args, **kwargs)
        sub = self._expand("scaled_dot_product_attention", mask, ndim, rows)
        if at is not None:
            args = args[:3] + (sub,) + args[4:]
        else:
            kwargs = dict(kwargs, attn_mask=sub)
        return func(*args, **kwargs)

    def _expand(self, name: str, t: Tensor, ndim: int, rows: int) -> Tensor:
        """``t`` aligned to ``ndim`` dimensions and expanded to ``rows`` rows,
        with a hook that reads each example's gradient of ``t``."""
        shape = (1,) * (ndim - t.ndim) + tuple(t.shape)
        expanded = t.reshape(shape).expand(rows, *shape[1:])
        site = _Site(self.tracked[id(t)], t.shape, self.n)
        expanded.register_hook(site.hook)
        self.sites.append(site)
        self._key.append((name, tuple(t.shape), ndim, rows // self.n))
        return expanded

    def _track(self, name: str, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """A batch-free operation: its outputs that need a gradient are followed,
        their shadows computed from the shadows of its inputs."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if not any(isinstance(o, Tensor) and o.requires_grad for o in outs):
            return
        tracked = self.tracked

        def shadow(a: Any) -> Any:
            if isinstance(a, Tensor):
                return tracked.get(id(a), a)
            if type(a) in (list, tuple):
                return type(a)(tracked.get(id(b), b) if isinstance(b, Tensor) else b for b in a)
            return a

        with torch.enable_grad():
            sout = func(*[shadow(a) for a in args], **{k: shadow(v) for k, v in kwargs.items()})
        souts = sout if isinstance(sout, (tuple, list)) else (sout,)
        for o, s in zip(outs, souts):
            if isinstance(o, Tensor) and o.requires_grad and isinstance(s, Tensor):
                tracked[id(o)] = s
                self._alive.append(o)
        self._key.append((name,))

    # -- after the forward and the backward ---------------------------------
    def close(self, output: Any) -> None:
        """Leave the mode (the module's forward has returned ``output``)."""
        self.__exit__(None, None, None)
        if self.failed is None:
            if any(isinstance(t, Tensor) and id(t) in self.tracked for t in _flat(output)):
                self._fail("the module returns a tensor computed from the parameters alone")
            elif not self.sites:
                self._fail("the parameters met no rows")
        self.tracked, self._alive = {}, []
        self.key = tuple(self._key)

    def usable(self) -> bool:
        """Substituted, and every substitution received its gradient."""
        return self.failed is None and all(s.grad is not None for s in self.sites)

    def gradients(self, names: list[str]) -> list[Tensor] | None:
        """Each example's gradient of the parameters ``names``, stacked
        ``(n, *shape)``; ``None`` where the call cannot give them."""
        if not self.usable():
            return None
        leaves = [self.leaves[k] for k in names]
        outs = [s.shadow for s in self.sites]
        grads = [s.grad.to(s.shadow.dtype) for s in self.sites]  # type: ignore[union-attr]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (functorch's "no batching rule": still exact)
                got = list(
                    torch.autograd.grad(
                        outs,
                        leaves,
                        grads,
                        is_grads_batched=True,
                        retain_graph=True,
                        allow_unused=True,
                    )
                )
        except RuntimeError:  # (an operation of the chain without a batching rule: one example at a time)
            rows: list[list[Tensor | None]] = []
            for i in range(self.n):
                rows.append(
                    list(
                        torch.autograd.grad(
                            outs,
                            leaves,
                            [g[i] for g in grads],
                            retain_graph=True,
                            allow_unused=True,
                        )
                    )
                )
            got = [
                None
                if all(r[j] is None for r in rows)
                else torch.stack([r[j] if r[j] is not None else torch.zeros_like(leaves[j]) for r in rows])
                for j in range(len(leaves))
            ]
        return [
            g if g is not None else torch.zeros(self.n, *p.shape, dtype=p.dtype, device=p.device)
            for g, p in zip(got, leaves)
        ]


def _compiling() -> bool:
    """Whether TorchDynamo is tracing (nothing is substituted then)."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check()) if check is not None else False


_IS_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def _wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` transform's wrapper (vmap, grad)."""
    return bool(_IS_WRAPPED(t)) if _IS_WRAPPED is not None else False


def _flat(output: Any) -> list[Any]:
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _flat(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _flat(o)]
    return [output]


def start(module: nn.Module, names: list[str], n: int | None, args: tuple) -> Substitution | None:
    """A :class:`Substitution` entered for one call of ``module`` whose
    trainable direct parameters ``names`` take the generic path, else
    ``None`` (not for this call: batch size unknown, traced, under
    ``torch.func``, a parameter that is not a plain tensor)."""
    if n is None or not names or _compiling():
        return None
    params = {}
    for k in names:
        p = module._parameters.get(k) if "." not in k else None
        if p is None or type(p) is not nn.Parameter or not p.requires_grad:
            return None
        params[k] = p
    for a in args:
        if isinstance(a, Tensor) and _wrapped(a):
            return None
    mode = Substitution(params, n)
    mode.__enter__()
    return mode
