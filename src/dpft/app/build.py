"""Building a job: the model and its trainable parameters (the method), the optimizer, and
the privacy side (engine or SPARTA driver)."""

from __future__ import annotations

import math
import secrets
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import offline
from .offline import TaskData
from ..checkpoint import CheckpointError, read_checkpoint
from ..methods import registry
from ..options import EngineOptions
from ..methods.registry import MethodError
from .errors import ConfigError
from .config import CHECKPOINT, NotAvailableYet, TrainConfig, _pick_device, _size, resolve, validate
from .prepare import (
    BatchPlan,
    Encoded,
    _Job,
    _World,
    _check_resume_config,
    _default_out,
    _derive_seed,
    _read_config_json,
    merge_resume_config,
    prepare_out,
)


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
    raise ConfigError(
        f"cannot find the classification head of {type(model).__name__} (looked for {', '.join(_HEAD_NAMES)})"
    )


def select_trainable(model: nn.Module, method: str, lora_rank: int = 8, notes: list[str] | None = None) -> nn.Module:
    """Freeze/unfreeze (and for LoRA wrap) ``model`` for ``method`` (the registered method's
    :attr:`~dpft.methods.registry.Method.select`); returns the model to train.
    ``notes``: where a change to the model is said (bitfit adding biases)."""
    head = sorted(_head_param_names(model))
    try:
        entry = registry.get(method)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    try:
        return entry.select(model, head=head, notes=notes, lora_rank=lora_rank, head_modules=_HEAD_NAMES)
    except MethodError as e:
        raise ConfigError(str(e)) from e


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
        raise NotAvailableYet(
            "private training needs dpft.PrivacyEngine, which is not available in this build; use a nonprivate-* method"
        )
    try:
        # privacy_unit "user": n_train is the number of users
        options = EngineOptions(
            target_delta=r.delta,
            max_grad_norm=r.max_grad_norm,
            clipping_fn=r.clipping_fn,
            clipping_style=clipping_groups(model, r.clipping_style),
            clipping_mode=r.clipping_mode,
            accountant=r.accountant,
            loss_reduction="mean",
            noise_seed=noise_seed,
            poisson=r.poisson,
            privacy_unit=r.privacy_unit,
        )
        engine = engine_cls(
            model,
            batch_size=r.batch_size,
            sample_size=n_train,
            target_epsilon=r.epsilon,
            steps=steps_total,
            options=options,
        )
    except NotImplementedError as e:
        raise NotAvailableYet(f"method {r.method}: the engine cannot train these parameters yet: {e}") from e
    except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: σ cannot be calibrated
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"method {r.method}: {msg}") from e
    return engine


def _make_sparta(model, r: TrainConfig, n_train: int):
    """The :class:`dpft.methods.sparta.Sparta` of the run: σ calibrated for warm-up +
    scoring + training steps (no scoring steps with a public ``--sparta-selection``);
    candidates are the Linear weights outside the head."""
    # (--privacy-unit user: n_train is the number of users, each phase's engine clips per user)
    from ..methods.sparta import Sparta, default_candidates

    class _Sparta(Sparta):
        """Each phase's engine clips with ``r.clipping_style`` over what trains in that phase."""

        def _engine(self, phase: str, **kw: Any):
            self.engine_kwargs["clipping_style"] = clipping_groups(self.model, r.clipping_style)
            return super()._engine(phase, **kw)

    head = sorted(_head_param_names(model))
    candidates = [n for n in default_candidates(model) if n not in head]
    try:
        return _Sparta(
            model,
            batch_size=r.batch_size,
            sample_size=n_train,
            target_epsilon=r.epsilon,
            train_epochs=r.epochs,
            scoring_epochs=r.scoring_epochs,
            warmup_epochs=r.warmup_epochs,
            density=r.density,
            selection=r.sparta_selection,
            candidates=candidates,
            always_train=head,
            target_delta=r.delta,
            accountant=r.accountant,
            max_grad_norm=r.max_grad_norm,
            clipping_fn=r.clipping_fn,
            clipping_style="all-layer",
            clipping_mode=r.clipping_mode,
            loss_reduction="mean",
            poisson=r.poisson,
            **({"privacy_unit": "user"} if r.privacy_unit == "user" else {}),
        )
    except NotImplementedError as e:
        raise NotAvailableYet(f"method sparta: the engine cannot train these parameters yet: {e}") from e
    except (TypeError, ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"method sparta: {msg}") from e


