"""dpft and non-private training under the same ``torch.compile`` setting, side by side.

The measurement of issue 24 (one process, one GPU; every configuration in turn):

    python -m benchmarks.compile_step --models gpt2 --methods bitfit,full,lora \\
        --compile none,default,max-autotune-no-cudagraphs --bf16 --poisson --explain

CPU smoke run (tiny GPT-2, seconds per configuration):

    python -m benchmarks.compile_step --device cpu --size tiny --models gpt2 --methods bitfit \\
        --compile default --backend aot_eager --poisson --rounds 1 --steps 2 --warmup 4 --explain

For each (model, method, compile setting) two copies of the model with the
same weights are built: one trains without privacy, the other with a
:class:`dpft.PrivacyEngine` attached (noise on, ``clipping_mode="auto"``).
``--compile none`` runs both eagerly; ``default`` / ``max-autotune-no-cudagraphs``
wrap both in ``torch.compile(model, mode=..., dynamic=...)`` (the engine is
given the compiled module).

``--poisson``: each step's batch size is drawn as Poisson sampling draws it
(binomial, mean ``--batch-size``; the same sequence of sizes for both
models), the examples being the first rows of one batch of twice the size.
``--dynamic`` says how compiled code meets changing sizes, the same for both:
``auto`` (default, ``dynamic=None``: a function is compiled for the first
size and once more, with a symbolic batch dimension, at the first other
size), ``batch`` (the inputs' batch dimension marked dynamic before every
call, ``torch._dynamo.mark_dynamic``) or ``static`` (``dynamic=False``: one
compilation per size; to show what the others avoid).

Compilation is warm-up: ``--warmup`` steps of each run first (at least 4:
dpft's first two backward passes cross-check its sums, its book-keeping
forward from the third on compiles once more without the first passes'
hooks; with ``--poisson`` the warm-up sees several sizes), then the two are
timed in turn, ``--rounds`` times (median step time of ``--steps`` steps).
Each line gives the ratio non-private / dpft, the graphs compiled during the
*timed* steps by each (``recompiled`` — should be 0 0: warm-up did all the
compiling) and, with ``--explain``, the private and non-private models'
graph and graph-break counts for one forward (``torch._dynamo.explain``) and
the private model's graph breaks grouped by reason.  ``--bf16``: every step
under bfloat16 autocast.  Development tool; published numbers come from
``benchmarks.speed``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import statistics
import time
import warnings
from typing import Any

import torch

import dpft
from benchmarks.models import build_for_method

COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs")
DYNAMIC = ("auto", "batch", "static")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def _compile(model: torch.nn.Module, args: argparse.Namespace, mode: str) -> torch.nn.Module:
    if mode == "none":
        return model
    kw: dict[str, Any] = {"dynamic": False if args.dynamic == "static" else None}
    if args.backend != "inductor":
        kw["backend"] = args.backend  # (a CPU smoke run: aot_eager; modes are inductor's)
    else:
        kw["mode"] = mode
    return torch.compile(model, **kw)


def batch_sizes(args: argparse.Namespace, count: int) -> list[int]:
    """``count`` batch sizes: ``--batch-size`` each, or with ``--poisson``
    binomial draws (4B trials of probability 1/4: mean B, the spread of
    Poisson sampling from a large data set), between 2 and 2B."""
    b = args.batch_size
    if not args.poisson:
        return [b] * count
    g = torch.Generator().manual_seed(1234)
    draws = torch.binomial(torch.full((count,), 4.0 * b), torch.full((count,), 0.25), generator=g)
    return [int(min(max(d, 2), 2 * b)) for d in draws.tolist()]


def _slices(wl: Any, sizes: list[int], mark: bool) -> dict[int, Any]:
    """One workload per batch size: the first ``n`` examples of ``wl``'s batch."""
    import torch._dynamo

    out = {}
    for n in sorted(set(sizes)):
        inputs = {k: v[:n] for k, v in wl.inputs.items()}
        if mark:
            for v in inputs.values():
                torch._dynamo.mark_dynamic(v, 0)
        out[n] = dataclasses.replace(wl, inputs=inputs, targets=wl.targets[:n])
    return out


