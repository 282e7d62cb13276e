"""Speed and memory of dpft's exact generic path (issue 22): DP full
fine-tuning against non-private full fine-tuning on models where some
parameters have no fast per-example rule, and which parameters those are.

    python -m benchmarks.generic_path                                   # all four, GPU defaults
    python -m benchmarks.generic_path --models moe_1b --batch 8 --seq 256
    python -m benchmarks.generic_path --tiny --steps 2 --warmup 1       # CPU smoke check (tiny configs)

Models (random init from configs, nothing downloaded):

- ``convnext_t``: timm ``convnext_tiny`` (layer scale ``gamma``: container parameters);
- ``swin_t``: timm ``swin_tiny_patch4_window7_224`` (relative position bias tables, windows flattened into the batch);
- ``t5_base``: transformers T5 with t5-base's shape (relative attention bias: a batch-independent output);
- ``moe_1b``: a Mixtral-style mixture of experts of about 1B parameters (8 experts, top-2 routing, fused
  ``(E, ...)`` expert tensors, transformers' eager experts implementation).

Each model is built once; the non-private step (autograd, ``optimizer.step``)
and the DP step (``dpft.PrivacyEngine``, ``clipping_mode="auto"``, noise 1,
every parameter trainable) are timed on the same data, median step time of
``--steps`` steps after ``--warmup``.  Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (GPU only).  One
markdown table row per model, then the parameters that took the generic path
(``PrivacyEngine.generic_path()``), by module, with the computation each
module's generic path settled on after the first passes (``substitution``:
read from the forward, no recomputation; ``vmap`` / ``loop``: recomputed,
vectorized or one example at a time; ``reference``: recomputed, one
pull-back per example; ``factored``: fused mixture-of-experts weights and
routers on their factored rule, verified in the first passes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dpft

MODELS = ("convnext_t", "swin_t", "t5_base", "moe_1b")


@dataclass
class Case:
    """A model and a batch maker: ``loss(model, batch)`` is the batch mean of per-example losses."""

    name: str
    model: nn.Module
    batch: Callable[[], dict[str, Tensor]]
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    shape: str  # what one example is (for the table)


# -- models ------------------------------------------------------------------------------------------


def _timm():
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install (missing torchvision)
        raise ModuleNotFoundError(f"timm is not importable ({type(e).__name__}: {e})") from e
    return timm


def _image_case(name: str, model: nn.Module, batch: int, side: int, classes: int, device: torch.device) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, side, side, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    return Case(
        name, model, lambda: {"x": x, "y": y}, lambda m, b: F.cross_entropy(m(b["x"]), b["y"]), f"{side}x{side} image"
    )


def convnext_t(batch: int, seq: int, image: int, tiny: bool, device: torch.device) -> Case:
    timm = _timm()
    if tiny:
        from timm.models.convnext import ConvNeXt

        model, side, classes = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=10), 32, 10
    else:
        model, side, classes = timm.create_model("convnext_tiny", pretrained=False), image, 1000
    return _image_case("ConvNeXt-T", model, batch, side, classes, device)


def swin_t(batch: int, seq: int, image: int, tiny: bool, device: torch.device) -> Case:
    timm = _timm()
    if tiny:
        from timm.models.swin_transformer import SwinTransformer

        model = SwinTransformer(
            img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2), num_classes=10
        )
        side, classes = 32, 10
    else:
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=image)
        side, classes = image, 1000
    return _image_case("Swin-T", model, batch, side, classes, device)


def _token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over examples of each example's mean token cross-entropy."""
    per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return per.view(targets.shape).mean(1).mean()


