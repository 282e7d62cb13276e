"""BiTFiT: train only the bias terms (plus, optionally, named extra parameters)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def bitfit(model: nn.Module, extra: Iterable[str] = ()) -> list[str]:
    """Freeze every parameter except those whose name ends in ``bias``
    (norm-layer biases included) and those named in ``extra`` (exact
    parameter names or name prefixes, e.g. ``"classifier"`` for a new head).

    Returns the names of the trainable parameters."""
    extra = tuple(extra)
    names = []
    for name, p in model.named_parameters():
        train = name.endswith("bias") or any(name == e or name.startswith(e + ".") for e in extra)
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names
