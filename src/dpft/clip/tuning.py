"""Every tuning threshold and size bound of the clipping stage, in one table.

The clipping code (:mod:`.norms`, :mod:`.stacked`, :mod:`.ghost_kernel`,
:mod:`.noise`) reads these module attributes when it runs, never a copy taken
at import.  None of them changes a result beyond rounding: they choose between
kernels that compute the same numbers, bound how much memory one piece of
work takes, or (:data:`TWO_PASS_TOL`) say how much rounding a check allows
before it refuses a step.  :data:`MEASURED` says where each value comes from (the hardware
and benchmark it was measured on, or that it is a memory bound and no timing).

To try other values (benchmarks' variants, tests that force small chunks) use
the one switch, :func:`override`, never a module's globals::

    from dpft.clip import tuning
    with tuning.override(CHUNK_BYTES=1 << 29, FUSED_KERNEL=False):
        ...  # every clipped sum in here uses these values
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# -- norms (dpft.clip.norms) -------------------------------------------------

#: largest Gram block (elements) built at once; longer sequences are processed in row chunks
GHOST_BLOCK = 1 << 25

#: flops per byte of memory traffic at which a GPU's matrix units and its
#: memory are about equally busy, for float32 factors (no tensor cores) and
#: half-precision ones (tensor cores): book-keeping's instantiation rule
#: (:func:`dpft.clip.norms.instantiation_pays`) weighs Gram flops against bytes with it
FLOPS_PER_BYTE = {"float": 20.0, "half": 300.0}

#: how much larger than the factors it frees a per-example gradient built by
#: book-keeping's instantiation rule may be
INSTANTIATE_MEMORY = 2.0

#: a Gram matrix's rows and columns are computed in tiles of this many
#: positions (a product over a part of a tile costs a whole tile)
GRAM_TILE = 64

# -- stacked layers (dpft.clip.stacked) ---------------------------------------

#: largest memory (bytes) of one chunk's stacked factors and Gram matrices;
#: twice this for half-precision factors (as many values per chunk as in float32)
CHUNK_BYTES = 1 << 28

#: layers doing more multiply-adds than this per step (norm + clipped sum;
#: float32 counted 32x: no tensor cores without TF32) are processed one by
#: one instead of stacked with same-shaped layers (their kernels keep the GPU
#: busy longer than the launches take, and the copy into the stack is saved)
BATCH_MACS = 1 << 37

#: stacked half-precision factors get zero rows up to a multiple of this many
#: positions (products over other counts run on slow tensor-core kernels)
ALIGN_POSITIONS = 8

# -- the fused ghost-norm kernel (dpft.clip.ghost_kernel) ---------------------

#: whether the fused Triton kernel is used at all (off: every float32 ghost
#: norm from cuBLAS's Gram matrices)
FUSED_KERNEL = True

#: with fewer programs (examples x tile pairs) than this, cuBLAS is faster
#: for wide layers ...
MIN_PROGRAMS = 32

#: ... while for layers with at most this many columns (input plus output
#: gradient) the fused kernel wins even with few programs
NARROW_COLUMNS = 2048

#: the kernel's tile of positions, slice of columns per step, warps and pipeline stages
BLOCK_T, BLOCK_K, WARPS, STAGES = 64, 32, 4, 4

# -- convolutions (dpft.rules.conv, read by dpft.clip.norms) ------------------

#: per-example convolution weight gradients from the weight-gradient kernel
#: with the batch folded into the groups, instead of the unfolded input times
#: the output gradient
GROUPED_CONV = False

# -- noise (dpft.clip.noise) ---------------------------------------------------

#: largest number of noise values :meth:`dpft.clip.noise.GaussianNoise.add_`
#: draws at once (64 MiB of float32)
NOISE_CHUNK = 1 << 24

# -- two-pass clipping's check (dpft.clip.two_pass) ----------------------------

#: by output-gradient dtype: how far pass 2's projection of a layer's output
#: gradient may be from pass 1's times the clip weight, as a fraction of the
#: size the projections have by chance (rounding of two backward passes that
#: scale the same gradients differently; float64 models often compute parts in
#: float32, e.g. Hugging Face's RMSNorm); beyond it the step is refused
TWO_PASS_TOL = {"float64": 1e-2, "float32": 1e-2, "bfloat16": 0.25, "float16": 0.05}

#: where each value was measured, or why it is no timing
MEASURED: dict[str, str] = {
    "GHOST_BLOCK": "a memory bound (128 MiB of float32 per Gram block), no timing",
    "FLOPS_PER_BYTE": (
        "H100 data sheet: ~60 TFLOP/s float32 without tensor cores against ~3.3 TB/s of memory; "
        "half-precision tensor cores ~15x faster"
    ),
    "INSTANTIATE_MEMORY": "a memory bound: a per-example gradient may take twice the factors it frees",
    "GRAM_TILE": (
        "H100, float32 X X^T over B = 32 examples, 768 columns: T = 197 positions take as long as "
        "T = 256 (78 us both); benchmarks/gram_probe.py"
    ),
    "CHUNK_BYTES": (
        "a memory bound (256 MiB per chunk); doubled for half-precision factors: ViT-base bf16 at "
        "B = 32 gained 4 % on an H100 (benchmarks/ab_step.py, variant chunk512 for 512 MiB)"
    ),
    "BATCH_MACS": (
        "H100, benchmarks/ab_step.py: bf16 BERT/GPT-2/ViT-base at B = 32 and float32 at B = 8, "
        "T = 128 gain 10-50 % from stacking, float32 at B = 32 does not; bf16 up to 2^37: a 1B "
        "Llama's MLP projections at B = 8, T = 256 gain ~8 % on a host-bound step"
    ),
    "ALIGN_POSITIONS": (
        "H100, bf16, B = 32, 3072 columns: a Gram matrix over 197 positions takes 174 us, over 200 "
        "positions 24 us (benchmarks/gram_probe.py; variant unaligned in benchmarks/ab_step.py)"
    ),
    "FUSED_KERNEL": (
        "H100: 0.42-0.72x the time of the cuBLAS path wherever it is used (B = 32 at T = 100 / "
        "197 / 256: about 0.69 / 0.49 / 0.5x; benchmarks/ghost_probe.py)"
    ),
    "MIN_PROGRAMS": (
        "H100, 768 + 3072 columns: B = 8, T = 100 (24 programs) 108 us fused against 84 us "
        "cuBLAS; B = 32, T = 64 (32 programs) 109 against 171 us"
    ),
    "NARROW_COLUMNS": "H100, B = 8, T = 64, 768 + 768 columns: 8 programs, 48 us fused against 69 us cuBLAS",
    "BLOCK_T": "H100 over ViT / RoBERTa / GPT-2 shapes (benchmarks/ghost_probe.py)",
    "BLOCK_K": "H100 over ViT / RoBERTa / GPT-2 shapes (benchmarks/ghost_probe.py)",
    "WARPS": "H100 over ViT / RoBERTa / GPT-2 shapes (benchmarks/ghost_probe.py)",
    "STAGES": "H100 over ViT / RoBERTa / GPT-2 shapes (benchmarks/ghost_probe.py)",
    "GROUPED_CONV": (
        "H100, ResNet50-GN, B = 32: cuDNN's grouped weight gradient was slower than unfold + batched "
        "matrix product (benchmarks/ab_step.py, variant grouped)"
    ),
    "NOISE_CHUNK": "a memory bound (64 MiB of float32 noise at once), no timing",
    "TWO_PASS_TOL": (
        "a check bound, no timing: float32 (and float64 models with float32 parts) 20x the largest "
        "deviation seen in the CPU test suite (5e-4 of the chance size: a tiny BERT's LoRA A output under "
        "checkpointing, where the output gradient comes from cancelling sums); bfloat16 10x the deviation "
        "of a 4-layer Llama in bfloat16 on a CPU (0.025), float16 by its 8x finer rounding; not yet "
        "measured on a GPU (two_pass_worst in benchmarks/ckpt_memory.py's check column)"
    ),
}

#: the values as shipped
DEFAULTS: dict[str, Any] = {name: globals()[name] for name in MEASURED}


def values() -> dict[str, Any]:
    """The values in effect now, by name."""
    return {name: globals()[name] for name in MEASURED}


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[dict[str, Any]]:
    """Use other values inside the ``with`` block (the one switch for
    benchmarks' variants and tests); the previous values come back on exit,
    also after an exception.  An unknown name is refused in one line."""
    unknown = sorted(set(changes) - MEASURED.keys())
    if unknown:
        raise KeyError(f"dpft.clip.tuning has no value {unknown[0]!r}; known: {', '.join(sorted(MEASURED))}")
    scope = globals()
    before = {name: scope[name] for name in changes}
    scope.update(changes)
    try:
        yield values()
    finally:
        scope.update(before)
