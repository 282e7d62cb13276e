"""Profile one training step (CUDA): top kernels and CPU time, private vs not.
    python -m benchmarks.profile_step --model resnet50gn --method dp-bitfit
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import dpft
from benchmarks.models import build


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50gn")
    ap.add_argument("--method", default="dp-bitfit")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    wl = build(args.model, batch_size=args.batch_size, device="cuda")
    model = wl.model
    if "bitfit" in args.method:
        dpft.bitfit(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if args.method.startswith("dp-"):
        mode = args.method.split("-")[-1] if args.method.startswith("dp-full") else "auto"
        engine = dpft.PrivacyEngine(model, batch_size=args.batch_size, sample_size=10**6, steps=1000,
                                    noise_multiplier=1.0, clipping_mode=mode)
        engine.attach(opt)

    def step():
        wl.loss(wl.logits()).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        step()
    cpu_issue = (time.perf_counter() - t) / 10
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in ka) / 3 / 1e3
    print(f"{args.model} {args.method}: wall {wall * 1e3:.2f} ms/step, CPU issue {cpu_issue * 1e3:.2f} ms/step, GPU busy {gpu:.2f} ms/step")
    print(ka.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
