"""The `dpft train` job as a library function: ``dpft.train.train(TrainConfig(...))``.

One private fine-tuning run, start to finish: load the model and the data
(offline by default, see :mod:`dpft.offline`), pick the trainable parameters for
the method, wrap the optimizer in a :class:`dpft.PrivacyEngine` calibrated to the
target ε, train with Poisson-sampled logical batches split into physical
batches, evaluate, and write everything a user needs into ``out``:

``config.json``   the resolved configuration (every default filled in)
``metrics.jsonl`` one JSON line per optimizer step (loss, ε so far, ...) and per evaluation
``summary.json``  the final numbers (accuracy, majority baseline, ε, δ, σ, steps, time, memory)
``report.png``    training loss, test accuracy and ε against step (needs matplotlib)
``checkpoint.pt`` trainable parameters, optimizer, engine ledger, sampler position and
                  RNG states, so that ``--resume`` continues the run exactly

Every field of :class:`TrainConfig` defaults to ``None`` = "choose for me"; the
choices depend on the data kind and on the device (on a CPU the default text
job subsamples the training set and shortens sequences so that it finishes in
a few minutes, and says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import offline
from .checkpoint import CheckpointError, atomic_save, atomic_write, read_checkpoint
from .choices import (ACCOUNTANTS, CLIPPING_FNS, CLIPPING_MODES, CLIPPING_STYLES, DEVICES, LR_SCHEDULES, MAX_EPSILON, METHODS,
                      MIN_EPSILON, OPTIMIZERS, PRIVATE_METHODS, SPARTA_SELECTIONS)
from .errors import ConfigError, DataUnavailable, RunFailed
from .offline import TaskData

__all__ = [
    "ConfigError",
    "NotAvailableYet",
    "TrainConfig",
    "METHODS",
    "PRIVATE_METHODS",
    "resolve",
    "train",
]


class NotAvailableYet(ConfigError):
    """The requested method exists in the plan but has not landed in this version."""


# Fields that may change between an interrupted run and its --resume.
_OPERATIONAL = {"out", "resume", "overwrite", "device", "num_threads", "stop_after_steps",
                "progress", "checkpoint_every", "checkpoint_minutes", "config"}

CHECKPOINT = "checkpoint.pt"
MONITOR_SIZE = 512  # evaluation examples used for the progress evaluations
EPSILON_POINTS = 10  # steps of a run whose metrics.jsonl row carries ε (plus the first and the last)


@dataclass
class TrainConfig:
    """All options of `dpft train` (the CLI flags, one to one). ``None`` = default."""

    model: str | None = None            # "minilm" (packaged), "cnn", a HF name/path
    dataset: str | None = None          # "rotten-tomatoes", "mnist", "fashion-mnist", file, HF name
    test_file: str | None = None        # evaluation file for a CSV/JSONL --dataset (default: hold out 20 %)
    text_column: str | None = None      # column names of a CSV/JSONL/HF dataset (default: found by name)
    label_column: str | None = None
    privacy_unit: str | None = None     # "example" (default) | "user": ε protects all of a user's examples
    user_column: str | None = None      # the user of each training example (CSV/JSONL/HF column; movie_name)
    method: str | None = None           # one of METHODS; default "bitfit"
    epsilon: float | None = None        # target ε; default 3
    delta: float | None = None          # default: the engine's (below 1/N)
    epochs: float | None = None
    batch_size: int | None = None       # logical (expected, under Poisson sampling)
    max_physical_batch_size: int | None = None
    lr: float | None = None
    head_lr: float | None = None        # lr of the new classification head (bitfit/lora: 1e-2)
    optimizer: str | None = None        # "adam" (default) | "sgd" (momentum 0.9)
    lr_schedule: str | None = None      # "constant" | "linear" (decay to 0) | "cosine"
    max_grad_norm: float | None = None
    clipping_fn: str | None = None      # "abadi" | "automatic"
    clipping_mode: str | None = None    # passed to the engine; "auto" by default
    clipping_style: str | None = None   # "all-layer" | "separate-head" (default when weights below the head train)
    accountant: str | None = None       # "pld" | "rdp" | "prv"
    poisson: bool | None = None         # Poisson sampling (default) or shuffled fixed batches
    device: str | None = None           # "auto" | "cpu" | "cuda" | "cuda:1" | "mps"
    bf16: bool | None = None            # bfloat16 autocast (GPU)
    seed: int | None = None             # data subsample, head init, batch sampling, dropout
    dp_seed: int | None = None          # Poisson sampling + DP noise; default OS entropy (see docs)
    out: str | None = None
    resume: bool | None = None
    overwrite: bool | None = None
    max_seq_len: int | None = None
    train_size: int | str | None = None  # an int or "all"
    eval_size: int | str | None = None   # an int or "all"
    validation_size: int | None = None   # hold out this many training examples and evaluate on them
    lora_rank: int | None = None
    density: float | None = None        # sparta: fraction of rows trained per candidate weight (0.2)
    scoring_epochs: float | None = None  # sparta: epochs of the private scoring pass (GPU 1, CPU 0.5)
    warmup_epochs: float | None = None   # sparta: epochs of DP biases + head before scoring (0)
    sparta_selection: str | None = None  # sparta: "scores" (private, default) | "random" | "magnitude"
    dropout: float | None = None        # override every dropout probability (e.g. 0); None: model's
    num_threads: int | None = None
    eval_every: int | None = None       # steps between progress evaluations (default: 8 per run; 0: none)
    checkpoint_every: int | None = None  # steps between checkpoints (0: none by step count)
    checkpoint_minutes: float | None = None  # minutes between checkpoints (default 2; 0: none by time)
    stop_after_steps: int | None = None  # stop (checkpointed, resumable) after this many steps
    progress: bool | None = None        # progress bar

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

# Adam learning rates of the text methods (GPU defaults: 3 epochs at batch 512 and 128
# tokens; the CPU job: CPU_TEXT_EPOCHS at batch 128 and 64 tokens). docs/utility.md's GPU
# search found DP full fine-tuning at lr 5e-4 stuck at the majority class (57 %) and 1.5e-3
# at 75 % (validation split): 1.5e-3 is the GPU default. On the CPU job (79 noisier steps)
# full fine-tuning moves the body slowly (1e-4) and the new head at 1e-2 like the other
# methods; clipped as one group its head stalled at the majority class at both 3e-4 and 5e-5.
_DEFAULT_HEAD_LR = {"bitfit": 1e-2, "lora": 1e-2, "sparta": 1e-2, "nonprivate-bitfit": 1e-2}
_DEFAULT_LR = {
    "bitfit": 3e-3, "last-layer": 3e-2, "lora": 2e-3, "full": 1.5e-3, "sparta": 1e-3,
    "nonprivate-bitfit": 1e-3, "nonprivate-full": 5e-5,
}
_DEFAULT_HEAD_LR_CPU = {**_DEFAULT_HEAD_LR, "full": 1e-2}
_DEFAULT_LR_CPU = {**_DEFAULT_LR, "full": 1e-4}
# Where weight matrices below the new head train, their per-example gradients grow with the
# head's weights and, clipped together with the head's, squeeze the head's share of the
# clipped gradient until the head stops learning (measured: DP full fine-tuning stalled at the
# majority class). Clipped as its own group the head keeps R/√2 whatever the rest does.
# (DP-LoRA learned on the CPU job clipped as one group, 74.5 % against 57.0 %, so it keeps that.)
_DEFAULT_CLIPPING_STYLE = {"full": "separate-head", "sparta": "separate-head"}


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
        if cfg.method == "sparta":
            raise ConfigError("--privacy-unit user with --method sparta is not supported by dpft train yet "
                              "(the library supports it: PrivacyEngine(privacy_unit='user'))")
        if cfg.poisson is False:
            raise ConfigError("--privacy-unit user samples users (Poisson); --no-poisson is not supported with it")
    elif cfg.user_column is not None:
        raise ConfigError("--user-column needs --privacy-unit user")
    if cfg.checkpoint_minutes is not None and not (
            isinstance(cfg.checkpoint_minutes, (int, float)) and not isinstance(cfg.checkpoint_minutes, bool)
            and math.isfinite(cfg.checkpoint_minutes) and cfg.checkpoint_minutes >= 0):
        raise ConfigError(f"--checkpoint-minutes must be a non-negative number, got {cfg.checkpoint_minutes!r}")
    for name in ("epsilon", "lr", "head_lr", "max_grad_norm", "epochs", "scoring_epochs"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)
                              or not math.isfinite(v) or v <= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}")
    if cfg.epsilon is not None and isinstance(cfg.epsilon, (int, float)) and cfg.epsilon > MAX_EPSILON:
        raise ConfigError(f"--epsilon {cfg.epsilon:g} is above {MAX_EPSILON:g}: no meaningful guarantee (and σ "
                          "would take minutes to calibrate); for no privacy use a nonprivate-* method")
    if cfg.epsilon is not None and isinstance(cfg.epsilon, (int, float)) and 0 < cfg.epsilon < MIN_EPSILON:
        raise ConfigError(f"--epsilon {cfg.epsilon:g} is below {MIN_EPSILON:g}: the accountant cannot resolve "
                          "an ε that small")
    if cfg.clipping_style is not None and cfg.clipping_style not in CLIPPING_STYLES:
        raise ConfigError(f"unknown clipping style {cfg.clipping_style!r}; choose one of {', '.join(CLIPPING_STYLES)}")
    if cfg.clipping_mode is not None and cfg.clipping_mode not in CLIPPING_MODES:
        raise ConfigError(f"unknown clipping mode {cfg.clipping_mode!r}; choose one of {', '.join(CLIPPING_MODES)}")
    if cfg.density is not None and not (isinstance(cfg.density, (int, float)) and not isinstance(cfg.density, bool)
                                        and 0 < cfg.density <= 1):
        raise ConfigError(f"--density must be in (0, 1], got {cfg.density!r}")
    if cfg.warmup_epochs is not None and not (isinstance(cfg.warmup_epochs, (int, float))
                                              and not isinstance(cfg.warmup_epochs, bool)
                                              and math.isfinite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0):
        raise ConfigError(f"--warmup-epochs must be a non-negative number, got {cfg.warmup_epochs!r}")
    if cfg.sparta_selection is not None and cfg.sparta_selection not in SPARTA_SELECTIONS:
        raise ConfigError(f"unknown SPARTA selection {cfg.sparta_selection!r}; choose one of "
                          f"{', '.join(SPARTA_SELECTIONS)}")
    if cfg.method is not None and cfg.method != "sparta":
        for name in ("density", "scoring_epochs", "warmup_epochs", "sparta_selection"):
            if getattr(cfg, name) is not None:
                raise ConfigError(f"--{name.replace('_', '-')} applies to --method sparta only")
    if cfg.dropout is not None and not (isinstance(cfg.dropout, (int, float)) and 0 <= cfg.dropout < 1):
        raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout!r}")
    if cfg.delta is not None and not (0 < cfg.delta < 1):
        raise ConfigError(f"--delta must be in (0, 1), got {cfg.delta!r}")
    for name in ("batch_size", "max_physical_batch_size", "max_seq_len", "lora_rank", "num_threads",
                 "validation_size"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.stop_after_steps is not None and (isinstance(cfg.stop_after_steps, bool)
                                             or not isinstance(cfg.stop_after_steps, int)
                                             or cfg.stop_after_steps <= 0):
        raise ConfigError(f"--stop-after-steps must be a positive integer (leave it out for no limit), "
                          f"got {cfg.stop_after_steps!r}")
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


def resolve(cfg: TrainConfig, kind: str | None = None, device: torch.device | None = None,
            n_train_total: int | None = None) -> tuple[TrainConfig, list[str]]:
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
    r.resume, r.overwrite = bool(r.resume), bool(r.overwrite)
    r.clipping_fn = r.clipping_fn or "abadi"
    r.optimizer = r.optimizer or "adam"
    r.lr_schedule = r.lr_schedule or "constant"
    r.clipping_mode = r.clipping_mode or "auto"
    r.clipping_style = r.clipping_style or _DEFAULT_CLIPPING_STYLE.get(r.method, "all-layer")
    r.accountant = r.accountant or "pld"
    r.max_grad_norm = float(r.max_grad_norm) if r.max_grad_norm is not None else 1.0
    r.lora_rank = r.lora_rank or 8
    if r.method == "sparta":
        r.density = float(r.density) if r.density is not None else 0.2
        r.warmup_epochs = float(r.warmup_epochs) if r.warmup_epochs is not None else 0.0
        # a public selection (random, magnitude) has no scoring pass: scoring_epochs is None
        r.sparta_selection = r.sparta_selection or "scores"
        if r.sparta_selection != "scores" and r.scoring_epochs is not None:
            notes.append(f"--sparta-selection {r.sparta_selection} runs no scoring pass: "
                         f"--scoring-epochs {r.scoring_epochs:g} ignored")
            r.scoring_epochs = None
        if r.sparta_selection == "scores" and r.scoring_epochs is None:
            r.scoring_epochs = CPU_SCORING_EPOCHS if on_cpu else GPU_SCORING_EPOCHS
            if on_cpu:
                notes.append(f"CPU run: SPARTA scores rows over {CPU_SCORING_EPOCHS:g} epoch by default "
                             f"(--scoring-epochs to change; {GPU_SCORING_EPOCHS:g} on a GPU)")
        if r.scoring_epochs is not None:
            r.scoring_epochs = float(r.scoring_epochs)
    elif any(getattr(r, k) is not None
             for k in ("density", "scoring_epochs", "warmup_epochs", "sparta_selection")):
        raise ConfigError("--density, --scoring-epochs, --warmup-epochs and --sparta-selection apply to "
                          "--method sparta only")
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
        notes.append("--no-poisson: shuffled fixed-size batches; the reported ε assumes Poisson "
                     "sampling and is then only a heuristic, not a proof")
    return r, notes


def _resolve_lr(r: TrainConfig, kind: str, on_cpu: bool) -> None:
    """The learning rates of the method (Adam), tuned per method and device (see the tables above)."""
    if r.lr is None:
        if kind == "text":
            r.lr = (_DEFAULT_LR_CPU if on_cpu else _DEFAULT_LR).get(r.method) or _DEFAULT_LR[r.method]
        else:
            r.lr = 2e-3 if r.method in ("nonprivate-full", "nonprivate-bitfit") else 1e-2
    if r.head_lr is None:
        # The head is new (randomly initialised) and wants a larger step than the body;
        # without its own default it shares --lr.
        table = (_DEFAULT_HEAD_LR_CPU if on_cpu else _DEFAULT_HEAD_LR) if kind == "text" else {}
        r.head_lr = table.get(r.method) or r.lr


def _resolve_text_sizes(r: TrainConfig, on_cpu: bool, private: bool, n_train_total: int | None,
                        notes: list[str]) -> None:
    """Sequence length, training subsample, epochs and batch sizes of a text job."""
    if r.max_seq_len is None:
        r.max_seq_len = CPU_TEXT_MAX_SEQ_LEN if on_cpu else GPU_TEXT_MAX_SEQ_LEN
        if on_cpu:
            notes.append(f"CPU run: sequences truncated to {r.max_seq_len} tokens by default "
                         f"(--max-seq-len to change; {GPU_TEXT_MAX_SEQ_LEN} on a GPU)")
    if r.train_size is None:
        if on_cpu and n_train_total is not None and n_train_total > CPU_TEXT_TRAIN_SIZE:
            r.train_size = CPU_TEXT_TRAIN_SIZE
            notes.append(f"CPU run: training on a random {CPU_TEXT_TRAIN_SIZE:,} of {n_train_total:,} "
                         "training examples by default (--train-size all for everything; a GPU "
                         "uses all)")
        else:
            r.train_size = "all"
    if r.epochs is None:
        if private:
            r.epochs = CPU_TEXT_EPOCHS if on_cpu else GPU_TEXT_EPOCHS
            if on_cpu:
                notes.append(f"CPU run: {CPU_TEXT_EPOCHS:g} epoch(s) by default (--epochs to change; "
                             f"{GPU_TEXT_EPOCHS} on a GPU)")
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
    n = n_train_total - (r.validation_size or 0) if r.validation_size and r.validation_size < n_train_total \
        else n_train_total
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
        notes.append(f"small training set ({n:,} examples): {' and '.join(changed)} by default, "
                     f"{steps} steps (--batch-size / --epochs to change)")


# ---------------------------------------------------------------------------
# Models and trainable parameters
# ---------------------------------------------------------------------------

_HEAD_NAMES = ("classifier", "score", "head", "fc", "out_proj")


def _head_param_names(model: nn.Module) -> list[str]:
    """Parameters of the classification head (newly initialised; trained by every method)."""
    for attr in _HEAD_NAMES:
        mod = getattr(model, attr, None)
        if isinstance(mod, nn.Module):
            return [f"{attr}.{n}" for n, _ in mod.named_parameters()]
    raise ConfigError(f"cannot find the classification head of {type(model).__name__} "
                      f"(looked for {', '.join(_HEAD_NAMES)})")


def _bitfit(model: nn.Module, extra: list[str], notes: list[str] | None = None) -> list[str]:
    from .methods.bitfit import bitfit
    # a bias-free model (Llama, T5, ...) first gets zero-initialised biases, said in the notes
    return list(bitfit(model, extra=extra, log=None if notes is None else notes.append))


def select_trainable(model: nn.Module, method: str, lora_rank: int = 8,
                     notes: list[str] | None = None) -> nn.Module:
    """Freeze/unfreeze (and for LoRA wrap) ``model`` for ``method``; returns the model to train.
    ``notes``: where a change to the model is said (bitfit adding biases)."""
    head = set(_head_param_names(model))
    base = method.replace("nonprivate-", "")
    if base == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if base == "bitfit":
        _bitfit(model, sorted(head), notes)
        return model
    if base == "sparta":
        # biases + head for now; the selected rows of the candidate weights join after
        # the private scoring pass (see _sparta_phases)
        _bitfit(model, sorted(head), notes)
        return model
    if base == "last-layer":
        for n, p in model.named_parameters():
            p.requires_grad_(n in head)
        return model
    if base == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ConfigError("method lora needs peft: pip install 'dpft[hf]'") from e
        targets = _lora_targets(model)
        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                            target_modules=targets, bias="none")
        peft_model = get_peft_model(model, config)
        for n, p in peft_model.named_parameters():
            if any(n.endswith(h) for h in head):
                p.requires_grad_(True)
        return peft_model
    raise NotAvailableYet(f"method {method!r} is not available yet")  # pragma: no cover


def _lora_targets(model: nn.Module) -> list[str]:
    leaf = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["query", "value"], ["q_proj", "v_proj"], ["q_lin", "v_lin"], ["c_attn"]):
        if set(pair) <= leaf:
            return pair
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and not any(n.startswith(h) for h in _HEAD_NAMES)]
    if not convs:
        raise ConfigError(f"method lora: no Linear layers to adapt in {type(model).__name__}")
    return convs


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability of ``model`` (nn.Dropout modules and attention dropout)."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = p
        for attr in ("dropout_prob", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, p)
    config = getattr(model, "config", None)
    for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if config is not None and isinstance(getattr(config, attr, None), float):
            setattr(config, attr, p)


def count_params(model: nn.Module) -> tuple[int, int]:
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


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


def _forward(model: nn.Module, inputs: dict) -> torch.Tensor:
    if "x" in inputs:
        return model(inputs["x"])
    return model(**inputs).logits


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

    def __init__(self, n: int, batch_size: int, steps_per_epoch: int, seed: int, poisson: bool,
                 units: np.ndarray | None = None):
        self.n, self.batch_size, self.steps, self.seed, self.poisson = n, batch_size, steps_per_epoch, seed, poisson
        self._sampler = None
        if units is not None:  # --privacy-unit user: Poisson sampling of users (all their examples)
            from .data import UserPoissonBatchSampler
            self._sampler = UserPoissonBatchSampler(torch.as_tensor(units), batch_size=batch_size,
                                                    steps=steps_per_epoch, seed=seed)
        elif poisson:
            from .data import PoissonBatchSampler
            # the global batch on every process (under torchrun each takes its share of it)
            self._sampler = PoissonBatchSampler(n, batch_size=min(batch_size, n), steps=steps_per_epoch,
                                                seed=seed, rank=0, world_size=1)
        self._perm_epoch, self._perm = None, None

    def batch(self, epoch: int, i: int) -> np.ndarray:
        if self._sampler is not None:
            return np.asarray(self._sampler.batch(epoch, i), dtype=np.int64)
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, 1_000_003, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n), epoch
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


def _derive_seed(secret: int, stream: int) -> int:
    """A 256-bit seed of stream ``stream`` from the run's secret (noise and batches
    take all its bits: no 2^63 or 2^32 seed space to search)."""
    state = np.random.SeedSequence([secret, stream]).generate_state(8, np.uint32)
    return sum(int(w) << (32 * i) for i, w in enumerate(state))


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, device: torch.device, batch_size: int,
             autocast: Callable, subset: np.ndarray | None = None,
             cancel: Callable[[], bool] | None = None) -> float | None:
    """Accuracy on the evaluation split (or on the examples ``subset`` of it).

    ``cancel``: checked before each batch; when it returns True the evaluation
    stops and ``None`` is returned (a Ctrl-C need not wait for a long evaluation).
    """
    was_training = model.training
    model.eval()
    order = np.arange(len(data.y_test)) if subset is None else np.asarray(subset)
    n = len(order)
    lens = data.lengths("test")
    if lens is not None:
        order = order[np.argsort(lens[order], kind="stable")]
    correct = 0
    try:
        for start in range(0, n, batch_size):
            if cancel is not None and cancel():
                return None
            idx = order[start:start + batch_size]
            inputs, y = data.batch("test", idx, device)
            with autocast():
                logits = _forward(model, inputs)
            correct += int((logits.argmax(-1) == y).sum())
    finally:
        model.train(was_training)
    return correct / max(n, 1)


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
            raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it or "
                              "--overwrite to replace it")
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
    diffs = [f"{k} (run: {saved.get(k)!r}, now: {v!r})" for k, v in r.to_dict().items()
             if k not in _OPERATIONAL and k in saved and saved[k] != v]
    if diffs:
        raise ConfigError("--resume with a different configuration: " + "; ".join(diffs))


def _read_config_json(out: Path) -> dict:
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: {path} cannot be read ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); the run cannot be resumed") from e
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} does not hold a dpft configuration")
    return saved


def merge_resume_config(cfg: TrainConfig) -> TrainConfig:
    """For --resume: the saved configuration, overridden by the options given now."""
    saved = _read_config_json(Path(cfg.out))
    unknown = sorted(set(saved) - set(TrainConfig.field_names()))
    if unknown:
        raise ConfigError(f"--resume: {Path(cfg.out) / 'config.json'} has options this dpft does not know "
                          f"({', '.join(unknown[:3])}); it was written by another version")
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
# The job
# ---------------------------------------------------------------------------


def _fmt_eps(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "inf"
    return f"{x:.3f}"


def clipping_groups(model: nn.Module, style: str):
    """The engine's ``clipping_style`` for ``style``: ``"all-layer"``, or for
    ``"separate-head"`` two groups of trainable parameter names, the new
    classification head and everything else (each clipped to R/√2); one group
    when only one of them trains."""
    if style == "all-layer":
        return "all-layer"
    inner = getattr(model, "module", model)  # DistributedDataParallel
    head = set(_head_param_names(_unwrap(inner)))
    names = [n for n, p in inner.named_parameters() if p.requires_grad]
    groups = [[n for n in names if _strip_peft(n) in head or any(n.endswith("." + h) for h in head)]]
    groups.append([n for n in names if n not in set(groups[0])])
    groups = [g for g in groups if g]
    return "all-layer" if len(groups) < 2 else groups


def _make_engine(model, r: TrainConfig, n_train: int, steps_total: int, noise_seed: int):
    import dpft
    engine_cls = getattr(dpft, "PrivacyEngine", None)
    if engine_cls is None:  # pragma: no cover - until the engine lands
        raise NotAvailableYet("private training needs dpft.PrivacyEngine, which is not available "
                              "in this build; use a nonprivate-* method")
    kwargs = dict(batch_size=r.batch_size, sample_size=n_train, target_epsilon=r.epsilon,
                  target_delta=r.delta, max_grad_norm=r.max_grad_norm, clipping_fn=r.clipping_fn,
                  clipping_style=clipping_groups(model, r.clipping_style), clipping_mode=r.clipping_mode,
                  accountant=r.accountant, loss_reduction="mean", noise_seed=noise_seed, poisson=r.poisson)
    if r.privacy_unit == "user":
        kwargs["privacy_unit"] = "user"  # n_train: the number of users
    try:
        engine = engine_cls(model, steps=steps_total, **kwargs)
    except NotImplementedError as e:
        raise NotAvailableYet(f"method {r.method}: the engine cannot train these parameters "
                              f"yet: {e}") from e
    except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: σ cannot be calibrated
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"method {r.method}: {msg}") from e
    return engine


def _make_sparta(model, r: TrainConfig, n_train: int):
    """The :class:`dpft.methods.sparta.Sparta` of the run: σ calibrated for warm-up +
    scoring + training steps (no scoring steps with a public ``--sparta-selection``);
    candidates are the Linear weights outside the head."""
    from .methods.sparta import Sparta, default_candidates

    class _Sparta(Sparta):
        """Each phase's engine clips with ``r.clipping_style`` over what trains in that phase."""

        def _engine(self, phase: str, **kw: Any):
            self.engine_kwargs["clipping_style"] = clipping_groups(self.model, r.clipping_style)
            return super()._engine(phase, **kw)

    head = sorted(_head_param_names(model))
    candidates = [n for n in default_candidates(model) if n not in head]
    try:
        return _Sparta(model, batch_size=r.batch_size, sample_size=n_train, target_epsilon=r.epsilon,
                      train_epochs=r.epochs, scoring_epochs=r.scoring_epochs, warmup_epochs=r.warmup_epochs,
                      density=r.density, selection=r.sparta_selection, candidates=candidates, always_train=head,
                      target_delta=r.delta, accountant=r.accountant, max_grad_norm=r.max_grad_norm,
                      clipping_fn=r.clipping_fn, clipping_style="all-layer", clipping_mode=r.clipping_mode,
                      loss_reduction="mean", poisson=r.poisson)
    except NotImplementedError as e:
        raise NotAvailableYet(f"method sparta: the engine cannot train these parameters yet: {e}") from e
    except (TypeError, ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"method sparta: {msg}") from e


