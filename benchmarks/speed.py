"""Throughput and peak-memory benchmark of dpft against non-private training and Opacus.

    python -m benchmarks.speed --suite core --out results/           # GPU
    python -m benchmarks.speed --smoke --out /tmp/bench               # CPU, seconds

Each (model, method) configuration runs in its own child process
(``python -m benchmarks.speed --one '<json>'``) so that its peak memory is
clean and an out-of-memory error or a crash is recorded for that
configuration only.  The parent appends one JSON line per configuration to
``<out>/<suite>.jsonl`` as soon as it finishes (partial results survive a
killed run), then writes ``<out>/<suite>.md`` and PNG charts with
:mod:`benchmarks.report` (and updates ``--docs`` when given).

Timing: ``--warmup`` steps, then ``--steps`` timed steps (default 3 + 10);
each step is forward + loss + backward + ``optimizer.step()`` +
``optimizer.zero_grad()``, bracketed by ``torch.cuda.synchronize()``;
the record holds every step time and the median throughput (examples/s).
Peak memory: ``torch.cuda.reset_peak_memory_stats()`` once the model,
optimizer and privacy engine exist, ``torch.cuda.max_memory_allocated()``
after the timed steps.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_TAG = "@@DPFT-BENCH@@ "
REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------
# methods and suites


@dataclass(frozen=True)
class Method:
    trainable: str  # "full" | "bitfit" | "lora" | "sparta"
    engine: str | None = None  # None (non-private) | "dpft" | "opacus"
    mode: str = ""  # dpft clipping_mode / opacus grad_sample_mode
    density: float = 0.0  # sparta: fraction of the rows of every candidate weight that trains


METHODS: dict[str, Method] = {
    "nonprivate-full": Method("full"),
    "nonprivate-bitfit": Method("bitfit"),
    "dp-bitfit": Method("bitfit", "dpft", "auto"),
    "dp-full-auto": Method("full", "dpft", "auto"),
    "dp-full-ghost": Method("full", "dpft", "ghost"),
    "dp-full-mixed": Method("full", "dpft", "mixed"),
    "dp-full-instantiate": Method("full", "dpft", "instantiate"),
    "opacus-bitfit": Method("bitfit", "opacus", "hooks"),
    "opacus-full-hooks": Method("full", "opacus", "hooks"),
    "opacus-full-ghost": Method("full", "opacus", "ghost"),
    "nonprivate-lora": Method("lora"),
    "dp-lora": Method("lora", "dpft", "auto"),
    # SPARTA's sparse training phase: random rows at this density in every candidate
    # weight (the step's cost does not depend on which rows), plus biases and the head
    "dp-sparta-1.0": Method("sparta", "dpft", "auto", 1.0),
    "dp-sparta-0.5": Method("sparta", "dpft", "auto", 0.5),
    "dp-sparta-0.2": Method("sparta", "dpft", "auto", 0.2),
    "dp-sparta-0.05": Method("sparta", "dpft", "auto", 0.05),
}
SPARTA_METHODS = ["dp-sparta-1.0", "dp-sparta-0.5", "dp-sparta-0.2", "dp-sparta-0.05"]

CORE_MODELS = ["gpt2", "roberta", "vit", "resnet50gn"]
BITFIT_METHODS = ["nonprivate-full", "nonprivate-bitfit", "dp-bitfit", "opacus-bitfit"]
FULL_METHODS = ["nonprivate-full", "dp-full-auto", "dp-full-ghost", "opacus-full-hooks", "opacus-full-ghost"]
SCALING_METHODS = [
    "nonprivate-bitfit",
    "dp-bitfit",
    "nonprivate-full",
    "dp-full-auto",
    "opacus-bitfit",
    "opacus-full-hooks",
]
MAXBATCH_METHODS = ["nonprivate-full", "dp-full-auto", "nonprivate-bitfit", "dp-bitfit"]


def _union(*lists: list[str]) -> list[str]:
    out: list[str] = []
    for lst in lists:
        out += [x for x in lst if x not in out]
    return out


# suite -> (models, methods, per-model variants); variants are dicts of
# overrides (seq_len / image_size / batch_size) run for every method
SUITES: dict[str, dict[str, Any]] = {
    # issue 2: DP-BiTFiT vs non-private BiTFiT (and full), Opacus with frozen weights
    "bitfit": dict(models=CORE_MODELS, methods=BITFIT_METHODS),
    # issue 4: DP full fine-tuning modes vs non-private full and Opacus
    "full": dict(models=CORE_MODELS, methods=FULL_METHODS),
    # both tables in one run (shared non-private full baseline)
    "core": dict(
        models=CORE_MODELS,
        methods=_union(
            ["nonprivate-bitfit", "dp-bitfit", "nonprivate-full", "dp-full-auto", "dp-full-ghost"],
            ["opacus-bitfit", "opacus-full-hooks", "opacus-full-ghost"],
        ),
    ),
    # every dpft clipping mode against non-private full
    "modes": dict(
        models=CORE_MODELS,
        methods=["nonprivate-full", "dp-full-auto", "dp-full-ghost", "dp-full-mixed", "dp-full-instantiate"],
    ),
    # DP-LoRA (peft, r=16) next to DP-BiTFiT and DP full
    "lora": dict(
        models=["gpt2", "roberta", "vit"],
        methods=["nonprivate-lora", "dp-lora", "nonprivate-bitfit", "dp-bitfit", "nonprivate-full", "dp-full-auto"],
    ),
    # the larger models of issue 8
    "large": dict(
        models=["gpt2-medium", "gpt2-large", "roberta-large"],
        methods=["nonprivate-bitfit", "dp-bitfit", "nonprivate-full", "dp-full-auto", "opacus-full-hooks"],
    ),
    "llama": dict(
        models=["llama1b"],
        methods=["nonprivate-bitfit", "dp-bitfit", "nonprivate-lora", "dp-lora", "nonprivate-full", "dp-full-auto"],
    ),
    # memory / throughput against sequence length and image size
    "scaling": dict(
        models=["roberta", "resnet50gn", "vit"],
        methods=SCALING_METHODS,
        variants={
            "roberta": [dict(seq_len=t, batch_size=8) for t in (128, 512, 1024, 2048, 4096)],
            "resnet50gn": [dict(image_size=s, batch_size=8) for s in (224, 384, 512)],
            "vit": [dict(image_size=s, batch_size=8) for s in (224, 384, 512)],
        },
    ),
    # largest batch that fits, by bisection
    "maxbatch": dict(models=["gpt2"], methods=MAXBATCH_METHODS),
    # SPARTA: step time and memory against the density of the trained rows; DP-BiTFiT
    # (nothing but biases and head) is the floor as the density goes to 0.  AdamW by
    # default, so that the compact optimizer state shows in the memory column.
    "sparta": dict(
        models=["vit", "resnet50gn"],
        methods=["nonprivate-full", "dp-full-auto", "dp-bitfit"] + SPARTA_METHODS,
        optimizer="adamw",
    ),
    # tiny CPU configs for the test suite
    "smoke": dict(
        models=["gpt2", "resnet50gn"],
        methods=["nonprivate-bitfit", "dp-bitfit", "dp-full-auto", "dp-sparta-0.2"],
    ),
}

# ----------------------------------------------------------------------------
# the child: one configuration


def _versions() -> dict[str, Any]:
    from importlib import metadata

    import torch

    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for pkg in ("transformers", "timm", "opacus", "peft", "dpft"):
        try:
            out[pkg] = metadata.version(pkg)
        except Exception:  # noqa: BLE001
            mod = sys.modules.get(pkg)
            out[pkg] = getattr(mod, "__version__", None)
    out["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cudnn"] = torch.backends.cudnn.version()
    out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return out


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "cublas_status_alloc_failed" in msg or "cudnn_status_alloc_failed" in msg


def _short(e: BaseException, limit: int = 600) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= limit else s[:limit] + " ..."


def _opacus_functorch_modules(model) -> list[str]:
    """Module types Opacus handles with its functorch (vmap) fallback: a clue
    when its numbers are low."""
    try:
        from opacus.grad_sample import GradSampleModule
    except Exception:  # noqa: BLE001
        return []
    samplers = GradSampleModule.GRAD_SAMPLERS
    out: set[str] = set()

    def visit(m) -> None:
        own = any(p.requires_grad for p in m.parameters(recurse=False))
        if own and type(m) not in samplers:
            out.add(type(m).__name__)
            return  # Opacus does not recurse into such a module
        for c in m.children():
            visit(c)

    visit(model)
    return sorted(out)


def _make_optimizer(name: str, params, lr: float):
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def _state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state tensors (Adam's moments, momentum buffers)."""
    try:
        state = optimizer.state
        return sum(v.numel() * v.element_size() for st in state.values() for v in st.values() if hasattr(v, "numel"))
    except Exception:  # noqa: BLE001 - a wrapper without a plain state dict
        return 0


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build, warm up, time.  Returns the measured fields (raises on failure)."""
    import contextlib
    import statistics

    import torch

    import dpft

    from . import models

    method = METHODS[cfg["method"]]
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    if cuda:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if cfg.get("tf32", "default") == "off":
        # IEEE float32 for the model too (PyTorch's default lets cuDNN convolutions
        # use TF32, while dpft computes its per-example norms and sums in IEEE float32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    b = int(cfg["batch_size"])
    out: dict[str, Any] = {}

    t0 = time.perf_counter()
    wl = models.build(
        cfg["model"],
        batch_size=b,
        device=device,
        tiny=cfg["size"] == "tiny",
        seq_len=cfg.get("seq_len"),
        image_size=cfg.get("image_size"),
        seed=cfg.get("seed", 0),
    )
    out.update(wl.info)
    if method.engine == "opacus" and cfg.get("opacus_out_of_place", True):
        # Opacus' backward hooks crash on in-place ops after hooked modules
        # (timm ResNet's `x += shortcut`, ReLU(inplace=True)); dpft needs no change
        changes = models.out_of_place(wl.model)
        if changes:
            out["model_patched"] = "; ".join(changes)
    if method.trainable == "full":
        for p in wl.model.parameters():
            p.requires_grad_(True)
    elif method.trainable == "bitfit":
        dpft.bitfit(wl.model)
    elif method.trainable == "lora":
        models.lora(wl, r=int(cfg.get("lora_r", 16)))
    elif method.trainable == "sparta":
        out.update(models.sparta_rows(wl, method.density, seed=int(cfg.get("seed", 0))))
    else:
        raise ValueError(method.trainable)
    trainable = [p for p in wl.model.parameters() if p.requires_grad]
    out["params"] = models.count(wl.model.parameters())
    out["trainable"] = models.count(trainable) if method.trainable != "sparta" else out["sparta_trainable"]
    optimizer = _make_optimizer(cfg["optimizer"], trainable, cfg["lr"])
    if method.trainable == "sparta":  # optimizer state for the selected rows only
        dpft.sparta.compact_optimizer(optimizer)

    forward_model = wl.model
    criterion = None
    extra: dict[str, Any] = {}
    total_steps = int(cfg["warmup"]) + int(cfg["steps"])
    sample_size = max(50_000, 10 * b)
    if method.engine == "dpft":
        engine = dpft.PrivacyEngine(
            wl.model,
            batch_size=b,
            sample_size=sample_size,
            steps=total_steps + 1,
            noise_multiplier=cfg["noise_multiplier"],
            max_grad_norm=cfg["max_grad_norm"],
            clipping_mode=method.mode,
            accountant="rdp",
        )
        engine.attach(optimizer)
        try:  # which per-layer rules the engine chose (diagnostic)
            rules: dict[str, int] = {}
            for bnd in engine._capture.bindings:
                k = type(bnd.rule).__name__
                rules[k] = rules.get(k, 0) + 1
            out["dpft_rules"] = rules
        except Exception:  # noqa: BLE001
            pass
    elif method.engine == "opacus":
        import opacus
        from torch.utils.data import DataLoader, TensorDataset

        out["opacus_functorch"] = _opacus_functorch_modules(wl.model)
        # The loader only fixes Opacus' sampling rate (B / N) and expected batch
        # size B; training uses the same pre-generated GPU batch as every method.
        loader = DataLoader(TensorDataset(torch.zeros(sample_size)), batch_size=b)
        pe = opacus.PrivacyEngine(accountant="rdp")
        kw = dict(
            module=wl.model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=cfg["noise_multiplier"],
            max_grad_norm=cfg["max_grad_norm"],
            poisson_sampling=False,
            grad_sample_mode=method.mode,
        )
        if method.mode == "ghost":
            forward_model, optimizer, criterion, _ = pe.make_private(criterion=torch.nn.CrossEntropyLoss(), **kw)
        else:
            forward_model, optimizer, _ = pe.make_private(**kw)
        # Opacus' embedding grad sampler needs per-example position ids (B, T)
        extra = models.position_ids(wl)
    out["setup_s"] = round(time.perf_counter() - t0, 3)

    dtype = cfg["dtype"]
    if dtype == "bf16":

        def autocast():
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    elif dtype == "fp32":
        autocast = contextlib.nullcontext
    else:
        raise ValueError(f"unknown dtype {dtype!r}")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step():
        with autocast():
            logits = wl.logits(forward_model, extra)
            if criterion is not None:
                args, kw = wl.criterion_args(logits)
                loss = criterion(*args, **kw)
            else:
                loss = wl.loss(logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # the next configuration's child may still be importing: let it finish
    # first, so that nothing else runs during the timed steps
    wait_for = cfg.get("_wait_for")
    if wait_for:
        t_wait = time.perf_counter()
        while not os.path.exists(wait_for) and time.perf_counter() - t_wait < 60:
            time.sleep(0.05)
        out["waited_s"] = round(time.perf_counter() - t_wait, 3)

    if cuda:
        sync()
        out["static_mem_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
        torch.cuda.reset_peak_memory_stats(device)

    t1 = time.perf_counter()
    first_loss = None
    for i in range(int(cfg["warmup"])):
        loss = step()
        if i == 0:
            first_loss = loss.detach()
    sync()
    out["warmup_s"] = round(time.perf_counter() - t1, 3)

    times = []
    for _ in range(int(cfg["steps"])):
        sync()
        ts = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - ts)
    last_loss = float(loss.detach())
    if first_loss is not None:
        out["loss_first"] = float(first_loss)
    out["loss_last"] = last_loss
    if cuda:
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    else:
        import resource

        out["cpu_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["optimizer_state_mb"] = round(_state_bytes(optimizer) / 2**20, 2)
    med = statistics.median(times)
    out["step_times_s"] = [round(t, 6) for t in times]
    out["median_step_s"] = round(med, 6)
    out["examples_per_s"] = round(b / med, 3)
    if "seq_len" in wl.info:
        out["tokens_per_s"] = round(b * wl.info["seq_len"] / med, 1)
    if last_loss != last_loss or last_loss in (float("inf"), float("-inf")):
        raise FloatingPointError(f"loss is {last_loss} after the timed steps")
    return out


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration; never raises: failures become ``status``."""
    rec: dict[str, Any] = _public(cfg)
    try:
        rec["env"] = _versions()
    except Exception as e:  # noqa: BLE001
        rec["env"] = {"error": _short(e)}
    try:
        rec.update(measure(cfg))
        rec["status"] = "ok"
    except ModuleNotFoundError as e:
        rec["status"] = "not installed"
        rec["error"] = _short(e)
    except NotImplementedError as e:
        rec["status"] = "unsupported"
        rec["error"] = _short(e)
    except BaseException as e:  # noqa: BLE001 - record everything, incl. KeyboardInterrupt
        if _is_oom(e):
            rec["status"] = "OOM"
        else:
            rec["status"] = "error"
            rec["traceback"] = traceback.format_exc(limit=-8)[-4000:]
        rec["error"] = _short(e)
    return rec


