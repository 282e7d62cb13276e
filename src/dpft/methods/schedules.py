"""Two-phase schedule (DP-BiTFiT paper): DP full (or LoRA, or any subset)
fine-tuning first, then DP-BiTFiT, with one privacy ledger and one noise
multiplier calibrated for the total number of steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .. import accounting
from ..engine import PrivacyEngine
from .bitfit import bitfit


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

    ``engine_kwargs`` go to both engines (``max_grad_norm``, ``clipping_fn``, ...).
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
        **engine_kwargs: Any,
    ) -> None:
        if phase1_epochs <= 0 or phase2_epochs <= 0:
            raise ValueError(f"phase1_epochs and phase2_epochs must be > 0, got {phase1_epochs!r}, {phase2_epochs!r}")
        per_epoch = math.ceil(sample_size / batch_size)
        self.model = model
        self.steps = (int(math.ceil(phase1_epochs * per_epoch)), int(math.ceil(phase2_epochs * per_epoch)))
        self.batch_size = batch_size
        self.sample_size = sample_size
        self.target_epsilon = float(target_epsilon)
        self.target_delta = accounting.default_delta(sample_size) if target_delta is None else float(target_delta)
        self.accountant = accountant
        self.bitfit_extra = tuple(bitfit_extra)
        if "options" in engine_kwargs:  # σ is calibrated here, with this accountant and δ: one source for them
            raise TypeError("TwoPhase takes the engine's options as keywords (max_grad_norm=, clipping_fn=, ...), "
                            "not options=")
        self.engine_kwargs = engine_kwargs
        self.noise_multiplier = accounting.noise_multiplier(
            target_epsilon=self.target_epsilon,
            sample_rate=batch_size / sample_size,
            steps=sum(self.steps),
            delta=self.target_delta,
            accountant=accountant,
        )
        self.ledger = accounting.Ledger()
        self.engine: PrivacyEngine | None = None

    def _engine(self, steps: int, optimizer: torch.optim.Optimizer) -> PrivacyEngine:
        engine = PrivacyEngine(
            self.model,
            batch_size=self.batch_size,
            sample_size=self.sample_size,
            steps=steps,
            noise_multiplier=self.noise_multiplier,
            epsilon_budget=self.target_epsilon,
            target_delta=self.target_delta,
            accountant=self.accountant,
            ledger=self.ledger,
            **self.engine_kwargs,
        )
        engine.attach(optimizer)
        self.engine = engine
        return engine

    def phase1(self, optimizer: torch.optim.Optimizer) -> PrivacyEngine:
        """Start phase 1 with the model's current trainable parameters."""
        return self._engine(self.steps[0], optimizer)

    def phase2(self, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> PrivacyEngine:
        """Detach phase 1, switch to DP-BiTFiT and start phase 2."""
        if self.engine is not None:
            self.engine.detach()
        bitfit(self.model, self.bitfit_extra)
        params = [p for p in self.model.parameters() if p.requires_grad]
        return self._engine(self.steps[1], make_optimizer(params))

    @property
    def epsilon(self) -> float:
        """Total epsilon spent over both phases at ``target_delta``."""
        return self.ledger.epsilon(self.target_delta, accountant=self.accountant)
