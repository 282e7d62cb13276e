"""The `dpft train` job's options: :class:`TrainConfig`, their checks (:func:`validate`) and the
defaults each method and device gets (:func:`resolve`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..methods import registry
from .choices import (
    ACCOUNTANTS,
    CLIPPING_FNS,
    CLIPPING_MODES,
    CLIPPING_STYLES,
    DEVICES,
    LR_SCHEDULES,
    MAX_EPSILON,
    METHODS,
    MIN_EPSILON,
    OPTIMIZERS,
    PRIVATE_METHODS,
    SPARTA_SELECTIONS,
)
from .errors import ConfigError


class NotAvailableYet(ConfigError):
    """The requested method exists in the plan but has not landed in this version."""


# Fields that may change between an interrupted run and its --resume.
_OPERATIONAL = {
    "out",
    "resume",
    "overwrite",
    "device",
    "num_threads",
    "stop_after_steps",
    "progress",
    "checkpoint_every",
    "checkpoint_minutes",
    "config",
}

CHECKPOINT = "checkpoint.pt"
MONITOR_SIZE = 512  # evaluation examples used for the progress evaluations
EPSILON_POINTS = 10  # steps of a run whose metrics.jsonl row carries ε (plus the first and the last)


@dataclass
class TrainConfig:
    """All options of `dpft train` (the CLI flags, one to one). ``None`` = default."""

    model: str | None = None  # "minilm" (packaged), "cnn", a HF name/path
    dataset: str | None = None  # "rotten-tomatoes", "mnist", "fashion-mnist", file, HF name
    test_file: str | None = None  # evaluation file for a CSV/JSONL --dataset (default: hold out 20 %)
    text_column: str | None = None  # column names of a CSV/JSONL/HF dataset (default: found by name)
    label_column: str | None = None
    privacy_unit: str | None = None  # "example" (default) | "user": ε protects all of a user's examples
    user_column: str | None = None  # the user of each training example (CSV/JSONL/HF column; movie_name)
    method: str | None = None  # one of METHODS; default "bitfit"
    epsilon: float | None = None  # target ε; default 3
    delta: float | None = None  # default: the engine's (below 1/N)
    epochs: float | None = None
    batch_size: int | None = None  # logical (expected, under Poisson sampling)
    max_physical_batch_size: int | None = None
    lr: float | None = None
    head_lr: float | None = None  # lr of the new classification head (bitfit/lora: 1e-2)
    optimizer: str | None = None  # "adam" (default) | "sgd" (momentum 0.9)
    lr_schedule: str | None = None  # "constant" | "linear" (decay to 0) | "cosine"
    max_grad_norm: float | None = None
    clipping_fn: str | None = None  # "abadi" | "automatic"
    clipping_mode: str | None = None  # passed to the engine; "auto" by default
    clipping_style: str | None = None  # "all-layer" | "separate-head" (default when weights below the head train)
    accountant: str | None = None  # "pld" | "rdp" | "prv"
    poisson: bool | None = None  # Poisson sampling (default) or shuffled fixed batches
    device: str | None = None  # "auto" | "cpu" | "cuda" | "cuda:1" | "mps"
    bf16: bool | None = None  # bfloat16 autocast (GPU)
    gradient_checkpointing: bool | None = None  # HF activation checkpointing (non-reentrant)
    seed: int | None = None  # data subsample, head init, batch sampling, dropout
    dp_seed: int | None = None  # Poisson sampling + DP noise; default OS entropy (see docs)
    out: str | None = None
    resume: bool | None = None
    overwrite: bool | None = None
    max_seq_len: int | None = None
    train_size: int | str | None = None  # an int or "all"
    eval_size: int | str | None = None  # an int or "all"
    validation_size: int | None = None  # hold out this many training examples and evaluate on them
    lora_rank: int | None = None
    density: float | None = None  # sparta: fraction of rows trained per candidate weight (0.2)
    scoring_epochs: float | None = None  # sparta: epochs of the private scoring pass (GPU 1, CPU 0.5)
    warmup_epochs: float | None = None  # sparta: epochs of DP biases + head before scoring (0)
    sparta_selection: str | None = None  # sparta: "scores" (private, default) | "random" | "magnitude"
    dropout: float | None = None  # override every dropout probability (e.g. 0); None: model's
    num_threads: int | None = None
    eval_every: int | None = None  # steps between progress evaluations (default: 8 per run; 0: none)
    checkpoint_every: int | None = None  # steps between checkpoints (0: none by step count)
    checkpoint_minutes: float | None = None  # minutes between checkpoints (default 2; 0: none by time)
    stop_after_steps: int | None = None  # stop (checkpointed, resumable) after this many steps
    progress: bool | None = None  # progress bar

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------

# The default text job on a CPU: one epoch over sequences cut to 64 tokens, and at
# most 10,000 training examples, so that it finishes in a few minutes on 2 cores
# (the default Rotten Tomatoes job: about 100 s on an idle 2-core machine). On a GPU:
# all data, 128 tokens, 3 epochs.
CPU_TEXT_TRAIN_SIZE = 10_000
CPU_TEXT_MAX_SEQ_LEN = 64
CPU_TEXT_EPOCHS = 1
GPU_TEXT_MAX_SEQ_LEN = 128
GPU_TEXT_EPOCHS = 3
# SPARTA's private scoring pass: one epoch on a GPU, half of one on a CPU (its steps
# come out of the same ε budget as training, and cost as much time as training steps).
CPU_SCORING_EPOCHS = 0.5
GPU_SCORING_EPOCHS = 1.0

CPU_TEXT_BATCH = 128
GPU_TEXT_BATCH = 512
DEFAULT_CHECKPOINT_MINUTES = 2.0

# The per-method defaults (learning rates of body and head on GPU / CPU text jobs and on image
# jobs, the clipping style) are each method's own: dpft.methods.builtin, one file per method.


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    return dev


def _size(value, what: str) -> int | None:
    """An int, "all"/None (= everything) or a numeric string."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() in ("all", "full", "none", ""):
            return None
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"--{what} must be a positive integer or 'all', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"--{what} must be a positive integer or 'all', got {value!r}")
    return int(value)


