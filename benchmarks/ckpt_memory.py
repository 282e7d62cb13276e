"""Peak memory and step time of dpft against the same non-private run, with
activation checkpointing on and off (issue 23).

Llama-3-shaped models with random weights (no download), bfloat16 weights,
per-example token-mean cross-entropy, AdamW; DP-LoRA (r16 on q, k, v, o via
peft), DP full fine-tuning and DP-BiTFiT (biases added to every Linear).
Checkpointing is Hugging Face's ``gradient_checkpointing_enable()``
(non-reentrant unless ``--reentrant``).  Every configuration runs in its own
process (an out-of-memory error ends that row only); the table gives
dpft / non-private for peak memory (``torch.cuda.max_memory_allocated``) and
speed (median step time), and how many of the measured dpft steps took
two-pass clipping (``--two-pass``: the engine's ``two_pass`` option; ``auto``
takes it for DP full under checkpointing).  The engine's first three
backward passes cross-check its per-example gradients against autograd's
and take the usual path, so the warm-up is at least three steps and is
reported apart: the peak over it (``warm-up peak``: the usual path's) and
two-pass clipping's check (``check``: the largest deviation of pass 2 from
pass 1 as a fraction of its tolerance; below 1 passes).

    python -m benchmarks.ckpt_memory --models 1b --methods lora,full --batch 8 --seq 2048
    python -m benchmarks.ckpt_memory --models 1b --methods full --ckpt on --two-pass off   # the usual path
    python -m benchmarks.ckpt_memory --models 8b --methods lora --batch 2 --seq 4096
    python -m benchmarks.ckpt_memory --tiny --device cpu     # a CPU check of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads (Llama-3.2-1B / 3B, Llama-3-8B)
    "1b": (2048, 8192, 16, 32, 8),
    "3b": (3072, 8192, 28, 24, 8),
    "8b": (4096, 14336, 32, 32, 8),
    "tiny": (64, 128, 4, 4, 2),
}


def build(cfg: dict[str, Any]):
    import torch
    import transformers

    hidden, inter, layers, heads, kv = SHAPES[cfg["model"]]
    vocab = 128256 if cfg["model"] != "tiny" else 256
    conf = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=max(cfg["seq"], 128),
        tie_word_embeddings=False,
        attention_bias=cfg["method"] == "bitfit",
        mlp_bias=cfg["method"] == "bitfit",
    )
    conf._attn_implementation = "sdpa"
    device = torch.device(cfg["device"])
    dtype = torch.bfloat16 if cfg["device"] != "cpu" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = transformers.LlamaForCausalLM(conf)
    finally:
        torch.set_default_dtype(old)
    if cfg["method"] == "lora":
        import peft

        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
            ),
        )
    elif cfg["method"] == "bitfit":
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith(".bias"))
    model.train()
    if cfg["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": cfg["reentrant"]})
        if cfg["reentrant"]:
            model.enable_input_require_grads()  # frozen embeddings (LoRA, BiTFiT)
    return model


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    cuda = cfg["device"] != "cpu"
    model = build(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    B, T = cfg["batch"], cfg["seq"]
    vocab = model.config.vocab_size
    if cfg["private"]:
        import dpft

        engine = dpft.PrivacyEngine(
            model,
            batch_size=B,
            sample_size=100 * B,
            steps=1000,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            two_pass=cfg["two_pass"],
        )
        engine.attach(opt)

    def step():
        ids = torch.randint(0, vocab, (B, T), device=cfg["device"])
        logits = model(input_ids=ids, use_cache=False).logits
        tok = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1), reduction="none")
        loss = tok.view(B, -1).mean(1).mean()
        del logits, tok
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(max(cfg["warmup"], 3)):  # (the engine's first three passes take the usual path)
        step()
    sync()
    before = engine.two_pass_steps if cfg["private"] else 0
    warm_peak = torch.cuda.max_memory_allocated() if cuda else 0  # (the first passes: the usual path)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    two_pass = engine.two_pass_steps - before if cfg["private"] else 0
    return {
        "step_s": statistics.median(times),
        "peak_gib": peak / 2**30,
        "trainable": sum(p.numel() for p in params),
        "two_pass_steps": two_pass,
        "warmup_peak_gib": warm_peak / 2**30,
        # the two-pass check's largest deviation, as a fraction of its tolerance
        "two_pass_worst": engine.two_pass_worst if cfg["private"] else 0.0,
    }


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ckpt_memory", "--child", json.dumps(cfg)], capture_output=True, text=True
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    err = (proc.stderr or proc.stdout).strip().splitlines()
    oom = any("OutOfMemoryError" in x or "out of memory" in x for x in err)
    return {"error": "out of memory" if oom else (err[-1] if err else f"exit {proc.returncode}")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b", help="comma-separated: 1b, 3b, 8b")
    ap.add_argument("--methods", default="lora,full", help="comma-separated: lora, full, bitfit")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--ckpt", default="on,off", help="checkpointing settings to run: on, off")
    ap.add_argument("--reentrant", action="store_true", help="reentrant checkpointing (default: non-reentrant)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps (at least 3)")
    ap.add_argument("--two-pass", default="auto", choices=["auto", "on", "off"], help="the engine's two_pass option")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (checks the script, e.g. on CPU)")
    ap.add_argument("--json", default=None, help="append every row to this JSON-lines file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        cfg = json.loads(args.child)
        try:
            print("RESULT " + json.dumps(child(cfg)), flush=True)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        return
    models = ["tiny"] if args.tiny else args.models.split(",")
    seq, batch = (64, 2) if args.tiny else (args.seq, args.batch)
    header = (
        f"{'model':6} {'method':7} {'ckpt':4} {'B x T':>11} | {'non-private':>18} | {'dpft':>18} | "
        f"{'memory':>7} {'speed':>6} {'2-pass':>6}"
    )
    print(header)
    print("-" * len(header))
    for model in models:
        for method in args.methods.split(","):
            for ckpt in args.ckpt.split(","):
                rows = {}
                for private in (False, True):
                    cfg = {
                        "model": model,
                        "method": method,
                        "ckpt": ckpt == "on",
                        "reentrant": args.reentrant,
                        "private": private,
                        "batch": batch,
                        "seq": seq,
                        "steps": args.steps,
                        "warmup": args.warmup,
                        "two_pass": args.two_pass,
                        "device": args.device,
                    }
                    rows[private] = run_one(cfg)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps({**cfg, **rows[private]}) + "\n")

                def cell(r):
                    if "error" in r:
                        return r["error"][:18]
                    return f"{r['peak_gib']:7.2f} GiB {r['step_s']:6.3f}s"

                np_, dp = rows[False], rows[True]
                mem = speed = "-"
                if "error" not in np_ and "error" not in dp:
                    if np_["peak_gib"] > 0:
                        mem = f"{dp['peak_gib'] / np_['peak_gib']:.2f}x"
                    speed = f"{np_['step_s'] / dp['step_s']:.2f}x"
                passes = f"{dp['two_pass_steps']}/{args.steps}" if "error" not in dp else "-"
                extra = ""
                if "error" not in dp and "error" not in np_:
                    if np_["warmup_peak_gib"] > 0:
                        extra += f" | warm-up peak {dp['warmup_peak_gib'] / np_['warmup_peak_gib']:.2f}x"
                    extra += f" | check {dp['two_pass_worst']:.3g}"
                print(
                    f"{model:6} {method:7} {ckpt:4} {f'{batch} x {seq}':>11} | {cell(np_):>18} | {cell(dp):>18} | "
                    f"{mem:>7} {speed:>6} {passes:>6}{extra}",
                    flush=True,
                )
    print(
        "memory: dpft peak / non-private peak (target <= 1.05x under checkpointing); "
        "speed: non-private step time / dpft step time (targets: LoRA >= 0.95x, full >= 0.80x); "
        "2-pass: measured dpft steps that took two-pass clipping; warm-up peak: the same ratio over "
        "the warm-up steps (the engine's first three backward passes take the usual path); check: "
        "two-pass clipping's largest fingerprint deviation as a fraction of its tolerance"
    )


if __name__ == "__main__":
    main()