def _sparta_phases(sp, model, r: TrainConfig, data: Encoded, device, autocast, n_train: int,
                   steps_per_epoch: int, dp_secret: int, ckpt: dict | None, log):
    """Warm-up (optional), private scoring, selection; returns the engine of the sparse
    training phase (attached to a fresh optimizer).  On --resume the row selection comes
    from the checkpoint (the engine's ledger is restored by the caller).

    Every phase draws its own Poisson batches (:class:`BatchPlan`, its own stream of the
    secret seed) and its own noise stream, and uses the training loss."""
    lengths = data.lengths("train")

    def loss_fn(m: nn.Module, chunk: np.ndarray) -> torch.Tensor:
        inputs, y = data.batch("train", chunk, device)
        with autocast():
            logits = _forward(m, inputs)
        return F.cross_entropy(logits.float(), y)

    def batches(steps: int, stream: int, desc: str):
        plan = BatchPlan(n_train, r.batch_size, steps_per_epoch, _derive_seed(dp_secret, stream),
                         poisson=r.poisson)
        bar = _tqdm(r.progress)(total=steps, desc=desc, unit="step", leave=True, dynamic_ncols=True)
        try:
            for i in range(steps):
                idx = plan.batch(i // steps_per_epoch, i % steps_per_epoch)
                if lengths is not None and len(idx):  # cut padding, as physical_chunks does
                    idx = idx[np.argsort(lengths[idx], kind="stable")]
                yield idx
                bar.update(1)
        finally:
            bar.close()

    if ckpt is not None:
        masks = ckpt.get("sparta_masks")
        if masks is None:
            raise ConfigError("--resume: the checkpoint holds no SPARTA row selection")
        sp.masks = {n: torch.as_tensor(m, dtype=torch.bool) for n, m in masks.items()}
    else:
        if sp.steps["warmup"]:
            sp.engine_kwargs["noise_seed"] = _derive_seed(dp_secret, 3)
            sp._set_trainable()
            opt = make_optimizer(model, r)
            set_lr(opt, r, 0, 1)
            engine = sp.warmup(opt)
            for idx in batches(sp.steps["warmup"], 5, "SPARTA warm-up"):
                chunks = physical_chunks(idx, r.max_physical_batch_size, None)
                for chunk in chunks:
                    loss_fn(model, chunk).backward()
                if not chunks:
                    engine.record_empty_batch()
                opt.step()
                opt.zero_grad(set_to_none=True)
        if sp.selection == "scores":
            sp.engine_kwargs["noise_seed"] = _derive_seed(dp_secret, 2)
            sp.score(batches(sp.steps["scoring"], 4, "SPARTA scoring"), loss_fn,
                     max_physical_batch_size=r.max_physical_batch_size)
            sp.select()
            log(f"  SPARTA: scored the rows privately ({sp.steps['scoring']} steps, ε so far "
                f"{_fmt_eps(sp.epsilon)})")
        else:  # public and data-independent: no privacy cost, reproducible from --seed
            sp.select(seed=r.seed)
            log(f"  SPARTA: {sp.selection} row selection (public, no scoring pass)")
    sp.engine_kwargs["noise_seed"] = _derive_seed(dp_secret, 1)
    return sp.train(lambda params: make_optimizer(model, r))


def _sparta_trainable(model: nn.Module) -> int:
    """Trainable parameters, counting only the selected rows of row-restricted weights."""
    from .methods.sparta import ATTR
    n = 0
    for p in model.parameters():
        if p.requires_grad:
            rm = getattr(p, ATTR, None)
            n += p.numel() if rm is None else int(rm.mask.sum()) * (p.numel() // p.shape[rm.dim])
    return n


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
    data: Any = None                    # Encoded
    model: Any = None
    net: Any = None                     # the model as trained (DDP-wrapped under torchrun)
    tokenizer: Any = None
    trainable: int = 0
    total: int = 0
    n_train: int = 0
    steps_per_epoch: int = 0
    steps_total: int = 0
    dp_secret: int = 0
    plan: Any = None                    # BatchPlan
    ckpt: dict | None = None
    autocast: Callable = None           # type: ignore[assignment]
    optimizer: Any = None
    engine: Any = None
    sp: Any = None                      # SPARTA driver
    units: Any = None                   # --privacy-unit user: the user (0..U-1) of each training example
    n_units: int = 0                    # training examples, or distinct users: the accountant's N
    batch_given: bool = True            # --batch-size given (else a user-level default is derived)

    @property
    def user_level(self) -> bool:
        return self.r.privacy_unit == "user" and self.private

    @property
    def private(self) -> bool:
        return self.r.method in PRIVATE_METHODS


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run one job; returns the summary dict (also written to ``out/summary.json``).

    A run stopped early (``--stop-after-steps``, Ctrl-C) returns
    ``{"stopped": True, "status": ..., "step": ..., "epsilon": ...}`` after
    writing a checkpoint that ``--resume`` continues. A fault (non-finite loss,
    a full disk) raises :class:`RunFailed`, whose message names the last
    checkpoint and the ε spent; every other way out logs the ε spent too.
    """
    log = log or _print
    spent = _Spent()
    try:
        job = _prepare(cfg, log, spent)
        return _Run(job, spent).run()
    except (ConfigError, DataUnavailable, RunFailed):
        raise
    except KeyboardInterrupt:
        if spent.source is not None:  # e.g. during SPARTA's scoring pass: nothing to resume from
            log(f"  interrupted before the first training checkpoint; {spent.text()}")
        raise
    except Exception:
        if spent.source is not None:
            log(f"  the run failed; {spent.text()}")
        raise


def _print(s: str) -> None:
    print(s, flush=True)


# --- building the job ----------------------------------------------------------


def _prepare(cfg: TrainConfig, log: Callable[[str], None], spent: _Spent) -> _Job:
    """Options, output folder, data, model, optimizer and privacy engine; runs SPARTA's
    warm-up and scoring phases (which spend privacy) when the method is sparta."""
    job = _resolve_job(cfg, log)
    _prepare_data(job)
    _build_model(job)
    _build_privacy(job)
    spent.source = job.sp if job.sp is not None else job.engine
    _log_plan(job)
    if job.sp is not None:
        _run_sparta_phases(job)
    return job


def _resolve_job(cfg: TrainConfig, log: Callable[[str], None]) -> _Job:
    """Validate, merge a --resume configuration, pick the device and the output folder."""
    t_start = time.perf_counter()
    validate(cfg)
    if cfg.resume:
        if cfg.out is None:
            raise ConfigError("--resume needs --out DIR (the run to continue)")
        prepare_out(Path(cfg.out), resume=True, overwrite=False)
        cfg = merge_resume_config(cfg)
        validate(cfg)
    device = _pick_device(cfg.device or "auto")
    world = _World(device)  # joins the process group under torchrun (WORLD_SIZE > 1)
    device = world.device
    if world.rank != 0:
        log = lambda s: None  # noqa: E731 - one voice: rank 0 logs and writes the run directory
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = offline.load_task(cfg.dataset or "rotten-tomatoes", seed=cfg.seed or 0, test_file=cfg.test_file,
                             text_column=cfg.text_column, label_column=cfg.label_column,
                             user_column=cfg.user_column if cfg.privacy_unit == "user" else None)
    r, notes = resolve(cfg, kind=task.kind, device=device, n_train_total=len(task.y_train))
    notes = list(task.notes) + notes
    out = Path(world.same(r.out or _default_out(r)))  # rank 0's choice (a default name has a time)
    r.out = str(out)
    if r.resume:
        _check_resume_config(_read_config_json(out), r)
    else:
        prepare_out(out, resume=False, overwrite=r.overwrite)
    world.barrier()  # every rank has checked --out before rank 0 writes into it
    if world.size > 1:
        if r.method == "sparta":
            raise ConfigError("--method sparta under torchrun is not supported yet (run it on one process)")
        if r.batch_size < world.size:
            raise ConfigError(f"--batch-size {r.batch_size} is smaller than the number of processes ({world.size})")
        notes.append(f"data parallel over {world.size} processes ({world.backend}): each takes 1 in "
                     f"{world.size} examples of each global logical batch of {r.batch_size}")
        if r.privacy_unit == "user":
            raise ConfigError("--privacy-unit user under torchrun is not supported (run it on one process)")
    if r.privacy_unit == "user" and task.u_train is None:
        raise ConfigError("--privacy-unit user needs --user-column NAME: the column of the training data "
                          "that names each example's user (the packaged rotten-tomatoes data: movie_name)")
    return _Job(r=r, notes=notes, log=log, world=world, device=device, out=out, task=task, t_start=t_start,
                batch_given=cfg.batch_size is not None)


def _prepare_data(job: _Job) -> None:
    """The validation split (--validation-size) and the subsamples of the splits."""
    r, task = job.r, job.task
    if r.validation_size:
        if r.validation_size >= len(task.y_train):
            raise ConfigError(f"--validation-size {r.validation_size} must be smaller than the training set "
                              f"({len(task.y_train):,} examples)")
        task = task.validation_split(r.validation_size, seed=r.seed)
        job.notes.append(f"evaluating on {len(task.y_test):,} held-out TRAINING examples "
                         "(--validation-size), not on the test set")
    task = task.subset(_size(r.train_size, "train-size"), _size(r.eval_size, "eval-size"), seed=r.seed)
    job.n_train = len(task.y_train)
    if job.n_train < 2:
        raise ConfigError(f"the training set has {job.n_train} example(s); need at least 2")
    job.n_units = job.n_train
    if job.user_level:
        _prepare_users(job, task)
    elif r.batch_size > job.n_train:
        raise ConfigError(f"--batch-size {r.batch_size} is larger than the training set ({job.n_train:,})")
    job.task = task
    job.steps_per_epoch = math.ceil(job.n_units / r.batch_size)  # the engine's convention
    job.steps_total = max(1, math.ceil(r.epochs * job.steps_per_epoch))
    if r.eval_every is None:
        r.eval_every = max(1, math.ceil(job.steps_total / 8))


def _prepare_users(job: _Job, task: TaskData) -> None:
    """--privacy-unit user: number the users; --batch-size is the expected number of
    *users* per step (default: the example-level default scaled by U / N, so that a
    step holds as many examples on average and q is the same)."""
    r = job.r
    index: dict[Any, int] = {}
    job.units = np.array([index.setdefault(u, len(index)) for u in task.u_train], dtype=np.int64)
    job.n_units = len(index)
    if job.n_units < 2:
        raise ConfigError(f"--privacy-unit user: the training set has {job.n_units} user(s); need at least 2")
    if not job.batch_given:
        examples = r.batch_size
        r.batch_size = max(1, min(job.n_units, round(examples * job.n_units / job.n_train)))
        job.notes.append(f"--privacy-unit user: logical batch of {r.batch_size} users by default (expected "
                         f"{r.batch_size * job.n_train / job.n_units:.0f} examples, as {examples} examples at "
                         "example level; --batch-size counts users)")
    if r.batch_size > job.n_units:
        raise ConfigError(f"--batch-size {r.batch_size} is larger than the number of users ({job.n_units:,}); "
                          "with --privacy-unit user it counts users")
    sizes = np.bincount(job.units)
    job.notes.append(f"privacy unit: user ({task.user_column or 'user column'}): {job.n_units:,} users, "
                     f"{sizes.min()} to {sizes.max()} (median {int(np.median(sizes))}) training examples each; "
                     "ε protects all of a user's examples")


def _build_model(job: _Job) -> None:
    """The model with its new head, frozen/unfrozen (or LoRA-wrapped) for the method."""
    r, task = job.r, job.task
    torch.manual_seed(r.seed)
    if task.kind == "text":
        model, job.tokenizer = offline.load_text_model(
            None if offline.is_packaged_text_model(r.model) else r.model, task.num_labels)
    else:
        in_ch = int(task.x_train.shape[1])
        # --model cnn-fmnist builds (once, cached) and logs the public Fashion-MNIST CNN
        model = offline.load_image_model(r.model, task.num_labels, in_ch, log=job.log)
        if getattr(model, "pretrained_info", None):
            pi = model.pretrained_info
            job.notes.append(f"{r.model}: public weights pretrained (non-privately) on Fashion-MNIST, "
                             f"{100 * pi['test_accuracy']:.1f}% Fashion-MNIST test accuracy ({pi['path']}); "
                             f"new {task.num_labels}-class head")
    if r.dropout is not None:
        set_dropout(model, r.dropout)
    model = select_trainable(model, r.method, r.lora_rank, notes=job.notes)
    model.to(job.device)
    model.train()
    job.model = model
    job.trainable, job.total = count_params(model)
    job.data = Encoded(task, job.tokenizer, r.max_seq_len)
    use_autocast = r.bf16 and job.device.type in ("cuda", "cpu")
    dev = job.device.type
    job.autocast = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if use_autocast \
        else (lambda: torch.autocast(dev, enabled=False))


def _build_privacy(job: _Job) -> None:
    """The secret seed, the batch plan, the optimizer and the engine (or SPARTA's driver).

    The randomness DP relies on (batch sampling, noise) comes from a secret seed:
    OS entropy unless --dp-seed; kept in the checkpoint so that --resume continues it.
    """
    r = job.r
    job.ckpt = _load_run_checkpoint(job.out) if r.resume else None
    if job.ckpt is not None:
        dp_secret = int(job.ckpt["dp_seed"])
    else:
        dp_secret = r.dp_seed if r.dp_seed is not None else secrets.randbits(256)
    job.dp_secret = job.world.same(dp_secret)  # all ranks draw the same global Poisson batches
    job.plan = BatchPlan(job.n_train, r.batch_size, job.steps_per_epoch, _derive_seed(job.dp_secret, 0),
                         poisson=r.poisson and job.private, units=job.units if job.user_level else None)
    if r.method == "sparta":
        # optimizer and engine come after the scoring pass (or from the checkpoint's row selection)
        job.sp = _make_sparta(job.model, r, job.n_train)
        job.net = job.model
        return
    job.optimizer = make_optimizer(job.model, r)
    job.net = job.world.wrap(job.model)  # DistributedDataParallel under torchrun (the engine unwraps it)
    if job.private:
        job.engine = _make_engine(job.net, r, job.n_units, job.steps_total, _derive_seed(job.dp_secret, 1))
        job.engine.attach(job.optimizer)


def _load_run_checkpoint(out: Path) -> dict:
    """``out/checkpoint.pt`` for --resume; a damaged file is a one-line error."""
    try:
        ckpt = read_checkpoint(out / CHECKPOINT)
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from e
    needed = {"model", "optimizer", "engine", "rng", "step", "metrics_lines", "dp_seed"}
    if not isinstance(ckpt, dict) or not needed <= set(ckpt):
        raise ConfigError(f"--resume: {out / CHECKPOINT} is not a dpft train checkpoint")
    return ckpt


def _log_plan(job: _Job) -> None:
    """What is about to run: data, model, the notes on chosen defaults, the DP parameters."""
    r, log, sp = job.r, job.log, job.sp
    dp = job.engine if job.engine is not None else sp
    cpu_note = "" if job.device.type != "cpu" else f", {torch.get_num_threads()} threads"
    log(f"dpft train: {r.method} on {job.task.description}")
    log(f"  model {r.model} ({job.total:,} parameters, {job.trainable:,} trainable = "
        f"{100 * job.trainable / job.total:.2f}%), device {job.device}{cpu_note}")
    for note in job.notes:
        log(f"  note: {note}")
    if dp is not None:
        if sp is not None:
            warm = f"{sp.steps['warmup']} warm-up + " if sp.steps["warmup"] else ""
            scoring = f"{sp.steps['scoring']} scoring + " if sp.steps["scoring"] else ""
            step_text = f"{warm}{scoring}{job.steps_total} training steps"
        else:
            step_text = f"{job.steps_total} steps"
        log(f"  DP: target ε = {r.epsilon:g}, δ = {dp.target_delta:.3g}, σ = "
            f"{dp.noise_multiplier:.4f}, q = {min(1.0, r.batch_size / job.n_units):.4f}"
            f"{' (users)' if job.user_level else ''}, "
            f"{step_text}, clip {r.clipping_fn} R = {r.max_grad_norm:g} ({r.clipping_style}), "
            f"accountant {r.accountant}")
    if sp is not None:
        log(f"  SPARTA: density {r.density:g} of the rows of {len(sp.candidates)} candidate weights "
            f"(+ biases and head), "
            + (f"scoring {r.scoring_epochs:g} epoch(s)" if sp.steps["scoring"] else f"{sp.selection} selection")
            + (f", warm-up {r.warmup_epochs:g} epoch(s)" if sp.steps["warmup"] else ""))
    log(f"  {job.n_train:,} training / {len(job.task.y_test):,} evaluation examples, logical batch "
        f"{r.batch_size}{' users' if job.user_level else ''}, physical ≤ {r.max_physical_batch_size}, lr {r.lr:g} (head {r.head_lr:g}), "
        f"{r.epochs:g} epoch{'' if r.epochs == 1 else 's'}, "
        f"output {job.out}")


def _run_sparta_phases(job: _Job) -> None:
    """SPARTA's warm-up and scoring (or the row selection from the checkpoint); then the
    engine and optimizer of its sparse training phase."""
    r, sp = job.r, job.sp
    job.engine = _sparta_phases(sp, job.model, r, job.data, job.device, job.autocast, job.n_train,
                                job.steps_per_epoch, job.dp_secret, job.ckpt, job.log)
    job.optimizer = job.engine.optimizer
    job.trainable = _sparta_trainable(job.model)
    rows = sum(int(m.sum()) for m in sp.masks.values())
    job.log(f"  SPARTA: {rows:,} of {sum(m.numel() for m in sp.masks.values()):,} candidate rows "
            f"selected; {job.trainable:,} trainable parameters ({100 * job.trainable / job.total:.2f}%)")


# --- Ctrl-C ----------------------------------------------------------------------


class _Interrupts:
    """Ctrl-C during the training loop.

    The first Ctrl-C is acknowledged at once; the run stops after the step in
    progress (a progress evaluation is cut short), writes a checkpoint and
    exits, resumable. A second Ctrl-C stops at once: the unfinished step is
    rolled back (none of it was applied, it is not accounted) and the last
    finished step is checkpointed. While a step is being applied or a
    checkpoint written (:meth:`critical`), a second Ctrl-C waits for its end.
    """

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.requested = False
        self.exiting = False
        self._pending = False
        self._depth = 0
        self._old: Any = None

    def install(self) -> None:
        if threading_main():
            self._old = signal.signal(signal.SIGINT, self._handler)

    def uninstall(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def _handler(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
            self.say("\n  Ctrl-C: stopping after the current step, with a checkpoint (Ctrl-C again to "
                     "stop at once: the unfinished step is rolled back)")
            return
        if self._depth or self.exiting:
            self._pending = not self.exiting
            self.say("  Ctrl-C: writing the checkpoint first, one moment")
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        """A section that a second Ctrl-C must not cut (it takes effect right after it)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._pending and not self.exiting:
            self._pending = False
            raise KeyboardInterrupt


class _NonFinite(Exception):
    """A step whose loss (or per-example gradient) is NaN or infinite; nothing of it was applied."""


# --- the training loop -----------------------------------------------------------

_now = time.monotonic  # the clock of the periodic checkpoints (a test moves it)



class _Run:
    """The training loop of a prepared job, its checkpoints, and every way out of it."""

    def __init__(self, job: _Job, spent: _Spent) -> None:
        self.j = job
        self.log = job.log
        self.spent = spent
        self.step = 0
        self.elapsed_before = 0.0
        self.t_train = time.perf_counter()
        self.metrics_path = job.out / "metrics.jsonl"
        self.metrics_file: Any = None
        self.n_lines = 0
        self.last_acc: float | None = None
        self.saved_step: int | None = None     # step of the newest checkpoint on disk
        self.last_save = _now()
        self.step_rng: dict | None = None      # RNG state at the start of the step in progress
        self.in_step = False                   # a step has begun and is not yet applied
        self._mine_empty = False
        self.interrupts = _Interrupts(self.log)
        n_eval = len(job.task.y_test)
        # Progress evaluations (before training, every eval_every steps, at epoch ends) use a
        # fixed subset of at most MONITOR_SIZE evaluation examples; the final one uses all.
        self.monitor = None
        if n_eval > MONITOR_SIZE:
            self.monitor = np.sort(np.random.default_rng([job.r.seed, 17]).permutation(n_eval)[:MONITOR_SIZE])

    # -- state ----------------------------------------------------------------
    def restore(self) -> None:
        """Load the checkpoint of a --resume, or start a fresh run directory."""
        j, ckpt = self.j, self.j.ckpt
        if ckpt is not None:
            _restore_checkpoint(j, ckpt)
            self.step = ckpt["step"]
            self.saved_step = self.step
            self.elapsed_before = ckpt.get("elapsed", 0.0)
            lines = self.metrics_path.read_text().splitlines()[: ckpt["metrics_lines"]] \
                if self.metrics_path.exists() else []
            if j.world.rank == 0:
                self.metrics_path.write_text("".join(line + "\n" for line in lines))
            self.log(f"  resumed from step {self.step} ({self.spent.text()})")
        elif j.world.rank == 0:
            j.out.mkdir(parents=True, exist_ok=True)
            _write_json(j.out / "config.json", j.r.to_dict())
            self.metrics_path.write_text("")
            for stale in ("summary.json", "report.png", CHECKPOINT):
                (j.out / stale).unlink(missing_ok=True)
            _remove_release(j.out)
        j.world.barrier()
        if j.world.rank == 0:
            self.metrics_file = open(self.metrics_path, "a")
        self.n_lines = len(self.metrics_path.read_text().splitlines())

    def record(self, obj: dict) -> None:
        """One line of metrics.jsonl (rank 0 writes; every rank counts the lines)."""
        self.n_lines += 1
        if self.metrics_file is None:
            return
        try:
            self.metrics_file.write(json.dumps(obj, default=offline.json_default) + "\n")
            self.metrics_file.flush()
        except OSError as e:
            from .checkpoint import describe_os_error
            raise CheckpointError(f"cannot write {self.metrics_path}: {describe_os_error(e)}") from e

    def save_checkpoint(self, rng: dict | None = None) -> None:
        """Write checkpoint.pt atomically (a second Ctrl-C waits for it)."""
        j = self.j
        self.last_save = _now()
        if j.world.rank != 0:
            self.saved_step = self.step
            return
        state = {"model": _trainable_state(j.model), "optimizer": j.optimizer.state_dict(),
                 "engine": j.engine.state_dict() if j.engine is not None else None,
                 "rng": rng if rng is not None else _rng_state(), "step": self.step,
                 "metrics_lines": self.n_lines, "dp_seed": j.dp_secret,
                 "elapsed": self.elapsed(),
                 **({"sparta_masks": j.sp.masks} if j.sp is not None else {})}
        with self.interrupts.critical():
            atomic_save(state, j.out / CHECKPOINT)
            self.saved_step = self.step

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_train

    def checkpoint_due(self, end_of_epoch: bool) -> bool:
        r = self.j.r
        if end_of_epoch or (r.checkpoint_every and self.step % r.checkpoint_every == 0):
            return True
        return bool(r.checkpoint_minutes) and _now() - self.last_save >= 60 * r.checkpoint_minutes

    # -- evaluation -----------------------------------------------------------
    def run_eval(self, epoch: int, final: bool) -> float | None:
        """Accuracy on the evaluation split (a fixed subset for progress evaluations);
        a Ctrl-C cuts an evaluation short (nothing is recorded; a cut final evaluation
        is made by --resume)."""
        j = self.j
        subset = None if final else self.monitor
        if j.world.rank == 0:  # under torchrun rank 0 alone evaluates (the model is the same everywhere)
            cancel = lambda: self.interrupts.requested  # noqa: E731
            acc = evaluate(j.model, j.data, j.device, 2 * j.r.max_physical_batch_size, j.autocast, subset,
                           cancel=cancel)
            if acc is None:
                return None
        else:
            acc = math.nan
        self.record({"event": "eval", "step": self.step, "epoch": epoch, "test_accuracy": acc,
                     "examples": len(j.task.y_test) if subset is None else len(subset), "final": final,
                     "epsilon": _epsilon(j.engine) if j.engine is not None else None})
        self.last_acc = acc
        return acc

    # -- one step -------------------------------------------------------------
    def compute(self, idx: np.ndarray) -> tuple[float, int]:
        """Forward and backward of this process's share of a logical batch, in physical
        chunks; returns the summed loss and the correct predictions of the global batch."""
        j = self.j
        mine = idx[j.world.rank::j.world.size]  # this process's share of the global batch
        loss_sum, correct = 0.0, 0
        chunks = physical_chunks(mine, j.r.max_physical_batch_size, j.data.lengths("train"))
        for chunk in chunks:
            inputs, y = j.data.batch("train", chunk, j.device)
            with j.autocast():
                logits = _forward(j.net, inputs)
            loss = F.cross_entropy(logits.float(), y)
            if j.engine is not None and j.user_level:
                j.engine.set_units(j.units[chunk])
            if j.private or len(chunks) == 1:
                loss.backward()
            else:  # non-private accumulation: weight each chunk by its share
                (loss * len(chunk) / len(mine)).backward()
            loss_sum += float(loss.detach()) * len(chunk)
            correct += int((logits.argmax(-1) == y).sum())
        self._mine_empty = len(mine) == 0
        return j.world.sum(loss_sum, correct)

    def apply(self, idx: np.ndarray, loss_sum: float, correct: float) -> dict:
        """The optimizer step (privatized by the engine) and its metrics row."""
        j = self.j
        set_lr(j.optimizer, j.r, self.step, j.steps_total)
        try:
            if self._mine_empty and j.engine is not None:
                _empty_step(j.engine, j.optimizer)
            else:
                j.optimizer.step()
        except FloatingPointError as e:  # the engine refused a non-finite per-example gradient
            raise _NonFinite(f"a per-example gradient is NaN or infinite ({str(e).splitlines()[0]})") from e
        j.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        n = len(idx)
        row = {"event": "step", "step": self.step, "epoch": (self.step - 1) // j.steps_per_epoch + 1,
               "batch_size": int(n), "loss": loss_sum / n if n else None,
               "train_accuracy": correct / n if n else None,
               "epsilon": self.row_epsilon(),
               "lr": j.optimizer.param_groups[0]["lr"], "time": round(self.elapsed(), 3)}
        self.record(row)
        return row

    def row_epsilon(self) -> float | None:
        """ε after this step for metrics.jsonl: at EPSILON_POINTS evenly spaced steps and the last
        one (each value is an accountant query that takes up to a second; the engine's budget
        check needs none per step). A pure function of the step, so a resumed run writes the
        same rows."""
        j = self.j
        if j.engine is None:
            return None
        every = max(1, math.ceil(j.steps_total / EPSILON_POINTS))
        if self.step == 1 or self.step % every == 0 or self.step == j.steps_total:
            return _epsilon(j.engine)
        return None

    def one_step(self, epoch: int, b: int) -> dict:
        """Draw, compute and apply one logical batch. A non-finite loss or a second Ctrl-C
        before the step is applied leaves the model, optimizer and ledger as they were."""
        j = self.j
        self.step_rng = _rng_state()
        self.in_step = True
        idx = j.plan.batch(epoch, b)
        loss_sum, correct = self.compute(idx)
        if len(idx) and not math.isfinite(loss_sum):
            raise _NonFinite(f"the training loss is {'NaN' if math.isnan(loss_sum) else 'infinite'}")
        with self.interrupts.critical():
            row = self.apply(idx, loss_sum, correct)
            self.in_step = False
        return row

    # -- the loop -------------------------------------------------------------
    def loop(self) -> str | None:
        """All remaining steps; returns why it stopped early (None: it finished)."""
        j, r = self.j, self.j.r
        tqdm = _tqdm(r.progress and j.world.rank == 0)
        if self.step == 0 and r.eval_every:
            self.run_eval(0, final=False)
        while self.step < j.steps_total:
            epoch = self.step // j.steps_per_epoch
            first = self.step - epoch * j.steps_per_epoch
            last = min(j.steps_per_epoch, j.steps_total - epoch * j.steps_per_epoch)
            bar = tqdm(total=last, initial=first, desc=f"epoch {epoch + 1}/{math.ceil(r.epochs)}",
                       unit="step", leave=True, dynamic_ncols=True)
            loss_avg, eps = None, None
            try:
                for b in range(first, last):
                    row = self.one_step(epoch, b)
                    if row["loss"] is not None:
                        loss_avg = row["loss"] if loss_avg is None else 0.9 * loss_avg + 0.1 * row["loss"]
                    eps = row["epsilon"] if row["epsilon"] is not None else eps
                    bar.set_postfix_str(_postfix(loss_avg, row["train_accuracy"], eps, self.last_acc), refresh=False)
                    bar.update(1)
                    end_of_epoch = b == last - 1
                    if (r.eval_every and self.step % r.eval_every == 0) or end_of_epoch:
                        self.run_eval(epoch + 1, final=self.step == j.steps_total)
                        bar.set_postfix_str(_postfix(loss_avg, row["train_accuracy"], eps, self.last_acc))
                    stopped = None
                    if r.stop_after_steps and self.step >= r.stop_after_steps and self.step < j.steps_total:
                        stopped = f"stopped after {self.step} steps (--stop-after-steps)"
                    elif self.interrupts.requested:
                        stopped = f"interrupted (Ctrl-C) after step {self.step}"
                    if stopped or self.checkpoint_due(end_of_epoch):
                        self.save_checkpoint()
                    if stopped:
                        return stopped
            finally:
                bar.close()
        return None

    def run(self) -> dict:
        """Train to the end (then evaluate, summarise, release) or to a stop; on a fault,
        roll back the unfinished step, checkpoint, and raise :class:`RunFailed`."""
        j = self.j
        try:
            self.restore()
            self.interrupts.install()
            try:
                stopped = self.loop()
            except KeyboardInterrupt:  # a second Ctrl-C
                stopped = self.stop_at_once()
            except _NonFinite as e:
                raise RunFailed(self.fault_message(str(e))) from e
            finally:
                self.interrupts.uninstall()
            if stopped is not None:
                return self.stopped(stopped)
            return _finish(j, self)
        except CheckpointError as e:
            raise RunFailed(f"{e}. {self.resume_hint(after_fault=True)}; {self.spent.text()}") from e
        finally:
            if self.metrics_file is not None:
                self.metrics_file.close()

    def stop_at_once(self) -> str:
        """A second Ctrl-C: drop the unfinished step (nothing of it was applied) and
        checkpoint the last finished one, with the RNG state it ended with."""
        j = self.j
        self.interrupts.exiting = True
        if j.optimizer is not None:
            j.optimizer.zero_grad(set_to_none=True)
        rolled_back = self.in_step
        if self.saved_step != self.step:
            self.save_checkpoint(rng=self.step_rng if rolled_back else None)
        undo = "; the unfinished step was rolled back" if rolled_back else ""
        return f"interrupted (second Ctrl-C) after step {self.step}{undo}"

    def fault_message(self, what: str) -> str:
        """Roll back the step that failed, checkpoint the last good one, and say what to do."""
        j = self.j
        self.interrupts.exiting = True
        if j.optimizer is not None:
            j.optimizer.zero_grad(set_to_none=True)
        finite = all(bool(torch.isfinite(p).all()) for p in j.model.parameters() if p.requires_grad)
        if not finite:
            saved = "the parameters are no longer finite, so no checkpoint was written"
        elif self.saved_step != self.step:
            self.save_checkpoint(rng=self.step_rng)
            saved = f"checkpoint of step {self.step} saved"
        else:
            saved = f"checkpoint of step {self.step} kept"
        r = j.r
        return (f"{what} at step {self.step + 1}; the step was not applied and training stopped. "
                f"Likely causes: a learning rate too high for this model and data (--lr {r.lr:g}, head "
                f"{r.head_lr:g}: start a new run with a smaller one) or invalid values in the data. "
                f"{saved} in {j.out}; {self.spent.text()}")

    def resume_hint(self, after_fault: bool = False) -> str:
        if self.saved_step is None:
            return "no checkpoint of this run was written yet: it must be started again"
        fix = "free space or fix the folder, then " if after_fault else ""
        return (f"the checkpoint of step {self.saved_step} in {self.j.out} is intact: {fix}continue with "
                f"dpft train --out {self.j.out} --resume")

    def stopped(self, reason: str) -> dict:
        """A resumable stop (--stop-after-steps, Ctrl-C): say so, with the ε spent."""
        j = self.j
        status = "interrupted" if "Ctrl-C" in reason else "stopped"
        self.log(f"  {reason}; checkpoint saved; {self.spent.text()}. Continue with: "
                 f"dpft train --out {j.out} --resume")
        j.world.close()
        return {"stopped": True, "status": status, "step": self.step, "out": str(j.out),
                "epsilon": self.spent.epsilon(),
                "delta": getattr(self.spent.source, "target_delta", None)}


def _restore_checkpoint(j: _Job, ckpt: dict) -> None:
    """Put the checkpoint's parameters, optimizer, engine and RNG state back."""
    missing = set(_trainable_state(j.model)) ^ set(ckpt["model"])
    if missing:
        raise ConfigError(f"--resume: checkpoint parameters do not match the model ({sorted(missing)[:3]})")
    with torch.no_grad():
        named = dict(j.model.named_parameters())
        for n, t in ckpt["model"].items():
            named[n].copy_(t.to(named[n].device, named[n].dtype))
    j.optimizer.load_state_dict(ckpt["optimizer"])
    if j.engine is not None:
        j.engine.load_state_dict(ckpt["engine"])
    _set_rng_state(ckpt["rng"])


# --- the end of a run ------------------------------------------------------------


def _finish(j: _Job, run: _Run) -> dict:
    """Final evaluation, summary.json (with the learning check), report.png and the
    release folder; prints the summary."""
    r, world = j.r, j.world
    final_rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()] if world.rank == 0 else []
    final_rows = [x for x in final_rows if x.get("event") == "eval" and x.get("final")]
    if final_rows and final_rows[-1]["step"] == run.step:
        last_acc = final_rows[-1]["test_accuracy"]
    else:  # e.g. resumed from a checkpoint written after the last step
        last_acc = run.run_eval(math.ceil(r.epochs), final=True)
    summary = _summary(j, run, last_acc)
    if j.engine is not None:
        j.engine.detach()
    if world.rank == 0:
        _write_json(j.out / "summary.json", summary)
        plot = write_report(j.out, summary)
        _print_summary(summary, j.log, plot)
        release = _write_release(j, summary)
        if release is not None:
            j.log(f"  release: {release}/ (the model, its labels and privacy.json, no secrets: safe to "
                  f"share as far as DP allows); predict with: dpft predict --run {j.out} --input FILE.csv")
    world.close()
    return summary


def _privacy_record(j: _Job, summary: dict) -> dict:
    """privacy.json of the release: what the guarantee is, in numbers (no secrets, no accuracies)."""
    import dpft

    r = j.r
    rec = {
        "private": summary["private"], "method": r.method, "model": r.model, "dataset": summary["dataset"],
        "epsilon": summary["epsilon"] if summary["private"] else None, "delta": summary["delta"],
        "target_epsilon": summary["target_epsilon"], "noise_multiplier": summary["noise_multiplier"],
        "accountant": r.accountant if summary["private"] else None,
        "steps": summary["steps"], "sample_rate": summary["sample_rate"], "batch_size": r.batch_size,
        "training_examples": summary["train_size"], "epochs": r.epochs,
        "users": summary.get("users"),
        "sampling": "Poisson" if r.poisson else "shuffled fixed-size batches (the ε assumes Poisson: a heuristic)",
        "clipping": {"function": r.clipping_fn, "max_grad_norm": r.max_grad_norm, "style": r.clipping_style},
        "privacy_unit": (f"user: all the training examples of one {j.task.user_column or 'user'} value "
                         "(add/remove one user)") if summary.get("privacy_unit") == "user"
        else "one training example (one row of the training data), add/remove adjacency",
        "trainable_parameters": summary["trainable_parameters"], "total_parameters": summary["total_parameters"],
        "dpft_version": getattr(dpft, "__version__", None),
    }
    if "sparta" in summary:
        rec["steps_in_ledger"] = summary["sparta"]["ledger_steps"]
        rec["sparta"] = {k: summary["sparta"][k] for k in ("density", "selection", "scoring_steps",
                                                            "warmup_steps", "training_steps")}
    return rec


def _write_release(j: _Job, summary: dict) -> Path | None:
    """out/release/: the model, its labels and privacy.json (see :mod:`dpft.release`)."""
    from .release import ReleaseError, export

    image_shape = None if j.task.kind == "text" else list(np.asarray(j.task.x_train).shape[1:])
    try:
        return export(j.out, j.model, kind=j.task.kind, label_names=j.task.label_names,
                      privacy=_privacy_record(j, summary), tokenizer=j.tokenizer,
                      max_seq_len=j.r.max_seq_len if j.task.kind == "text" else None,
                      image_shape=image_shape, source_model=j.r.model)
    except ReleaseError as e:
        j.log(f"  note: no release folder: {e}")
        return None
    except OSError as e:
        from .checkpoint import describe_os_error
        raise CheckpointError(f"cannot write the release folder {j.out / 'release'}: {describe_os_error(e)}") from e


def _remove_release(out: Path) -> None:
    import shutil

    from .release import RELEASE_DIR
    if (out / RELEASE_DIR).is_dir():
        shutil.rmtree(out / RELEASE_DIR)


def _summary(j: _Job, run: _Run, last_acc: float) -> dict:
    r, task, engine = j.r, j.task, j.engine
    majority_label, majority_acc = task.majority_baseline()
    summary = {
        "method": r.method, "model": r.model, "dataset": task.name,
        "trainable_parameters": j.trainable, "total_parameters": j.total,
        "trainable_percent": 100 * j.trainable / j.total,
        "train_size": j.n_train, "eval_size": int(len(task.y_test)),
        "eval_split": "validation" if r.validation_size else "test",
        "test_accuracy": last_acc, "majority_label": majority_label, "majority_baseline": majority_acc,
        "label_names": list(task.label_names),
        "epsilon": _epsilon(engine) if engine is not None else float("inf"),
        "target_epsilon": r.epsilon if engine is not None else None,
        "delta": engine.target_delta if engine is not None else None,
        "noise_multiplier": engine.noise_multiplier if engine is not None else 0.0,
        "sample_rate": min(1.0, r.batch_size / j.n_units),
        # what ε protects: one training example, or all the training examples of one user
        "privacy_unit": r.privacy_unit if engine is not None else None,
        "epsilon_unit": None if engine is None else (
            f"all training examples of one user ({task.user_column or 'user'})" if j.user_level
            else "one training example"),
        "users": j.n_units if j.user_level else None,
        "steps": run.step, "epochs": r.epochs, "batch_size": r.batch_size, "lr": r.lr, "head_lr": r.head_lr,
        "max_seq_len": r.max_seq_len or None,
        "train_time_s": run.elapsed(),
        "wall_time_s": time.perf_counter() - j.t_start + run.elapsed_before,
        "peak_memory_mb": _peak_memory_mb(j.device), "device": str(j.device),
        "private": engine is not None, "out": str(j.out),
    }
    if j.sp is not None:
        sp = j.sp
        summary["sparta"] = {
            "density": r.density, "selection": sp.selection, "candidates": len(sp.candidates),
            "selected_rows": sum(int(m.sum()) for m in sp.masks.values()),
            "candidate_rows": sum(m.numel() for m in sp.masks.values()),
            "warmup_steps": sp.steps["warmup"], "scoring_steps": sp.steps["scoring"],
            "training_steps": run.step, "ledger_steps": engine.steps,
        }
    if j.world.size > 1:
        summary["world_size"] = j.world.size
    if run.monitor is not None:
        top = task.label_names.index(majority_label)
        summary["progress_eval"] = {"examples": int(len(run.monitor)),
                                    "majority_baseline": float(np.mean(task.y_test[run.monitor] == top))}
    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()] if j.world.rank == 0 else []
    summary.update(learning_check(summary, rows))
    return summary


def make_optimizer(model: nn.Module, r: TrainConfig) -> torch.optim.Optimizer:
    """Adam (or SGD with momentum); the new classification head gets ``head_lr``."""
    head_names = set(_head_param_names(_unwrap(model)))
    head, rest = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (head if _strip_peft(n) in head_names else rest).append(p)
    groups = [g for g in ({"params": rest, "lr_scale": 1.0},
                          {"params": head, "lr_scale": r.head_lr / r.lr}) if g["params"]]
    if r.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=r.lr, momentum=0.9)
    return torch.optim.Adam(groups, lr=r.lr)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (names of the head are looked up there)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _strip_peft(name: str) -> str:
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def set_lr(optimizer: torch.optim.Optimizer, r: TrainConfig, step: int, steps_total: int) -> None:
    """The learning rate of step ``step`` (0-based): a pure function of the step, so resumable."""
    factor = 1.0
    if r.lr_schedule == "linear":
        factor = 1.0 - step / steps_total
    elif r.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * step / steps_total))
    for group in optimizer.param_groups:
        group["lr"] = r.lr * group.get("lr_scale", 1.0) * factor


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _epsilon(engine) -> float | None:
    if engine is None:
        return None
    return float(engine.epsilon)


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


