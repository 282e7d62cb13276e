"""Time the Gram matrices ``X X^T`` dpft's ghost norm builds, per number of
positions (CUDA).  Shows the two effects its cost rule and its stacking of
half-precision factors account for:

* float32 (no tensor cores) Gram matrices are computed in tiles: 197
  positions cost as much as 256 (``dpft.clip.tuning.GRAM_TILE``);
* half-precision Gram matrices over a number of positions that is not a
  multiple of 8 run on much slower kernels (``dpft.clip.tuning.ALIGN_POSITIONS``).

    python -m benchmarks.gram_probe
"""

from __future__ import annotations

import argparse
import time

import torch


def _time_us(fn, steps: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", default="100,104,128,197,200,256,577,584")
    ap.add_argument("--shapes", default="32x768,32x3072,128x3072", help="batch x columns, comma-separated")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gram_probe needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; microseconds per Gram matrix batch")
    positions = [int(t) for t in args.positions.split(",")]
    for dtype in (torch.float32, torch.bfloat16):
        kw = {"out_dtype": torch.float32} if dtype == torch.bfloat16 else {}
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            row = []
            for t in positions:
                x = torch.randn(n, t, k, device="cuda", dtype=dtype)
                row.append(f"T={t}: {_time_us(lambda x=x: torch.bmm(x, x.mT, **kw)):.0f}")
                del x
            print(f"{str(dtype).removeprefix('torch.')} B={n} k={k} | " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
