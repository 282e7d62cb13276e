"""``PrivacyEngine``: wires capture -> clip -> noise -> optimizer, with the
privacy ledger beside the flow.

After :meth:`PrivacyEngine.attach`, an ordinary training loop::

    loss = criterion(model(x), y)      # mean over the physical batch
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

applies the privatized gradient ``(sum_i c_i g_i + sigma R z) / B`` to every
trainable parameter (``B`` = the expected logical batch size ``batch_size``).
Several ``backward()`` calls before one ``step()`` accumulate (gradient
accumulation / physical batches); noise is added once per ``step()``.

The stages live beside it: the hooks in :mod:`dpft.capture`, the per-layer
rules in :mod:`dpft.rules`, norms, clipped sums and noise in :mod:`dpft.clip`,
the ranks and the reduce of the noisy sums in :mod:`dpft.distributed`, the
ledger and the budget guard in :mod:`dpft.accounting`.  A step is: the budget
guard, the non-finite check, the sampling check, privatize, the optimizer's step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import accounting
from .accounting import BudgetGuard, Ledger, PrivacyBudgetExceeded  # noqa: F401 (PrivacyBudgetExceeded re-exported)
from .capture import Capture
from .clip.clipped_sum import ClippedSum
from .clip.functions import make_groups
from .clip import two_pass
from .clip.two_pass import Fingerprints
from .clip.noise import GaussianNoise
from .compiled import CompileSupport
from .compiled import unwrap as _unwrap_compiled
from .distributed import any_rank, is_ddp, reduce_noisy_sums, topology
from .sampling_check import NON_POISSON_CAVEAT, MISMATCH_CAVEAT, SamplingCheck, SamplingMismatch
from .sampling_check import warn as _warn_sampling
from .rows import compact_rows
from .rows import reattach as sparta_reattach
from .rows import row_masks as sparta_masks
from .rules.base import Contribution
from .options import ACCOUNTANTS, CLIPPING_FNS, CLIPPING_MODES, CLIPPING_STYLES, EngineOptions  # noqa: F401 (re-exported)
from .options import LOSS_REDUCTIONS, ON_BUDGET, PRIVACY_UNITS  # noqa: F401 (re-exported)
from .options import bad as _bad
from .clip.units import UserClippedSum


class PrivacyEngine:
    """Differentially private training of a model's trainable parameters.

    Args:
        model: any ``nn.Module``; trainable parameters are those with
            ``requires_grad=True`` when the engine is created.  A
            ``torch.compile``'d module is accepted (:mod:`dpft.compiled`).
        batch_size: expected logical batch size ``B`` (the divisor of the
            privatized gradient); ``sample_rate = batch_size / sample_size``.
        sample_size: number of training examples ``N``.
        epochs / steps: planned training length (exactly one; used to
            calibrate the noise and as the privacy budget's horizon).
            ``steps = epochs * ceil(N / B)``.
        target_epsilon / noise_multiplier: exactly one.  With
            ``target_epsilon`` the noise multiplier is calibrated so that
            the planned steps spend at most ``target_epsilon`` (and at least
            99% of it); a step that would exceed it raises
            :class:`dpft.PrivacyBudgetExceeded` before touching anything.
            ``noise_multiplier=0`` trains without privacy (epsilon = inf).
        target_delta: delta; default :func:`dpft.accounting.default_delta` (below ``1/N``).
        max_grad_norm: clipping threshold ``R``.
        clipping_fn: ``"abadi"`` (``min(1, R/||g||)``) or ``"automatic"`` (``R/(||g||+0.01)``).
        clipping_style: ``"all-layer"``, ``"layer-wise"``, ``"param-wise"`` or a
            list of lists of parameter names; ``K`` groups are each clipped to ``R/sqrt(K)``.
        clipping_mode: how weight norms are computed: ``"ghost"``,
            ``"instantiate"``, ``"mixed"`` (per layer ghost if ``2T^2 < pd``,
            else instantiate), ``"bk"`` (book-keeping: mixed norms, the
            clipped sum as one weighted matmul per layer from the kept
            activations and output gradients, and autograd skips the
            non-private weight gradients; a weight used once is also
            instantiated where that is cheaper than its Gram matrices and
            needs at most 2x the memory of the factors it frees:
            :func:`dpft.clip.norms.instantiation_pays`), ``"auto"`` (= ``"bk"``).  All give the same result up to rounding; biases
            never need activations.
        accountant: ``"pld"`` or ``"rdp"`` (Google's dp-accounting).
        loss_reduction: ``"mean"`` (each backward is of the mean loss over its
            physical batch) or ``"sum"``.
        on_budget_exceeded: ``"raise"`` (default) or ``"warn"``.
        noise_seed: seed of the noise generator, for reproducible
            experiments, never for a release: the noise is exactly as secret
            as the seed (all its bits are used).  Default: every generator's
            full state from OS entropy (:mod:`dpft.clip.noise`).  A checkpoint
            holding :meth:`state_dict` reveals the noise still to come: keep it
            as private as the data.
        secure_mode: draw each noise value as the sum of 4 independent float64
            draws (each from its own generator) and round the noisy gradient
            once, a mitigation of floating-point attacks on Gaussian sampling
            (:mod:`dpft.clip.noise`); the noise is still exactly ``N(0, sigma^2 R^2)``
            in real arithmetic, so the accounting is unchanged.  Costs four
            float64 draws per value instead of one draw (README: measured cost).
        poisson: ``True`` (default): the batches are Poisson-sampled (e.g. by
            :func:`dpft.data.poisson_loader`), as the accountant assumes, and
            the engine checks the number of examples of each step against it
            (:mod:`dpft.sampling_check`).  ``False`` accepts fixed-size
            (shuffled) batches explicitly: ε is then still the Poisson ε and is
            labelled as such (:attr:`epsilon_caveat`).
        privacy_unit: ``"example"`` (default: epsilon protects one example)
            or ``"user"`` (epsilon protects all the examples of one user:
            :mod:`dpft.clip.units`).  At user level ``batch_size`` is the expected
            number of *users* per step and ``sample_size`` the number of
            users, so ``sample_rate`` is the user sampling rate; call
            :meth:`set_units` with the user id of every example before each
            ``backward()``; each user's examples in the step are summed, then
            clipped to ``R``; the noise stays ``sigma R``.  Not with
            distributed training.
        strict: raise :class:`dpft.sampling_check.SamplingMismatch` (before the
            step is applied) when the batches do not match the sampling the
            accountant assumes, instead of a
            :class:`~dpft.sampling_check.SamplingMismatchWarning`.
        ledger: continue an existing :class:`dpft.accounting.Ledger` (e.g. the
            previous phase of a schedule): ``epsilon`` is then the total.
        epsilon_budget: with ``noise_multiplier``, a hard budget on the total
            epsilon (``target_epsilon`` implies it).
        distributed: data-parallel training over an initialized
            ``torch.distributed`` process group (default: on when one with
            more than one process is initialized).  Every rank runs the same
            loop on its own examples (``batch_size`` is the *global* logical
            batch size, e.g. ``dpft.data.poisson_loader`` shards a global
            Poisson batch); at each step the clipped sums are all-reduced and
            every rank adds independent noise of std ``sigma R / sqrt(W)``,
            so the total noise has std exactly ``sigma R`` and all ranks apply
            the same update.  A model wrapped in
            ``DistributedDataParallel`` may be passed as is: the engine hooks
            the wrapped module, uses DDP's process group and switches DDP's
            own gradient all-reduce off while attached (it would average
            unclipped gradients; the engine reduces the clipped sums once).
            FSDP2 (``fully_shard``) models work too: each rank computes the
            full per-example norms of its own examples (parameters are
            all-gathered for compute, so no norm spans ranks), the clipped
            sums are reduce-scattered to the shards, and the rank owning a
            shard adds its noise (std ``sigma R``).  Each rank holds one
            full-size clipped sum per trainable parameter during a step.
        two_pass: two-pass clipping (:mod:`dpft.clip.two_pass`): ``"auto"``
            (default) under activation checkpointing where the trainable
            weights' per-example gradients would take at least as many bytes
            as all the model's parameters (full fine-tuning, not LoRA);
            ``"on"`` wherever it applies; ``"off"`` never.  Pass 1 takes
            per-example norms in each layer's backward hook and drops its
            captures; pass 2 backpropagates the loss reweighted by the clip
            factors, and autograd's gradient is the clipped sum.  About one
            more backward pass (and recomputation) per step; memory no more
            than the non-private run's.  Every step checks that pass 2's
            output gradient at each layer is pass 1's times the clip factors
            (a loss term computed from a stored activation would reach the
            weights unclipped): where it is not, the backward pass raises
            :class:`dpft.TwoPassMismatch`, the step's gradients are dropped
            and later passes take the usual path.  It applies from the
            fourth backward pass on (the first ones take the usual path and
            cross-check dpft's per-example gradients against autograd's
            gradient of the whole loss, which also catches a parameter the
            loss reads outside the model's output), with one
            clipping group (``"all-layer"``), one process, per-example
            privacy, no row restriction, and a model output with exactly one
            tensor that requires grad, batch first (elsewhere the usual path
            runs).
        options: a :class:`dpft.EngineOptions` holding ``target_delta``,
            ``max_grad_norm``, the clipping options, ``accountant``,
            ``loss_reduction``, ``on_budget_exceeded``, ``noise_seed``,
            ``secure_mode``, ``poisson``, ``strict``, ``privacy_unit`` and
            ``two_pass`` at once, instead of those keywords (a keyword that differs from its
            default as well is a ``ValueError``).  :attr:`options` is the
            engine's, whichever way they were given.

    A NaN/Inf per-example gradient never reaches the parameters: with only
    biases and normalization weights trained (DP-BiTFiT) the example is left
    out on the device (it contributes zero) and a ``RuntimeWarning`` reports
    it once the count has reached the CPU; otherwise ``optimizer.step()``
    raises ``FloatingPointError`` and changes nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        sample_size: int,
        epochs: float | None = None,
        steps: int | None = None,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        target_delta: float | None = None,
        max_grad_norm: float = 1.0,
        clipping_fn: str = "abadi",
        clipping_style: str | Sequence[Sequence[str]] = "all-layer",
        clipping_mode: str = "auto",
        accountant: str = "pld",
        loss_reduction: str = "mean",
        on_budget_exceeded: str = "raise",
        noise_seed: int | None = None,
        ledger: Ledger | None = None,
        epsilon_budget: float | None = None,
        distributed: bool | None = None,
        secure_mode: bool = False,
        poisson: bool = True,
        strict: bool = False,
        privacy_unit: str = "example",
        two_pass: str = "auto",
        options: EngineOptions | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise _bad("model", model, "a torch.nn.Module")
        # torch.compile(model): the engine hooks model._orig_mod (dpft.compiled)
        model, self._compiled = _unwrap_compiled(model)
        # DistributedDataParallel: the engine hooks the wrapped module and does
        # the all-reduce itself (of the clipped sums); DDP's own all-reduce of
        # the raw gradients is switched off while attached (see attach()).
        self._ddp = model if is_ddp(model) else None
        group = None
        if self._ddp is not None:
            model = self._ddp.module
            group = self._ddp.process_group
            if distributed is False:
                raise ValueError("distributed=False with a DistributedDataParallel model")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise _bad("batch_size", batch_size, "a positive integer")
        if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size <= 0:
            raise _bad("sample_size", sample_size, "a positive integer")
        if batch_size > sample_size:
            raise ValueError(f"batch_size ({batch_size}) must not exceed sample_size ({sample_size})")
        if (epochs is None) == (steps is None):
            raise ValueError(f"give exactly one of epochs / steps, got epochs={epochs!r}, steps={steps!r}")
        if epochs is not None and not (isinstance(epochs, (int, float)) and epochs > 0 and math.isfinite(epochs)):
            raise _bad("epochs", epochs, "a positive number")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
            raise _bad("steps", steps, "a positive integer")
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError(
                "give exactly one of target_epsilon / noise_multiplier, got "
                f"target_epsilon={target_epsilon!r}, noise_multiplier={noise_multiplier!r}"
            )
        if target_epsilon is not None and not (
            isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon)
        ):
            raise _bad("target_epsilon", target_epsilon, "a positive finite number")
        if noise_multiplier is not None and not (
            isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0 and math.isfinite(noise_multiplier)
        ):
            raise _bad("noise_multiplier", noise_multiplier, "a finite number >= 0")
        # the privatization options, checked in one place (dpft.options)
        self.options = opts = EngineOptions.merge(
            options,
            target_delta=target_delta,
            max_grad_norm=max_grad_norm,
            clipping_fn=clipping_fn,
            clipping_style=clipping_style,
            clipping_mode=clipping_mode,
            accountant=accountant,
            loss_reduction=loss_reduction,
            on_budget_exceeded=on_budget_exceeded,
            noise_seed=noise_seed,
            secure_mode=secure_mode,
            poisson=poisson,
            strict=strict,
            privacy_unit=privacy_unit,
            two_pass=two_pass,
        )
        target_delta, max_grad_norm, clipping_fn = opts.target_delta, opts.max_grad_norm, opts.clipping_fn
        clipping_style, clipping_mode, accountant = opts.clipping_style, opts.clipping_mode, opts.accountant
        loss_reduction, on_budget_exceeded, noise_seed = opts.loss_reduction, opts.on_budget_exceeded, opts.noise_seed
        secure_mode, poisson, strict, privacy_unit = opts.secure_mode, opts.poisson, opts.strict, opts.privacy_unit
        if epsilon_budget is not None and not (isinstance(epsilon_budget, (int, float)) and epsilon_budget > 0):
            raise _bad("epsilon_budget", epsilon_budget, "a positive number")
        self.privacy_unit = privacy_unit

        self.model = model
        self.batch_size = batch_size
        self.sample_size = sample_size
        self.sample_rate = batch_size / sample_size
        self.planned_steps = (
            steps if steps is not None else int(math.ceil(epochs * math.ceil(sample_size / batch_size)))
        )  # type: ignore[operator]
        self.target_epsilon = float(target_epsilon) if target_epsilon is not None else None
        self.target_delta = float(target_delta) if target_delta is not None else accounting.default_delta(sample_size)
        self.max_grad_norm = float(max_grad_norm)
        self.clipping_fn = clipping_fn
        self.clipping_mode = clipping_mode
        self.accountant = accountant
        self.loss_reduction = loss_reduction
        self.on_budget_exceeded = on_budget_exceeded

        self.params: dict[str, nn.Parameter] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("model has no trainable parameters (requires_grad=True); nothing to train")

        if noise_multiplier is not None:
            self.noise_multiplier = float(noise_multiplier)
            if self.noise_multiplier == 0:
                warnings.warn(
                    "noise_multiplier=0: training is NOT differentially private (epsilon = inf)", stacklevel=2
                )
        else:
            self.noise_multiplier = accounting.noise_multiplier(
                target_epsilon=self.target_epsilon,
                sample_rate=self.sample_rate,
                steps=self.planned_steps,
                delta=self.target_delta,
                accountant=accountant,
            )

        norm_mode = {"auto": "mixed", "bk": "mixed"}.get(clipping_mode, clipping_mode)
        sparta_reattach(model)  # a deep copy of a restricted model keeps its selection
        self.row_masks = sparta_masks(self.params)
        self._capture = Capture(
            model,
            self._on_backward,
            book_keeping=clipping_mode in ("auto", "bk"),
            no_lane=set(self.row_masks),
            norm_mode=norm_mode,
        )
        self.groups = make_groups(clipping_style, list(self.params), self._capture.owner)
        sum_cls = UserClippedSum if privacy_unit == "user" else ClippedSum
        self._sum = sum_cls(self.params, self.groups, self.max_grad_norm, clipping_fn, norm_mode, self.row_masks)
        # every trainable parameter's per-example gradient in the flat lane (DP-BiTFiT):
        # a NaN/Inf example is left out on the device and the step never waits for the check
        self._sum.drop_nonfinite = set(self.params) <= set(self._capture.lane_keys)
        self._dropped: list[tuple[int, torch.Tensor, Any]] = []  # (step, count, event) not yet reported
        self.ledger = ledger if ledger is not None else Ledger()
        self.epsilon_budget = self.target_epsilon if epsilon_budget is None else float(epsilon_budget)
        # a calibrated engine on a fresh ledger is within budget for its planned steps by construction
        self._budget = BudgetGuard(
            self.ledger,
            self.epsilon_budget,
            self.noise_multiplier,
            self.sample_rate,
            self.target_delta,
            accountant,
            self.planned_steps,
            on_budget_exceeded,
            calibrated=self.target_epsilon is not None,
        )
        # the ranks that share a step (DDP, engine-level data parallel, FSDP2)
        self._topology = topo = topology(self.params, group, distributed, bool(self.row_masks))
        self._group, self.world_size, self.rank, self._sharded = topo.group, topo.world_size, topo.rank, topo.sharded
        self._capture.no_early(self._sharded)  # sharded weights: per-example gradients as before, at the end
        if privacy_unit == "user" and (self.world_size > 1 or self._sharded):
            raise NotImplementedError(
                "dpft: privacy_unit='user' with distributed training is not supported (a user's examples "
                "on several ranks would have to be summed before clipping); train on one process"
            )
        self.secure_mode, self.poisson, self.strict = secure_mode, poisson, strict
        # independent noise per rank (the stream), whether seeded or not
        self.noise = GaussianNoise(noise_seed, stream=self.rank, secure=secure_mode)
        self.sampling_check = SamplingCheck(sample_size, self.sample_rate, batch_size, poisson=poisson)
        if not poisson:
            self.ledger.add_caveat(NON_POISSON_CAVEAT)
        self._seen = 0  # examples of the step being accumulated (this rank)
        self._sampling_warned = False
        self._count_pending: tuple[torch.Tensor, Any] | None = None  # a step's all-reduced count, not yet read
        self._optimizer: torch.optim.Optimizer | None = None
        self._orig: dict[str, Any] = {}
        self._empty_batches = 0
        self._attached = False
        # two-pass clipping (dpft.clip.two_pass): why it never applies to this engine ("" if it may)
        self._two_pass_never = self._two_pass_refusal(opts.two_pass)
        self._two_pass_now = False  # this forward's output is wrapped (decided before the forward)
        self._pass = 0  # 1 or 2 while a two-pass backward is in its first or second pass
        self._weights: torch.Tensor | None = None  # the first pass's clip weights
        self._names_of = {id(p): k for k, p in self.params.items()}
        self._two_pass_handles: list[Any] = []
        self._grad_handles: list[Any] = []
        self.two_pass_steps = 0  # backward passes that took two-pass clipping
        self._fingerprints = Fingerprints()  # its check of pass 2 against pass 1
        self._sizes: tuple[int, int] | None = None  # (trainable weight values, model parameter bytes)

    # -- public state -------------------------------------------------------
    @property
    def steps(self) -> int:
        """Privatized optimizer steps taken so far."""
        return self.ledger.steps

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``target_delta``."""
        if self.noise_multiplier == 0:
            return math.inf  # no noise: no privacy guarantee at all
        return self.ledger.epsilon(self.target_delta, accountant=self.accountant)

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default ``target_delta``)."""
        if self.noise_multiplier == 0:
            return math.inf  # no noise: no privacy guarantee at all
        return self.ledger.epsilon(self.target_delta if delta is None else delta, accountant=self.accountant)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The attached optimizer (``None`` when detached)."""
        return self._optimizer

    @property
    def trainable_names(self) -> list[str]:
        return list(self.params)

    def generic_path(self) -> dict[str, str]:
        """Trainable parameters whose per-example gradients take dpft's exact
        generic path (a per-example recomputation of their module: slower and
        heavier than the fast rules) -> the module recomputed and why.  Empty
        when every parameter has a fast rule.  Exact after the first step;
        before it, the plan (see :meth:`dpft.capture.Capture.generic_path`)."""
        return self._capture.generic_path()

    # -- attach / detach ----------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Make ``optimizer.step()`` apply the privatized gradient; returns the optimizer."""
        if self._attached:
            raise RuntimeError("this PrivacyEngine is already attached; call detach() first")
        trainable = {id(p) for p in self.params.values()}
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad and id(p) not in trainable:
                    raise ValueError(
                        f"optimizer param group {gi} holds a trainable parameter of shape {tuple(p.shape)} "
                        "that is not a trainable parameter of the engine's model (it would be updated "
                        "without privacy)"
                    )
        self._optimizer = optimizer
        self._orig = {k: optimizer.__dict__[k] for k in ("step", "zero_grad") if k in optimizer.__dict__}
        engine_step = self._step
        orig_step = optimizer.step
        orig_zero = optimizer.zero_grad

        def step(closure: Callable[[], Any] | None = None) -> Any:
            return engine_step(orig_step, closure)

        def zero_grad(set_to_none: bool = True) -> None:
            self._clear_step()
            orig_zero(set_to_none=set_to_none)

        step.__dpft__ = True  # type: ignore[attr-defined]
        optimizer.step = step  # type: ignore[method-assign]
        optimizer.zero_grad = zero_grad  # type: ignore[method-assign]
        self._capture.attach()
        if not self._two_pass_never:
            # (before the capture's own pre-hook: the choice of this forward sets its switches)
            self._two_pass_handles = [
                self.model.register_forward_pre_hook(self._two_pass_pre, with_kwargs=True, prepend=True),
                self.model.register_forward_hook(self._two_pass_post),
            ]
        self._compile = CompileSupport(self._capture, self._compiled)
        self._compile.attach()
        if self._ddp is not None:
            # DDP would all-reduce (average) the raw, unclipped gradients in
            # backward: wasted bandwidth, and not what is applied; the engine
            # all-reduces the clipped sums instead
            self._ddp_sync = self._ddp.require_backward_grad_sync
            self._ddp.require_backward_grad_sync = False
        self._attached = True
        return optimizer

    def detach(self) -> None:
        """Remove all hooks and give the optimizer its own ``step`` back."""
        self._report_dropped(wait=True)
        for h in self._two_pass_handles + self._grad_handles:
            h.remove()
        self._two_pass_handles, self._grad_handles = [], []
        self._capture.weights_on = self._two_pass_now = False
        self._capture.detach()
        if getattr(self, "_compile", None) is not None:
            self._compile.detach()
            self._compile = None
        if self._ddp is not None and hasattr(self, "_ddp_sync"):
            self._ddp.require_backward_grad_sync = self._ddp_sync
        opt = self._optimizer
        if opt is not None:
            for k in ("step", "zero_grad"):
                opt.__dict__.pop(k, None)
            opt.__dict__.update(self._orig)
        self._optimizer = None
        self._attached = False
        self._clear_step()
        self._read_pending_count(final=True)

    # -- the flow -----------------------------------------------------------
    def _clear_step(self) -> None:
        """Forget what was accumulated for the next step."""
        self._sum.reset()
        self._empty_batches = 0
        self._seen = 0

    def set_units(self, units: Any) -> None:
        """The user ids of the examples of the next ``backward()``
        (``privacy_unit="user"`` only): one id (an int or a string) per
        example, in batch order -- a 1-D integer tensor, a numpy array or a
        list.  Call it before every backward pass; a user's examples may be
        spread over several physical batches of one step.
        :func:`dpft.data.user_poisson_loader` yields the ids beside each batch."""
        if self.privacy_unit != "user":
            raise RuntimeError("dpft: set_units() is for PrivacyEngine(privacy_unit='user')")
        self._sum.set_units(units)  # type: ignore[attr-defined]

    def _finalize_units(self) -> None:
        """User level: clip each user's summed gradient; the sampling check counts users."""
        if self.privacy_unit == "user":
            self._sum.finalize()  # type: ignore[attr-defined]
            self._seen = self._sum.users  # type: ignore[attr-defined]

    def _on_backward(self, contributions: dict[str, list[Contribution]], batch_size: int, lane=None) -> None:
        self._seen += int(batch_size)
        scale = float(batch_size) if self.loss_reduction == "mean" else 1.0
        if self._pass == 1:  # two-pass clipping: norms and clip weights only
            early, self._capture.early_norms = self._capture.early_norms or {}, None
            self._weights = self._sum.factors(contributions, batch_size, scale, lane, early)
            return
        self._sum.add(contributions, batch_size, scale, lane)

    # -- two-pass clipping (dpft.clip.two_pass) ------------------------------
    def _two_pass_refusal(self, choice: str) -> str:
        """Why two-pass clipping never applies to this engine, or ``""``."""
        if choice == "off":
            return "two_pass='off'"
        if len(self.groups) != 1:
            return "more than one clipping group"
        if self.privacy_unit != "example":
            return "privacy_unit='user'"
        if self.row_masks:
            return "row-restricted parameters"
        if self.world_size > 1 or self._sharded or self._ddp is not None:
            return "distributed training"
        if self._compiled:
            return "a torch.compile'd model"
        if self._sum.drop_nonfinite:
            return "only biases and norm weights train (the usual path is as small)"
        return ""

    def _two_pass_wanted(self, batch: int) -> bool:
        """Whether the coming forward's backward pass takes two-pass clipping."""
        cap = self._capture
        if not (torch.is_grad_enabled() and cap.enabled) or self._pass or self._two_pass_never:
            return False
        if cap._passes < cap.check_passes or cap._param_handles:
            # the first passes take the usual path: their cross-check of dpft's per-example
            # gradients against autograd's full-loss gradient catches a trainable parameter
            # the loss reads outside the model's output (e.g. logits = h @ embed.weight.T in
            # the loss function); pass 2 would hand that use's gradient over unclipped
            return False
        if self.options.two_pass == "on":
            return True
        # auto: under activation checkpointing (a hooked layer ran outside the
        # model's forward: recomputed), where the trainable weights'
        # per-example gradients would take as many bytes as the model's parameters
        if not (cap._outside_root or cap._ckpt_seen):
            return False
        if self._sizes is None:
            lane = set(cap.lane_keys)
            weights = sum(p.numel() for k, p in self.params.items() if k not in lane)
            self._sizes = (weights, sum(p.numel() * p.element_size() for p in self.model.parameters()))
        weights, model_bytes = self._sizes
        return batch * 4 * weights >= model_bytes

    def _two_pass_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            # (an evaluation between a forward and its backward: the switches of
            # that forward stay, for its segments' recomputation)
            return
        if self._pass:  # a two-pass backward pass that raised midway: the hooks are active again
            self._pass = 0
            self._capture.passive = False
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim), None)
        self._two_pass_now = first is not None and self._two_pass_wanted(int(first.shape[0]))
        self._batch = int(first.shape[0]) if first is not None else 0
        # book-keeping must leave the weights on: pass 2's autograd gradient is the clipped sum
        self._capture.weights_on = self._two_pass_now

    def _two_pass_post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self._two_pass_now:
            return None
        self._two_pass_now = False
        found = two_pass.single_output(output)
        if found is None or found[0].ndim == 0 or found[0].shape[0] != self._batch:
            return None  # (the usual path, with the weights left on in this forward)
        out, put = found
        box: list[torch.Tensor] = []
        handle = two_pass.Handle.apply(out, box)

        def run(g: torch.Tensor) -> torch.Tensor:
            return self._two_passes(handle, box, g)

        return put(two_pass.Reweight.apply(out, run))

    def _two_passes(self, handle: torch.Tensor, box: list, g: torch.Tensor) -> torch.Tensor:
        """In the backward of the wrapped output: pass 1 (nested), then the
        reweighted output gradient for pass 2 (the outer backward pass)."""
        if not self._grad_handles:
            self._grad_handles = [p.register_post_accumulate_grad_hook(self._take_grad) for p in self.params.values()]
        cap = self._capture
        cap.early_norms = {}
        cap.passive = False  # (another forward's pass 2 may be under way in the outer backward pass)
        cap.fingerprints = {}
        self._weights = None
        self._pass = 1
        box.append(g)
        try:
            torch.autograd.backward(handle, retain_graph=True)
        except BaseException:
            self._pass = 0
            cap.fingerprints = None
            raise
        finally:
            cap.early_norms = None
        w, self._weights = self._weights, None
        if w is None:
            self._pass = 0
            cap.fingerprints = None
            raise RuntimeError("dpft: two-pass clipping's first pass reached no hooked layer")
        # pass 2's output gradients must be pass 1's times the clip weights (checked at the end)
        self._fingerprints.expect(cap.fingerprints, w)
        cap.fingerprints = self._fingerprints.seen
        self._pass = 2
        cap.passive = True  # pass 2: dpft's backward hooks only take the fingerprints
        torch.autograd.Variable._execution_engine.queue_callback(self._two_pass_end)
        self.two_pass_steps += 1
        return two_pass.reweight(g, w.to(g.device))

    def _take_grad(self, p: torch.Tensor) -> None:
        """Autograd's gradient of a trainable parameter: dropped in pass 1,
        taken as the clipped sum in pass 2."""
        if self._pass == 1:
            p.grad = None
        elif self._pass == 2:
            g, p.grad = p.grad, None
            k = self._names_of[id(p)]
            cap = self._capture
            where = cap.lane_offsets.get(k)
            if where is not None:  # (where the usual path sums it: the same noise from a seeded generator)
                self._sum.add_flat(cap.lane_keys, cap.lane_total, where, g, cap.lane_dtype)
            else:
                self._sum.add_grad(k, g)

    def _two_pass_end(self) -> None:
        self._pass = 0
        self._capture.passive = False
        self._capture.fingerprints = None
        bad = self._fingerprints.mismatch()
        if bad:
            self._clear_step()
            for p in self.params.values():
                p.grad = None
            self._two_pass_never = "a loss term that does not come through the model's output"
            raise two_pass.TwoPassMismatch(
                f"dpft: two-pass clipping: layer {bad}. So some loss term reaches the weights without "
                "coming through the model's output (a term computed from a stored activation, say) and "
                "pass 2 would not clip it. The step's accumulated gradients were discarded; later backward "
                "passes take the usual path. Pass two_pass='off' to the engine to start that way."
            )

    @property
    def two_pass_worst(self) -> float:
        """The largest deviation of pass 2's output-gradient fingerprints from
        pass 1's times the clip weights seen so far, as a fraction of the
        tolerance (:data:`dpft.clip.tuning.TWO_PASS_TOL`): below 1 passes."""
        return self._fingerprints.worst

    def record_empty_batch(self) -> None:
        """Declare that this logical batch drew no examples (Poisson sampling):
        the next ``step()`` applies noise only, and is accounted as usual."""
        self._empty_batches += 1

    def _report_dropped(self, wait: bool = False) -> None:
        """Warn about the examples left out of earlier steps for a NaN/Inf
        gradient, once their device-side count is known (without waiting
        for the device unless ``wait``)."""
        pending = []
        for step, count, event in self._dropped:
            if event is not None and not wait and not event.query():
                pending.append((step, count, event))
                continue
            if event is not None:
                event.synchronize()
            n = int(count)
            if n:
                warnings.warn(
                    f"dpft: step {step}: {n} example(s) had a NaN or infinite gradient (NaN/Inf loss or "
                    "overflow) and were left out of the step (they contribute zero, as any clipped "
                    "gradient may, so the privacy guarantee is unchanged). Check the inputs or lower "
                    "the learning rate if this repeats.",
                    RuntimeWarning,
                    stacklevel=4,
                )
        self._dropped = pending

    def _check_sampling(self) -> None:
        """Feed the number of examples of the step about to be taken to
        :attr:`sampling_check`; warn, or raise under ``strict`` (before the
        step is applied), when the batches do not match the sampling the
        accountant assumes.  Distributed: the count is all-reduced (one
        integer) and read at the next step, so no rank waits for the device;
        every rank sees the same counts and so takes the same decision."""
        if self.world_size > 1 or self._sharded:
            self._read_pending_count()
            dev = next(iter(self.params.values())).device
            count = torch.full((1,), self._seen, dtype=torch.int64, device=dev)
            torch.distributed.all_reduce(count, group=self._group)
            if count.device.type == "cuda":
                host = torch.empty(1, dtype=torch.int64, pin_memory=True)
                host.copy_(count, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._count_pending = (host, event)
            else:
                self._count_pending = (count, None)
            return
        self._observe_count(self._seen)

    def _read_pending_count(self, final: bool = False) -> None:
        pending, self._count_pending = self._count_pending, None
        if pending is None:
            return
        host, event = pending
        if event is not None:
            event.synchronize()
        self._observe_count(int(host), final=final)

    def _observe_count(self, count: int, final: bool = False) -> None:
        msg = self.sampling_check.observe(count)
        if msg is None:
            return
        self.ledger.add_caveat(MISMATCH_CAVEAT)  # the steps already taken were accounted for the wrong sampling
        if self.strict and not final:
            raise SamplingMismatch(msg + " (Nothing was changed by this step.)")
        if not self._sampling_warned:
            self._sampling_warned = True
            _warn_sampling(msg, stacklevel=6)

    @property
    def epsilon_caveat(self) -> str | None:
        """``None`` when the reported ε rests only on the accountant's own
        assumptions (Poisson sampling at rate ``sample_rate``), else a label
        to print next to ε: the batches were declared not Poisson
        (``poisson=False``), or the sampling check found them not to match
        (see :mod:`dpft.sampling_check`).  Kept in the ledger, so it carries
        over to later phases and checkpoints."""
        return "; ".join(self.ledger.caveats) or None

    def _check_finite(self) -> None:
        if self._sum.drop_nonfinite:  # nothing to refuse: the bad examples were left out on the device
            taken = self._sum.take_flag()
            if taken is not None:
                self._dropped.append((self.steps + 1, *taken))
            self._report_dropped()
            return
        flag = self._sum.nonfinite
        distributed = self._topology.active
        if distributed:  # every rank refuses the step together
            flag = any_rank(flag, next(iter(self.params.values())).device, self._group)
        if flag is not None and (bool(flag) if distributed else self._sum.nonfinite_now()):
            self._clear_step()
            for p in self.params.values():
                p.grad = None  # no gradient of the refused step (autograd's own bias gradients included)
            raise FloatingPointError(
                "dpft: a per-example gradient was NaN or infinite (NaN/Inf loss or overflow); the step "
                "was not applied and the accumulated gradients were discarded (parameters, optimizer "
                "state and privacy ledger unchanged). Lower the learning rate, check the inputs, or "
                "use a loss scaler; then continue with the next batch."
            )

    @torch.no_grad()
    def privatize(self) -> None:
        """Write ``(sum_i c_i g_i + sigma R z) / B`` into ``p.grad`` of every
        trainable parameter and record the step in the ledger."""
        sigma_r = self.noise_multiplier * self.max_grad_norm
        if self._topology.active:
            reduce_noisy_sums(self._sum.totals(), self.params, self._topology, self.noise, sigma_r, self.batch_size)
            for k, rm in self.row_masks.items():  # rows a row mask leaves out: zero
                g = self.params[k].grad
                g.mul_(rm.to(g.device).view_for(g))
            self.ledger.record(self.noise_multiplier, self.sample_rate, 1)
            return
        flats, per_param = self._sum.layout()
        done: set[str] = set()
        for names, flat in flats:
            g = flat  # the engine's own accumulator, reset right after this step: update in place
            if sigma_r > 0:
                self.noise.add_([g], sigma_r, divide=self.batch_size)  # noise and division in one pass
            else:
                g.div_(self.batch_size)
            for k, view in self._sum._split(names, g):
                p = self.params[k]
                p.grad = view if view.dtype == p.dtype else view.to(p.dtype)
                done.add(k)
        rest = [k for k in self.params if k not in done]
        masked = [k for k in rest if k in self.row_masks]
        noise = dict(zip(masked, self._row_noise(masked))) if sigma_r > 0 and masked else {}
        rows = compact_rows(self._optimizer) if self.row_masks else {}
        grads: list[torch.Tensor] = []
        for k in rest:
            p = self.params[k]
            s = per_param.get(k)
            if k in self.row_masks:  # selected rows only (SPARTA)
                self._privatize_rows(k, s, noise.get(k), sigma_r, rows.get(id(p)))
                continue
            # the sums are the engine's own fresh tensors, reset after this step: update in place
            g = (s if s.dtype == p.dtype else s.to(p.dtype)) if s is not None else torch.zeros_like(p)
            grads.append(g)
            p.grad = g
        # noise drawn and added in bounded chunks, then multi-tensor scaling:
        # a few launches for all parameters, and no model-sized noise buffer
        if grads:
            if sigma_r > 0:
                self.noise.add_(grads, sigma_r, divide=self.batch_size)  # noise and division in one pass
            else:
                torch._foreach_div_(grads, self.batch_size)
        for k in done & self.row_masks.keys():  # restricted Direct parameters (flat buckets): mask
            g = self.params[k].grad
            g.mul_(self.row_masks[k].to(g.device).view_for(g))
        self.ledger.record(self.noise_multiplier, self.sample_rate, 1)

    def _privatize_rows(
        self, k: str, full: torch.Tensor | None, z: torch.Tensor | None, sigma_r: float, rows: torch.Tensor | None
    ) -> None:
        """The privatized gradient of a row-restricted weight, computed on its
        selected rows only (clipped sum + noise, both compact).  It goes to the
        optimizer's compact row tensor ``rows`` when there is one (then
        ``p.grad`` is ``None``), else into ``p.grad`` (zero on unselected rows)."""
        p = self.params[k]
        rm = self.row_masks[k].to(p.device)
        g = self._sum.row_sums.get(k)
        if g is not None and g.dtype != p.dtype:
            g = g.to(p.dtype)
        if full is not None:  # a full-size part (e.g. from a split flat bucket)
            part = rm.gather(full).to(p.dtype)
            g = part if g is None else g + part
        if g is None:
            g = torch.zeros(rm.compact_shape(p.shape), dtype=p.dtype, device=p.device)
        if z is not None:
            g.add_(z, alpha=sigma_r)  # the engine's own accumulator, reset after this step
        g.div_(self.batch_size)
        if rows is not None:
            rows.grad = g if g.dtype == rows.dtype else g.to(rows.dtype)
            p.grad = None
        else:
            p.grad = g if rm.count == p.shape[rm.dim] else rm.scatter(g, p.shape)

    @torch.no_grad()
    def release(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One private release of the accumulated clipped sum *without* an
        optimizer step: ``transform(sum_i c_i g_i) + sigma R z`` per trainable
        parameter (not divided by ``batch_size``).  ``transform`` must be
        1-Lipschitz elementwise (e.g. ``torch.abs``) so the sensitivity stays
        ``R``.  Accounted like a step (budget checked first); used by SPARTA's
        scoring pass."""
        if self._sum.backward_passes == 0 and self._empty_batches == 0:
            raise RuntimeError("dpft: release() called without a backward() since the last step")
        self._finalize_units()
        self._budget.check()
        self._check_finite()
        self._check_sampling()
        totals = self._sum.totals()
        sigma_r = self.noise_multiplier * self.max_grad_norm
        out: dict[str, torch.Tensor] = {}
        for k, p in self.params.items():
            t = totals.get(k)
            t = t.to(p.dtype) if t is not None else torch.zeros_like(p)
            if transform is not None:
                t = transform(t).contiguous()  # noise goes in in place: one memory location per entry
            out[k] = t
        if sigma_r > 0:
            self.noise.add_(list(out.values()), sigma_r)  # in bounded chunks
        for k, rm in self.row_masks.items():  # noise only on the selected rows
            t = out[k]
            out[k] = t * rm.to(t.device).view_for(t)
        self.ledger.record(self.noise_multiplier, self.sample_rate, 1)
        self._clear_step()
        return out

    def _row_noise(self, names: list[str]) -> list[torch.Tensor]:
        """Standard normal noise for the selected rows of the row-restricted
        parameters ``names`` (compact: just those rows)."""
        shapes = []
        for k in names:
            p, rm = self.params[k], self.row_masks[k]
            shape = list(p.shape)
            shape[rm.dim] = len(rm.index)
            shapes.append(torch.empty(shape, dtype=p.dtype, device=p.device))
        return self.noise.standard_normal(shapes)

    def _step(self, orig_step: Callable[..., Any], closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            # evaluated once: every evaluation on private data costs privacy
            with torch.enable_grad():
                loss = closure()
        if self._sum.backward_passes == 0 and self._empty_batches == 0:
            raise RuntimeError(
                "dpft: optimizer.step() called without a backward() since the last step; "
                "for an empty Poisson batch call engine.record_empty_batch() first"
            )
        self._finalize_units()
        self._budget.check()
        self._check_finite()
        self._check_sampling()
        self.privatize()
        self._clear_step()
        compact = compact_rows(self._optimizer) if self.row_masks else {}
        frozen_rows = [
            (p, rm, p.detach().index_select(rm.dim, rm.unselected.to(p.device)))
            for k, rm in self.row_masks.items()
            for p in [self.params[k]]
            if len(rm.unselected) and id(p) not in compact  # a compact optimizer never writes them
        ]
        out = orig_step()
        with torch.no_grad():  # e.g. weight decay must not move unselected rows
            for p, rm, rows in frozen_rows:
                p.index_copy_(rm.dim, rm.unselected.to(p.device), rows)
        return loss if closure is not None else out

    # -- state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.state_dict(),
            "noise": self.noise.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "batch_size": self.batch_size,
            "sample_size": self.sample_size,
            "target_delta": self.target_delta,
            "target_epsilon": self.target_epsilon,
            "max_grad_norm": self.max_grad_norm,
            "planned_steps": self.planned_steps,
            "privacy_unit": self.privacy_unit,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("noise_multiplier", "sample_rate", "max_grad_norm", "target_delta"):
            mine = getattr(self, k)
            if not math.isclose(float(state[k]), mine, rel_tol=1e-12):
                raise ValueError(f"engine state has {k}={state[k]!r}, this engine has {mine!r}")
        unit = state.get("privacy_unit", "example")
        if unit != self.privacy_unit:
            raise ValueError(f"engine state has privacy_unit={unit!r}, this engine has {self.privacy_unit!r}")
        self.ledger.load_state_dict(state["ledger"])
        if not self.poisson:
            self.ledger.add_caveat(NON_POISSON_CAVEAT)
        self.noise.load_state_dict(state["noise"])
