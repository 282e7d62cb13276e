"""DP-SPARTA: biases and the head first; after a private scoring pass (:mod:`dpft.methods.sparta`)
the selected rows of the candidate weights join."""

from __future__ import annotations

from ..registry import Method, register
from .bitfit import select_biases

# Weight rows below the head train, so the head is clipped as its own group (see full.py).
SPARTA = register(
    Method(
        name="sparta",
        trains="biases + the head, then selected weight rows",
        select=select_biases,
        lr=1e-3,
        head_lr=1e-2,
        clipping_style="separate-head",
    )
)