def validate(cfg: TrainConfig) -> None:
    """Checks that need no data or model; raise ConfigError naming the option."""
    if cfg.method is not None and cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.privacy_unit not in (None, "example", "user"):
        raise ConfigError(f"unknown privacy unit {cfg.privacy_unit!r}; choose example or user")
    if cfg.privacy_unit == "user":
        if cfg.poisson is False:
            raise ConfigError("--privacy-unit user samples users (Poisson); --no-poisson is not supported with it")
    elif cfg.user_column is not None:
        raise ConfigError("--user-column needs --privacy-unit user")
    if cfg.checkpoint_minutes is not None and not (
        isinstance(cfg.checkpoint_minutes, (int, float))
        and not isinstance(cfg.checkpoint_minutes, bool)
        and math.isfinite(cfg.checkpoint_minutes)
        and cfg.checkpoint_minutes >= 0
    ):
        raise ConfigError(f"--checkpoint-minutes must be a non-negative number, got {cfg.checkpoint_minutes!r}")
    for name in ("epsilon", "lr", "head_lr", "max_grad_norm", "epochs", "scoring_epochs"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}")
    if cfg.epsilon is not None and isinstance(cfg.epsilon, (int, float)) and cfg.epsilon > MAX_EPSILON:
        raise ConfigError(
            f"--epsilon {cfg.epsilon:g} is above {MAX_EPSILON:g}: no meaningful guarantee (and σ "
            "would take minutes to calibrate); for no privacy use a nonprivate-* method"
        )
    if cfg.epsilon is not None and isinstance(cfg.epsilon, (int, float)) and 0 < cfg.epsilon < MIN_EPSILON:
        raise ConfigError(
            f"--epsilon {cfg.epsilon:g} is below {MIN_EPSILON:g}: the accountant cannot resolve an ε that small"
        )
    if cfg.clipping_style is not None and cfg.clipping_style not in CLIPPING_STYLES:
        raise ConfigError(f"unknown clipping style {cfg.clipping_style!r}; choose one of {', '.join(CLIPPING_STYLES)}")
    if cfg.clipping_mode is not None and cfg.clipping_mode not in CLIPPING_MODES:
        raise ConfigError(f"unknown clipping mode {cfg.clipping_mode!r}; choose one of {', '.join(CLIPPING_MODES)}")
    if cfg.density is not None and not (
        isinstance(cfg.density, (int, float)) and not isinstance(cfg.density, bool) and 0 < cfg.density <= 1
    ):
        raise ConfigError(f"--density must be in (0, 1], got {cfg.density!r}")
    if cfg.warmup_epochs is not None and not (
        isinstance(cfg.warmup_epochs, (int, float))
        and not isinstance(cfg.warmup_epochs, bool)
        and math.isfinite(cfg.warmup_epochs)
        and cfg.warmup_epochs >= 0
    ):
        raise ConfigError(f"--warmup-epochs must be a non-negative number, got {cfg.warmup_epochs!r}")
    if cfg.sparta_selection is not None and cfg.sparta_selection not in SPARTA_SELECTIONS:
        raise ConfigError(
            f"unknown SPARTA selection {cfg.sparta_selection!r}; choose one of {', '.join(SPARTA_SELECTIONS)}"
        )
    if cfg.method is not None and cfg.method != "sparta":
        for name in ("density", "scoring_epochs", "warmup_epochs", "sparta_selection"):
            if getattr(cfg, name) is not None:
                raise ConfigError(f"--{name.replace('_', '-')} applies to --method sparta only")
    if cfg.dropout is not None and not (isinstance(cfg.dropout, (int, float)) and 0 <= cfg.dropout < 1):
        raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout!r}")
    if cfg.delta is not None and not (0 < cfg.delta < 1):
        raise ConfigError(f"--delta must be in (0, 1), got {cfg.delta!r}")
    for name in ("batch_size", "max_physical_batch_size", "max_seq_len", "lora_rank", "num_threads", "validation_size"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.stop_after_steps is not None and (
        isinstance(cfg.stop_after_steps, bool) or not isinstance(cfg.stop_after_steps, int) or cfg.stop_after_steps <= 0
    ):
        raise ConfigError(
            f"--stop-after-steps must be a positive integer (leave it out for no limit), got {cfg.stop_after_steps!r}"
        )
    for name in ("eval_every", "checkpoint_every", "seed", "dp_seed"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a non-negative integer, got {v!r}")
    _size(cfg.train_size, "train-size")
    _size(cfg.eval_size, "eval-size")
    if cfg.clipping_fn is not None and cfg.clipping_fn not in CLIPPING_FNS:
        raise ConfigError(f"unknown clipping function {cfg.clipping_fn!r}; choose one of {', '.join(CLIPPING_FNS)}")
    if cfg.optimizer is not None and cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.lr_schedule is not None and cfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr schedule {cfg.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if cfg.accountant is not None and cfg.accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {cfg.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
    if cfg.device is not None and cfg.device.split(":")[0] not in DEVICES:
        raise ConfigError(f"unknown device {cfg.device!r}; choose auto, cpu, cuda[:N] or mps")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")


def resolve(
    cfg: TrainConfig, kind: str | None = None, device: torch.device | None = None, n_train_total: int | None = None
) -> tuple[TrainConfig, list[str]]:
    """Fill in every ``None`` of ``cfg``; returns the resolved copy and notes to print.

    ``kind`` ("text"/"image") and ``device`` decide the data-dependent defaults;
    when omitted they are derived from the dataset name and the machine.
    """
    validate(cfg)
    r = dataclasses.replace(cfg)
    notes: list[str] = []
    r.dataset = r.dataset or "rotten-tomatoes"
    if kind is None:
        kind = "image" if r.dataset.lower() in ("mnist", "fashion-mnist", "fashion_mnist", "fmnist") else "text"
    if r.method is None:
        # BiTFiT needs pretrained weights; the built-in CNN starts from scratch, so train all of it
        scratch_cnn = kind == "image" and (r.model is None or r.model.lower() in ("cnn", "smallcnn", "small-cnn"))
        r.method = "full" if scratch_cnn else "bitfit"
        if scratch_cnn:
            notes.append("image data with the built-in CNN (no pretrained weights): method full by default")
    r.device = r.device or "auto"
    if device is None:
        device = _pick_device(r.device)
    on_cpu = device.type == "cpu"
    private = r.method in PRIVATE_METHODS
    r.model = r.model or ("minilm" if kind == "text" else "cnn")
    r.epsilon = float(r.epsilon) if r.epsilon is not None else 3.0
    r.seed = 0 if r.seed is None else r.seed
    r.poisson = True if r.poisson is None else bool(r.poisson)
    r.privacy_unit = r.privacy_unit or "example"
    r.bf16 = bool(r.bf16)
    r.gradient_checkpointing = bool(r.gradient_checkpointing)
    r.resume, r.overwrite = bool(r.resume), bool(r.overwrite)
    r.clipping_fn = r.clipping_fn or "abadi"
    r.optimizer = r.optimizer or "adam"
    r.lr_schedule = r.lr_schedule or "constant"
    r.clipping_mode = r.clipping_mode or "auto"
    r.clipping_style = r.clipping_style or registry.get(r.method).clipping_style
    r.accountant = r.accountant or "pld"
    if r.max_grad_norm is None:
        method = registry.get(r.method)
        r.max_grad_norm = method.text_max_grad_norm(on_cpu) if kind == "text" else method.max_grad_norm
    r.max_grad_norm = float(r.max_grad_norm)
    r.lora_rank = r.lora_rank or 8
    if r.method == "sparta":
        r.density = float(r.density) if r.density is not None else 0.2
        r.warmup_epochs = float(r.warmup_epochs) if r.warmup_epochs is not None else 0.0
        # a public selection (random, magnitude) has no scoring pass: scoring_epochs is None
        r.sparta_selection = r.sparta_selection or "scores"
        if r.sparta_selection != "scores" and r.scoring_epochs is not None:
            notes.append(
                f"--sparta-selection {r.sparta_selection} runs no scoring pass: "
                f"--scoring-epochs {r.scoring_epochs:g} ignored"
            )
            r.scoring_epochs = None
        if r.sparta_selection == "scores" and r.scoring_epochs is None:
            r.scoring_epochs = CPU_SCORING_EPOCHS if on_cpu else GPU_SCORING_EPOCHS
            if on_cpu:
                notes.append(
                    f"CPU run: SPARTA scores rows over {CPU_SCORING_EPOCHS:g} epoch by default "
                    f"(--scoring-epochs to change; {GPU_SCORING_EPOCHS:g} on a GPU)"
                )
        if r.scoring_epochs is not None:
            r.scoring_epochs = float(r.scoring_epochs)
    elif any(getattr(r, k) is not None for k in ("density", "scoring_epochs", "warmup_epochs", "sparta_selection")):
        raise ConfigError(
            "--density, --scoring-epochs, --warmup-epochs and --sparta-selection apply to --method sparta only"
        )
    r.checkpoint_every = 0 if r.checkpoint_every is None else r.checkpoint_every
    r.checkpoint_minutes = DEFAULT_CHECKPOINT_MINUTES if r.checkpoint_minutes is None else float(r.checkpoint_minutes)
    r.progress = True if r.progress is None else bool(r.progress)
    _resolve_lr(r, kind, on_cpu)
    if r.dropout is None and private:
        # measured on the validation split: dropout only adds variance to the noisy DP updates
        r.dropout = 0.0
    given = {"batch_size": r.batch_size is not None, "epochs": r.epochs is not None}
    if kind == "text":
        _resolve_text_sizes(r, on_cpu, private, n_train_total, notes)
    else:
        _resolve_image_sizes(r, private)
    if n_train_total is not None:
        _fit_small_data(r, _effective_train_size(r, n_train_total), private, given, notes)
    r.eval_size = r.eval_size if r.eval_size is not None else "all"
    if isinstance(r.train_size, int) is False:
        r.train_size = "all" if _size(r.train_size, "train-size") is None else _size(r.train_size, "train-size")
    if isinstance(r.eval_size, int) is False:
        r.eval_size = "all" if _size(r.eval_size, "eval-size") is None else _size(r.eval_size, "eval-size")
    if r.bf16 and device.type == "cpu":
        notes.append("--bf16 on a CPU: bfloat16 autocast is usually slower there")
    if not private:
        notes.append(f"method {r.method}: NON-PRIVATE baseline, no DP guarantee (ε = ∞)")
    elif not r.poisson:
        notes.append(
            "--no-poisson: shuffled fixed-size batches; the reported ε assumes Poisson "
            "sampling and is then only a heuristic, not a proof"
        )
    return r, notes


def _resolve_lr(r: TrainConfig, kind: str, on_cpu: bool) -> None:
    """The learning rates of the method (Adam), tuned per method and device (the method's
    registered defaults: :class:`dpft.methods.registry.Method`)."""
    method = registry.get(r.method)
    if r.lr is None:
        r.lr = method.text_lr(on_cpu) if kind == "text" else method.image_lr
    if r.head_lr is None:
        # The head is new (randomly initialised) and wants a larger step than the body;
        # without its own default it shares --lr.
        head_lr = method.text_head_lr(on_cpu) if kind == "text" else None
        r.head_lr = head_lr or r.lr


def _resolve_text_sizes(
    r: TrainConfig, on_cpu: bool, private: bool, n_train_total: int | None, notes: list[str]
) -> None:
    """Sequence length, training subsample, epochs and batch sizes of a text job."""
    if r.max_seq_len is None:
        r.max_seq_len = CPU_TEXT_MAX_SEQ_LEN if on_cpu else GPU_TEXT_MAX_SEQ_LEN
        if on_cpu:
            notes.append(
                f"CPU run: sequences truncated to {r.max_seq_len} tokens by default "
                f"(--max-seq-len to change; {GPU_TEXT_MAX_SEQ_LEN} on a GPU)"
            )
    if r.train_size is None:
        if on_cpu and n_train_total is not None and n_train_total > CPU_TEXT_TRAIN_SIZE:
            r.train_size = CPU_TEXT_TRAIN_SIZE
            notes.append(
                f"CPU run: training on a random {CPU_TEXT_TRAIN_SIZE:,} of {n_train_total:,} "
                "training examples by default (--train-size all for everything; a GPU "
                "uses all)"
            )
        else:
            r.train_size = "all"
    if r.epochs is None:
        if private:
            r.epochs = CPU_TEXT_EPOCHS if on_cpu else GPU_TEXT_EPOCHS
            if on_cpu:
                notes.append(
                    f"CPU run: {CPU_TEXT_EPOCHS:g} epoch(s) by default (--epochs to change; {GPU_TEXT_EPOCHS} on a GPU)"
                )
        else:
            r.epochs = 2
    if r.batch_size is None:
        r.batch_size = (CPU_TEXT_BATCH if on_cpu else GPU_TEXT_BATCH) if private else 32
    if r.max_physical_batch_size is None:
        r.max_physical_batch_size = 64 if on_cpu else 256


def _resolve_image_sizes(r: TrainConfig, private: bool) -> None:
    r.max_seq_len = r.max_seq_len or None  # unused for images (0 would fail validate() on --resume)
    r.train_size = r.train_size if r.train_size is not None else "all"
    if r.epochs is None:
        r.epochs = 10 if private else 3
    if r.batch_size is None:
        r.batch_size = 256 if private else 64
    if r.max_physical_batch_size is None:
        r.max_physical_batch_size = 256


def _effective_train_size(r: TrainConfig, n_train_total: int) -> int:
    """Training examples after --train-size and --validation-size (as the job will see them)."""
    n = (
        n_train_total - (r.validation_size or 0)
        if r.validation_size and r.validation_size < n_train_total
        else n_train_total
    )
    size = _size(r.train_size, "train-size")
    return n if size is None else min(size, n)


#: A small training set still gets at least this many optimizer steps by default
#: (more epochs), and at least SMALL_DATA_STEPS_PER_EPOCH steps per epoch (a smaller batch).
SMALL_DATA_MIN_STEPS = 60
SMALL_DATA_STEPS_PER_EPOCH = 8
SMALL_DATA_MAX_EPOCHS = 30


def _fit_small_data(r: TrainConfig, n: int, private: bool, given: dict[str, bool], notes: list[str]) -> None:
    """Defaults that fit a small training set: a default batch that would give fewer than
    SMALL_DATA_STEPS_PER_EPOCH steps per epoch shrinks (a power of two, at least 8), and
    default epochs grow until the run has SMALL_DATA_MIN_STEPS steps (at most
    SMALL_DATA_MAX_EPOCHS). Options given explicitly are never changed; what was
    chosen is said in a note."""
    if n < 2:
        return
    changed = []
    if not given["batch_size"] and n < SMALL_DATA_STEPS_PER_EPOCH * r.batch_size:
        b = 2 ** int(math.floor(math.log2(max(1, n // SMALL_DATA_STEPS_PER_EPOCH))))
        r.batch_size = max(1, min(r.batch_size, max(8, b), n))
        changed.append(f"logical batch {r.batch_size}")
    steps_per_epoch = math.ceil(n / r.batch_size)
    if not given["epochs"] and r.epochs * steps_per_epoch < SMALL_DATA_MIN_STEPS:
        r.epochs = float(min(SMALL_DATA_MAX_EPOCHS, math.ceil(SMALL_DATA_MIN_STEPS / steps_per_epoch)))
        if r.epochs.is_integer():
            r.epochs = int(r.epochs)
        changed.append(f"{r.epochs:g} epochs")
    if changed:
        steps = max(1, math.ceil(r.epochs * steps_per_epoch))
        notes.append(
            f"small training set ({n:,} examples): {' and '.join(changed)} by default, "
            f"{steps} steps (--batch-size / --epochs to change)"
        )
