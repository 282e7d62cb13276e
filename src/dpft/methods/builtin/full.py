"""DP full fine-tuning: every parameter."""

from __future__ import annotations

from typing import Any

from ..registry import Method, register


def select_all(model: Any, **_: Any) -> Any:
    """Train every parameter of ``model``."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# docs/utility.md's GPU search found DP full fine-tuning at lr 5e-4 stuck at the majority class
# (57 %) and 1.5e-3 at 75 % (validation split): 1.5e-3 is the GPU default. On the CPU job (79
# noisier steps) the body moves slowly (1e-4) and the new head at 1e-2 like the other methods;
# clipped as one group its head stalled at the majority class at both 3e-4 and 5e-5.
# Where weight matrices below the new head train, their per-example gradients grow with the
# head's weights and, clipped together with the head's, squeeze the head's share of the clipped
# gradient until the head stops learning; clipped as its own group ("separate-head") the head
# keeps R/√2 whatever the rest does.
# On the CPU job R is 4, not 1 (docs/utility.md, "Defaults on a CPU"): at R = 1 the head's share
# R/√2 ≈ 0.7 is below nearly every head gradient of the packaged MiniLM (≈ 2.7 at the start),
# so every example pushes the head by the same amount whether it is already right or not; the
# pushes of the majority class win, the logits drift towards it and the training loss rose
# (0.69 → ~1.2) for the first ~15-20 steps. At R/√2 ≈ 2.8 the head's gradients are mostly
# unclipped (cross-entropy's own weighting) and the loss falls from the first steps; the body's
# gradients are clipped either way, so its signal-to-noise ratio under Adam does not change.
FULL = register(
    Method(
        name="full",
        trains="every parameter",
        select=select_all,
        lr=1.5e-3,
        lr_cpu=1e-4,
        head_lr_cpu=1e-2,
        clipping_style="separate-head",
        max_grad_norm_cpu=4.0,
    )
)
