"""Clipping functions and clipping styles (how parameters are grouped).

With ``K`` groups each group is clipped to ``R / sqrt(K)``, so the clipped
per-example gradient has norm at most ``R`` overall and the sensitivity of
the sum stays ``R``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..options import CLIPPING_FNS, CLIPPING_STYLES  # noqa: F401 (the vocabulary lives in dpft.options)

AUTOMATIC_GAMMA = 0.01


def clip_factors(norms: Tensor, max_norm: float, fn: str) -> Tensor:
    """Per-example factors ``c_i`` for per-example norms ``norms``.

    ``abadi``: ``min(1, R / ||g_i||)`` (no stabiliser above 1e-12);
    ``automatic``: ``R / (||g_i|| + 0.01)`` (normalization, Bu et al. 2023).
    """
    if fn == "abadi":
        return (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    if fn == "automatic":
        return max_norm / (norms + AUTOMATIC_GAMMA)
    raise ValueError(f"clipping_fn must be one of {CLIPPING_FNS}, got {fn!r}")


def make_groups(
    style: str | Sequence[Sequence[str]],
    names: Sequence[str],
    owner: dict[str, str],
) -> list[list[str]]:
    """Partition trainable parameter ``names`` into clipping groups.

    ``owner`` maps a parameter name to the name of the module that owns it
    (for ``layer-wise``).  Explicit groups must cover every trainable
    parameter exactly once."""
    if isinstance(style, str):
        if style == "all-layer":
            return [list(names)]
        if style == "param-wise":
            return [[n] for n in names]
        if style == "layer-wise":
            by_module: dict[str, list[str]] = {}
            for n in names:
                by_module.setdefault(owner[n], []).append(n)
            return list(by_module.values())
        raise ValueError(
            f"clipping_style must be one of {CLIPPING_STYLES} or a list of lists of parameter names, got {style!r}"
        )
    groups = [list(g) for g in style]
    seen: dict[str, int] = {}
    for gi, g in enumerate(groups):
        if not g:
            raise ValueError(f"clipping_style: group {gi} is empty")
        for n in g:
            if n in seen:
                raise ValueError(f"clipping_style: parameter {n!r} is in groups {seen[n]} and {gi}")
            seen[n] = gi
    unknown = sorted(set(seen) - set(names))
    if unknown:
        raise ValueError(f"clipping_style: not trainable parameters (or unknown names): {unknown}")
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"clipping_style: trainable parameters in no group: {missing}")
    return groups