def _enable_checkpointing(model: nn.Module, name: str) -> None:
    """Hugging Face's activation checkpointing on ``model`` or the encoder it wraps
    (non-reentrant); a model without it is refused."""
    target = next(
        (
            m
            for m in model.modules()
            if hasattr(m, "gradient_checkpointing_enable") and getattr(m, "supports_gradient_checkpointing", False)
        ),
        None,
    )
    if target is None:
        raise ConfigError(
            f"--gradient-checkpointing: model {name!r} has no Hugging Face activation "
            "checkpointing (gradient_checkpointing_enable); leave the flag off"
        )
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
    task = offline.load_task(
        cfg.dataset or "rotten-tomatoes",
        seed=cfg.seed or 0,
        test_file=cfg.test_file,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        user_column=cfg.user_column if cfg.privacy_unit == "user" else None,
    )
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
        notes.append(
            f"data parallel over {world.size} processes ({world.backend}): each takes 1 in "
            f"{world.size} examples of each global logical batch of {r.batch_size}"
        )
        if r.privacy_unit == "user":
            raise ConfigError("--privacy-unit user under torchrun is not supported (run it on one process)")
    if r.privacy_unit == "user" and task.u_train is None:
        raise ConfigError(
            "--privacy-unit user needs --user-column NAME: the column of the training data "
            "that names each example's user (the packaged rotten-tomatoes data: movie_name)"
        )
    return _Job(
        r=r,
        notes=notes,
        log=log,
        world=world,
        device=device,
        out=out,
        task=task,
        t_start=t_start,
        batch_given=cfg.batch_size is not None,
    )


def _prepare_data(job: _Job) -> None:
    """The validation split (--validation-size) and the subsamples of the splits."""
    r, task = job.r, job.task
    if r.validation_size:
        if r.validation_size >= len(task.y_train):
            raise ConfigError(
                f"--validation-size {r.validation_size} must be smaller than the training set "
                f"({len(task.y_train):,} examples)"
            )
        task = task.validation_split(r.validation_size, seed=r.seed)
        job.notes.append(
            f"evaluating on {len(task.y_test):,} held-out TRAINING examples (--validation-size), not on the test set"
        )
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
        job.notes.append(
            f"--privacy-unit user: logical batch of {r.batch_size} users by default (expected "
            f"{r.batch_size * job.n_train / job.n_units:.0f} examples, as {examples} examples at "
            "example level; --batch-size counts users)"
        )
    if r.batch_size > job.n_units:
        raise ConfigError(
            f"--batch-size {r.batch_size} is larger than the number of users ({job.n_units:,}); "
            "with --privacy-unit user it counts users"
        )
    sizes = np.bincount(job.units)
    job.notes.append(
        f"privacy unit: user ({task.user_column or 'user column'}): {job.n_units:,} users, "
        f"{sizes.min()} to {sizes.max()} (median {int(np.median(sizes))}) training examples each; "
        "ε protects all of a user's examples"
    )


