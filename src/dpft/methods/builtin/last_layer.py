"""DP last-layer (linear probing): the new classification head only."""

from __future__ import annotations

from typing import Any

from ..registry import Method, register


def select_head(model: Any, *, head: list[str], **_: Any) -> Any:
    """Train the parameters named in ``head`` and nothing else."""
    keep = set(head)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    return model


LAST_LAYER = register(Method(name="last-layer", trains="the classification head", select=select_head, lr=3e-2))
