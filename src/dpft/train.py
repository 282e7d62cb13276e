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
from .offline import DataUnavailable, TaskData

__all__ = [
    "ConfigError",
    "NotAvailableYet",
    "TrainConfig",
    "METHODS",
    "PRIVATE_METHODS",
    "resolve",
    "train",
]


class ConfigError(ValueError):
    """A user error in the job's configuration (the CLI prints it on one line, exit code 2)."""


class NotAvailableYet(ConfigError):
    """The requested method exists in the plan but has not landed in this version."""


METHODS = ("bitfit", "full", "lora", "last-layer", "sparta", "nonprivate-full", "nonprivate-bitfit")
PRIVATE_METHODS = ("bitfit", "full", "lora", "last-layer", "sparta")
CLIPPING_FNS = ("abadi", "automatic")
ACCOUNTANTS = ("pld", "rdp")
DEVICES = ("auto", "cpu", "cuda", "mps")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "linear", "cosine")
SPARTA_SELECTIONS = ("scores", "random", "magnitude")  # random/magnitude: public, no scoring pass

# Fields that may change between an interrupted run and its --resume.
_OPERATIONAL = {"out", "resume", "overwrite", "device", "num_threads", "stop_after_steps",
                "progress", "checkpoint_every", "config"}

CHECKPOINT = "checkpoint.pt"
MONITOR_SIZE = 512  # evaluation examples used for the progress evaluations


@dataclass
class TrainConfig:
    """All options of `dpft train` (the CLI flags, one to one). ``None`` = default."""

    model: str | None = None            # "minilm" (packaged), "cnn", a HF name/path
    dataset: str | None = None          # "rotten-tomatoes", "mnist", "fashion-mnist", file, HF name
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
    checkpoint_every: int | None = None  # steps between checkpoints (0: at each epoch end only)
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

_DEFAULT_HEAD_LR = {"bitfit": 1e-2, "lora": 1e-2, "sparta": 1e-2, "nonprivate-bitfit": 1e-2}
_DEFAULT_LR = {  # Adam
    "bitfit": 3e-3, "last-layer": 3e-2, "lora": 2e-3, "full": 5e-4, "sparta": 1e-3,
    "nonprivate-bitfit": 1e-3, "nonprivate-full": 5e-5,
}


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
    for name in ("epsilon", "lr", "head_lr", "max_grad_norm", "epochs", "scoring_epochs"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)
                              or not math.isfinite(v) or v <= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}")
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
    for name in ("eval_every", "checkpoint_every", "stop_after_steps", "seed", "dp_seed"):
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
    r.bf16 = bool(r.bf16)
    r.resume, r.overwrite = bool(r.resume), bool(r.overwrite)
    r.clipping_fn = r.clipping_fn or "abadi"
    r.optimizer = r.optimizer or "adam"
    r.lr_schedule = r.lr_schedule or "constant"
    r.clipping_mode = r.clipping_mode or "auto"
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
    r.stop_after_steps = r.stop_after_steps or None
    r.progress = True if r.progress is None else bool(r.progress)
    if r.lr is None:
        r.lr = _DEFAULT_LR[r.method] if kind == "text" else (
            2e-3 if r.method in ("nonprivate-full", "nonprivate-bitfit") else 1e-2)
    if r.head_lr is None:
        # The head is new (randomly initialised) and wants a larger step than the biases;
        # full fine-tuning and last-layer use one learning rate for everything.
        r.head_lr = _DEFAULT_HEAD_LR.get(r.method) or r.lr
    if r.dropout is None and private:
        # measured on the validation split: dropout only adds variance to the noisy DP updates
        r.dropout = 0.0
    if kind == "text":
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
        # Tuned on a held-out part of the training split (--validation-size 1000), three
        # seeds each; never on the test set.
        if r.epochs is None:
            if private:
                r.epochs = CPU_TEXT_EPOCHS if on_cpu else GPU_TEXT_EPOCHS
                if on_cpu:
                    notes.append(f"CPU run: {CPU_TEXT_EPOCHS} epoch by default (--epochs to change; "
                                 f"{GPU_TEXT_EPOCHS} on a GPU)")
            else:
                r.epochs = 2
        if r.batch_size is None:
            r.batch_size = (128 if on_cpu else 512) if private else 32
        if r.max_physical_batch_size is None:
            r.max_physical_batch_size = 64 if on_cpu else 256
    else:
        r.max_seq_len = r.max_seq_len or None  # unused for images (0 would fail validate() on --resume)
        r.train_size = r.train_size if r.train_size is not None else "all"
        if r.epochs is None:
            r.epochs = 10 if private else 3
        if r.batch_size is None:
            r.batch_size = 256 if private else 64
        if r.max_physical_batch_size is None:
            r.max_physical_batch_size = 256
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

    def __init__(self, n: int, batch_size: int, steps_per_epoch: int, seed: int, poisson: bool):
        self.n, self.batch_size, self.steps, self.seed, self.poisson = n, batch_size, steps_per_epoch, seed, poisson
        self._sampler = None
        if poisson:
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
    state = np.random.SeedSequence([secret, stream]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) % (2**63)


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, device: torch.device, batch_size: int,
             autocast: Callable, subset: np.ndarray | None = None) -> float:
    """Accuracy on the evaluation split (or on the examples ``subset`` of it)."""
    was_training = model.training
    model.eval()
    order = np.arange(len(data.y_test)) if subset is None else np.asarray(subset)
    n = len(order)
    lens = data.lengths("test")
    if lens is not None:
        order = order[np.argsort(lens[order], kind="stable")]
    correct = 0
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        inputs, y = data.batch("test", idx, device)
        with autocast():
            logits = _forward(model, inputs)
        correct += int((logits.argmax(-1) == y).sum())
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

    Only checks: the directory is created when the first file is written.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    has_run = (out / "config.json").is_file()
    if resume:
        if not has_run or not (out / CHECKPOINT).is_file():
            raise ConfigError(f"--resume: {out} holds no dpft checkpoint to resume from")
        return
    if out.is_dir() and any(out.iterdir()):
        if has_run and not overwrite:
            raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it or "
                              "--overwrite to replace it")
        if not has_run:
            raise ConfigError(f"--out {out} is not empty and holds no dpft run; choose another directory")


