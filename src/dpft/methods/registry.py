"""The fine-tuning methods by name: what each trains, whether it is private, and its defaults.

A method is one :class:`Method` registered with :func:`register`; the built-in ones are one
file each in :mod:`dpft.methods.builtin`, which the package :mod:`dpft.methods` imports (so
they are registered before anything here is read; ``dpft train --method`` offers exactly the
registered names, in registration order). Nothing here imports torch: ``dpft --help``
reads the names and defaults without it (a method's :attr:`Method.select` imports what
it needs when it runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Method", "MethodError", "register", "get", "names"]


class MethodError(ValueError):
    """A method cannot train this model (or needs a package that is missing); the message says why."""


@dataclass(frozen=True)
class Method:
    """One fine-tuning method of ``dpft train``.

    Attributes:
        name: the ``--method`` value.
        trains: what trains, in words (for help and reports).
        select: ``select(model, *, head, notes, **options) -> model``: freezes and unfreezes
            (or wraps) ``model`` so that exactly what the method trains has
            ``requires_grad=True``; ``head`` names the parameters of the new
            classification head (every method trains it), ``notes`` (a list or ``None``)
            collects what it changed in the model; ``options`` are the job's method
            options (``lora_rank``, ``head_modules``); a method ignores those it does not use.
        private: trained with the privacy engine (``False``: a non-private baseline, ε = ∞).
        lr: default Adam learning rate of a text job on a GPU.
        lr_cpu: the same on a CPU job (``None``: ``lr``).
        head_lr / head_lr_cpu: default learning rate of the new head on text jobs
            (``None``: the head shares ``lr``).
        image_lr: default learning rate of an image job (head included).
        max_grad_norm: default clipping threshold R (``--max-grad-norm``).
        max_grad_norm_cpu: the same on a CPU text job (``None``: ``max_grad_norm``).
        clipping_style: default ``--clipping-style`` (``"all-layer"`` or ``"separate-head"``).
    """

    name: str
    trains: str
    select: Callable[..., Any]
    private: bool = True
    lr: float = 1e-3
    lr_cpu: float | None = None
    head_lr: float | None = None
    head_lr_cpu: float | None = None
    image_lr: float = 1e-2
    clipping_style: str = "all-layer"
    max_grad_norm: float = 1.0
    max_grad_norm_cpu: float | None = None

    def text_lr(self, on_cpu: bool) -> float:
        """Default learning rate of a text job."""
        return self.lr_cpu if on_cpu and self.lr_cpu is not None else self.lr

    def text_head_lr(self, on_cpu: bool) -> float | None:
        """Default head learning rate of a text job (``None``: the head shares the lr)."""
        return self.head_lr_cpu if on_cpu and self.head_lr_cpu is not None else self.head_lr

    def text_max_grad_norm(self, on_cpu: bool) -> float:
        """Default clipping threshold R of a text job."""
        return self.max_grad_norm_cpu if on_cpu and self.max_grad_norm_cpu is not None else self.max_grad_norm


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name registered twice is an error); returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a dpft.methods.registry.Method, got {type(method).__name__}")
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def names(private: bool | None = None) -> tuple[str, ...]:
    """The registered method names in registration order (``private``: only those that are / are not)."""
    return tuple(n for n, m in _METHODS.items() if private is None or m.private == private)


def get(name: str) -> Method:
    """The method registered as ``name``; ``KeyError`` naming the choices otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}") from None
