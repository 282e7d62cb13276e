"""What a job runs on before anything trains: its data on tensors (:class:`Encoded`, the
batch plan), its output folder and resume state, the process group, and the job record (:class:`_Job`)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import offline
from ..checkpoint import atomic_write
from .choices import PRIVATE_METHODS
from .errors import ConfigError
from .offline import TaskData
from .config import CHECKPOINT, TrainConfig, _OPERATIONAL


# ---------------------------------------------------------------------------
# Data on tensors
# ---------------------------------------------------------------------------


class Encoded:
    """Tokenised text (ragged lists of ids, padded per physical batch) or image tensors."""

    def __init__(self, task: TaskData, tokenizer=None, max_seq_len: int = 0):
        self.kind = task.kind
        self.y_train = torch.as_tensor(task.y_train, dtype=torch.long)
        self.y_test = torch.as_tensor(task.y_test, dtype=torch.long)
        if task.kind == "text":
            self.pad_id = tokenizer.pad_token_id or 0
            enc = lambda texts: tokenizer(list(texts), truncation=True, max_length=max_seq_len)["input_ids"]  # noqa: E731
            self.x_train, self.x_test = enc(task.x_train), enc(task.x_test)
            self.len_train = np.array([len(x) for x in self.x_train])
            self.len_test = np.array([len(x) for x in self.x_test])
        else:
            self.x_train = torch.as_tensor(task.x_train)
            self.x_test = torch.as_tensor(task.x_test)

    def batch(self, split: str, idx: np.ndarray, device: torch.device) -> tuple[dict, torch.Tensor]:
        y = (self.y_train if split == "train" else self.y_test)[torch.as_tensor(idx, dtype=torch.long)]
        if self.kind == "image":
            x = (self.x_train if split == "train" else self.x_test)[torch.as_tensor(idx, dtype=torch.long)]
            return {"x": x.to(device)}, y.to(device)
        seqs = self.x_train if split == "train" else self.x_test
        rows = [seqs[int(i)] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, y.to(device)

    def lengths(self, split: str) -> np.ndarray | None:
        if self.kind != "text":
            return None
        return self.len_train if split == "train" else self.len_test


def physical_chunks(idx: np.ndarray, max_physical: int, lengths: np.ndarray | None) -> list[np.ndarray]:
    """Split a logical batch into physical batches; text is sorted by length to cut padding.

    The order of examples inside a logical batch does not change the privatized
    gradient (a sum over examples), so sorting is free.
    """
    if len(idx) == 0:
        return []
    if lengths is not None:
        idx = idx[np.argsort(lengths[idx], kind="stable")]
    k = math.ceil(len(idx) / max_physical)
    return [c for c in np.array_split(idx, k) if len(c)]


class BatchPlan:
    """The logical batches of the run: batch ``i`` of epoch ``e`` is a pure function
    of (secret seed, e, i), so a resumed run draws exactly the batches the
    interrupted one would have.

    Poisson (the default, what the accountant assumes): each example joins each
    batch independently with probability q = batch_size / n, via
    :class:`dpft.data.PoissonBatchSampler` (sizes vary, batches may be empty).
    Otherwise: a seeded permutation per epoch cut into batches of ``batch_size``.
    """

    def __init__(
        self, n: int, batch_size: int, steps_per_epoch: int, seed: int, poisson: bool, units: np.ndarray | None = None
    ):
        self.n, self.batch_size, self.steps, self.seed, self.poisson = n, batch_size, steps_per_epoch, seed, poisson
        self._sampler = None
        if units is not None:  # --privacy-unit user: Poisson sampling of users (all their examples)
            from ..data import UserPoissonBatchSampler

            self._sampler = UserPoissonBatchSampler(
                torch.as_tensor(units), batch_size=batch_size, steps=steps_per_epoch, seed=seed
            )
        elif poisson:
            from ..data import PoissonBatchSampler

            # the global batch on every process (under torchrun each takes its share of it)
            self._sampler = PoissonBatchSampler(
                n, batch_size=min(batch_size, n), steps=steps_per_epoch, seed=seed, rank=0, world_size=1
            )
        self._perm_epoch, self._perm = None, None

    def batch(self, epoch: int, i: int) -> np.ndarray:
        if self._sampler is not None:
            return np.asarray(self._sampler.batch(epoch, i), dtype=np.int64)
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, 1_000_003, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n), epoch
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]


def _derive_seed(secret: int, stream: int) -> int:
    """A 256-bit seed of stream ``stream`` from the run's secret (noise and batches
    take all its bits: no 2^63 or 2^32 seed space to search)."""
    state = np.random.SeedSequence([secret, stream]).generate_state(8, np.uint32)
    return sum(int(w) << (32 * i) for i, w in enumerate(state))


# ---------------------------------------------------------------------------
# Output directory, checkpoint
# ---------------------------------------------------------------------------


def _default_out(r: TrainConfig) -> str:
    stem = Path(r.dataset).stem if os.path.exists(r.dataset) else r.dataset.replace("/", "_")
    return os.path.join("runs", f"{stem}-{r.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: an existing run needs --resume or --overwrite; other files, a new dir.

    Also checks that the directory can be written (a read-only folder is a one-line error
    before any work). The directory itself is created when the first file is written.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    has_run = (out / "config.json").is_file()
    if resume:
        if not has_run or not (out / CHECKPOINT).is_file():
            raise ConfigError(f"--resume: {out} holds no dpft checkpoint to resume from")
        _check_writable(out)
        return
    if out.is_dir() and any(out.iterdir()):
        if has_run and not overwrite:
            raise ConfigError(
                f"--out {out} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        if not has_run:
            raise ConfigError(f"--out {out} is not empty and holds no dpft run; choose another directory")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """``out`` (or the nearest existing folder above it) accepts new files."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == out else f" (its existing parent {probe} is not writable)"
        raise ConfigError(f"--out {out} cannot be written{where}: choose a folder you can write to")


