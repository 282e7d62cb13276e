"""Multi-GPU throughput and memory of dpft under ``torchrun`` (DDP and FSDP2).

    python -m benchmarks.distributed --models gpt2,roberta --methods dp-bitfit,dp-full-auto \
        --nproc 1,2 --out results/                       # DDP scaling from 1 to 2 GPUs
    python -m benchmarks.distributed --models llama7b --methods dp-full-auto-fsdp --nproc 1,2 --out results/

Each configuration runs in its own ``torch.distributed.run`` launch (clean
memory).  The per-GPU batch is fixed (weak scaling: the global logical batch
is ``batch x W``); examples/s counts the global batch.  DDP methods wrap the
model in ``DistributedDataParallel`` (the engine switches DDP's raw-gradient
all-reduce off and all-reduces the clipped sums); ``*-fsdp`` methods shard
every transformer block and the root with ``fully_shard`` (FSDP2), AdamW.
Results append to ``OUT/distributed.jsonl``; one line per configuration, with
the step times, peak memory per GPU (max over ranks) and the GPU name.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: a Llama-2-7B-shaped model (6.7B parameters; biases on, as the llama1b benchmark model, so that
#: DP-BiTFiT has something to train), random init directly on the GPUs
LLAMA7B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    vocab_size=32000,
    max_position_embeddings=4096,
    attention_bias=True,
    mlp_bias=True,
)


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ----------------------------------------------------------------------------
# child: one configuration on W processes


def _build_llama7b(device, seq_len: int, batch: int, fsdp: bool, tiny: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from benchmarks.models import LLAMA_TINY, SPECS, Workload

    cfg = LlamaConfig(**(dict(LLAMA7B, **LLAMA_TINY) if tiny else LLAMA7B))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.normal_(0.0, 0.02)
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                w = m.weight.to_local() if hasattr(m.weight, "to_local") else m.weight
                w.fill_(1.0)
    with torch.device(device):  # its buffers were left uninitialized by to_empty
        model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g, device=device)
    spec = SPECS["llama1b"]
    return Workload(
        "llama7b", spec, model, {"input_ids": ids}, ids, {"family": "llama", "seq_len": seq_len}, {"use_cache": False}
    )


def child(cfg: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    import dpft
    from benchmarks.models import build

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("highest")
    else:
        torch.set_num_threads(1)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    method: str = cfg["method"]
    fsdp = method.endswith("-fsdp")
    bitfit = "bitfit" in method
    private = method.startswith("dp-")
    per_gpu = cfg["batch_size"]
    result: dict[str, Any] = dict(
        cfg,
        world_size=world,
        gpu=torch.cuda.get_device_name(device) if cuda else "cpu",
        torch=torch.__version__,
        global_batch=per_gpu * world,
    )
    try:
        if cfg["model"] == "llama7b":
            wl = _build_llama7b(
                device, cfg["seq_len"] or (16 if cfg.get("tiny") else 256), per_gpu, fsdp, cfg.get("tiny", False)
            )
        else:
            kw = {"seq_len": cfg["seq_len"]} if cfg["seq_len"] else {}
            wl = build(cfg["model"], batch_size=per_gpu, device=device, seed=0, tiny=cfg.get("tiny", False), **kw)
            if fsdp:
                from torch.distributed.fsdp import fully_shard

                blocks = [
                    m
                    for m in wl.model.modules()
                    if type(m).__name__ in ("GPT2Block", "RobertaLayer", "LlamaDecoderLayer")
                ]
                for b in blocks:
                    fully_shard(b)
                fully_shard(wl.model)
        model = wl.model
        model.train()
        if bitfit:
            dpft.bitfit(model)
        params = [p for p in model.parameters() if p.requires_grad]
        result["trainable"] = sum(p.numel() for p in params)
        net = model
        if not fsdp and world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[local] if cuda else None)
        opt = torch.optim.AdamW(params, lr=1e-5) if fsdp else torch.optim.SGD(params, lr=1e-4)
        if private:
            engine = dpft.PrivacyEngine(
                net,
                batch_size=per_gpu * world,
                sample_size=10**7,
                steps=10**6,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                clipping_mode="auto",
            )
            engine.attach(opt)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg["bf16"]))

        def step():
            with amp:
                logits = wl.logits(net)
            wl.loss(logits).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(cfg["warmup"]):
            step()
        times = []
        for _ in range(cfg["steps"]):
            sync()
            dist.barrier()
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**20 if cuda else 0.0], device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        med = statistics.median(times)
        result.update(
            status="ok",
            step_times_s=[round(x, 5) for x in times],
            median_step_s=med,
            examples_per_s=per_gpu * world / med,
            peak_mem_mb_per_gpu=float(peak.item()),
        )
    except torch.OutOfMemoryError as e:
        result.update(status="oom", error=str(e).splitlines()[0][:300])
    if rank == 0:
        with open(cfg["result_file"], "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------
# parent


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2,roberta")
    ap.add_argument("--methods", default="nonprivate-full,dp-bitfit,dp-full-auto")
    ap.add_argument("--nproc", default="1,2", help="process counts to compare")
    ap.add_argument("--batch-size", type=int, default=32, help="per GPU")
    ap.add_argument("--seq-len", type=int, default=0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="toy model sizes (CPU/gloo check)")
    ap.add_argument("--time-budget", type=float, default=None)
    ap.add_argument("--config-timeout", type=float, default=240)
    ap.add_argument("--out", default="results")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "distributed.jsonl"
    t0 = time.perf_counter()
    for model in args.models.split(","):
        for method in args.methods.split(","):
            for n in (int(x) for x in args.nproc.split(",")):
                if args.time_budget and time.perf_counter() - t0 > args.time_budget:
                    print(f"[dist] {model} {method} W={n}: skipped (time budget)", flush=True)
                    continue
                res_file = out / f".dist-{model}-{method}-{n}.json"
                res_file.unlink(missing_ok=True)
                cfg = dict(
                    model=model,
                    method=method,
                    batch_size=args.batch_size,
                    seq_len=args.seq_len,
                    steps=args.steps,
                    warmup=args.warmup,
                    bf16=args.bf16,
                    tiny=args.tiny,
                    result_file=str(res_file),
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                )
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    str(n),
                    "--master_port",
                    _port(),
                    "-m",
                    "benchmarks.distributed",
                    "--child",
                    json.dumps(cfg),
                ]
                t = time.perf_counter()
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.config_timeout)
                    err = p.stderr[-1500:] if p.returncode else ""
                except subprocess.TimeoutExpired:
                    err = "timeout"
                if res_file.exists():
                    res = json.loads(res_file.read_text())
                    res_file.unlink()
                else:
                    res = dict(cfg, world_size=n, status="error", error=err)
                res["wall_s"] = round(time.perf_counter() - t, 1)
                with open(jsonl, "a") as f:
                    f.write(json.dumps(res) + "\n")
                if res.get("status") == "ok":
                    print(
                        f"[dist] {model:10s} {method:20s} W={n}  {res['examples_per_s']:8.1f} ex/s  "
                        f"{res['peak_mem_mb_per_gpu'] / 1024:6.2f} GiB/GPU  ({res['wall_s']} s)",
                        flush=True,
                    )
                else:
                    print(
                        f"[dist] {model:10s} {method:20s} W={n}  {res.get('status')}: "
                        f"{str(res.get('error', ''))[-400:]}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