def child_main(spec: str, preload: str, ready_file: str | None = None) -> int:
    try:
        for mod in filter(None, preload.split(",")):
            try:
                __import__(mod)
            except Exception:  # noqa: BLE001 - the configuration itself will report it
                pass
    finally:
        if ready_file:
            Path(ready_file).touch()
    if spec == "-":
        spec = sys.stdin.readline()
        if not spec.strip():
            return 0  # released unused by the parent
    cfg = json.loads(spec)
    rec = run_one(cfg)
    sys.stdout.write(RESULT_TAG + json.dumps(rec) + "\n")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------
# the parent: a suite


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


@dataclass
class Child:
    proc: subprocess.Popen
    preload: str
    ready: Path  # written by the child once its imports are done


class ChildPool:
    """Starts child processes.  With ``prefork`` the next configuration's child
    is started while the current one runs, so that its imports (torch, dpft,
    transformers, timm, opacus: several seconds) overlap the current child's
    model building.  The current child waits for the next one's imports to
    finish before its warm-up, so nothing else runs during the timed steps."""

    def __init__(self, prefork: bool, tmpdir: Path, wait: bool = True) -> None:
        self.prefork = prefork
        self.wait = wait  # False: let imports overlap the timed steps (smoke runs: speed over accuracy)
        self.tmpdir = tmpdir
        self.env = _child_env()
        self._next: Child | None = None
        self._count = 0

    def _spawn(self, preload: str) -> Child:
        self._count += 1
        ready = self.tmpdir / f"ready-{os.getpid()}-{self._count}"
        cmd = [sys.executable, "-m", "benchmarks.speed", "--one", "-", "--preload", preload, "--ready-file", str(ready)]
        proc = subprocess.Popen(
            cmd,
            cwd=str(REPO),
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        return Child(proc, preload, ready)

    def run(self, cfg: dict[str, Any], timeout: float, next_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
        preload = ",".join(_preload_for(cfg))
        child = self._next
        self._next = None
        if child is None or child.preload != preload:
            if child is not None:
                self._release(child)
            child = self._spawn(preload)
        if self.prefork and next_cfg is not None:
            self._next = self._spawn(",".join(_preload_for(next_cfg)))
            if self.wait:
                cfg = dict(cfg, _wait_for=str(self._next.ready))
        proc = child.proc
        t0 = time.monotonic()
        try:
            stdout, stderr = proc.communicate(json.dumps(cfg) + "\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            stdout, stderr = proc.communicate()
            rec = _public(dict(cfg, status="timeout", error=f"killed after {timeout:.0f} s"))
            rec["stderr_tail"] = (stderr or "")[-2000:]
            return rec
        except BaseException:  # Ctrl-C / kill of the parent: the child runs in its own session
            _kill(proc)
            self.close()
            raise
        finally:
            child.ready.unlink(missing_ok=True)
        wall = time.monotonic() - t0
        for line in reversed((stdout or "").splitlines()):
            if line.startswith(RESULT_TAG):
                rec = json.loads(line[len(RESULT_TAG) :])
                rec["wall_s"] = round(wall, 2)
                if rec.get("status") == "error":
                    rec["stderr_tail"] = (stderr or "")[-2000:]
                return rec
        # no result line: the child died (segfault, killed for memory, ...)
        text = (stderr or "") + (stdout or "")
        oom = "out of memory" in text.lower() or proc.returncode in (-9, 137)
        return _public(
            dict(
                cfg,
                status="OOM" if oom else "crashed",
                error=f"child exited with code {proc.returncode}",
                stderr_tail=text[-2000:],
                wall_s=round(wall, 2),
            )
        )

    def _release(self, child: Child) -> None:
        try:
            child.proc.communicate("\n", timeout=30)
        except Exception:  # noqa: BLE001
            _kill(child.proc)
        child.ready.unlink(missing_ok=True)

    def close(self) -> None:
        nxt, self._next = self._next, None
        if nxt is not None:
            self._release(nxt)


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own session (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "cpu"


def build_configs(args: argparse.Namespace, run_id: str, command: str) -> list[dict[str, Any]]:
    suite = SUITES[args.suite]
    model_list = suite["models"] if not args.models else [m.strip() for m in args.models.split(",") if m.strip()]
    method_list = suite["methods"] if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
    from . import models as _models

    for m in model_list:
        if m not in _models.SPECS:
            raise SystemExit(f"unknown model {m!r}; known: {', '.join(_models.SPECS)}")
    for m in method_list:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    base = dict(
        suite=args.suite,
        run_id=run_id,
        command=command,
        device=args.device,
        dtype=args.dtype,
        size=args.size,
        steps=args.steps,
        warmup=args.warmup,
        optimizer=args.optimizer or suite.get("optimizer", "sgd"),
        lr=args.lr,
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        opacus_out_of_place=not args.opacus_unmodified,
    )
    if args.tf32 != "default":
        base["tf32"] = args.tf32
    configs = []
    for model in model_list:
        spec = _models.SPECS[model]
        variants = suite.get("variants", {}).get(model, [{}])
        for var in variants:
            for method in method_list:
                cfg = dict(base, model=model, method=method)
                cfg["batch_size"] = args.batch_size or var.get("batch_size") or spec.default_batch
                shape = _models.default_shape(model, args.size == "tiny")
                if "seq_len" in shape:
                    cfg["seq_len"] = args.seq_len or var.get("seq_len") or shape["seq_len"]
                else:
                    cfg["image_size"] = args.image_size or var.get("image_size") or shape["image_size"]
                configs.append(cfg)
    # --seq-len / --image-size collapse a suite's shape variants into one: run each config once
    unique: dict[tuple, dict[str, Any]] = {}
    for cfg in configs:
        key = (cfg["model"], cfg["method"], cfg["batch_size"], cfg.get("seq_len"), cfg.get("image_size"))
        unique.setdefault(key, cfg)
    return list(unique.values())


def repeat_rounds(configs: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """With ``k > 1``: the methods of one model (and shape) in turn, that round
    repeated ``k`` times (each configuration tagged with its ``repeat``), so
    that host drift between processes falls on every method alike."""
    if k <= 1:
        return configs
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in configs:
        groups.setdefault((c["model"], c["batch_size"], c.get("seq_len"), c.get("image_size")), []).append(c)
    return [dict(c, repeat=r) for g in groups.values() for r in range(k) for c in g]


def _preload_for(cfg: dict[str, Any]) -> list[str]:
    """Modules the child for ``cfg`` imports before it gets the go."""
    from . import models as _models

    mods = ["torch", "dpft", "benchmarks.models"]
    fam = _models.SPECS[cfg["model"]].family
    if fam in ("gpt2", "roberta", "llama"):
        mods += ["transformers", f"transformers.models.{fam}.modeling_{fam}"]
    elif fam == "vit" or cfg.get("size") != "tiny":
        mods.append("timm")
    method = METHODS[cfg["method"]]
    if method.engine == "opacus":
        mods.append("opacus")
    if method.trainable == "lora":
        mods.append("peft")
    return mods


def _fmt(rec: dict[str, Any]) -> str:
    what = f"{rec['model']:<12} {rec['method']:<20}"
    var = "".join(f" {k}={rec[k]}" for k in ("seq_len", "image_size") if rec.get(k))
    if rec.get("status") == "ok":
        mem = f"{rec['peak_mem_mb'] / 1024:7.2f} GiB" if rec.get("peak_mem_mb") is not None else "      -"
        return f"{what} B={rec['batch_size']}{var}  {rec['examples_per_s']:9.1f} ex/s  {mem}  ({rec.get('wall_s', 0):.0f} s)"
    return f"{what} B={rec['batch_size']}{var}  {rec.get('status')}: {str(rec.get('error', ''))[:160]}"


class Budget:
    def __init__(self, seconds: float | None, per_config: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds
        self.per_config = per_config

    def exceeded(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.start > self.seconds

    def timeout(self) -> float:
        if self.seconds is None:
            return self.per_config
        left = self.seconds - (time.monotonic() - self.start)
        return max(30.0, min(self.per_config, left + 60.0))


def run_suite(args: argparse.Namespace, command: str) -> list[dict[str, Any]]:
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    configs = repeat_rounds(build_configs(args, run_id, command), args.repeat)
    for c in configs:
        c["date"] = date
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{args.suite}.jsonl"
    budget = Budget(args.time_budget, args.config_timeout)
    tmp = Path(tempfile.mkdtemp(prefix="dpft-bench-"))

    def _terminate(signum, frame):  # a killed parent takes its children with it
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    pool = ChildPool(prefork=not args.no_prefork, tmpdir=tmp, wait=not args.smoke)
    records: list[dict[str, Any]] = []
    print(
        f"[bench] suite={args.suite} configs={len(configs)} device={args.device} dtype={args.dtype} -> {jsonl}",
        flush=True,
    )

    def emit(rec: dict[str, Any]) -> None:
        records.append(rec)
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print("[bench] " + _fmt(rec), flush=True)

    try:
        if args.suite == "maxbatch":
            for model in dict.fromkeys(c["model"] for c in configs):
                for cfg in [c for c in configs if c["model"] == model]:
                    if budget.exceeded():
                        emit(dict(cfg, status="skipped", error="time budget exceeded"))
                        continue
                    emit(max_batch(pool, cfg, budget, args))
        else:
            for i, cfg in enumerate(configs):
                if budget.exceeded():
                    emit(dict(cfg, status="skipped", error="time budget exceeded"))
                    continue
                emit(pool.run(cfg, budget.timeout(), configs[i + 1] if i + 1 < len(configs) else None))
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - budget.start
    print(f"[bench] done in {elapsed:.0f} s", flush=True)
    try:
        from . import report

        md = report.write_outputs(jsonl, suite=args.suite, out_dir=out_dir, docs=args.docs)
        print(f"[bench] wrote {md}" + (f" and updated {args.docs}" if args.docs else ""), flush=True)
    except Exception as e:  # noqa: BLE001 - the jsonl is what matters
        print(f"[bench] report failed: {_short(e)}", flush=True)
        traceback.print_exc()
    return records


def max_batch(pool: ChildPool, cfg: dict[str, Any], budget: Budget, args: argparse.Namespace) -> dict[str, Any]:
    """Largest batch size that trains (``cfg`` with 1 warm-up + 2 timed steps):
    doubling from ``--batch-size`` until out of memory (halving if that size
    does not fit), then bisection to within ``--max-batch-tol`` (3%)."""
    probes: list[dict[str, Any]] = []
    env: dict[str, Any] = {}

    def probe(b: int) -> str:
        rec = pool.run(dict(cfg, batch_size=b, warmup=1, steps=2), budget.timeout(), next_cfg=cfg)
        probes.append({k: rec.get(k) for k in ("batch_size", "status", "examples_per_s", "peak_mem_mb", "error")})
        if rec.get("env") and not env:
            env.update(rec["env"])  # GPU and versions, as the probes' processes saw them
        print("[bench]   probe " + _fmt(rec), flush=True)
        return rec["status"]

    lo, hi = 0, None
    b = int(cfg["batch_size"])
    status = "ok"
    while hi is None and b <= args.max_batch_cap and not budget.exceeded():  # double until OOM
        status = probe(b)
        if status == "ok":
            lo, b = b, b * 2
        elif status == "OOM":
            hi = b
        else:
            break
    if hi is not None and lo == 0:  # the first size did not fit: halve until one does
        b = hi // 2
        while b >= 1 and not budget.exceeded():
            status = probe(b)
            if status == "ok":
                lo = b
                break
            if status != "OOM":
                break
            hi, b = b, b // 2
    while hi is not None and lo > 0 and hi - lo > max(1, int(args.max_batch_tol * lo)) and not budget.exceeded():
        mid = (lo + hi) // 2
        status = probe(mid)
        if status == "ok":
            lo = mid
        elif status == "OOM":
            hi = mid
        else:
            break
    rec = dict(cfg, probes=probes, max_batch=lo or None, first_oom=hi)
    if env:
        rec["env"] = env
    ok = [p for p in probes if p["status"] == "ok"]
    if ok:
        best = max(ok, key=lambda p: p["batch_size"])
        rec.update(
            examples_per_s=best["examples_per_s"], peak_mem_mb=best["peak_mem_mb"], batch_size=best["batch_size"]
        )
    if lo and (hi is not None or b > args.max_batch_cap):
        rec["status"] = "ok"
    elif budget.exceeded():
        rec["status"] = "partial" if lo else "skipped"
        rec["error"] = "time budget exceeded"
    else:
        rec["status"] = status if not lo else "partial"
        bad = [p for p in probes if p["status"] not in ("ok", "OOM")]
        if bad:
            rec["error"] = bad[-1].get("error")
    return rec


# ----------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="core", choices=sorted(SUITES), help="which table (default core = bitfit + full)")
    p.add_argument("--out", default="results", help="directory for <suite>.jsonl, <suite>.md and PNG charts")
    p.add_argument("--models", default="", help="comma-separated subset of the suite's models")
    p.add_argument("--methods", default="", help=f"comma-separated subset of methods ({', '.join(METHODS)})")
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: the model's (32; 8 for llama1b and the scaling suite)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="override the text models' sequence length")
    p.add_argument("--image-size", type=int, default=None, help="override the vision models' image side")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; >= 10 for published numbers)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 3)")
    p.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast bf16, fp32 master weights"
    )
    p.add_argument(
        "--tf32",
        default="default",
        choices=["default", "off"],
        help="off: no TF32 anywhere (PyTorch's default: cuDNN convolutions may use TF32, matmuls not)",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny = toy model sizes (CPU checks)")
    p.add_argument(
        "--optimizer",
        default=None,
        choices=["sgd", "adamw"],
        help="same optimizer for every method (default: sgd; adamw for the sparta suite)",
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each model's methods this many times in turn (separate processes); the report "
        "takes each method's median throughput and largest peak memory",
    )
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no new configuration starts after it")
    p.add_argument("--config-timeout", type=float, default=180.0, help="seconds before a configuration is killed")
    p.add_argument("--max-batch-cap", type=int, default=8192, help="maxbatch suite: largest batch tried")
    p.add_argument("--max-batch-tol", type=float, default=0.03, help="maxbatch suite: relative precision")
    p.add_argument(
        "--opacus-unmodified",
        action="store_true",
        help="run Opacus on the unmodified model (it crashes on in-place residual adds / ReLUs)",
    )
    p.add_argument("--docs", default=None, help="also update this markdown file's section (e.g. docs/benchmarks.md)")
    p.add_argument("--no-prefork", action="store_true", help="do not start the next child while one runs")
    p.add_argument("--smoke", action="store_true", help="tiny GPT-2 + ResNet-GN on CPU, 1 + 3 steps (for the tests)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: '<json>' or '-' (stdin)
    p.add_argument("--preload", default="", help=argparse.SUPPRESS)
    p.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke or args.suite == "smoke":
        args.smoke = True
        args.suite = "smoke"
        args.size = "tiny"
        args.device = args.device or "cpu"
        args.batch_size = args.batch_size or 4
    if args.steps is None:
        args.steps = 3 if args.smoke else 10
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 3
    if args.one is None and args.device is None:
        args.device = _default_device()
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.repeat > 1 and args.suite == "maxbatch":
        p.error("--repeat does not apply to the maxbatch suite (a largest batch is found once)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        return child_main(args.one, args.preload, args.ready_file)
    raw = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.speed " + " ".join(shlex.quote(a) for a in raw)
    records = run_suite(args, command)
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
