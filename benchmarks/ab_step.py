"""In-process A/B timing of engine features (CUDA), interleaved to cancel host drift.

    python -m benchmarks.ab_step --models gpt2,resnet50gn --methods bitfit,full

(methods: bitfit, full, lora: peft LoRA, r = 16).

For each (model, method) one model is built; the non-private step and the
private step with each feature set are timed in turn, ``--rounds`` times
(median step time of ``--steps`` steps after ``--warmup``), on the same model
and data.  Feature sets: ``new`` (everything as shipped), ``sync`` (the
non-finite check synchronizes the whole device stream, as before),
``nocheck`` (no wait for the non-finite check at all: what the check costs),
``grouped`` (per-example convolution weight gradients from the weight-
gradient kernel with the batch folded into the groups), ``unfold``
(convolution weights through the unfolded input and matrix products only,
no weight-gradient kernel for the clipped sum),
``old`` (all of these, plus hooks added through ``Tensor.register_hook``),
``rule0`` (book-keeping's instantiation rule with ``INSTANTIATE_MEMORY``
1.25 and no Gram tiles),
``chunk512`` (batched layers stacked in chunks of 512 MiB, not 256),
``unaligned`` (half-precision stacks not padded to 8 positions),
``convlate`` (no convolution weight instantiated
in its backward hook), ``nofused`` (every float32 ghost norm from cuBLAS's
Gram matrices, none from the fused kernel of ``dpft.clip.ghost_kernel``),
``prev`` (another copy of the library, e.g. the last commit's, importable as
the package ``dpft_prev`` from ``--prev-src``: ``git archive HEAD src/dpft |
tar -x -C /tmp/prev && mv /tmp/prev/src/dpft /tmp/prev/dpft_prev``).
Memory: peak allocated over the timed steps, and separately over the
warm-up steps (where the engine's first passes run its self-check).
``--bf16`` runs every step under bfloat16 autocast; ``--fused`` uses
``torch.optim.SGD(fused=True)`` for every variant.  Development tool;
published numbers come from ``benchmarks.speed``.

Variants that try other tuning values (``grouped``, ``rule0``, ``chunk512``, ``unaligned``,
``nofused``) name them under ``tuning``: they run inside
``dpft.clip.tuning.override(**tuning)``, the one switch for those values
(:mod:`dpft.clip.tuning` lists every one and where it was measured).  The
others swap a piece of code for an older one (the non-finite check, the hook
installation, the convolution rule) and say so under their own keys.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time

import torch

import dpft
import dpft.capture.hooks
import dpft.clip.clipped_sum
import dpft.rules.conv
from benchmarks.models import build_for_method
from dpft.clip import tuning

_ORIG_HOOK = dpft.capture.hooks._add_grad_hook
_ORIG_FLAG = dpft.clip.clipped_sum.ClippedSum.nonfinite_now
_CONV = dpft.rules.conv.ConvFactored
_ORIG_CONV = (_CONV.per_example, _CONV.weighted)


def _sync_flag(self) -> bool:
    return False if self.nonfinite is None else bool(self.nonfinite)


def _no_flag(self) -> bool:
    return False


VARIANTS = {
    "new": dict(sync=False, hook=True, conv=True),
    "grouped": dict(sync=False, hook=True, conv=True, tuning={"GROUPED_CONV": True}),
    "sync": dict(sync=True, hook=True, conv=True),
    "nocheck": dict(sync="off", hook=True, conv=True),
    "unfold": dict(sync=False, hook=True, conv=False),
    "old": dict(sync=True, hook=False, conv=False),
    "prev": dict(sync=False, hook=True, conv=True, package="dpft_prev"),
    "rule0": dict(sync=False, hook=True, conv=True, tuning={"INSTANTIATE_MEMORY": 1.25, "GRAM_TILE": 1}),
    "chunk512": dict(sync=False, hook=True, conv=True, tuning={"CHUNK_BYTES": 1 << 29}),
    "unaligned": dict(sync=False, hook=True, conv=True, tuning={"ALIGN_POSITIONS": 1}),
    "convlate": dict(sync=False, hook=True, conv=True, patch={"dpft.rules.conv.ConvRule.instantiates_early": False}),
    "nofused": dict(sync=False, hook=True, conv=True, tuning={"FUSED_KERNEL": False}),
}


def _owner(path: str):
    """The module, or the class inside a module, that ``path`` names
    (``dpft.clip.norms``, ``dpft.rules.conv.ConvRule``)."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        mod, name = path.rsplit(".", 1)
        return getattr(importlib.import_module(mod), name)


