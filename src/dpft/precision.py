"""Full float32 precision for dpft's own per-example computations.

PyTorch can run float32 matrix products and convolutions on TF32 tensor
cores (10-bit mantissa, ~1e-3 relative error): cuDNN convolutions do by
default, cuBLAS matrix products when the user asks for it
(``torch.set_float32_matmul_precision("high")``, Hugging Face ``tf32=True``).
That is fine for a model's own gradients, but a per-example norm computed
that way can come out ~0.1 % small, and the clipped contribution of that
example then exceeds the clipping threshold the noise was calibrated for.
:func:`full_fp32` switches TF32 off around dpft's norms and clipped sums and
restores the user's settings afterwards.
"""

from __future__ import annotations

import torch


def _flag_objects() -> list:
    """The per-backend precision settings of PyTorch's newer API (>= 2.9)."""
    out = []
    for holder in (getattr(torch.backends.cuda, "matmul", None), getattr(torch.backends.cudnn, "conv", None)):
        if holder is not None and hasattr(holder, "fp32_precision"):
            out.append(holder)
    return out


class full_fp32:  # noqa: N801 - used like the function it replaces: ``with full_fp32(): ...``
    """Float32 matrix products and cuDNN convolutions in IEEE float32 inside.

    Uses the per-backend ``fp32_precision`` settings where PyTorch has them
    (setting the legacy ``allow_tf32`` flags as well would mix the two APIs,
    which recent PyTorch refuses), the legacy flags otherwise.  A setting that
    is IEEE already is left alone (nested uses and PyTorch's default for
    matrix products cost two reads): this runs in per-layer hooks."""

    __slots__ = ("_holders", "_old", "_legacy")

    def __enter__(self) -> None:
        holders = _HOLDERS if _HOLDERS is not None else _flag_objects()
        if len(holders) == 2:
            self._legacy = None
            changed, old = [], []
            for h in holders:
                v = h.fp32_precision
                if v != "ieee":
                    changed.append(h)
                    old.append(v)
                    h.fp32_precision = "ieee"
            self._holders, self._old = changed, old
            return
        # older PyTorch: the legacy flags  # pragma: no cover
        self._legacy = torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled,
            benchmark=torch.backends.cudnn.benchmark,
            deterministic=torch.backends.cudnn.deterministic,
            allow_tf32=False,
        )
        self._old = [torch.backends.cuda.matmul.allow_tf32]
        torch.backends.cuda.matmul.allow_tf32 = False
        self._legacy.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._legacy is None:
            for h, v in zip(self._holders, self._old):
                h.fp32_precision = v
            return
        try:  # pragma: no cover
            self._legacy.__exit__(*exc)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = self._old[0]


_HOLDERS: list | None = _flag_objects() or None
