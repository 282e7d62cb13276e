"""dpft and non-private training under the same ``torch.compile`` setting, side by side (CUDA).

    python -m benchmarks.compile_step --models gpt2,roberta,vit --methods bitfit,full,lora \\
        --compile none,default --bf16

For each (model, method, compile setting) two copies of the model with the
same weights are built: one trains without privacy, the other with a
:class:`dpft.PrivacyEngine` attached (noise on, ``clipping_mode="auto"``).
``--compile none`` runs both eagerly; ``default`` / ``max-autotune-no-cudagraphs``
wrap both in ``torch.compile(model, mode=...)`` (the engine is given the
compiled module).  Compilation is warm-up: ``--warmup`` steps of each run first
(at least 4: dpft's first two backward passes cross-check its sums, and its
book-keeping forward from the third on recompiles once), then the two are
timed in turn, ``--rounds`` times (median step time of ``--steps`` steps).
Prints the ratio non-private / dpft per line, and the graph breaks that
remain in the private model's compiled forward (``torch._dynamo.explain``
counts, with ``--explain``).  ``--bf16``: every step under bfloat16 autocast.
Development tool; published numbers come from ``benchmarks.speed``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
import warnings

import torch

import dpft
from benchmarks.models import build_for_method

COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(step, steps: int) -> float:
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return (time.perf_counter() - t) / steps * 1e3


def _compile(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    return model if mode == "none" else torch.compile(model, mode=mode)


def run(args: argparse.Namespace, model_name: str, method: str, mode: str) -> str:
    wl = build_for_method(model_name, method, args)
    torch.compiler.reset()
    plain_model = copy.deepcopy(wl.model)
    private_model = wl.model
    amp = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def make_step(module: torch.nn.Module, opt: torch.optim.Optimizer):
        def step() -> None:
            with amp():
                loss = wl.loss(wl.logits(module))
            loss.backward()
            opt.step()
            opt.zero_grad()

        return step

    plain = _compile(plain_model, mode)
    plain_opt = torch.optim.SGD([p for p in plain_model.parameters() if p.requires_grad], lr=1e-6)
    private = _compile(private_model, mode)
    engine = dpft.PrivacyEngine(private, batch_size=args.batch_size, sample_size=10**6, steps=10**5,
                                noise_multiplier=1.0, clipping_mode="auto")
    private_opt = engine.attach(torch.optim.SGD([p for p in private_model.parameters() if p.requires_grad], lr=1e-6))
    steps = {"nonprivate": make_step(plain, plain_opt), "dpft": make_step(private, private_opt)}
    warm: dict[str, float] = {}
    for name, step in steps.items():  # compilation (and dpft's recompilation after its first passes)
        t = time.perf_counter()
        for _ in range(max(args.warmup, 4)):
            step()
        _sync()
        warm[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(_timed(step, args.steps))
    base, ours = statistics.median(times["nonprivate"]), statistics.median(times["dpft"])
    tag = " bf16" if args.bf16 else ""
    line = (f"{model_name} {method} B={args.batch_size}{tag} compile={mode}: non-private {base:.2f} ms | "
            f"dpft {ours:.2f} ms ({base / ours:.3f}x) | warm-up {warm['nonprivate']:.0f} s / {warm['dpft']:.0f} s")
    if args.explain and mode != "none":
        line += " | " + _explain(wl, private_model, amp)
    engine.detach()
    return line


def _explain(wl, model: torch.nn.Module, amp) -> str:
    """Graphs and graph breaks of the private model's forward under Dynamo
    (the engine attached: its hooks are where the breaks are)."""
    import torch._dynamo

    with amp(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = torch._dynamo.explain(lambda: wl.logits(model))()
    return f"{ex.graph_count} graphs, {ex.graph_break_count} breaks"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2,roberta,vit")
    ap.add_argument("--methods", default="bitfit,full,lora")
    ap.add_argument("--compile", default="none,default",
                    help=f"comma-separated, each one of {', '.join(COMPILE_MODES)}")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--explain", action="store_true", help="count the private model's graphs and graph breaks")
    ap.add_argument("--tf32", default="off", choices=["on", "off"],
                    help="off (default): IEEE float32 everywhere; on: PyTorch's default (TF32 cuDNN convolutions)")
    args = ap.parse_args()
    modes = args.compile.split(",")
    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad:
        ap.error(f"--compile: unknown setting(s) {bad}; choose from {', '.join(COMPILE_MODES)}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            for mode in modes:
                print(run(args, model_name, method, mode), flush=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