def _empty_step(engine, optimizer) -> None:
    """An empty Poisson batch: still one step of the mechanism (noise only, accounted)."""
    engine.record_empty_batch()
    optimizer.step()


def _postfix(loss, acc, eps, test_acc) -> str:
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    if acc is not None:
        parts.append(f"acc {acc:.2f}")
    if test_acc is not None:
        parts.append(f"test {test_acc:.3f}")
    if eps is not None:
        parts.append(f"ε {eps:.2f}")
    return ", ".join(parts)


def _tqdm(enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm
        except ImportError:  # pragma: no cover
            pass

    class _Silent:
        def __init__(self, *a, **k):
            pass

        def set_postfix_str(self, *a, **k):
            pass

        def update(self, *a):
            pass

        def close(self):
            pass
    return _Silent


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024 if sys.platform != "darwin" else rss / 2**20
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


#: A run must beat always predicting the majority class by this much to count as learned.
LEARNED_MARGIN = 0.01


def learning_check(summary: dict, rows: list[dict]) -> dict:
    """``{"learned": bool | None, "warnings": [...]}`` for summary.json.

    A run whose accuracy is not above the majority baseline by LEARNED_MARGIN did
    not learn anything useful; the warning names the likely causes read from the
    run itself (training loss rising or flat, too few steps, a small training set).
    """
    acc, base = summary.get("test_accuracy"), summary.get("majority_baseline")
    if acc is None or base is None or not (math.isfinite(acc) and math.isfinite(base)):
        return {"learned": None, "warnings": []}
    if acc > base + LEARNED_MARGIN:
        return {"learned": True, "warnings": []}
    split = summary.get("eval_split", "test")
    msg = (f"NOT LEARNED: {split} accuracy {acc:.4f} is not above the majority baseline {base:.4f} "
           f"(always '{summary.get('majority_label')}') by {100 * LEARNED_MARGIN:g} point(s); the model is "
           f"no better than a constant. Likely causes: " + "; ".join(_likely_causes(summary, rows)))
    return {"learned": False, "warnings": [msg]}


def _likely_causes(summary: dict, rows: list[dict]) -> list[str]:
    losses = [r["loss"] for r in rows if r.get("event") == "step" and r.get("loss") is not None
              and math.isfinite(r["loss"])]
    lr, steps, n = summary.get("lr"), summary.get("steps", 0), summary.get("train_size", 0)
    causes = []
    if len(losses) >= 10:
        k = max(2, len(losses) // 5)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        if last > 1.05 * first:
            causes.append(f"the training loss rose ({first:.3f} -> {last:.3f}): the learning rate is probably "
                          f"too high (--lr {lr:g}, --head-lr {summary.get('head_lr', lr):g}: try 3-10x smaller)")
        elif last > 0.97 * first:
            causes.append(f"the training loss hardly fell ({first:.3f} -> {last:.3f}): the learning rate may be "
                          f"too low or too high under the noise (--lr {lr:g}), or there are too few steps")
    if steps < SMALL_DATA_MIN_STEPS:
        causes.append(f"only {steps} optimizer steps: too few for the data size ({n:,} examples; more "
                      "--epochs, or a smaller --batch-size)")
    if summary.get("private") and n and n < 2000:
        causes.append(f"a small training set ({n:,} examples): at ε = {summary.get('target_epsilon')} the "
                      "noise needed is large compared with the signal of so few examples")
    if not causes:
        causes.append(f"the learning rate (--lr {lr:g}; try 3x smaller and 3x larger) or too few steps for "
                      f"the data size ({steps} steps over {n:,} examples; more --epochs)")
    return causes


def _print_summary(s: dict, log, plot: Path | None) -> None:
    rows = [
        ("method", s["method"] + ("" if s["private"] else " (NOT private)")),
        ("trainable params", f"{s['trainable_parameters']:,} of {s['total_parameters']:,} "
                             f"({s['trainable_percent']:.2f}%)"),
        (f"{s['eval_split']} accuracy", f"{s['test_accuracy']:.4f}  ({s['eval_size']:,} examples)"),
        ("majority baseline", f"{s['majority_baseline']:.4f}  (always '{s['majority_label']}')"),
        ("ε (spent / target)", f"{_fmt_eps(s['epsilon'])} / {s['target_epsilon']:g}"
         + (f"  (protects {s.get('epsilon_unit')})" if s.get("epsilon_unit") else "")
         if s["private"] else "inf (no privacy)"),
        ("δ", f"{s['delta']:.3g}" if s["delta"] is not None else "-"),
        ("σ (noise multiplier)", f"{s['noise_multiplier']:.4f}"),
        ("steps", f"{s['steps']}  (q = {s['sample_rate']:.4f}, {s['train_size']:,} training examples"
                  + (f", {s['users']:,} users)" if s.get("users") else ")")),
        ("wall time", f"{s['wall_time_s']:.1f} s  (training {s['train_time_s']:.1f} s)"),
        ("peak memory", f"{s['peak_memory_mb']:.0f} MB ({'GPU' if s['device'].startswith('cuda') else 'process RSS'})"),
    ]
    width = max(len(k) for k, _ in rows)
    log("")
    for k, v in rows:
        log(f"  {k:<{width}}  {v}")
    for w in s.get("warnings", []):
        bar = "!" * 78
        log(f"  {bar}")
        log(f"  !! {w}")
        log(f"  {bar}")
    extra = ", report.png" if plot else ""
    log(f"  results in {s['out']}/ (summary.json, metrics.jsonl, config.json{extra}, {CHECKPOINT})")
    if s["private"]:
        log(f"  keep {CHECKPOINT} and metrics.jsonl as private as the data: the checkpoint holds the secret "
            "seed of the batch sampling and the noise, metrics.jsonl the training loss of each batch "
            "(not private)")


def write_report(out: Path, summary: dict) -> Path | None:
    """report.png: training loss, test accuracy and ε against step (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = report_figure(out, summary)
    path = out / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_figure(out: Path, summary: dict):
    """The figure of report.png (three panels: loss, accuracy, ε) from out/metrics.jsonl.

    The accuracy panel draws the majority-class line of the full evaluation split and,
    when the progress evaluations use a subset, that subset's own majority line; the
    ε axis starts at 0."""
    import matplotlib.pyplot as plt
    steps, losses, eps, monitor, final = [], [], [], [], []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("event") == "step":
            if row.get("loss") is not None:
                steps.append(row["step"])
                losses.append(row["loss"])
            if row.get("epsilon") is not None:
                eps.append((row["step"], row["epsilon"]))
        elif row.get("event") == "eval":
            (final if row.get("final") else monitor).append((row["step"], row["test_accuracy"],
                                                            row.get("examples")))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)
    axes[0].plot(steps, losses, lw=0.8, color="tab:blue", alpha=0.45, label="logical batch")
    if len(losses) > 4:
        ema, smooth = losses[0], []
        for v in losses:
            ema = 0.8 * ema + 0.2 * v
            smooth.append(ema)
        axes[0].plot(steps, smooth, lw=1.8, color="tab:blue", label="moving average")
        axes[0].legend(loc="upper right")
    axes[0].set(title="training loss", xlabel="step", xlim=(0, max(summary["steps"], 1) * 1.04))
    split = summary["eval_split"]
    sub_base = (summary.get("progress_eval") or {}).get("majority_baseline")
    if monitor:
        k = monitor[0][2]
        is_subset = bool(final and k and k < (final[-1][2] or 0))
        sub = f" ({k:,}-example subset)" if is_subset else ""
        axes[1].plot([m[0] for m in monitor], [m[1] for m in monitor], "o-", ms=3, color="tab:green",
                     label=f"{split}{sub}")
        if is_subset and sub_base is not None:
            axes[1].axhline(sub_base, ls=":", color="tab:green", alpha=0.7,
                            label=f"majority class on the subset ({sub_base:.3f})")
    if final:
        axes[1].plot([f[0] for f in final], [f[1] for f in final], "D", ms=7, color="darkgreen",
                     label=f"{split} (all {final[-1][2]:,})")
    axes[1].axhline(summary["majority_baseline"], ls="--", color="grey",
                    label=f"majority class ({summary['majority_baseline']:.3f})")
    axes[1].set(title=f"{split} accuracy", xlabel="step")
    if summary.get("learned") is False:
        axes[1].text(0.5, 0.5, "NOT LEARNED:\nno better than the\nmajority class", color="red", ha="center",
                     va="center", fontsize=13, fontweight="bold", transform=axes[1].transAxes, alpha=0.8)
    axes[1].legend(loc="lower right", fontsize=8)
    if eps:
        axes[2].plot([s for s, _ in eps], [e for _, e in eps], color="tab:red")
        axes[2].axhline(summary["target_epsilon"], ls="--", color="grey", label="target")
        axes[2].set_ylim(bottom=0, top=max(summary["target_epsilon"], max(e for _, e in eps)) * 1.08)
        axes[2].legend(loc="lower right")
        axes[2].set(title=f"ε spent (δ = {summary['delta']:.2g})", xlabel="step")
    else:
        axes[2].text(0.5, 0.5, "non-private:\nε = ∞", ha="center", va="center", fontsize=14,
                     transform=axes[2].transAxes)
        axes[2].set_title("ε")
        axes[2].axis("off")
    title = f"dpft {summary['method']} · {summary['model']} · {summary['dataset']}"
    if summary.get("learned") is False:
        title += "  ·  NOT LEARNED (accuracy at the majority baseline; see summary.json warnings)"
    fig.suptitle(title, color="red" if summary.get("learned") is False else "black")
    fig.tight_layout()
    return fig


__all__ += ["evaluate", "BatchPlan", "physical_chunks", "select_trainable", "write_report",
            "DataUnavailable", "RunFailed", "learning_check"]
