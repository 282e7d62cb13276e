"""Profile one training step (CUDA): top kernels and CPU time, private vs not.

    python -m benchmarks.profile_step --model resnet50gn --method dp-bitfit
    python -m benchmarks.profile_step --model vit --method dp-sparta-0.2 --optimizer adamw

Methods: nonprivate-full, nonprivate-bitfit, dp-bitfit, dp-full-<mode>
(auto/bk/ghost/mixed/instantiate), dp-sparta-<density>.  Prints the wall
time per step, the CPU time to issue it (no synchronization), the GPU busy
time, the top kernels by GPU time and the top CPU operators.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

import dpft
from benchmarks.models import build, sparta_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50gn")
    ap.add_argument("--method", default="dp-bitfit")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--tf32",
        default="off",
        choices=["on", "off"],
        help="cuDNN convolutions in TF32 (PyTorch's default) or IEEE float32; matrix products stay IEEE",
    )
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    wl = build(args.model, batch_size=args.batch_size, device="cuda")
    model = wl.model
    if "bitfit" in args.method:
        dpft.bitfit(model)
    elif args.method.startswith("dp-sparta-"):
        sparta_rows(wl, float(args.method.rsplit("-", 1)[1]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4) if args.optimizer == "sgd" else torch.optim.AdamW(params, lr=1e-5)
    if args.method.startswith("dp-sparta-"):
        dpft.sparta.compact_optimizer(opt)  # before attach (which wraps step)
    if args.method.startswith("dp-"):
        mode = args.method.split("-")[-1] if args.method.startswith("dp-full") else "auto"
        engine = dpft.PrivacyEngine(
            model, batch_size=args.batch_size, sample_size=10**6, steps=10**5, noise_multiplier=1.0, clipping_mode=mode
        )
        engine.attach(opt)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def step():
        with amp:
            loss = wl.loss(wl.logits())
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    walls, issues = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        issues.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    walls.sort()
    issues.sort()
    wall, cpu_issue = walls[len(walls) // 2], issues[len(issues) // 2]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in ka) / 3 / 1e3
    kernels = sum(e.count for e in ka if e.self_device_time_total > 0 and e.device_type.name == "CUDA") / 3
    print(
        f"== {args.model} {args.method} B={args.batch_size}{' bf16' if args.bf16 else ''}: "
        f"wall {wall * 1e3:.2f} ms/step (median), CPU issue {cpu_issue * 1e3:.2f} ms/step, "
        f"GPU busy {gpu:.2f} ms/step, ~{kernels:.0f} kernels/step"
    )
    print(ka.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