def _check_resume_config(saved: dict, r: TrainConfig) -> None:
    diffs = [
        f"{k} (run: {saved.get(k)!r}, now: {v!r})"
        for k, v in r.to_dict().items()
        if k not in _OPERATIONAL and k in saved and saved[k] != v
    ]
    if diffs:
        raise ConfigError("--resume with a different configuration: " + "; ".join(diffs))


def _read_config_json(out: Path) -> dict:
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"--resume: {path} cannot be read ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the run cannot be resumed"
        ) from e
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} does not hold a dpft configuration")
    return saved


def merge_resume_config(cfg: TrainConfig) -> TrainConfig:
    """For --resume: the saved configuration, overridden by the options given now."""
    saved = _read_config_json(Path(cfg.out))
    unknown = sorted(set(saved) - set(TrainConfig.field_names()))
    if unknown:
        raise ConfigError(
            f"--resume: {Path(cfg.out) / 'config.json'} has options this dpft does not know "
            f"({', '.join(unknown[:3])}); it was written by another version"
        )
    # a stop point belongs to the interrupted invocation, not to the run
    merged = {k: saved.get(k) for k in TrainConfig.field_names() if k not in ("stop_after_steps", "overwrite")}
    for k, v in cfg.to_dict().items():
        if v is not None:
            merged[k] = v
    return TrainConfig(**merged)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, default=offline.json_default) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()), what="file")


# ---------------------------------------------------------------------------
# The job record (what the stages fill in) and the process group
# ---------------------------------------------------------------------------


def _fmt_eps(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "inf"
    return f"{x:.3f}"


class _Spent:
    """The privacy spent so far, for the report on every way out of a run.

    ``source`` is the engine (or the SPARTA driver, whose ledger also counts its
    scoring steps) once one exists; before that nothing private has been released.
    """

    def __init__(self) -> None:
        self.source: Any = None

    def epsilon(self) -> float | None:
        return None if self.source is None else float(self.source.epsilon)

    def text(self) -> str:
        eps = self.epsilon()
        if eps is None:
            return "no private step was taken (no privacy spent)"
        delta = getattr(self.source, "target_delta", None)
        d = f", δ = {delta:.3g}" if delta is not None else ""
        return f"ε spent so far {_fmt_eps(eps)}{d} (spent whether or not the run finishes)"


@dataclass
class _Job:
    """What one run is made of: the resolved options, the data, the model and its privacy."""

    r: TrainConfig
    notes: list[str]
    log: Callable[[str], None]
    world: "_World"
    device: torch.device
    out: Path
    task: TaskData
    t_start: float
    data: Any = None  # Encoded
    model: Any = None
    net: Any = None  # the model as trained (DDP-wrapped under torchrun)
    tokenizer: Any = None
    trainable: int = 0
    total: int = 0
    n_train: int = 0
    steps_per_epoch: int = 0
    steps_total: int = 0
    dp_secret: int = 0
    plan: Any = None  # BatchPlan
    ckpt: dict | None = None
    autocast: Callable = None  # type: ignore[assignment]
    optimizer: Any = None
    engine: Any = None
    sp: Any = None  # SPARTA driver
    units: Any = None  # --privacy-unit user: the user (0..U-1) of each training example
    n_units: int = 0  # training examples, or distinct users: the accountant's N
    batch_given: bool = True  # --batch-size given (else a user-level default is derived)

    @property
    def user_level(self) -> bool:
        return self.r.privacy_unit == "user" and self.private

    @property
    def private(self) -> bool:
        return self.r.method in PRIVATE_METHODS


class _World:
    """The process group of a ``torchrun`` launch (or a single process)."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        self.backend = ""
        self.owned = False
        if self.size <= 1:
            self.size, self.rank = 1, 0
            return
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(self.backend)
            self.owned = True
        self.size, self.rank = dist.get_world_size(), dist.get_rank()

    def same(self, value):
        """``value`` as rank 0 has it (a default output name, a random seed)."""
        if self.size == 1:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            self.dist.barrier()

    def sum(self, *values: float) -> tuple[float, ...]:
        """Sums over the ranks (the loss and accuracy of the global batch)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.backend == "nccl" else "cpu")
        self.dist.all_reduce(t)
        return tuple(float(v) for v in t.tolist())

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` when there are several processes."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()
            self.owned = False