@contextlib.contextmanager
def variant(v: dict):
    flag = {True: _sync_flag, False: _ORIG_FLAG, "off": _no_flag}[v["sync"]]
    dpft.clip.clipped_sum.ClippedSum.nonfinite_now = flag
    dpft.capture.hooks._add_grad_hook = _ORIG_HOOK if v["hook"] else (lambda t, fn: t.register_hook(fn))
    patch = {tuple(k.rsplit(".", 1)): value for k, value in v.get("patch", {}).items()}
    saved = {(mod, attr): getattr(_owner(mod), attr) for mod, attr in patch}
    for (mod, attr), value in patch.items():
        setattr(_owner(mod), attr, value)
    if not v["conv"]:
        _CONV.per_example = lambda self, dtype, grouped=False: None
        _CONV.weighted = lambda self, weights, dtype: None
    try:
        with tuning.override(**v.get("tuning", {})):
            yield
    finally:
        dpft.clip.clipped_sum.ClippedSum.nonfinite_now = _ORIG_FLAG
        dpft.capture.hooks._add_grad_hook = _ORIG_HOOK
        _CONV.per_example, _CONV.weighted = _ORIG_CONV
        for (mod, attr), value in saved.items():
            setattr(_owner(mod), attr, value)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, warmup: int, steps: int, on_warm=None) -> float:
    for _ in range(warmup):
        step()
    _sync()
    if on_warm is not None:
        on_warm()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2,resnet50gn")
    ap.add_argument("--methods", default="bitfit,full")
    ap.add_argument("--variants", default="new,old")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--fused", action="store_true", help="torch.optim.SGD(fused=True) for every variant")
    ap.add_argument("--prev-src", default=None, help="directory holding the package dpft_prev (variant prev)")
    ap.add_argument(
        "--tf32",
        default="off",
        choices=["on", "off"],
        help="off (default): IEEE float32 everywhere; on: PyTorch's default (TF32 cuDNN convolutions)",
    )
    args = ap.parse_args()
    if args.prev_src:
        sys.path.insert(0, args.prev_src)
    amp = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            wl = build_for_method(model_name, method, args)
            params = [p for p in wl.model.parameters() if p.requires_grad]
            times: dict[str, list[float]] = {"nonprivate": []}
            peak: dict[str, float] = {}
            first: dict[str, float] = {}  # peak over the warm-up steps (the engine's first passes self-check)
            names = args.variants.split(",")
            for v in names:
                times[v] = []
            for _ in range(args.rounds):
                for v in ["nonprivate", *names]:
                    opt = torch.optim.SGD(params, lr=1e-6, fused=args.fused or None)
                    engine = None
                    ctx = variant(VARIANTS[v]) if v != "nonprivate" else contextlib.nullcontext()
                    with ctx:
                        if v != "nonprivate":
                            lib = importlib.import_module(VARIANTS[v].get("package", "dpft"))
                            engine = lib.PrivacyEngine(
                                wl.model,
                                batch_size=args.batch_size,
                                sample_size=10**6,
                                steps=10**5,
                                noise_multiplier=1.0,
                                clipping_mode="auto",
                            )
                            engine.attach(opt)

                        def step(wl=wl):
                            with amp():
                                loss = wl.loss(wl.logits())
                            loss.backward()
                            opt.step()
                            opt.zero_grad()

                        def warm(v=v):
                            if torch.cuda.is_available():
                                first[v] = max(first.get(v, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                                torch.cuda.reset_peak_memory_stats()

                        if torch.cuda.is_available():
                            torch.cuda.reset_peak_memory_stats()
                        times[v].append(time_steps(step, args.warmup, args.steps, warm))
                        if torch.cuda.is_available():
                            peak[v] = max(peak.get(v, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                        if engine is not None:
                            engine.detach()
            base = statistics.median(times["nonprivate"])
            tag = (" bf16" if args.bf16 else "") + (" tf32" if args.tf32 == "on" else "")
            mem = (lambda v: f", {peak[v]:.2f} GiB, warm-up {first[v]:.2f} GiB") if peak else (lambda v: "")
            line = f"{model_name} {method} B={args.batch_size}{tag}: non-private {base:.2f} ms{mem('nonprivate')}"
            for v in names:
                t = statistics.median(times[v])
                line += f" | {v} {t:.2f} ms ({base / t:.3f}x{mem(v)})"
            print(line, flush=True)
            del wl, params
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
