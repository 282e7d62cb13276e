"""Where does DP full fine-tuning's memory go?  One model, one method, memory
and time at each phase of a step (CUDA).  Usage:
    python -m benchmarks.memprobe --model roberta --mode auto
"""

from __future__ import annotations

import argparse
import time

import torch

import dpft
from benchmarks.models import build


def gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="roberta")
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--nonprivate", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    wl = build(args.model, batch_size=args.batch_size, device=dev)
    model = wl.model
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    engine = None
    if not args.nonprivate:
        engine = dpft.PrivacyEngine(
            model,
            batch_size=args.batch_size,
            sample_size=10**6,
            steps=100,
            noise_multiplier=1.0,
            clipping_mode=args.mode,
        )
        engine.attach(opt)
        cap = engine._capture
        orig = cap._backward_end

        def probe():
            torch.cuda.synchronize()
            print(
                f"  backward end (before processing): alloc {gib(torch.cuda.memory_allocated())} GiB, peak {gib(torch.cuda.max_memory_allocated())}"
            )
            t = time.perf_counter()
            orig()
            torch.cuda.synchronize()
            print(
                f"  processing: {1e3 * (time.perf_counter() - t):.1f} ms, alloc {gib(torch.cuda.memory_allocated())}, peak {gib(torch.cuda.max_memory_allocated())}"
            )

        cap._backward_end = probe
    for i in range(3):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        print(f"step {i}: start alloc {gib(torch.cuda.memory_allocated())}")
        t0 = time.perf_counter()
        loss = wl.loss(wl.logits())
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        print(
            f"  forward {1e3 * (t1 - t0):.1f} ms: alloc {gib(torch.cuda.memory_allocated())}, peak {gib(torch.cuda.max_memory_allocated())}"
        )
        loss.backward()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(
            f"  backward total {1e3 * (t2 - t1):.1f} ms: alloc {gib(torch.cuda.memory_allocated())}, peak {gib(torch.cuda.max_memory_allocated())}"
        )
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        print(f"  step {1e3 * (time.perf_counter() - t2):.1f} ms: peak {gib(torch.cuda.max_memory_allocated())}")


if __name__ == "__main__":
    main()
