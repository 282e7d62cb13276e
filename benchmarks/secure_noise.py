"""What ``PrivacyEngine(secure_mode=True)`` costs per step, on real-shaped models (CUDA).

    python -m benchmarks.secure_noise --models gpt2,roberta,vit --methods full,bitfit --out results/
    python -m benchmarks.secure_noise --smoke          # tiny models on the CPU (what the test runs)

For each (model, method) one model and one batch are built
(:mod:`benchmarks.models`: random init, random data of the real shapes), and
the private training step (forward, backward, ``optimizer.step()``) is timed
with ``secure_mode`` off and on, in turn (``--rounds`` rounds of ``--steps``
steps after ``--warmup``, interleaved so that clock drift hits both alike).
Secure mode changes only the noise: four float64 draws per value from four
generators, summed and added in float64, then rounded once
(:mod:`dpft.clip.noise`).  So the noise alone is timed too:
``GaussianNoise.add_`` on tensors shaped like the trainable parameters, one
draw vs secure.  Reported per (model, method): trainable parameters, median
step time (ms) without / with secure mode, the overhead (ms and %), the
noise-only times, and the peak memory of each step.  One JSON line per
result goes to ``--out/secure_noise.jsonl``; a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import dpft
from dpft.clip.noise import GaussianNoise


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def _engine(wl, secure: bool, batch: int):
    engine = dpft.PrivacyEngine(
        wl.model,
        batch_size=batch,
        sample_size=100 * batch,
        steps=10**6,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        secure_mode=secure,
        poisson=False,
    )  # one fixed batch, every step: not Poisson, and that is fine here
    opt = torch.optim.SGD([p for p in wl.model.parameters() if p.requires_grad], lr=1e-6)
    engine.attach(opt)
    return engine, opt


def measure(
    name: str, method: str, *, batch: int, device: torch.device, tiny: bool, steps: int, warmup: int, rounds: int
) -> dict[str, Any]:
    from benchmarks.models import build, count

    wl = build(name, batch_size=batch, device=device, tiny=tiny)
    if method == "bitfit":
        dpft.bitfit(wl.model)
    trainable = [p for p in wl.model.parameters() if p.requires_grad]
    n_train = count(trainable)
    times: dict[bool, list[float]] = {False: [], True: []}
    peaks: dict[bool, int] = {False: 0, True: 0}
    for _ in range(rounds):
        for secure in (False, True):
            engine, opt = _engine(wl, secure, batch)

            def step() -> None:
                wl.loss(wl.logits()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            _time(step, device, warmup)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[secure] += _time(step, device, steps)
            if device.type == "cuda":
                peaks[secure] = max(peaks[secure], torch.cuda.max_memory_allocated(device))
            engine.detach()
    # the noise alone, on tensors shaped like the trainable parameters
    grads = [torch.zeros_like(p) for p in trainable]
    noise_ms = {}
    for secure in (False, True):
        gen = GaussianNoise(secure=secure)
        _time(lambda: gen.add_(grads, 1.0, divide=batch), device, warmup)
        noise_ms[secure] = statistics.median(_time(lambda: gen.add_(grads, 1.0, divide=batch), device, steps))
    plain, sec = statistics.median(times[False]), statistics.median(times[True])
    return {
        "model": name,
        "method": method,
        "tiny": tiny,
        "batch": batch,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "trainable": n_train,
        "step_ms": plain,
        "secure_step_ms": sec,
        "overhead_ms": sec - plain,
        "overhead_pct": 100 * (sec - plain) / plain,
        "noise_ms": noise_ms[False],
        "secure_noise_ms": noise_ms[True],
        "peak_bytes": peaks[False],
        "secure_peak_bytes": peaks[True],
        "steps": steps * rounds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2,roberta,vit", help="comma-separated benchmarks.models names")
    ap.add_argument("--methods", default="full,bitfit", help="full and/or bitfit")
    ap.add_argument("--batch-size", type=int, default=None, help="physical = logical batch (default: the model's)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for secure_noise.jsonl")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU, 2 steps")
    args = ap.parse_args(argv)
    if args.smoke:
        device, tiny, steps, warmup, rounds, models = torch.device("cpu"), True, 2, 1, 1, "gpt2"
    else:
        if not torch.cuda.is_available():
            print("secure_noise: needs a CUDA device (or --smoke)", file=sys.stderr)
            return 2
        device, tiny, steps, warmup, rounds, models = (
            torch.device("cuda"),
            False,
            args.steps,
            args.warmup,
            args.rounds,
            args.models,
        )
    from benchmarks.models import SPECS

    rows = []
    warnings.simplefilter("ignore")
    for name in models.split(","):
        for method in args.methods.split(","):
            batch = args.batch_size or (4 if tiny else SPECS[name].default_batch)
            try:
                rec = measure(
                    name, method, batch=batch, device=device, tiny=tiny, steps=steps, warmup=warmup, rounds=rounds
                )
            except torch.OutOfMemoryError as e:  # pragma: no cover - GPU only
                rec = {"model": name, "method": method, "batch": batch, "error": f"out of memory: {e}"[:300]}
                torch.cuda.empty_cache()
            rows.append(rec)
            print(json.dumps(rec), flush=True)
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                with open(Path(args.out) / "secure_noise.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
    print(
        "\n| model | method | trainable | batch | step (ms) | secure step (ms) | overhead | noise (ms) "
        "| secure noise (ms) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['method']} | - | {r['batch']} | {r['error'][:40]} | | | | |")
            continue
        print(
            f"| {r['model']} | {r['method']} | {r['trainable'] / 1e6:.2f} M | {r['batch']} | {r['step_ms']:.1f} "
            f"| {r['secure_step_ms']:.1f} | {r['overhead_ms']:+.1f} ms ({r['overhead_pct']:+.1f} %) "
            f"| {r['noise_ms']:.2f} | {r['secure_noise_ms']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
