"""Tensor helpers that import nothing from dpft (so that any module may use them).

:func:`bmm_acc` is the batched matrix product the per-example norms and the
convolution rule share; :func:`cast` skips a no-op ``.to``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)  # autocast's dtypes (dpft.rules.base.HALF)


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the call when it would return ``t`` (on a
    CUDA host the no-op call costs about as much as a small kernel launch)."""
    return t if t.dtype is dtype else t.to(dtype)


#: whether ``torch.bmm(..., out_dtype=torch.float32)`` works for half inputs on CUDA (probed once)
_BMM_OUT_DTYPE: bool | None = None


def bmm_acc(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """``x @ y`` (batched) with the result in ``dtype`` (float32/64).

    Half-precision factors (what a layer used under autocast) are multiplied
    in half precision with a float32 result on CUDA: each product of two half
    values is exact in float32 and the accumulation is float32, so the result
    is as accurate as a float32 product of the same values, at tensor-core
    speed (no rounding of the output back to half precision: a norm must not
    come out smaller than it is).  Elsewhere, and for float32/64 factors, the
    factors are cast to ``dtype`` first."""
    global _BMM_OUT_DTYPE
    if x.dtype in _HALF and y.dtype == x.dtype and x.is_cuda and dtype == torch.float32 and _BMM_OUT_DTYPE is not False:
        try:
            out = torch.bmm(x, y, out_dtype=torch.float32)
            _BMM_OUT_DTYPE = True
            return out
        except torch.OutOfMemoryError:
            raise  # a real failure, not a missing feature: never retry with larger float32 copies
        except (TypeError, RuntimeError, NotImplementedError):
            if _BMM_OUT_DTYPE:  # it worked before: this is a real error, not a missing feature
                raise
            _BMM_OUT_DTYPE = False
    return torch.bmm(cast(x, dtype), cast(y, dtype))
