"""Hugging Face ``transformers.Trainer`` integration: :class:`DPTrainer`.

An existing Trainer script becomes differentially private by changing
``Trainer(...)`` to ``DPTrainer(..., target_epsilon=3.0, max_grad_norm=1.0)``::

    from dpft.hf import DPTrainer
    trainer = DPTrainer(model=model, args=args, train_dataset=ds,
                        target_epsilon=3.0, max_grad_norm=1.0)
    trainer.train()          # logs include "epsilon"
    trainer.dp_engine.epsilon

What changes compared with ``Trainer``:

* **Logical batch** ``B = per_device_train_batch_size *
  gradient_accumulation_steps`` (one process; see "Not supported").  The
  :class:`dpft.PrivacyEngine` is created in :meth:`create_optimizer` with
  ``batch_size=B``, ``sample_size=len(train_dataset)`` and
  ``steps = the trainer's planned max steps``, and attached to the optimizer
  Hugging Face builds.  accelerate's ``AcceleratedOptimizer.step`` calls the
  inner optimizer's ``step``, which is the engine's privatized step: it runs
  once per logical batch (the Trainer only steps on its sync step).
* **Gradient clipping** of the Trainer (``TrainingArguments.max_grad_norm``)
  is switched off: DP per-example clipping replaces it.  The Trainer's
  ``grad_norm`` log (the norm of the *non-private* gradient) is not logged.
* **Per-example losses**: every ``backward()`` is of the plain mean over the
  physical batch of per-example losses (the engine divides by ``B`` itself;
  the Trainer's ``1/gradient_accumulation_steps`` scaling is not applied).
  For token-level labels (causal LM, with ``-100`` ignored; seq2seq; token
  classification) each example's loss is the mean over *its own* tokens.
  Hugging Face's default loss divides the summed token loss by the number of
  tokens in the whole (accumulated) batch, so one example's gradient would
  be scaled by the lengths of the *other* examples: the per-example
  gradients the engine clips would then depend on other people's data and
  the sensitivity bound (hence ε) would not hold.
* **Sampling**: with ``poisson=True`` (default) the training data loader
  draws Poisson-subsampled logical batches (each example independently with
  probability ``q = B / N``, :func:`dpft.data.poisson_loader`) — the sampling
  the accountant analyses.  Each logical batch is split into physical chunks
  of at most ``per_device_train_batch_size`` examples inside
  :meth:`training_step` (the Trainer's own gradient accumulation is set to 1,
  so one Trainer "step" is one logical batch); an empty batch is declared to
  the engine (noise-only step).  The sampling seed is ``args.data_seed`` when
  set (reproducible, for experiments), else drawn from OS entropy: subsampling
  amplifies privacy only while the batches stay secret, so the public
  ``args.seed`` (42 by default) is never used for them.  With ``poisson=False``
  the Trainer's usual shuffled fixed-size batches are used, a warning says that
  ε is then the Poisson ε reported by convention, not a guarantee, and the
  engine labels it so (``trainer.dp_engine.epsilon_caveat``).
* ``epsilon`` (spent so far, at ``target_delta``) is added to every log.
* **Checkpoints**: every ``checkpoint-N/`` folder the Trainer writes also
  holds ``dpft_state.pt``: the privacy ledger, the noise generator and the
  Poisson sampling seed.  ``trainer.train(resume_from_checkpoint=...)``
  restores them, so the resumed run continues the same ledger (ε is that of
  an uninterrupted run, never restarted at 0), draws the same noise and the
  same Poisson batches.  Resuming from a checkpoint without that file raises
  (it would silently under-report ε).  The file holds the noise and sampling
  seeds: keep checkpoints as private as the training data.

Not supported (clear error): several processes (``torchrun`` / accelerate
multi-process, i.e. ``world_size > 1``) and several GPUs in one process
(``DataParallel``): the Trainer would wrap the model in DDP, whose gradient
all-reduce does not fit per-example clipping.  For data-parallel DP use
:class:`dpft.PrivacyEngine` in your own loop under ``torchrun`` (it
all-reduces the clipped sums itself, see its ``distributed`` argument) with
:func:`dpft.data.poisson_loader`.  Also not supported: fp16 with a gradient
scaler (use bf16 or fp32), label smoothing, ``compute_loss_func``, DeepSpeed /
FSDP.  Models must be supported by the engine (see :mod:`dpft.rules`).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover
    raise ImportError("dpft.hf needs the `transformers` package: pip install transformers") from exc

from .data import poisson_loader, split_physical, user_poisson_loader
from .engine import PrivacyEngine
from .options import EngineOptions

__all__ = ["DPTrainer", "per_example_loss", "DP_STATE_NAME"]

#: the key under which the user loader puts each example's user into a batch (popped before the model)
UNITS_KEY = "_dpft_units"

#: The file, inside each ``checkpoint-N/`` folder, that holds the DP state.
DP_STATE_NAME = "dpft_state.pt"
_DP_STATE_FORMAT = 1


def _check_single_process(args: Any) -> None:
    """Refuse a multi-process or multi-GPU Trainer, naming what is supported."""
    world, n_gpu = int(args.world_size), int(args.n_gpu)
    if world > 1 or n_gpu > 1:
        raise NotImplementedError(
            f"DPTrainer runs in a single process on one device (got world_size={world}, n_gpu={n_gpu}): "
            "under several processes the Trainer wraps the model in DDP, whose gradient all-reduce "
            "bypasses per-example clipping, so the privacy guarantee would not hold. Run it on one "
            "device (e.g. CUDA_VISIBLE_DEVICES=0, one process), or for data-parallel DP training use "
            "dpft.PrivacyEngine in your own loop under torchrun (it all-reduces the clipped sums "
            "itself; see PrivacyEngine(distributed=...)) with dpft.data.poisson_loader"
        )


def _batch_size(inputs: Any) -> int:
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("DPTrainer: found no batched tensor in the inputs")


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    m = model
    for _ in range(4):  # PeftModel -> LoraModel -> the transformers model
        if m.__class__.__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            return True
        inner = getattr(m, "base_model", None)
        inner = getattr(inner, "model", inner) if inner is not None and inner is not m else None
        if inner is None or inner is m:
            break
        m = inner
    return False


def per_example_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = False,
    problem_type: str | None = None,
) -> torch.Tensor:
    """One loss per example, shape ``(batch,)``.

    * ``logits (b, T, V)`` and ``labels (b, T)`` (token level; ``-100`` ignored):
      each example's mean cross-entropy over its own labelled tokens
      (``shift=True`` for causal LM: token ``t`` predicts label ``t+1``).
      An example without labelled tokens has loss 0.
    * ``logits (b, C)``: cross-entropy with integer labels ``(b,)``; mean
      squared error for ``problem_type="regression"`` (or one output with
      float labels); per-example mean binary cross-entropy for
      ``"multi_label_classification"``.
    """
    logits = logits.float()
    if logits.dim() >= 3 and labels.dim() == logits.dim() - 1:
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        tok = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1).to(logits.device),
            ignore_index=-100,
            reduction="none",
        ).view(labels.shape)
        mask = labels.ne(-100).to(tok.dtype)
        return tok.mul(mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)
    labels = labels.to(logits.device)
    if problem_type == "regression" or (problem_type is None and logits.shape[-1] == 1 and labels.is_floating_point()):
        return (
            F.mse_loss(
                logits.squeeze(-1), labels.to(logits.dtype).view(logits.shape[0], -1).squeeze(-1), reduction="none"
            )
            .view(logits.shape[0], -1)
            .mean(1)
        )
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").flatten(1).mean(1)
    return F.cross_entropy(logits, labels.long(), reduction="none")


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with DP-SGD through :class:`dpft.PrivacyEngine`.

    Args (besides those of ``Trainer``):
        target_epsilon / noise_multiplier: exactly one (as in ``PrivacyEngine``).
        max_grad_norm: per-example clipping threshold R.
        target_delta, clipping_fn, clipping_mode, clipping_style, accountant,
        noise_seed: passed to ``PrivacyEngine``.
        options: a :class:`dpft.EngineOptions` instead of the keywords above
            and ``poisson`` / ``privacy_unit`` (as for ``PrivacyEngine``);
            ``trainer.engine_options`` holds them either way.
        poisson: Poisson-subsampled logical batches (default) or the
            Trainer's shuffled fixed-size batches.
        privacy_unit: ``"example"`` (default) or ``"user"``: epsilon then
            protects all the examples of one user (:mod:`dpft.clip.units`).  Give
            the users as ``user_column`` (a column of an HF ``datasets``
            train set; it never reaches the model) or ``user_ids`` (one id
            per training example).  Users are Poisson-sampled at
            ``q = B / U`` with ``B = per_device_train_batch_size *
            gradient_accumulation_steps`` now the expected number of *users*
            per step (each bringing all of their examples, or at most
            ``max_per_user`` of them), split into physical chunks of
            ``per_device_train_batch_size`` examples.

    After ``create_optimizer`` (i.e. once ``train()`` starts), the engine is
    ``trainer.dp_engine``.  Checkpoints hold its state (:data:`DP_STATE_NAME`);
    ``train(resume_from_checkpoint=...)`` continues the same privacy ledger.
    Several processes or GPUs raise ``NotImplementedError``.
    """

    def __init__(
        self,
        *args: Any,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        target_delta: float | None = None,
        clipping_fn: str = "abadi",
        clipping_mode: str = "auto",
        clipping_style: Any = "all-layer",
        accountant: str = "pld",
        noise_seed: int | None = None,
        poisson: bool = True,
        privacy_unit: str = "example",
        user_column: str | None = None,
        user_ids: Any = None,
        max_per_user: int | None = None,
        options: EngineOptions | None = None,
        **kwargs: Any,
    ) -> None:
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError(
                "DPTrainer: give exactly one of target_epsilon / noise_multiplier, got "
                f"target_epsilon={target_epsilon!r}, noise_multiplier={noise_multiplier!r}"
            )
        # the engine's options, checked here once (dpft.options); the trainer reads R, the sampling and the unit
        self.engine_options = EngineOptions.merge(
            options,
            max_grad_norm=max_grad_norm,
            target_delta=target_delta,
            clipping_fn=clipping_fn,
            clipping_mode=clipping_mode,
            clipping_style=clipping_style,
            accountant=accountant,
            noise_seed=noise_seed,
            poisson=bool(poisson),
            privacy_unit=privacy_unit,
        )
        max_grad_norm = self.engine_options.max_grad_norm
        poisson, privacy_unit = self.engine_options.poisson, self.engine_options.privacy_unit
        # do not mutate the caller's TrainingArguments
        if "args" in kwargs and kwargs["args"] is not None:
            kwargs["args"] = copy.copy(kwargs["args"])
            _check_single_process(kwargs["args"])  # before the Trainer sets up any parallelism
        elif len(args) >= 2 and args[1] is not None:
            args = (args[0], copy.copy(args[1]), *args[2:])
            _check_single_process(args[1])
        super().__init__(*args, **kwargs)
        a = self.args
        _check_single_process(a)
        if a.fp16:
            raise ValueError("DPTrainer: fp16 (gradient scaler) is not supported; use bf16=True or fp32")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError("DPTrainer: DeepSpeed / FSDP are not supported")
        if a.label_smoothing_factor:
            raise ValueError("DPTrainer: label_smoothing_factor is not supported (per-example losses)")
        if self.compute_loss_func is not None:
            raise ValueError(
                "DPTrainer: compute_loss_func is not supported; subclass and override "
                "DPTrainer.per_example_losses to return one loss per example"
            )
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError("DPTrainer needs a map-style train_dataset with a length")
        self.privacy_unit = privacy_unit
        self._user_ids = self._read_user_ids(privacy_unit, user_column, user_ids, poisson)
        self.max_per_user = max_per_user
        if a.max_grad_norm not in (None, 0, 0.0):
            if a.max_grad_norm != 1.0:  # 1.0 is the TrainingArguments default
                warnings.warn(
                    f"DPTrainer: TrainingArguments.max_grad_norm={a.max_grad_norm} is ignored (set to 0); "
                    f"DP per-example clipping with max_grad_norm={max_grad_norm} replaces it",
                    stacklevel=2,
                )
            a.max_grad_norm = 0.0
        self.physical_batch_size = int(a.per_device_train_batch_size)
        self.logical_batch_size = self.physical_batch_size * int(a.gradient_accumulation_steps)
        self.poisson = bool(poisson)
        if self.poisson:
            # one Trainer step = one Poisson logical batch, split in training_step
            a.gradient_accumulation_steps = 1
        else:
            warnings.warn(
                "DPTrainer(poisson=False): shuffled fixed-size batches are used, but epsilon is computed "
                "for Poisson subsampling (the common convention, not a guarantee; see dpft.data.shuffled_loader)",
                stacklevel=2,
            )
        self._engine_kwargs = dict(
            target_epsilon=target_epsilon, noise_multiplier=noise_multiplier, options=self.engine_options
        )
        self.dp_engine: PrivacyEngine | None = None
        self.dp_train_dataloader = None

    # -- data ----------------------------------------------------------------
    def _read_user_ids(self, unit: str, column: str | None, ids: Any, poisson: bool) -> list[Any] | None:
        if unit == "example":
            if column is not None or ids is not None:
                raise ValueError("DPTrainer: user_column / user_ids need privacy_unit='user'")
            return None
        if not poisson:
            raise ValueError("DPTrainer: privacy_unit='user' samples users (Poisson); poisson=False is not supported")
        if (column is None) == (ids is None):
            raise ValueError(
                "DPTrainer(privacy_unit='user'): give exactly one of user_column (a column of "
                "train_dataset) or user_ids (one id per training example)"
            )
        if column is not None:
            names = getattr(self.train_dataset, "column_names", None)
            if names is None or column not in names:
                raise ValueError(
                    f"DPTrainer: train_dataset has no column {column!r} (columns: {names}); "
                    "pass user_ids=... for a dataset without columns"
                )
            ids = self.train_dataset[column]
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
        if len(ids) != len(self.train_dataset):
            raise ValueError(f"DPTrainer: {len(ids)} user ids for {len(self.train_dataset)} training examples")
        return ids

    @property
    def num_units(self) -> int:
        """The number of privacy units: examples, or distinct users."""
        return len(self.train_dataset) if self._user_ids is None else len(set(self._user_ids))

    def get_train_dataloader(self):  # type: ignore[override]
        if not self.poisson:
            return super().get_train_dataloader()
        dataset = self.train_dataset
        collator = self.data_collator
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:  # pragma: no cover
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        n = len(dataset)
        seed = self.args.data_seed  # None: OS entropy (args.seed is public, the batches must not be)
        kw: dict[str, Any] = {
            "num_workers": self.args.dataloader_num_workers,
            "pin_memory": self.args.dataloader_pin_memory,
        }
        if self.args.dataloader_num_workers > 0:
            kw["persistent_workers"] = self.args.dataloader_persistent_workers
            kw["prefetch_factor"] = self.args.dataloader_prefetch_factor
        if self._user_ids is not None:
            # users Poisson-sampled at q = B / U (B: expected users per step); ceil(U / B) steps per epoch
            u = self.num_units
            self.dp_train_dataloader = user_poisson_loader(
                dataset,
                self._user_ids,
                min(self.logical_batch_size, u),
                max_per_user=self.max_per_user,
                steps=math.ceil(u / self.logical_batch_size),
                seed=seed,
                collate_fn=collator,
                units_key=UNITS_KEY,
                **kw,
            )
            return self.dp_train_dataloader
        # steps per epoch: ceil(N / B), as PrivacyEngine(epochs=...) counts them
        self.dp_train_dataloader = poisson_loader(
            dataset,
            self.logical_batch_size,
            steps=math.ceil(n / self.logical_batch_size),
            seed=seed,
            collate_fn=collator,
            **kw,
        )
        return self.dp_train_dataloader

    # -- optimizer / engine --------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None):  # type: ignore[override]
        optimizer = super().create_optimizer(model)
        if self.dp_engine is None:
            steps = int(self.state.max_steps) if self.state.max_steps and self.state.max_steps > 0 else None
            if steps is None:
                raise RuntimeError("DPTrainer: the planned number of steps is not known when creating the optimizer")
            self.dp_engine = PrivacyEngine(
                self.model,
                batch_size=min(self.logical_batch_size, self.num_units),
                sample_size=self.num_units,
                steps=steps,
                **self._engine_kwargs,
            )
        if self.dp_engine.optimizer is not optimizer:
            if self.dp_engine.optimizer is not None:
                self.dp_engine.detach()
            self.dp_engine.attach(optimizer)
        return optimizer

    # -- checkpoints: the DP state travels with every checkpoint-N/ folder -----
    def _sampling_seed(self) -> int | None:
        loader = self.dp_train_dataloader
        return None if loader is None else int(loader.batch_sampler.seed)

    def dp_state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the private run exactly: the
        engine (ledger, noise generator) and the Poisson sampling seed."""
        if self.dp_engine is None:
            raise RuntimeError("DPTrainer: no engine yet (it is created when train() starts)")
        return {
            "format": _DP_STATE_FORMAT,
            "engine": self.dp_engine.state_dict(),
            "global_step": int(self.state.global_step),
            "poisson": self.poisson,
            "sampling_seed": self._sampling_seed(),
            "logical_batch_size": self.logical_batch_size,
            "sample_size": self.num_units,
            "privacy_unit": self.privacy_unit,
        }

    def load_dp_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`dp_state_dict` into this trainer's engine and sampler
        (called by ``train(resume_from_checkpoint=...)``)."""
        if self.dp_engine is None:
            raise RuntimeError("DPTrainer: no engine yet (it is created when train() starts)")
        if state.get("format") != _DP_STATE_FORMAT:
            raise ValueError(f"DPTrainer: unknown DP state format {state.get('format')!r}")
        for key, mine in (
            ("poisson", self.poisson),
            ("logical_batch_size", self.logical_batch_size),
            ("sample_size", self.num_units),
            ("privacy_unit", self.privacy_unit),
        ):
            if state.get(key, "example" if key == "privacy_unit" else None) != mine:
                raise ValueError(
                    f"DPTrainer: the checkpoint was trained with {key}={state[key]!r}, "
                    f"this trainer has {key}={mine!r}; resume with the same setup"
                )
        # checks noise multiplier, sampling rate, R and delta against this engine
        self.dp_engine.load_state_dict(state["engine"])
        if self.dp_engine.steps != int(self.state.global_step):
            raise ValueError(
                f"DPTrainer: the checkpoint's privacy ledger has {self.dp_engine.steps} steps but the "
                f"Trainer state is at global step {self.state.global_step}"
            )
        loader = self.dp_train_dataloader
        if self.poisson and loader is not None:
            # Batch i of epoch e is a pure function of (seed, e, i): restart the sampler at the
            # beginning of the current epoch; the Trainer then skips the batches of this epoch
            # that were already trained on (skip_first_batches), as for any data loader.
            sampler = loader.batch_sampler
            epoch = int(self.state.global_step) // len(sampler)
            sampler.load_state_dict(
                {**sampler.state_dict(), "seed": int(state["sampling_seed"]), "epoch": epoch, "position": 0}
            )

    def _save_checkpoint(self, model, trial):  # type: ignore[override]
        # written before the Trainer's own files: a folder whose trainer_state.json exists
        # (the last file the Trainer writes) always has its DP state too
        if self.dp_engine is not None and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            out = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(out, exist_ok=True)
            tmp = os.path.join(out, DP_STATE_NAME + ".tmp")
            torch.save(self.dp_state_dict(), tmp)
            os.replace(tmp, os.path.join(out, DP_STATE_NAME))
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):  # type: ignore[override]
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, DP_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"DPTrainer: {checkpoint} holds no {DP_STATE_NAME} (not written by DPTrainer, or "
                "incomplete); resuming without it would restart the privacy ledger at 0 and "
                "under-report epsilon"
            )
        self.load_dp_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def _get_grad_norm(self, model, grad_norm=None):  # noqa: D401
        # the Trainer's grad norm is of the non-private gradient: never log it
        return None

    # -- loss / step ---------------------------------------------------------
    def per_example_losses(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """``(losses of shape (batch,), model outputs)``; override for custom losses."""
        inputs = dict(inputs)
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("DPTrainer: the training batch has no `labels`; per-example losses need them")
        config = getattr(model, "config", None)
        if not getattr(config, "is_encoder_decoder", False):
            inputs.pop("labels")  # the model's own (batch-coupled) loss is not needed
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        losses = per_example_loss(
            logits,
            labels,
            shift=_is_causal_lm(self.accelerator.unwrap_model(model)),
            problem_type=getattr(config, "problem_type", None),
        )
        return losses, outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        """Mean over the batch of per-example losses (``num_items_in_batch`` is ignored)."""
        if not model.training:  # evaluation: Hugging Face's usual loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)
        losses, outputs = self.per_example_losses(model, inputs)
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        units = inputs.pop(UNITS_KEY) if self._user_ids is not None else None
        n = _batch_size(inputs)
        engine = self.dp_engine
        assert engine is not None, "DPTrainer: the engine is created in create_optimizer"
        if n == 0:  # empty Poisson batch: noise-only step, accounted as usual
            engine.record_empty_batch()
            return torch.zeros((), device=self.args.device)
        if units is not None:
            pairs = split_physical((inputs, units), self.physical_batch_size)
        else:
            pairs = (
                (c, None) for c in (split_physical(inputs, self.physical_batch_size) if self.poisson else [inputs])
            )
        total = torch.zeros((), device=self.args.device)
        for chunk, chunk_units in pairs:
            if chunk_units is not None:
                engine.set_units(chunk_units)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, chunk)
            # plain mean over the physical batch: no 1/gradient_accumulation_steps
            # (the engine divides the clipped sum by the logical batch size)
            loss.backward()
            total = total + loss.detach() * _batch_size(chunk)
        if self.poisson:
            return total / n  # the Trainer sums one value per step
        return total / n / self.current_gradient_accumulation_steps

    # -- logging -------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if self.dp_engine is not None:
            logs["epsilon"] = self.dp_engine.epsilon
        super().log(logs, *args, **kwargs)


assert issubclass(DPTrainer, transformers.Trainer)