def _check_resume_config(saved: dict, r: TrainConfig) -> None:
    diffs = [f"{k} (run: {saved.get(k)!r}, now: {v!r})" for k, v in r.to_dict().items()
             if k not in _OPERATIONAL and k in saved and saved[k] != v]
    if diffs:
        raise ConfigError("--resume with a different configuration: " + "; ".join(diffs))


def merge_resume_config(cfg: TrainConfig) -> TrainConfig:
    """For --resume: the saved configuration, overridden by the options given now."""
    saved = json.loads((Path(cfg.out) / "config.json").read_text())
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


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=offline.json_default) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------


def _fmt_eps(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "inf"
    return f"{x:.3f}"


def _make_engine(model, r: TrainConfig, n_train: int, steps_total: int, noise_seed: int):
    import dpft
    engine_cls = getattr(dpft, "PrivacyEngine", None)
    if engine_cls is None:  # pragma: no cover - until the engine lands
        raise NotAvailableYet("private training needs dpft.PrivacyEngine, which is not available "
                              "in this build; use a nonprivate-* method")
    kwargs = dict(batch_size=r.batch_size, sample_size=n_train, target_epsilon=r.epsilon,
                  target_delta=r.delta, max_grad_norm=r.max_grad_norm, clipping_fn=r.clipping_fn,
                  clipping_style="all-layer", clipping_mode=r.clipping_mode,
                  accountant=r.accountant, loss_reduction="mean", noise_seed=noise_seed)
    try:
        engine = engine_cls(model, steps=steps_total, **kwargs)
    except NotImplementedError as e:
        raise NotAvailableYet(f"method {r.method}: the engine cannot train these parameters "
                              f"yet: {e}") from e
    except (TypeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"method {r.method}: {msg}") from e
    return engine


def _make_sparta(model, r: TrainConfig, n_train: int):
    """The :class:`dpft.methods.sparta.Sparta` of the run: σ calibrated for warm-up +
    scoring + training steps (no scoring steps with a public ``--sparta-selection``);
    candidates are the Linear weights outside the head."""
    from .methods.sparta import Sparta, default_candidates
    head = sorted(_head_param_names(model))
    candidates = [n for n in default_candidates(model) if n not in head]
    try:
        return Sparta(model, batch_size=r.batch_size, sample_size=n_train, target_epsilon=r.epsilon,
                      train_epochs=r.epochs, scoring_epochs=r.scoring_epochs, warmup_epochs=r.warmup_epochs,
                      density=r.density, selection=r.sparta_selection, candidates=candidates, always_train=head,
                      target_delta=r.delta, accountant=r.accountant, max_grad_norm=r.max_grad_norm,
                      clipping_fn=r.clipping_fn, clipping_style="all-layer", clipping_mode=r.clipping_mode,
                      loss_reduction="mean")
    except NotImplementedError as e:
        raise NotAvailableYet(f"method sparta: the engine cannot train these parameters yet: {e}") from e
    except (TypeError, ValueError) as e:
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


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run one job; returns the summary dict (also written to ``out/summary.json``)."""
    log = log or (lambda s: print(s, flush=True))
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
    ds_name = cfg.dataset or "rotten-tomatoes"
    task = offline.load_dataset(ds_name, seed=cfg.seed or 0)
    r, notes = resolve(cfg, kind=task.kind, device=device, n_train_total=len(task.y_train))
    out = Path(world.same(r.out or _default_out(r)))  # rank 0's choice (a default name has a time)
    r.out = str(out)
    if r.resume:
        _check_resume_config(json.loads((out / "config.json").read_text()), r)
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

    # --- data ------------------------------------------------------------------
    if r.validation_size:
        task = task.validation_split(r.validation_size, seed=r.seed)
        notes.append(f"evaluating on {len(task.y_test):,} held-out TRAINING examples "
                     "(--validation-size), not on the test set")
    task = task.subset(_size(r.train_size, "train-size"), _size(r.eval_size, "eval-size"), seed=r.seed)
    n_train = len(task.y_train)
    if n_train < 2:
        raise ConfigError(f"the training set has {n_train} example(s); need at least 2")
    torch.manual_seed(r.seed)

    # --- model -------------------------------------------------------------------
    tokenizer = None
    if task.kind == "text":
        model, tokenizer = offline.load_text_model(
            None if offline.is_packaged_text_model(r.model) else r.model, task.num_labels)
    else:
        in_ch = int(task.x_train.shape[1])
        # --model cnn-fmnist builds (once, cached) and logs the public Fashion-MNIST CNN
        model = offline.load_image_model(r.model, task.num_labels, in_ch, log=log)
        if getattr(model, "pretrained_info", None):
            pi = model.pretrained_info
            notes.append(f"{r.model}: public weights pretrained (non-privately) on Fashion-MNIST, "
                         f"{100 * pi['test_accuracy']:.1f}% Fashion-MNIST test accuracy ({pi['path']}); "
                         f"new {task.num_labels}-class head")
    if r.dropout is not None:
        set_dropout(model, r.dropout)
    model = select_trainable(model, r.method, r.lora_rank, notes=notes)
    model.to(device)
    model.train()
    trainable, total = count_params(model)
    data = Encoded(task, tokenizer, r.max_seq_len)

    private = r.method in PRIVATE_METHODS
    if r.batch_size > n_train:
        raise ConfigError(f"--batch-size {r.batch_size} is larger than the training set ({n_train:,})")
    steps_per_epoch = math.ceil(n_train / r.batch_size)  # the engine's convention
    steps_total = max(1, math.ceil(r.epochs * steps_per_epoch))
    if r.eval_every is None:
        r.eval_every = max(1, math.ceil(steps_total / 8))
    # The randomness DP relies on (batch sampling, noise) comes from a secret seed:
    # OS entropy unless --dp-seed; kept in the checkpoint so that --resume continues it.
    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False) if r.resume else None
    if ckpt is not None:
        dp_secret = int(ckpt["dp_seed"])
    else:
        dp_secret = r.dp_seed if r.dp_seed is not None else secrets.randbits(63)
    dp_secret = world.same(dp_secret)  # all ranks draw the same global Poisson batches
    plan = BatchPlan(n_train, r.batch_size, steps_per_epoch, _derive_seed(dp_secret, 0),
                     poisson=r.poisson and private)
    sp = None
    if r.method == "sparta":
        # optimizer and engine come after the scoring pass (or from the checkpoint's row selection)
        sp = _make_sparta(model, r, n_train)
        optimizer, engine, net = None, None, model
    else:
        optimizer = make_optimizer(model, r)
        net = world.wrap(model)  # DistributedDataParallel under torchrun (the engine unwraps it)
        engine = _make_engine(net, r, n_train, steps_total, _derive_seed(dp_secret, 1)) if private else None
        if engine is not None:
            engine.attach(optimizer)
    dp = engine if engine is not None else sp

    majority_label, majority_acc = task.majority_baseline()
    cpu_note = "" if device.type != "cpu" else f", {torch.get_num_threads()} threads"
    log(f"dpft train: {r.method} on {task.description}")
    log(f"  model {r.model} ({total:,} parameters, {trainable:,} trainable = "
        f"{100 * trainable / total:.2f}%), device {device}{cpu_note}")
    for note in notes:
        log(f"  note: {note}")
    if dp is not None:
        if sp is not None:
            warm = f"{sp.steps['warmup']} warm-up + " if sp.steps["warmup"] else ""
            scoring = f"{sp.steps['scoring']} scoring + " if sp.steps["scoring"] else ""
            step_text = f"{warm}{scoring}{steps_total} training steps"
        else:
            step_text = f"{steps_total} steps"
        log(f"  DP: target ε = {r.epsilon:g}, δ = {dp.target_delta:.3g}, σ = "
            f"{dp.noise_multiplier:.4f}, q = {min(1.0, r.batch_size / n_train):.4f}, "
            f"{step_text}, clip {r.clipping_fn} R = {r.max_grad_norm:g}, "
            f"accountant {r.accountant}")
    if sp is not None:
        log(f"  SPARTA: density {r.density:g} of the rows of {len(sp.candidates)} candidate weights "
            f"(+ biases and head), "
            + (f"scoring {r.scoring_epochs:g} epoch(s)" if sp.steps["scoring"] else f"{sp.selection} selection")
            + (f", warm-up {r.warmup_epochs:g} epoch(s)" if sp.steps["warmup"] else ""))
    log(f"  {n_train:,} training / {len(task.y_test):,} evaluation examples, logical batch "
        f"{r.batch_size}, physical ≤ {r.max_physical_batch_size}, lr {r.lr:g} (head {r.head_lr:g}), "
        f"{r.epochs:g} epoch{'' if r.epochs == 1 else 's'}, "
        f"output {out}")

    use_autocast = r.bf16 and device.type in ("cuda", "cpu")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_autocast \
        else (lambda: torch.autocast(device.type, enabled=False))

    if sp is not None:
        engine = _sparta_phases(sp, model, r, data, device, autocast, n_train, steps_per_epoch,
                                dp_secret, ckpt, log)
        optimizer = engine.optimizer
        trainable = _sparta_trainable(model)
        rows = sum(int(m.sum()) for m in sp.masks.values())
        log(f"  SPARTA: {rows:,} of {sum(m.numel() for m in sp.masks.values()):,} candidate rows "
            f"selected; {trainable:,} trainable parameters ({100 * trainable / total:.2f}%)")

    # --- state (fresh or resumed) -----------------------------------------------
    step = 0
    metrics_path = out / "metrics.jsonl"
    elapsed_before = 0.0
    if ckpt is not None:
        missing = set(_trainable_state(model)) ^ set(ckpt["model"])
        if missing:
            raise ConfigError(f"--resume: checkpoint parameters do not match the model ({sorted(missing)[:3]})")
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n, t in ckpt["model"].items():
                named[n].copy_(t.to(named[n].device, named[n].dtype))
        optimizer.load_state_dict(ckpt["optimizer"])
        if engine is not None:
            engine.load_state_dict(ckpt["engine"])
        _set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        elapsed_before = ckpt.get("elapsed", 0.0)
        lines = metrics_path.read_text().splitlines()[: ckpt["metrics_lines"]] if metrics_path.exists() else []
        if world.rank == 0:
            metrics_path.write_text("".join(line + "\n" for line in lines))
        log(f"  resumed from step {step} (ε so far {_fmt_eps(_epsilon(engine))})")
    elif world.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", r.to_dict())
        metrics_path.write_text("")
        for stale in ("summary.json", "report.png", CHECKPOINT):
            (out / stale).unlink(missing_ok=True)
    world.barrier()

    lengths = data.lengths("train")
    metrics_file = open(metrics_path, "a") if world.rank == 0 else None
    n_lines = len(metrics_path.read_text().splitlines())

    def record(obj: dict) -> None:
        nonlocal n_lines
        if world.rank != 0:
            n_lines += 1
            return
        metrics_file.write(json.dumps(obj, default=offline.json_default) + "\n")
        metrics_file.flush()
        n_lines += 1

    def save_checkpoint() -> None:
        if world.rank != 0:
            return
        _atomic_save({"model": _trainable_state(model), "optimizer": optimizer.state_dict(),
                      "engine": engine.state_dict() if engine is not None else None,
                      "rng": _rng_state(), "step": step, "metrics_lines": n_lines, "dp_seed": dp_secret,
                      "elapsed": elapsed_before + time.perf_counter() - t_train,
                      **({"sparta_masks": sp.masks} if sp is not None else {})},
                     out / CHECKPOINT)

    # Ctrl-C: finish the current step, checkpoint, exit (resumable); a second Ctrl-C aborts.
    interrupted = {"flag": False}
    old_handler = None
    if threading_main():
        def on_sigint(signum, frame):
            if interrupted["flag"]:
                raise KeyboardInterrupt
            interrupted["flag"] = True
        old_handler = signal.signal(signal.SIGINT, on_sigint)

    tqdm = _tqdm(r.progress and world.rank == 0)
    t_train = time.perf_counter()
    last_acc = None
    stopped = None
    eval_bs = 2 * r.max_physical_batch_size
    # Progress evaluations (before training, every eval_every steps, at epoch ends) use a
    # fixed subset of at most MONITOR_SIZE evaluation examples; the final one uses all.
    n_eval = len(task.y_test)
    monitor = None
    if n_eval > MONITOR_SIZE:
        monitor = np.sort(np.random.default_rng([r.seed, 17]).permutation(n_eval)[:MONITOR_SIZE])

    def run_eval(epoch: int, final: bool) -> float:
        subset = None if final else monitor
        # under torchrun rank 0 alone evaluates (the model is the same on every rank)
        acc = evaluate(model, data, device, eval_bs, autocast, subset) if world.rank == 0 else math.nan
        record({"event": "eval", "step": step, "epoch": epoch, "test_accuracy": acc,
                "examples": n_eval if subset is None else len(subset), "final": final,
                "epsilon": _epsilon(engine) if engine is not None else None})
        return acc

    if step == 0 and r.eval_every:
        run_eval(0, final=False)
    try:
        while step < steps_total and stopped is None:
            epoch = step // steps_per_epoch
            first = step - epoch * steps_per_epoch
            last = min(steps_per_epoch, steps_total - epoch * steps_per_epoch)
            bar = tqdm(total=last, initial=first, desc=f"epoch {epoch + 1}/{math.ceil(r.epochs)}",
                       unit="step", leave=True, dynamic_ncols=True)
            loss_avg = None
            for b in range(first, last):
                idx = plan.batch(epoch, b)
                mine = idx[world.rank::world.size]  # this process's share of the global batch
                loss_sum, correct = 0.0, 0
                chunks = physical_chunks(mine, r.max_physical_batch_size, lengths)
                for chunk in chunks:
                    inputs, y = data.batch("train", chunk, device)
                    with autocast():
                        logits = _forward(net, inputs)
                    loss = F.cross_entropy(logits.float(), y)
                    if private or len(chunks) == 1:
                        loss.backward()
                    else:  # non-private accumulation: weight each chunk by its share
                        (loss * len(chunk) / len(mine)).backward()
                    loss_sum += float(loss.detach()) * len(chunk)
                    correct += int((logits.argmax(-1) == y).sum())
                loss_sum, correct = world.sum(loss_sum, correct)
                set_lr(optimizer, r, step, steps_total)
                if len(mine) == 0 and engine is not None:
                    _empty_step(engine, optimizer)
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                eps = _epsilon(engine)
                row = {"event": "step", "step": step, "epoch": epoch + 1, "batch_size": int(len(idx)),
                       "loss": loss_sum / len(idx) if len(idx) else None,
                       "train_accuracy": correct / len(idx) if len(idx) else None,
                       "epsilon": eps if engine is not None else None,
                       "lr": optimizer.param_groups[0]["lr"],
                       "time": round(elapsed_before + time.perf_counter() - t_train, 3)}
                record(row)
                if row["loss"] is not None:
                    loss_avg = row["loss"] if loss_avg is None else 0.9 * loss_avg + 0.1 * row["loss"]
                bar.set_postfix_str(_postfix(loss_avg, row["train_accuracy"], eps, last_acc), refresh=False)
                bar.update(1)
                end_of_epoch = b == last - 1
                if (r.eval_every and step % r.eval_every == 0) or end_of_epoch:
                    last_acc = run_eval(epoch + 1, final=step == steps_total)
                    bar.set_postfix_str(_postfix(loss_avg, row["train_accuracy"], eps, last_acc))
                if r.stop_after_steps and step >= r.stop_after_steps and step < steps_total:
                    stopped = f"stopped after {step} steps (--stop-after-steps)"
                elif interrupted["flag"]:
                    stopped = f"interrupted after step {step}"
                if end_of_epoch or stopped or (r.checkpoint_every and step % r.checkpoint_every == 0):
                    save_checkpoint()
                if stopped:
                    break
            bar.close()
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)

    train_time = elapsed_before + time.perf_counter() - t_train
    if stopped:
        log(f"  {stopped}; checkpoint saved. Continue with: dpft train --out {out} --resume")
        world.close()
        return {"stopped": True, "step": step, "out": str(out)}

    final_rows = [json.loads(x) for x in metrics_path.read_text().splitlines()]
    final_rows = [x for x in final_rows if x.get("event") == "eval" and x.get("final")]
    if final_rows and final_rows[-1]["step"] == step:
        last_acc = final_rows[-1]["test_accuracy"]
    elif world.rank == 0:  # e.g. resumed from a checkpoint written after the last step
        last_acc = evaluate(model, data, device, eval_bs, autocast)
    summary = {
        "method": r.method, "model": r.model, "dataset": task.name,
        "trainable_parameters": trainable, "total_parameters": total,
        "trainable_percent": 100 * trainable / total,
        "train_size": n_train, "eval_size": int(len(task.y_test)),
        "eval_split": "validation" if r.validation_size else "test",
        "test_accuracy": last_acc, "majority_label": majority_label, "majority_baseline": majority_acc,
        "epsilon": _epsilon(engine) if engine is not None else float("inf"),
        "target_epsilon": r.epsilon if engine is not None else None,
        "delta": engine.target_delta if engine is not None else None,
        "noise_multiplier": engine.noise_multiplier if engine is not None else 0.0,
        "sample_rate": min(1.0, r.batch_size / n_train),
        "steps": step, "epochs": r.epochs, "batch_size": r.batch_size, "lr": r.lr,
        "max_seq_len": r.max_seq_len or None,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start + elapsed_before,
        "peak_memory_mb": _peak_memory_mb(device), "device": str(device),
        "private": engine is not None, "out": str(out),
    }
    if sp is not None:
        summary["sparta"] = {
            "density": r.density, "selection": sp.selection, "candidates": len(sp.candidates),
            "selected_rows": sum(int(m.sum()) for m in sp.masks.values()),
            "candidate_rows": sum(m.numel() for m in sp.masks.values()),
            "warmup_steps": sp.steps["warmup"], "scoring_steps": sp.steps["scoring"],
            "training_steps": step, "ledger_steps": engine.steps,
        }
    if engine is not None:
        engine.detach()
    if world.size > 1:
        summary["world_size"] = world.size
    if world.rank == 0:
        _write_json(out / "summary.json", summary)
        plot = write_report(out, summary)
        _print_summary(summary, log, plot)
    world.close()
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


def _print_summary(s: dict, log, plot: Path | None) -> None:
    rows = [
        ("method", s["method"] + ("" if s["private"] else " (NOT private)")),
        ("trainable params", f"{s['trainable_parameters']:,} of {s['total_parameters']:,} "
                             f"({s['trainable_percent']:.2f}%)"),
        (f"{s['eval_split']} accuracy", f"{s['test_accuracy']:.4f}  ({s['eval_size']:,} examples)"),
        ("majority baseline", f"{s['majority_baseline']:.4f}  (always '{s['majority_label']}')"),
        ("ε (spent / target)", f"{_fmt_eps(s['epsilon'])} / {s['target_epsilon']:g}"
         if s["private"] else "inf (no privacy)"),
        ("δ", f"{s['delta']:.3g}" if s["delta"] is not None else "-"),
        ("σ (noise multiplier)", f"{s['noise_multiplier']:.4f}"),
        ("steps", f"{s['steps']}  (q = {s['sample_rate']:.4f}, {s['train_size']:,} training examples)"),
        ("wall time", f"{s['wall_time_s']:.1f} s  (training {s['train_time_s']:.1f} s)"),
        ("peak memory", f"{s['peak_memory_mb']:.0f} MB ({'GPU' if s['device'].startswith('cuda') else 'process RSS'})"),
    ]
    width = max(len(k) for k, _ in rows)
    log("")
    for k, v in rows:
        log(f"  {k:<{width}}  {v}")
    extra = ", report.png" if plot else ""
    log(f"  results in {s['out']}/ (summary.json, metrics.jsonl, config.json{extra}, {CHECKPOINT})")
    if s["private"]:
        log(f"  keep {CHECKPOINT} as private as the data: it holds the secret seed of the batch "
            "sampling and the noise")


def write_report(out: Path, summary: dict) -> Path | None:
    """report.png: training loss, test accuracy and ε against step (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
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
    if monitor:
        k = monitor[0][2]
        sub = f" ({k:,}-example subset)" if final and k and k < (final[-1][2] or 0) else ""
        axes[1].plot([m[0] for m in monitor], [m[1] for m in monitor], "o-", ms=3, color="tab:green",
                     label=f"{split}{sub}")
    if final:
        axes[1].plot([f[0] for f in final], [f[1] for f in final], "D", ms=7, color="darkgreen",
                     label=f"{split} (all {final[-1][2]:,})")
    axes[1].axhline(summary["majority_baseline"], ls="--", color="grey", label="majority class")
    axes[1].set(title=f"{split} accuracy", xlabel="step")
    axes[1].legend(loc="lower right", fontsize=8)
    if eps:
        axes[2].plot([s for s, _ in eps], [e for _, e in eps], color="tab:red")
        axes[2].axhline(summary["target_epsilon"], ls="--", color="grey", label="target")
        axes[2].legend(loc="lower right")
        axes[2].set(title=f"ε spent (δ = {summary['delta']:.2g})", xlabel="step")
    else:
        axes[2].text(0.5, 0.5, "non-private:\nε = ∞", ha="center", va="center", fontsize=14,
                     transform=axes[2].transAxes)
        axes[2].set_title("ε")
        axes[2].axis("off")
    fig.suptitle(f"dpft {summary['method']} · {summary['model']} · {summary['dataset']}")
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ += ["evaluate", "BatchPlan", "physical_chunks", "select_trainable", "write_report",
            "DataUnavailable"]
