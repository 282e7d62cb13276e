"""A phase plan: several phases of DP training with one σ and one ledger.

Two-phase schedules (:class:`dpft.methods.schedules.TwoPhase`: full or LoRA
first, then DP-BiTFiT) and SPARTA (:class:`dpft.methods.sparta.Sparta`:
warm-up, private scoring, sparse training) run several engines one after the
other at the same sample rate.  The plan calibrates σ once, for the steps of
all phases together, and every phase's engine records into the same
:class:`~dpft.accounting.Ledger` with the whole run's ε as its budget, so
the run's ε is the composition of all phases, exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from .. import accounting
from ..engine import PrivacyEngine
from ..options import EngineOptions

#: the engine keywords an :class:`~dpft.options.EngineOptions` holds
OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(EngineOptions))


def split_options(options: EngineOptions | None, kwargs: Mapping[str, Any]) -> tuple[EngineOptions, dict[str, Any]]:
    """``options`` merged with the option keywords among ``kwargs`` (each option
    given once: in ``options`` or as a keyword), and the other keywords."""
    given = {k: v for k, v in kwargs.items() if k in OPTION_FIELDS}
    rest = {k: v for k, v in kwargs.items() if k not in OPTION_FIELDS}
    return EngineOptions.merge(options, **given), rest


class PhasePlan:
    """Phases of DP training sharing one σ, one ledger and one budget.

    Args:
        batch_size, sample_size: the expected logical batch size and the
            dataset size (the same sample rate in every phase).
        steps: planned steps per phase, in order (a phase may plan 0 steps).
        target_epsilon: the whole run's budget (at ``options.target_delta``).
        options: how every phase's engine privatizes; ``target_delta``
            ``None`` becomes :func:`dpft.accounting.default_delta`.
        noise_multiplier: use this σ instead of calibrating one (the budget
            still stops the run at ``target_epsilon``).
    """

    def __init__(
        self,
        *,
        batch_size: int,
        sample_size: int,
        steps: Mapping[str, int],
        target_epsilon: float,
        options: EngineOptions | None = None,
        noise_multiplier: float | None = None,
    ) -> None:
        options = options if options is not None else EngineOptions()
        delta = options.target_delta
        self.options = options.replace(target_delta=accounting.default_delta(sample_size) if delta is None else delta)
        self.batch_size, self.sample_size = batch_size, sample_size
        self.steps = dict(steps)
        self.target_epsilon = float(target_epsilon)
        #: whether σ was calibrated here (for exactly the planned steps of all phases)
        self.calibrated = noise_multiplier is None
        if noise_multiplier is not None:  # explicit sigma (0 = no privacy, for tests and debugging)
            self.noise_multiplier = float(noise_multiplier)
        else:
            self.noise_multiplier = accounting.noise_multiplier(
                target_epsilon=self.target_epsilon,
                sample_rate=self.sample_rate,
                steps=sum(self.steps.values()),
                delta=self.target_delta,
                accountant=self.accountant,
            )
        self.ledger = accounting.Ledger()

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.sample_size

    @property
    def target_delta(self) -> float:
        return float(self.options.target_delta)  # type: ignore[arg-type]

    @property
    def accountant(self) -> str:
        return self.options.accountant

    def engine(self, model: nn.Module, phase: str, **kwargs: Any) -> PrivacyEngine:
        """The engine of ``phase`` (not attached): the plan's σ, ledger and
        budget; ``kwargs`` change options for this phase (``noise_seed=``,
        ``clipping_style=``) or go to the engine as they are."""
        changes = {k: v for k, v in kwargs.items() if k in OPTION_FIELDS}
        rest = {k: v for k, v in kwargs.items() if k not in OPTION_FIELDS}
        return PrivacyEngine(
            model,
            batch_size=self.batch_size,
            sample_size=self.sample_size,
            steps=max(1, self.steps[phase]),
            noise_multiplier=self.noise_multiplier,
            epsilon_budget=self.target_epsilon,
            ledger=self.ledger,
            options=self.options.replace(**changes),
            **rest,
        )

    @property
    def epsilon(self) -> float:
        """ε spent so far over all phases, at ``target_delta``."""
        return self.ledger.epsilon(self.target_delta, accountant=self.accountant)
