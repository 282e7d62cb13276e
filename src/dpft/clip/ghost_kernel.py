"""The ghost norm of one Linear-type layer in one fused GPU kernel (Triton).

For a layer with per-example input ``A_i`` (``T x D``) and output gradient
``G_i`` (``T x P``) the squared norm of the per-example weight gradient is

    ||A_i^T G_i||^2 = sum_{t,s} (A_i A_i^T)_{ts} (G_i G_i^T)_{ts}.

cuBLAS builds both ``T x T`` Gram matrices in IEEE float32 (no tensor cores),
writes them to memory, and a third kernel multiplies and sums them.  Both
Gram matrices are symmetric, and in tiles of 128 positions ``T = 197``
costs as much as 256.  The kernel here computes, per example, only the
64 x 64 tiles on and above the diagonal of both Gram matrices, multiplies
them in registers and writes one number per tile pair (off-diagonal
pairs count twice); nothing ``T x T`` reaches memory.

The tile products use Triton's ``tf32x3`` precision: each float32 operand is
split into a TF32 high part and a TF32 remainder, and three tensor-core
products (high*high + high*low + low*high, float32 accumulation) give about
the accuracy of an IEEE float32 product (the dropped low*low term is
~2^-22 of each product).  Measured against float64: relative errors of a few
1e-7 on random inputs, against 1-2e-7 for cuBLAS's IEEE float32 Gram
matrices; plain TF32 (one product) is ~1e-3 off and is never used for
norms (see :mod:`dpft.precision`).

Where it is used it is faster than the cuBLAS path (the measured times are
in :data:`dpft.clip.tuning.MEASURED`; ``python -m benchmarks.ghost_probe``).  It is used for float32 factors on CUDA where
the work fills the GPU (:func:`usable`) and Triton is importable;
everything else (CPU, float64, half-precision factors, small batches of
wide layers) keeps the cuBLAS path.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import Tensor

from . import tuning


@functools.cache
def _kernel():  # pragma: no cover - needs a CUDA device and Triton
    import triton
    import triton.language as tl

    @triton.jit
    def ghost_tiles(
        a_ptr, g_ptr, i_ptr, j_ptr, out_ptr, T, D, P, sab, sat, sgb, sgt, n_pairs, BT: tl.constexpr, BK: tl.constexpr
    ):
        pair = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        i = tl.load(i_ptr + pair)
        j = tl.load(j_ptr + pair)
        rows = i * BT + tl.arange(0, BT)
        cols = j * BT + tl.arange(0, BT)
        ks = tl.arange(0, BK)
        row_ok = rows[:, None] < T
        col_ok = cols[None, :] < T
        a = a_ptr + b * sab
        gram_a = tl.zeros((BT, BT), tl.float32)
        for k in range(0, D, BK):
            kk = k + ks
            x = tl.load(a + rows[:, None] * sat + kk[None, :], mask=row_ok & (kk[None, :] < D), other=0.0)
            y = tl.load(a + cols[None, :] * sat + kk[:, None], mask=col_ok & (kk[:, None] < D), other=0.0)
            gram_a = tl.dot(x, y, gram_a, input_precision="tf32x3")
        g = g_ptr + b * sgb
        gram_g = tl.zeros((BT, BT), tl.float32)
        for k in range(0, P, BK):
            kk = k + ks
            x = tl.load(g + rows[:, None] * sgt + kk[None, :], mask=row_ok & (kk[None, :] < P), other=0.0)
            y = tl.load(g + cols[None, :] * sgt + kk[:, None], mask=col_ok & (kk[:, None] < P), other=0.0)
            gram_g = tl.dot(x, y, gram_g, input_precision="tf32x3")
        v = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0)
        v = tl.where(i == j, v, 2.0 * v)
        tl.store(out_ptr + b * n_pairs + pair, v)

    return ghost_tiles


@functools.cache
def triton_ok() -> bool:
    """Whether Triton imports (it ships with CUDA builds of PyTorch)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # any import failure means: use the cuBLAS path
        return False
    return True