def run(args: argparse.Namespace, model_name: str, method: str, mode: str) -> str:
    poisson_b = 2 * args.batch_size if args.poisson else args.batch_size
    build_args = argparse.Namespace(**{**vars(args), "batch_size": poisson_b})
    wl = build_for_method(model_name, method, build_args)
    torch.compiler.reset()
    plain_model = copy.deepcopy(wl.model)
    private_model = wl.model
    amp = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    warm_n = max(args.warmup, 4)
    sizes = batch_sizes(args, warm_n + args.rounds * args.steps)
    by_size = _slices(wl, sizes, mark=args.dynamic == "batch" and mode != "none")

    def make_step(module: torch.nn.Module, opt: torch.optim.Optimizer):
        it = iter(sizes)  # the same sizes, in the same order, for both models

        def step() -> None:
            w = by_size[next(it)]
            with amp():
                loss = w.loss(w.logits(module))
            loss.backward()
            opt.step()
            opt.zero_grad()

        return step

    plain = _compile(plain_model, args, mode)
    plain_opt = torch.optim.SGD([p for p in plain_model.parameters() if p.requires_grad], lr=1e-6)
    private = _compile(private_model, args, mode)
    engine = dpft.PrivacyEngine(
        private, batch_size=args.batch_size, sample_size=10**6, steps=10**5, noise_multiplier=1.0, clipping_mode="auto"
    )
    private_opt = engine.attach(torch.optim.SGD([p for p in private_model.parameters() if p.requires_grad], lr=1e-6))
    try:
        steps = {"nonprivate": make_step(plain, plain_opt), "dpft": make_step(private, private_opt)}
        warm: dict[str, float] = {}
        for name, step in steps.items():  # compilation (and dpft's recompilation after its first passes)
            t = time.perf_counter()
            for _ in range(warm_n):
                step()
            _sync()
            warm[name] = time.perf_counter() - t
        times: dict[str, list[float]] = {k: [] for k in steps}
        recompiled = dict.fromkeys(steps, 0)
        for _ in range(args.rounds):
            for name, step in steps.items():
                g0 = _graphs()
                _sync()
                t = time.perf_counter()
                for _ in range(args.steps):
                    step()
                _sync()
                times[name].append((time.perf_counter() - t) / args.steps * 1e3)
                recompiled[name] += _graphs() - g0
        base, ours = statistics.median(times["nonprivate"]), statistics.median(times["dpft"])
        tag = " bf16" if args.bf16 else ""
        batch = f"B~{args.batch_size} (Poisson, {min(sizes)}..{max(sizes)})" if args.poisson else f"B={args.batch_size}"
        setting = (
            mode
            if mode == "none"
            else f"{mode} dynamic={args.dynamic}" + (f" backend={args.backend}" if args.backend != "inductor" else "")
        )
        line = (
            f"{model_name} {method} {batch}{tag} compile={setting}: non-private {base:.2f} ms | "
            f"dpft {ours:.2f} ms ({base / ours:.3f}x) | warm-up {warm['nonprivate']:.0f} s / {warm['dpft']:.0f} s"
        )
        if mode != "none":
            line += f" | recompiled while timed {recompiled['nonprivate']} / {recompiled['dpft']}"
            if args.explain:
                w = by_size[sizes[0]]
                line += f" | non-private {_explain(w, plain_model, amp)[0]} | dpft " + "; ".join(
                    _explain(w, private_model, amp, reasons=True)
                )
        return line
    finally:
        engine.detach()


def _explain(wl: Any, model: torch.nn.Module, amp, reasons: bool = False) -> list[str]:
    """Graphs and graph breaks of one forward of ``model`` under Dynamo (with
    the engine attached, its hooks are where the breaks are), and with
    ``reasons`` the breaks grouped by reason (first line of each, counted)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    before = collections.Counter(counters["graph_break"])
    with amp(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = torch._dynamo.explain(lambda: wl.logits(model))()
    out = [f"{ex.graph_count} graphs, {ex.graph_break_count} breaks"]
    if reasons:
        by: collections.Counter[str] = collections.Counter()
        for why, n in (collections.Counter(counters["graph_break"]) - before).items():
            by[_short(why)] += n
        out.append("break reasons: " + (", ".join(f"{n}x {why}" for why, n in by.most_common()) or "none"))
    return out


def _short(reason: str) -> str:
    """A graph-break reason in a few words: dpft's disabled hooks by the reason
    they carry, others by their first line."""
    if "dpft capture hook" in reason:
        return "dpft hook (torch.compiler.disable)"
    first = reason.strip().splitlines()[0] if reason.strip() else "?"
    return first[:120]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2,roberta,vit")
    ap.add_argument("--methods", default="bitfit,full,lora")
    ap.add_argument(
        "--compile", default="none,default", help=f"comma-separated, each one of {', '.join(COMPILE_MODES)}"
    )
    ap.add_argument(
        "--dynamic",
        default="auto",
        choices=DYNAMIC,
        help="auto: dynamic=None; batch: mark_dynamic on the batch dimension; static: dynamic=False",
    )
    ap.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend (inductor: --compile's mode; aot_eager or eager: CPU smoke runs)",
    )
    ap.add_argument(
        "--poisson", action="store_true", help="batch sizes as Poisson sampling draws them (mean --batch-size)"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    ap.add_argument("--explain", action="store_true", help="count the graphs and graph breaks, breaks by reason")
    ap.add_argument(
        "--tf32",
        default="off",
        choices=["on", "off"],
        help="off (default): IEEE float32 everywhere; on: PyTorch's default (TF32 cuDNN convolutions)",
    )
    args = ap.parse_args(argv)
    modes = args.compile.split(",")
    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad:
        ap.error(f"--compile: unknown setting(s) {bad}; choose from {', '.join(COMPILE_MODES)}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            for mode in modes:
                try:
                    print(run(args, model_name, method, mode), flush=True)
                except Exception as e:  # noqa: BLE001 (one configuration's failure does not end the others)
                    first = (str(e).strip().splitlines() or [""])[0][:300]
                    print(
                        f"{model_name} {method} compile={mode} dynamic={args.dynamic}: FAILED "
                        f"{type(e).__name__}: {first}",
                        flush=True,
                    )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
