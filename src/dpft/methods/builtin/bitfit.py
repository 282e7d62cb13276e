"""DP-BiTFiT: the biases (zero-initialised ones added to a bias-free model) and the new head."""

from __future__ import annotations

from typing import Any

from ..registry import Method, register


def select_biases(model: Any, *, head: list[str], notes: list[str] | None = None, **_: Any) -> Any:
    """Train the biases and ``head`` (:func:`dpft.methods.bitfit.bitfit`); what it added goes to ``notes``."""
    from ..bitfit import bitfit

    bitfit(model, extra=sorted(head), log=None if notes is None else notes.append)
    return model


# Text defaults (Adam): 3 epochs at batch 512 and 128 tokens on a GPU, the CPU job smaller
# (dpft.app.config); the new head wants a larger step than the biases.
BITFIT = register(
    Method(name="bitfit", trains="biases + the classification head", select=select_biases, lr=3e-3, head_lr=1e-2)
)