def _build_model(job: _Job) -> None:
    """The model with its new head, frozen/unfrozen (or LoRA-wrapped) for the method."""
    r, task = job.r, job.task
    torch.manual_seed(r.seed)
    if task.kind == "text":
        model, job.tokenizer = offline.load_text_model(
            None if offline.is_packaged_text_model(r.model) else r.model, task.num_labels
        )
    else:
        in_ch = int(task.x_train.shape[1])
        # --model cnn-fmnist builds (once, cached) and logs the public Fashion-MNIST CNN
        model = offline.load_image_model(r.model, task.num_labels, in_ch, log=job.log)
        if getattr(model, "pretrained_info", None):
            pi = model.pretrained_info
            public = (
                "Fashion-MNIST"
                if pi.get("public_data", "fashion-mnist") == "fashion-mnist"
                else "scikit-learn's digits (Fashion-MNIST not installed)"
            )
            job.notes.append(
                f"{r.model}: public weights pretrained (non-privately) on {public}, "
                f"{100 * pi['test_accuracy']:.1f}% test accuracy there ({pi['path']}); "
                f"new {task.num_labels}-class head"
            )
    if r.dropout is not None:
        set_dropout(model, r.dropout)
    model = select_trainable(model, r.method, r.lora_rank, notes=job.notes)
    if r.gradient_checkpointing:
        _enable_checkpointing(model, r.model)
        job.notes.append(
            "activation checkpointing on (non-reentrant): one more forward per step, activations kept per block only"
        )
    model.to(job.device)
    model.train()
    job.model = model
    job.trainable, job.total = count_params(model)
    job.data = Encoded(task, job.tokenizer, r.max_seq_len)
    use_autocast = r.bf16 and job.device.type in ("cuda", "cpu")
    dev = job.device.type
    job.autocast = (
        (lambda: torch.autocast(dev, dtype=torch.bfloat16))
        if use_autocast
        else (lambda: torch.autocast(dev, enabled=False))
    )


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
    job.plan = BatchPlan(
        job.n_train,
        r.batch_size,
        job.steps_per_epoch,
        _derive_seed(job.dp_secret, 0),
        poisson=r.poisson and job.private,
        units=job.units if job.user_level else None,
    )
    if r.method == "sparta":
        # optimizer and engine come after the scoring pass (or from the checkpoint's row selection)
        job.sp = _make_sparta(job.model, r, job.n_units)
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
    log(
        f"  model {r.model} ({job.total:,} parameters, {job.trainable:,} trainable = "
        f"{100 * job.trainable / job.total:.2f}%), device {job.device}{cpu_note}"
    )
    for note in job.notes:
        log(f"  note: {note}")
    if dp is not None:
        if sp is not None:
            warm = f"{sp.steps['warmup']} warm-up + " if sp.steps["warmup"] else ""
            scoring = f"{sp.steps['scoring']} scoring + " if sp.steps["scoring"] else ""
            step_text = f"{warm}{scoring}{job.steps_total} training steps"
        else:
            step_text = f"{job.steps_total} steps"
        log(
            f"  DP: target ε = {r.epsilon:g}, δ = {dp.target_delta:.3g}, σ = "
            f"{dp.noise_multiplier:.4f}, q = {min(1.0, r.batch_size / job.n_units):.4f}"
            f"{' (users)' if job.user_level else ''}, "
            f"{step_text}, clip {r.clipping_fn} R = {r.max_grad_norm:g} ({r.clipping_style}), "
            f"accountant {r.accountant}"
        )
    if sp is not None:
        log(
            f"  SPARTA: density {r.density:g} of the rows of {len(sp.candidates)} candidate weights "
            f"(+ biases and head), "
            + (f"scoring {r.scoring_epochs:g} epoch(s)" if sp.steps["scoring"] else f"{sp.selection} selection")
            + (f", warm-up {r.warmup_epochs:g} epoch(s)" if sp.steps["warmup"] else "")
        )
    log(
        f"  {job.n_train:,} training / {len(job.task.y_test):,} evaluation examples, logical batch "
        f"{r.batch_size}{' users' if job.user_level else ''}, physical ≤ {r.max_physical_batch_size}, lr {r.lr:g} (head {r.head_lr:g}), "
        f"{r.epochs:g} epoch{'' if r.epochs == 1 else 's'}, "
        f"output {job.out}"
    )


def make_optimizer(model: nn.Module, r: TrainConfig) -> torch.optim.Optimizer:
    """Adam (or SGD with momentum); the new classification head gets ``head_lr``."""
    head_names = set(_head_param_names(_unwrap(model)))
    head, rest = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (head if _strip_peft(n) in head_names else rest).append(p)
    groups = [
        g for g in ({"params": rest, "lr_scale": 1.0}, {"params": head, "lr_scale": r.head_lr / r.lr}) if g["params"]
    ]
    if r.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=r.lr, momentum=0.9)
    return torch.optim.Adam(groups, lr=r.lr)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (names of the head are looked up there)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _strip_peft(name: str) -> str:
    return name[len("base_model.model.") :] if name.startswith("base_model.model.") else name
