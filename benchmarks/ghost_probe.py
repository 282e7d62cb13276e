"""Time one layer's float32 ghost norm two ways (CUDA): cuBLAS's two IEEE
Gram matrices and their product-sum (``dpft.clip.norms._ghost_plain``) against
the fused upper-triangular tf32x3 kernel (``dpft.clip.ghost_kernel``), with each
one's largest relative error against float64.

    python -m benchmarks.ghost_probe
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.gram_probe import _time_us
from dpft.clip import ghost_kernel
from dpft.clip.norms import _ghost_plain
from dpft.rules.base import Factored

#: batch x positions x input columns x output columns: GPT-2 (T = 100),
#: ViT-base (197), RoBERTa (256), ViT-large / Llama-ish widths, long sequences
SHAPES = (
    "32x100x768x3072,32x150x768x768,32x197x768x768,32x197x768x2304,32x197x768x3072,32x197x3072x768,"
    "32x256x768x768,32x256x768x3072,32x197x1024x4096,8x197x768x2304,8x512x768x3072,8x577x768x768"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=SHAPES, help="BxTxDxP, comma-separated")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not ghost_kernel.triton_ok():
        raise SystemExit("ghost_probe needs a CUDA device and Triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; microseconds per layer (B examples)")
    print("| B x T x D x P | cuBLAS Gram | fused | fused / cuBLAS | rel. error cuBLAS | rel. error fused |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        n, t, d, p = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        a = torch.randn(n, t, d, device="cuda")
        g = torch.randn(n, t, p, device="cuda")
        c = Factored(left=a.unsqueeze(2), right=g.unsqueeze(2), shape=torch.Size((d, p)))
        want = torch.einsum("ntd,ntp->ndp", a.double(), g.double()).flatten(1).pow(2).sum(1)

        def cublas():
            return _ghost_plain(c, torch.float32, None)

        def fused():
            return ghost_kernel.ghost_sq_norm(a, g)

        errs = [float(((f().double() - want).abs() / want).max()) for f in (cublas, fused)]
        ta, tb = _time_us(cublas), _time_us(fused)
        print(f"| {shape} | {ta:.0f} | {tb:.0f} | {tb / ta:.2f} | {errs[0]:.1e} | {errs[1]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