def t5_base(batch: int, seq: int, image: int, tiny: bool, device: torch.device) -> Case:
    from transformers import T5Config, T5ForConditionalGeneration

    kw = dict(
        d_model=768,
        d_kv=64,
        d_ff=3072,
        num_layers=12,
        num_decoder_layers=12,
        num_heads=12,
        vocab_size=32128,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    )
    if tiny:
        kw.update(
            d_model=16,
            d_kv=8,
            d_ff=24,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            vocab_size=64,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
        )
    cfg = T5Config(**kw, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, use_cache=False)
    model = T5ForConditionalGeneration(cfg)
    g = torch.Generator(device="cpu").manual_seed(0)
    src = torch.randint(2, cfg.vocab_size, (batch, seq), generator=g).to(device)
    tgt = torch.randint(2, cfg.vocab_size, (batch, max(2, seq // 4)), generator=g).to(device)
    dec = torch.cat([torch.zeros_like(tgt[:, :1]), tgt[:, :-1]], 1)

    def loss(m, b):
        return _token_loss(m(input_ids=b["src"], decoder_input_ids=b["dec"]).logits, b["tgt"])

    return Case("T5-base", model, lambda: {"src": src, "dec": dec, "tgt": tgt}, loss, f"{seq} + {tgt.shape[1]} tokens")


def moe_1b(batch: int, seq: int, image: int, tiny: bool, device: torch.device, experts_impl: str = "eager") -> Case:
    from transformers import MixtralConfig, MixtralForCausalLM

    kw = dict(
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
        max_position_embeddings=max(4096, seq),
    )
    if tiny:
        kw.update(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=4,
            vocab_size=64,
        )
    cfg = MixtralConfig(**kw, use_cache=False, experts_implementation=experts_impl)
    model = MixtralForCausalLM(cfg)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g).to(device)

    def loss(m, b):
        logits = m(input_ids=b["ids"]).logits
        return _token_loss(logits[:, :-1], b["ids"][:, 1:])

    return Case("Mixtral-style MoE", model, lambda: {"ids": ids}, loss, f"{seq} tokens")


BUILDERS = {"convnext_t": convnext_t, "swin_t": swin_t, "t5_base": t5_base, "moe_1b": moe_1b}


# -- timing ------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> tuple[float, float | None]:
    """Median seconds per step and peak memory (GiB, GPU only) over the timed steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Time one model non-private and DP full; returns the row's fields."""
    build = BUILDERS[name]
    extra = {"experts_impl": args.experts_impl} if name == "moe_1b" else {}
    torch.manual_seed(0)
    case = build(args.batch, args.seq, args.image, args.tiny, device, **extra)
    model = case.model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    batch = case.batch()
    row: dict = {"model": case.name, "params": params, "batch": args.batch, "example": case.shape}

    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step() -> None:
        with _autocast(device, args.dtype):
            loss = case.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    row["np_s"], row["np_peak"] = _time(step, args.steps, args.warmup, device)
    del opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model,
            batch_size=args.batch,
            sample_size=100 * args.batch,
            steps=1000,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            clipping_mode="auto",
        )
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    engine.attach(opt)
    try:
        row["dp_s"], row["dp_peak"] = _time(step, args.steps, args.warmup, device)
        row["generic"] = engine.generic_path()
        row["computation"] = _computations(model, row["generic"])
    finally:
        engine.detach()
    row["trainable"] = len(engine.trainable_names)
    return row


def _computations(model: nn.Module, generic: dict[str, str]) -> dict[str, str]:
    """Module recomputed -> the computation its generic path settled on after
    the first passes (``substitution``, ``vmap``, ``loop`` or ``reference``;
    see ``dpft.rules.fallback.computation``; ``factored`` for fused experts and
    routers on their verified rule, ``dpft.rules.experts``)."""
    from dpft.rules.experts import _STATES
    from dpft.rules.fallback import computation

    def which(m: nn.Module) -> str:
        state = _STATES.get(m)  # (a fused-experts module or router: its verified factored rule)
        if state is not None and state.fast_calls:
            return "factored" if state.ok else f"reference ({state.why_not[:40]})"
        return computation(m)

    modules = dict(model.named_modules())
    names = {why.split("'")[1] for why in generic.values()}
    return {name: which(modules[name]) for name in sorted(names) if name in modules}


# -- report ------------------------------------------------------------------------------------------


HEADER = (
    "| model | params | batch | example | non-private ex/s | DP full ex/s | DP / non-private "
    "| non-private peak GiB | DP peak GiB | parameters on the generic path |"
)
RULE = "|" + "---|" * 10


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def table_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['model']} | | {row.get('batch', '')} | | | | | | | {row['error']} |"
    np_eps, dp_eps = row["batch"] / row["np_s"], row["batch"] / row["dp_s"]
    generic = row["generic"]
    modules = {why.split("'")[1] for why in generic.values()}
    gen = f"{len(generic)} of {row['trainable']} tensors, {len(modules)} modules" if generic else "none"
    kinds = Counter(row.get("computation", {}).values())
    if kinds:
        gen += " (" + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")"
    return (
        f"| {row['model']} | {_size(row['params'])} | {row['batch']} | {row['example']} | {np_eps:.1f} | "
        f"{dp_eps:.1f} | {dp_eps / np_eps:.2f}x | {_gib(row['np_peak'])} | {_gib(row['dp_peak'])} | {gen} |"
    )


def generic_details(row: dict, limit: int) -> list[str]:
    """The generic-path parameters of one model, grouped by the reason and
    the module recomputed (a few parameter names each)."""
    by: dict[tuple[str, str], list[str]] = {}
    for key, why in row.get("generic", {}).items():
        module, reason = why.split("'")[1], why.split("): ", 1)[-1]
        by.setdefault((reason, module), []).append(key)
    lines = []
    computation = row.get("computation", {})
    for (reason, module), keys in by.items():
        shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} tensors)" if len(keys) > limit else "")
        how = f" [{computation[module]}]" if module in computation else ""
        lines.append(f"- {row['model']}: `{module}`, {reason}{how}: {shown}")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--batch", type=int, default=None, help="examples per step (default 32 images, 8 sequences)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per example (T5: source; target is a quarter)")
    ap.add_argument("--image", type=int, default=224, help="image side")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (dpft cross-checks its first 2)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="bf16: under bfloat16 autocast")
    ap.add_argument("--experts-impl", default="eager", help="transformers experts_implementation of the MoE")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (a CPU smoke check)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--details", type=int, default=4, help="parameter names listed per recomputed module")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in BUILDERS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if device.type == "cpu" and args.dtype == "bf16" and args.tiny:
        args.dtype = "fp32"
    rows = []
    print(f"device {device}, dtype {args.dtype}, steps {args.steps} after {args.warmup} warm-up", flush=True)
    for name in names:
        bargs = argparse.Namespace(**vars(args))
        if bargs.batch is None:
            bargs.batch = 32 if name in ("convnext_t", "swin_t") else 8
        if args.tiny:
            bargs.seq = min(args.seq, 8)
        try:
            row = run_model(name, bargs, device)
        except Exception as e:  # noqa: BLE001 - one model's failure (OOM, missing library) is its row
            row = {"model": name, "batch": bargs.batch, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            traceback.print_exc()
        rows.append(row)
        print(table_row(row), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(HEADER)
    print(RULE)
    for row in rows:
        print(table_row(row))
    print()
    print("Parameters on the generic path (module recomputed per example, and why):")
    for row in rows:
        for line in generic_details(row, args.details) or ([f"- {row['model']}: none"] if "error" not in row else []):
            print(line)
    return rows


if __name__ == "__main__":
    main()