def pays(examples: int, positions: int, columns: int) -> bool:
    """Whether the fused kernel is expected to beat cuBLAS for ``examples``
    examples of ``positions`` positions and ``columns`` columns (input plus
    output gradient): it runs one program per example and tile pair, and
    loses where few programs each make a long pass over many columns."""
    tiles = -(-positions // tuning.BLOCK_T)
    return examples * tiles * (tiles + 1) // 2 >= tuning.MIN_PROGRAMS or columns <= tuning.NARROW_COLUMNS


def usable(left: Tensor, right: Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`ghost_sq_norm` applies and pays: float32 ``(B, T, k)``
    factors on CUDA with unit stride along ``k``, float32 accumulation, enough
    work to spread over the GPU (:data:`~dpft.clip.tuning.MIN_PROGRAMS`, :data:`~dpft.clip.tuning.NARROW_COLUMNS`),
    a GPU with TF32 tensor cores, and Triton available and working."""
    if not (tuning.FUSED_KERNEL and _WORKS is not False and left.is_cuda and left.dim() == 3 and right.dim() == 3):
        return False
    n, t = left.shape[:2]
    return (
        pays(n, t, left.shape[2] + right.shape[2])
        and dtype == torch.float32
        and left.dtype == torch.float32
        and right.dtype == torch.float32
        and left.device == right.device
        and left.shape[:2] == right.shape[:2]
        and 0 < n <= 65535  # the grid's second dimension
        and left.stride(2) == 1
        and right.stride(2) == 1
        and t * max(left.stride(1), right.stride(1), 1) < 2**31  # offsets within one example are int32
        and _tensor_cores(left.device)
        and triton_ok()
    )


_CAPABLE: dict[torch.device, bool] = {}


def _tensor_cores(device: torch.device) -> bool:
    """Whether the GPU has TF32 tensor cores (compute capability 8.0 and up:
    A100, H100, RTX 30xx and later), which ``tf32x3`` products need."""
    ok = _CAPABLE.get(device)
    if ok is None:
        ok = _CAPABLE[device] = torch.cuda.get_device_capability(device) >= (8, 0)
    return ok


_PAIRS: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def _pairs(n_tiles: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The tile pairs ``i <= j`` (row and column index tensors), cached per device."""
    key = (n_tiles, device)
    got = _PAIRS.get(key)
    if got is None:
        idx = torch.triu_indices(n_tiles, n_tiles)
        got = (idx[0].to(device=device, dtype=torch.int32), idx[1].to(device=device, dtype=torch.int32))
        _PAIRS[key] = got
    return got


#: whether the kernel has run on this host (None: not tried yet); a failure
#: at the first launch (a GPU or Triton build that cannot compile it) turns
#: the fused path off for the process, with a warning
_WORKS: bool | None = None


def ghost_sq_norm(left: Tensor, right: Tensor) -> Tensor | None:
    """``(B, T, D), (B, T, P) -> (B,)``: ``||left_i^T right_i||_F^2`` per
    example, from the upper-triangular tiles of both Gram matrices (see the
    module doc).  The caller checks :func:`usable` first.  None (and a
    warning, once) if the kernel cannot be built or launched here: the
    caller then takes the cuBLAS path.  Once it has run, a failure is an
    error."""
    global _WORKS
    n, t, d = left.shape
    p = right.shape[2]
    tiles = -(-t // tuning.BLOCK_T)
    rows, cols = _pairs(tiles, left.device)
    n_pairs = rows.numel()
    out = torch.empty(n, n_pairs, device=left.device, dtype=torch.float32)
    # Triton launches on the current device: make it the tensors' one (a model on cuda:1)
    here = left.is_cuda and left.device.index != torch.cuda.current_device()
    try:
        with torch.cuda.device(left.device) if here else contextlib.nullcontext():
            _kernel()[(n_pairs, n)](
                left,
                right,
                rows,
                cols,
                out,
                t,
                d,
                p,
                left.stride(0),
                left.stride(1),
                right.stride(0),
                right.stride(1),
                n_pairs,
                BT=tuning.BLOCK_T,
                BK=tuning.BLOCK_K,
                num_warps=tuning.WARPS,
                num_stages=tuning.STAGES,
            )
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # Triton raises its own compiler and driver errors
        if _WORKS:
            raise
        _WORKS = False
        warnings.warn(
            f"dpft: the fused ghost-norm kernel could not run here ({type(e).__name__}: {e}); "
            "per-example norms come from cuBLAS's Gram matrices instead (same values, slower)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _WORKS = True
    return out.sum(1)
