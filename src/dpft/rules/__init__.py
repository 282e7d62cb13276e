"""Registry: module type -> per-layer rule.

Rules match by ``isinstance`` (so subclasses such as timm's LayerNorm or a
quantized Linear get the parent's rule); the first match in registration
order wins, so register specific types before their parents.  Modules with
no rule are handled by the exact ``torch.func`` fallback when they have no
children; see :func:`dpft.capture.plan_model` for the rest.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .base import Call, Contribution, Direct, Factored, Rule
from .conv import CONV_TRANSPOSE_TYPES, CONV_TYPES, ConvRule, ConvTransposeRule
from .embedding import EmbeddingRule
from .experts import FusedExpertsRule, LinearRouterRule, is_fused_experts, is_linear_router
from .fallback import (
    EnclosingRule,
    FallbackRule,
    MultiheadAttentionRule,
    ParametrizedRule,
    RoutedExpertsRule,
    is_moe_block,
)
from .linear import HFConv1DRule, LinearRule, is_hf_conv1d
from .norm import INSTANCE_NORM_TYPES, GroupNormRule, InstanceNormRule, LayerNormRule, RMSNormRule, is_hf_rmsnorm

Matcher = Callable[[nn.Module], bool]

_REGISTRY: list[tuple[Matcher, Rule]] = []


def register_rule(match: type | tuple[type, ...] | Matcher, rule: Rule, *, first: bool = False) -> None:
    """Register ``rule`` for modules that are instances of ``match`` (or for
    which the predicate ``match(module)`` is true).  ``first=True`` gives it
    priority over the built-in rules."""
    if isinstance(match, (type, tuple)):
        types = match
        matcher: Matcher = lambda m: isinstance(m, types)  # noqa: E731
    else:
        matcher = match
    if first:
        _REGISTRY.insert(0, (matcher, rule))
    else:
        _REGISTRY.append((matcher, rule))


#: the built-in rule of each parent class whose operator ``rules.functional`` knows
BUILTIN: dict[type, Rule] = {}


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``, or ``None``."""
    for matcher, rule in _REGISTRY:
        if matcher(module):
            return rule
    return None


FALLBACK = FallbackRule()
PARAMETRIZED = ParametrizedRule()
#: an enclosing module recomputed for parameters of a module inside it that
#: returned no per-example output (``Capture._escalate``)
ESCALATED = EnclosingRule()

register_rule(nn.MultiheadAttention, MultiheadAttentionRule())
register_rule(is_moe_block, RoutedExpertsRule())
register_rule(is_fused_experts, FusedExpertsRule())
register_rule(is_linear_router, LinearRouterRule())
BUILTIN[nn.Linear] = LinearRule()
BUILTIN[nn.Embedding] = EmbeddingRule()
BUILTIN[nn.LayerNorm] = LayerNormRule()
BUILTIN[nn.GroupNorm] = GroupNormRule()
BUILTIN.update(dict.fromkeys(CONV_TYPES, ConvRule()))
if hasattr(nn, "RMSNorm"):
    BUILTIN[nn.RMSNorm] = RMSNormRule()

register_rule(nn.Linear, BUILTIN[nn.Linear])
register_rule(is_hf_conv1d, HFConv1DRule())
register_rule(CONV_TYPES, BUILTIN[nn.Conv2d])
register_rule(CONV_TRANSPOSE_TYPES, ConvTransposeRule())
register_rule(nn.Embedding, BUILTIN[nn.Embedding])
register_rule(nn.LayerNorm, BUILTIN[nn.LayerNorm])
register_rule(nn.GroupNorm, BUILTIN[nn.GroupNorm])
register_rule(INSTANCE_NORM_TYPES, InstanceNormRule())
if hasattr(nn, "RMSNorm"):
    register_rule(nn.RMSNorm, BUILTIN[nn.RMSNorm])
register_rule(is_hf_rmsnorm, RMSNormRule())

__all__ = [
    "BUILTIN",
    "Call",
    "Contribution",
    "Direct",
    "Factored",
    "ESCALATED",
    "FALLBACK",
    "PARAMETRIZED",
    "Rule",
    "find_rule",
    "register_rule",
]
