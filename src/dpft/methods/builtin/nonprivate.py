"""Non-private baselines (no DP guarantee, ε = ∞): full fine-tuning and BiTFiT trained plainly."""

from __future__ import annotations

from ..registry import Method, register
from .bitfit import select_biases
from .full import select_all

NONPRIVATE_FULL = register(
    Method(
        name="nonprivate-full",
        trains="every parameter (no privacy)",
        select=select_all,
        private=False,
        lr=5e-5,
        image_lr=2e-3,
    )
)
NONPRIVATE_BITFIT = register(
    Method(
        name="nonprivate-bitfit",
        trains="biases + the head (no privacy)",
        select=select_biases,
        private=False,
        lr=1e-3,
        head_lr=1e-2,
        image_lr=2e-3,
    )
)
