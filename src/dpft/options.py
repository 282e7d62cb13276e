"""The engine's options, once: the words users pass (clipping functions, styles and modes,
accountants, ...) and :class:`EngineOptions`, which checks them.

``PrivacyEngine(model, ..., max_grad_norm=1.0, clipping_fn="abadi")`` and
``PrivacyEngine(model, ..., options=EngineOptions(max_grad_norm=1.0, clipping_fn="abadi"))``
are the same engine; the audits (:mod:`dpft.audit`) take the same object, so a configuration
is written once and passed to each.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .accounting import ACCOUNTANTS

__all__ = [
    "EngineOptions",
    "ACCOUNTANTS",
    "CLIPPING_FNS",
    "CLIPPING_MODES",
    "CLIPPING_STYLES",
    "LOSS_REDUCTIONS",
    "ON_BUDGET",
    "PRIVACY_UNITS",
]

CLIPPING_FNS = ("abadi", "automatic")
CLIPPING_STYLES = ("all-layer", "layer-wise", "param-wise")
CLIPPING_MODES = ("auto", "bk", "ghost", "mixed", "instantiate")
TWO_PASS = ("auto", "on", "off")
LOSS_REDUCTIONS = ("mean", "sum")
ON_BUDGET = ("raise", "warn")
PRIVACY_UNITS = ("example", "user")


def bad(name: str, value: Any, expected: str) -> ValueError:
    """The one-line error for an option: ``{name} must be {expected}, got {value!r}``."""
    return ValueError(f"{name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class EngineOptions:
    """How a :class:`dpft.PrivacyEngine` privatizes, apart from the run's size and budget
    (``batch_size``, ``sample_size``, ``epochs``/``steps``, ``target_epsilon``/``noise_multiplier``).

    Every field is checked when the object is made (``ValueError`` naming the field); the
    defaults are the engine's. The fields mean what the engine's keyword arguments of the
    same names mean (:class:`dpft.PrivacyEngine`).
    """

    target_delta: float | None = None
    max_grad_norm: float = 1.0
    clipping_fn: str = "abadi"
    clipping_style: str | Sequence[Sequence[str]] = "all-layer"
    clipping_mode: str = "auto"
    accountant: str = "pld"
    loss_reduction: str = "mean"
    on_budget_exceeded: str = "raise"
    noise_seed: int | None = None
    secure_mode: bool = False
    poisson: bool = True
    strict: bool = False
    privacy_unit: str = "example"
    two_pass: str = "auto"

    def __post_init__(self) -> None:
        d, r = self.target_delta, self.max_grad_norm
        if d is not None and not (isinstance(d, (int, float)) and 0 < d < 1):
            raise bad("target_delta", d, "in (0, 1)")
        if not (isinstance(r, (int, float)) and r > 0 and math.isfinite(r)):
            raise bad("max_grad_norm", r, "a positive finite number")
        if self.clipping_fn not in CLIPPING_FNS:
            raise bad("clipping_fn", self.clipping_fn, f"one of {CLIPPING_FNS}")
        if isinstance(self.clipping_style, str) and self.clipping_style not in CLIPPING_STYLES:
            raise bad(
                "clipping_style", self.clipping_style, f"one of {CLIPPING_STYLES} or a list of lists of parameter names"
            )
        for name, choices in (
            ("clipping_mode", CLIPPING_MODES),
            ("accountant", ACCOUNTANTS),
            ("loss_reduction", LOSS_REDUCTIONS),
            ("on_budget_exceeded", ON_BUDGET),
            ("privacy_unit", PRIVACY_UNITS),
            ("two_pass", TWO_PASS),
        ):
            if getattr(self, name) not in choices:
                raise bad(name, getattr(self, name), f"one of {choices}")
        for name in ("secure_mode", "poisson", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, getattr(self, name), "True or False")

    def replace(self, **changes: Any) -> EngineOptions:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def merge(cls, options: EngineOptions | None, **given: Any) -> EngineOptions:
        """``options`` with the keyword options ``given`` (field name -> value).

        Without ``options`` the keywords make a new object. With ``options``, a keyword that
        differs from its default would contradict it: ``ValueError`` naming it (give each
        option once: in ``options`` or as a keyword)."""
        if options is None:
            return cls(**given)
        if not isinstance(options, cls):
            raise bad("options", options, "a dpft.EngineOptions")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        both = [k for k, v in given.items() if not _same(v, defaults[k])]
        if both:
            raise ValueError(
                f"{', '.join(both)} given both in options= and as keyword arguments; give each option once"
            )
        return options


def _same(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)
