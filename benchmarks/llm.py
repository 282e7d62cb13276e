"""The ``llm`` suite (issue 23): Llama-3-shaped models on one GPU, dpft against
the same non-private run, with activation checkpointing on and off, and the
largest batch x length each trains.

Every configuration runs in its own process through
:func:`benchmarks.ckpt_memory.run_one` (random bf16 weights, per-example
token-mean loss, AdamW; an out-of-memory error ends that row only).

    # speed and peak memory over a grid
    python -m benchmarks.llm --models 1b,3b,8b --methods lora,bitfit,full --seqs 512,2048,4096 --batch 4 --ckpt on,off
    # largest trainable batch x length, non-private and dpft
    python -m benchmarks.llm --search --models 8b --methods lora --ckpt on
    python -m benchmarks.llm --tiny --device cpu     # a CPU check of the script itself

Each row says whether it meets the issue's targets: under checkpointing
dpft's peak memory <= 1.05x non-private, speed >= 0.95x (DP-LoRA, DP-BiTFiT)
or >= 0.80x (DP full); the search meets its target when dpft trains the same
largest batch x length as non-private.  Opacus is not part of this suite (it
has no hook for Hugging Face's checkpointed Llama blocks with peft adapters
that we could run side by side); ``benchmarks.speed`` compares with Opacus.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from benchmarks.ckpt_memory import run_one

#: the largest batch x length search, smallest first: (batch, tokens per example)
CANDIDATES = (
    (1, 2048),
    (2, 2048),
    (1, 4096),
    (2, 4096),
    (1, 8192),
    (4, 4096),
    (2, 8192),
    (1, 16384),
    (4, 8192),
    (2, 16384),
    (1, 32768),
    (4, 16384),
)

#: speed targets (non-private step time / dpft step time) by method; memory target under checkpointing
SPEED_TARGET = {"lora": 0.95, "bitfit": 0.95, "full": 0.80}
MEMORY_TARGET = 1.05

Runner = Callable[[dict[str, Any]], dict[str, Any]]


def config(model: str, method: str, ckpt: bool, private: bool, batch: int, seq: int, args: argparse.Namespace) -> dict:
    """One child configuration of :mod:`benchmarks.ckpt_memory`."""
    return {
        "model": model,
        "method": method,
        "ckpt": ckpt,
        "reentrant": args.reentrant,
        "private": private,
        "batch": batch,
        "seq": seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": args.device,
        "two_pass": getattr(args, "two_pass", "auto"),
    }


def verdict(method: str, ckpt: bool, plain: dict, dp: dict) -> tuple[str, str, str]:
    """Memory ratio, speed ratio and whether the row meets its targets."""
    if "error" in plain or "error" in dp:
        if "error" in dp and "error" not in plain:
            return "-", "-", "missed (dpft: " + dp["error"][:40] + ")"
        return "-", "-", "n/a"
    mem = dp["peak_gib"] / plain["peak_gib"] if plain["peak_gib"] > 0 else None
    speed = plain["step_s"] / dp["step_s"]
    ok = speed >= SPEED_TARGET[method] and (not ckpt or mem is None or mem <= MEMORY_TARGET)
    return ("-" if mem is None else f"{mem:.2f}x"), f"{speed:.2f}x", "met" if ok else "missed"


def largest(fits: Callable[[int, int], bool], candidates: tuple[tuple[int, int], ...] = CANDIDATES) -> tuple[int, int]:
    """The candidate with the most tokens that trains, trying them in order of
    tokens and stopping at the first size after which two in a row fail
    (a larger one is not expected to fit then); ``(0, 0)`` when none does."""
    best, misses = (0, 0), 0
    for batch, seq in sorted(candidates, key=lambda c: (c[0] * c[1], c[1])):
        if fits(batch, seq):
            if batch * seq >= best[0] * best[1]:
                best = (batch, seq)
            misses = 0
        else:
            misses += 1
            if misses >= 2:
                break
    return best


def grid(args: argparse.Namespace, run: Runner = run_one) -> list[dict]:
    rows = []
    for model in args.models:
        for method in args.methods:
            for seq in args.seqs:
                for ckpt in args.ckpt:
                    plain, dp = (run(config(model, method, ckpt, p, args.batch, seq, args)) for p in (False, True))
                    mem, speed, met = verdict(method, ckpt, plain, dp)
                    row = dict(model=model, method=method, ckpt=ckpt, batch=args.batch, seq=seq, plain=plain, dp=dp)
                    rows.append({**row, "memory": mem, "speed": speed, "targets": met})
                    print(_line(rows[-1]), flush=True)
    return rows


def search(args: argparse.Namespace, run: Runner = run_one) -> list[dict]:
    rows = []
    quick = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 3})
    for model in args.models:
        for method in args.methods:
            for ckpt in args.ckpt:
                found = {}
                for private in (False, True):

                    def fits(batch: int, seq: int) -> bool:
                        r = run(config(model, method, ckpt, private, batch, seq, quick))
                        who = "dpft" if private else "non-private"
                        print(f"  {model} {method} ckpt={ckpt} {who} {batch} x {seq}: {_cell(r)}", flush=True)
                        return "error" not in r

                    found[private] = largest(fits, args.candidates)
                (pb, ps), (db, ds) = found[False], found[True]
                met = "met" if db * ds >= pb * ps and pb * ps > 0 else "missed"
                rows.append(
                    dict(model=model, method=method, ckpt=ckpt, plain=f"{pb} x {ps}", dp=f"{db} x {ds}", targets=met)
                )
                print(f"{model} {method} ckpt={ckpt}: largest non-private {pb} x {ps}, dpft {db} x {ds}: {met}")
    return rows


def _cell(r: dict) -> str:
    return r["error"][:18] if "error" in r else f"{r['peak_gib']:.2f} GiB {r['step_s']:.3f} s"


def _line(r: dict) -> str:
    return (
        f"| {r['model']} | {r['method']} | {'on' if r['ckpt'] else 'off'} | {r['batch']} x {r['seq']} | "
        f"{_cell(r['plain'])} | {_cell(r['dp'])} | {r['memory']} | {r['speed']} | {r['targets']} |"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b", help="comma-separated: 1b, 3b, 8b")
    ap.add_argument("--methods", default="lora,bitfit,full", help="comma-separated: lora, bitfit, full")
    ap.add_argument("--seqs", default="512,2048", help="tokens per example, comma-separated (grid)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ckpt", default="on,off", help="checkpointing: on, off")
    ap.add_argument("--reentrant", action="store_true")
    ap.add_argument("--search", action="store_true", help="the largest trainable batch x length instead of the grid")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps (the engine's first passes check)")
    ap.add_argument("--two-pass", default="auto", choices=["auto", "on", "off"], help="the engine's two_pass option")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, short sequences (checks the script)")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = ap.parse_args(argv)
    args.models = ["tiny"] if args.tiny else args.models.split(",")
    args.methods = args.methods.split(",")
    args.seqs = [32] if args.tiny else [int(s) for s in args.seqs.split(",")]
    args.ckpt = [c == "on" for c in args.ckpt.split(",")]
    args.candidates = ((1, 16), (2, 16), (1, 32)) if args.tiny else CANDIDATES
    if args.tiny:
        args.batch, args.steps, args.warmup = 2, 1, 1
    if not args.search:
        print("| model | method | checkpointing | B x T | non-private | dpft | memory | speed | targets |")
        print("| --- | --- | --- | --- | --- | --- | ---: | ---: | --- |")
    rows = search(args) if args.search else grid(args)
    print(
        f"targets: under checkpointing memory <= {MEMORY_TARGET}x non-private; speed >= "
        + ", ".join(f"{k} {v}x" for k, v in SPEED_TARGET.items())
        + "; search: dpft's largest batch x length equals non-private's"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
