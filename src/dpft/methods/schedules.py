"""Two-phase schedule (DP-BiTFiT paper): DP full (or LoRA, or any subset)
fine-tuning first, then DP-BiTFiT, with one privacy ledger and one noise
multiplier calibrated for the total number of steps (a :class:`~dpft.methods.phases.PhasePlan`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..engine import PrivacyEngine
from ..options import EngineOptions
from .bitfit import bitfit
from .phases import PhasePlan, split_options


class TwoPhase:
    """Run phase 1 on the currently trainable parameters, then phase 2 on the
    biases (plus ``bitfit_extra``, e.g. the head), sharing one ledger.

    Usage::

        sched = TwoPhase(model, batch_size=256, sample_size=N, phase1_epochs=1,
                         phase2_epochs=2, target_epsilon=3.0)
        engine = sched.phase1(torch.optim.AdamW(trainable, lr=1e-4))
        ...train...
        engine = sched.phase2(lambda params: torch.optim.AdamW(params, lr=1e-3))
        ...train...
        sched.epsilon   # total over both phases

    ``options`` (a :class:`dpft.EngineOptions`) or the same options as keywords
    (``max_grad_norm``, ``clipping_fn``, ...) go to both engines; σ is
    calibrated once, with ``options.accountant`` and ``target_delta``, for the
    steps of both phases.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        sample_size: int,
        phase1_epochs: float,
        phase2_epochs: float,
        target_epsilon: float,
        target_delta: float | None = None,
        accountant: str = "pld",
        bitfit_extra: Iterable[str] = (),
        options: EngineOptions | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if phase1_epochs <= 0 or phase2_epochs <= 0:
            raise ValueError(f"phase1_epochs and phase2_epochs must be > 0, got {phase1_epochs!r}, {phase2_epochs!r}")
        per_epoch = math.ceil(sample_size / batch_size)
        self.model = model
        self.steps = (int(math.ceil(phase1_epochs * per_epoch)), int(math.ceil(phase2_epochs * per_epoch)))
        self.batch_size = batch_size
        self.sample_size = sample_size
        self.bitfit_extra = tuple(bitfit_extra)
        opts, self.engine_kwargs = split_options(
            options, dict(engine_kwargs, target_delta=target_delta, accountant=accountant)
        )
        self.plan = PhasePlan(
            batch_size=batch_size,
            sample_size=sample_size,
            target_epsilon=target_epsilon,
            steps={"phase1": self.steps[0], "phase2": self.steps[1]},
            options=opts,
        )
        self.target_epsilon = self.plan.target_epsilon
        self.target_delta, self.accountant = self.plan.target_delta, self.plan.accountant
        self.noise_multiplier = self.plan.noise_multiplier
        self.ledger = self.plan.ledger
        self.engine: PrivacyEngine | None = None

    def _engine(self, phase: str, optimizer: torch.optim.Optimizer) -> PrivacyEngine:
        engine = self.plan.engine(self.model, phase, **self.engine_kwargs)
        engine.attach(optimizer)
        self.engine = engine
        return engine

    def phase1(self, optimizer: torch.optim.Optimizer) -> PrivacyEngine:
        """Start phase 1 with the model's current trainable parameters."""
        return self._engine("phase1", optimizer)

    def phase2(self, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> PrivacyEngine:
        """Detach phase 1, switch to DP-BiTFiT and start phase 2."""
        if self.engine is not None:
            self.engine.detach()
        bitfit(self.model, self.bitfit_extra)
        params = [p for p in self.model.parameters() if p.requires_grad]
        return self._engine("phase2", make_optimizer(params))

    @property
    def epsilon(self) -> float:
        """Total epsilon spent over both phases at ``target_delta``."""
        return self.plan.epsilon
