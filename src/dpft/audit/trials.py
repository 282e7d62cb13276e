"""Many-trial distinguishing audit: gradient canaries and Clopper–Pearson bounds.

The classical way to audit a DP-SGD implementation (Jagielski, Ullman & Oprea
2020; Nasr et al. 2021): train many times with a canary and many times
without it, let an attacker guess from each output whether the canary was
there, and turn the attacker's error rates into an ε lower bound.  If a
training run is (ε, δ)-DP with respect to adding one canary, then for every
set ``S`` of outputs

    P[M(D ∪ {c}) ∈ S] <= e^ε P[M(D) ∈ S] + δ   and   P[M(D) ∉ S] <= e^ε P[M(D ∪ {c}) ∉ S] + δ,

so with ``S = {score >= τ}``, true-positive rate ``TPR`` (canary present)
and false-positive rate ``FPR`` (canary absent)::

    ε >= log((TPR - δ) / FPR)   and   ε >= log((1 - FPR - δ) / (1 - TPR)).

From ``n`` independent trials per world the rates are only estimated: the
bound uses one-sided Clopper–Pearson (exact binomial) bounds, ``TPR`` from
below and ``FPR`` from above.  The thresholds ``τ`` are a fixed grid chosen
*before* any trial from the public settings alone (quantiles of the nominal
mechanism's score, simulated), and every bound is taken at level
``β / (2 G)`` for ``G`` thresholds (Bonferroni), so the largest bound over
the grid and both directions is a valid lower bound at confidence ``1 - β``:
with probability at least ``1 - β`` every interval holds, and then every
bound computed is at most the true ε.

Unlike the one-run audit (:mod:`dpft.audit`), nothing saturates at
``log(m)`` of a joint guessing game: the bound approaches the true ε of the
mechanism as trials grow (slowly: ``n`` trials resolve rates down to about
``1/n``).  Each trial is a whole training run of the configuration you give
(σ or target ε, sampling rate, steps, clipping threshold / function / style /
mode, accountant, δ) through a :class:`dpft.PrivacyEngine`.

Trials in parallel
    One training run hosts many trials.  The task gives every canary slot its
    own parameter coordinate, which only that canary's gradient touches (a
    "gradient canary": its per-example loss is ``-<u, θ>`` along its own
    coordinate, with ``|u| = canary_scale · R`` so that clipping binds and,
    clipped, it moves its coordinate by exactly ``R``); the ordinary examples
    touch other coordinates only.  Half of the slots (fixed before the run)
    hold a canary that is in the data set, the others hold none.  Per-example
    clipping, Poisson sampling (independent per example) and noise
    (independent per coordinate) then make the coordinates of different slots
    independent, and each slot's coordinate has exactly the distribution it
    would have in a run of its own with or without its canary: ``S`` slots
    are ``S`` independent trials (``S/2`` per world).  The auditor sees every
    iterate (white box) and scores each slot by the log-likelihood ratio of
    the subsampled Gaussian step summed over steps (``score="llr"``, the
    optimal test for one canary) or by the sum of its updates
    (``score="sum"``).

Tasks
    ``"embedding"`` (default): an ``nn.Embedding(S + 1, 1)`` whose row ``i``
    is slot ``i``'s coordinate (the ordinary examples share the last row);
    its cost is linear in the number of trials, so 10^5 trials per world take
    seconds on a CPU.  ``"bitfit"``, ``"full"``, ``"sparta"``: the
    ``nn.Linear`` canary task of :func:`dpft.audit.one_run_audit` (bias only /
    weight and bias / biases and selected weight rows), whose cost grows
    with the square of the slots per run, so many runs of
    ``slots_per_run`` (default 2000) slots each.

What it proves, and what it does not
    As for any audit: a bound above the claimed ε proves a privacy bug (in
    clipping, noise, sampling or accounting) unless an event of probability
    at most ``1 - confidence`` happened; a bound below the claim proves
    nothing about privacy.  With 10^5 trials per world and δ = 1e-5 it
    certifies about 60 % of a correct claim of ε = 2 (Gaussian mechanism,
    q = 1), and catches noise of half the claimed σ at claimed ε = 1 to 4
    (``docs/audit.md`` has the measured numbers).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..options import EngineOptions
from .stats import Claim, _step_score, _thresholds, clopper_pearson, threshold_lower_bound

__all__ = [
    "TRIAL_TASKS",
    "DistinguishingResult",
    "clopper_pearson",
    "distinguishing_audit",
    "threshold_lower_bound",
]

TRIAL_TASKS: tuple[str, ...] = ("embedding", "bitfit", "full", "sparta")

_PLANT_NOISE = {"noise_half": 0.5, "noise_div10": 0.1}
_PLANTS = (None, "no_clipping", *_PLANT_NOISE)
_N_ORD = 256  # ordinary examples per run
_D_IN, _D_ORD = 4, 8  # the linear task's input width and ordinary outputs


# --------------------------------------------------------------------------
# the result


@dataclass(frozen=True)
class DistinguishingResult(Claim):
    """The outcome of :func:`distinguishing_audit`.

    Attributes:
        epsilon_lower_bound: ε certified at ``confidence`` (see the module docstring).
        claimed_epsilon: the engine's own ε at ``delta`` for exactly the steps run.
        delta, confidence: δ of the claim and of the bound; 1 - β.
        trials: independent trials per world (canary present / absent).
        runs: training runs that hosted them.
        threshold, direction: the threshold test that gave the bound.
        true_positives, false_positives: its counts (out of ``trials`` each).
        tpr_lower, fpr_upper: its Clopper–Pearson bounds.
        task, score, noise_multiplier, sample_rate, steps, max_grad_norm: the configuration.
        seconds: wall time; planted: a planted bug (tests only), else ``None``.
    """

    epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    confidence: float
    trials: int
    runs: int
    threshold: float | None
    direction: str | None
    true_positives: int | None
    false_positives: int | None
    tpr_lower: float | None
    fpr_upper: float | None
    task: str
    score: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    seconds: float
    planted: str | None = None

    def summary(self) -> str:
        verdict = self.verdict()
        at = ""
        if self.threshold is not None:
            at = (
                f"; best test: score >= {self.threshold:.4g} ({self.direction}), "
                f"TP {self.true_positives}/{self.trials}, FP {self.false_positives}/{self.trials}"
            )
        return (
            f"distinguishing audit ({self.task}, {self.score} score, {self.trials} trials per world in "
            f"{self.runs} run(s)): ε >= {self.epsilon_lower_bound:.3f} at {100 * self.confidence:g}% confidence; "
            f"claimed ε = {self.claimed_epsilon:.3f} (δ = {self.delta:.3g}, σ = {self.noise_multiplier:.4g}, "
            f"q = {self.sample_rate:.4g}, {self.steps} steps){at}; {self.seconds:.1f} s -> {verdict}"
        )


# --------------------------------------------------------------------------
# the tasks


@dataclass
class _Task:
    model: nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]  # mean loss of present examples ``ids``
    position: Callable[[], np.ndarray]  # the slots' coordinates
    present: int  # number of examples in the data set


def _ordinary_coefs(rng: np.random.Generator, n: int, width: int, R: float) -> np.ndarray:
    g = rng.standard_normal((n, width))
    return g * (R * rng.uniform(0.25, 2.0, size=(n, 1))) / np.linalg.norm(g, axis=1, keepdims=True)


def _embedding_task(included: np.ndarray, R: float, canary_scale: float, rng: np.random.Generator) -> _Task:
    S = included.shape[0]
    n_in = int(included.sum())
    ids = torch.from_numpy(np.concatenate([np.flatnonzero(included), np.full(_N_ORD, S)]))
    coef = torch.from_numpy(np.concatenate([np.full(n_in, canary_scale * R), _ordinary_coefs(rng, _N_ORD, 1, R)[:, 0]]))
    model = nn.Embedding(S + 1, 1).double()
    with torch.no_grad():
        model.weight.zero_()

    def loss(batch: torch.Tensor) -> torch.Tensor:
        return -(coef[batch] * model(ids[batch])[:, 0]).mean()

    def position() -> np.ndarray:
        with torch.no_grad():
            return model.weight[:S, 0].numpy().copy()

    return _Task(model, loss, position, n_in + _N_ORD)


def _linear_task(
    task: str, included: np.ndarray, R: float, canary_scale: float, rng: np.random.Generator, gen: torch.Generator
) -> _Task:
    from ..methods.bitfit import bitfit
    from ..methods.sparta import restrict

    S = included.shape[0]
    n_in = int(included.sum())
    x_can = rng.standard_normal((S, _D_IN))
    x_can /= np.linalg.norm(x_can, axis=1, keepdims=True)
    x_ord = rng.standard_normal((_N_ORD, _D_IN)) / math.sqrt(_D_IN)
    X = torch.from_numpy(np.concatenate([x_can[included], x_ord]))
    col = torch.from_numpy(np.concatenate([np.flatnonzero(included), np.zeros(_N_ORD, dtype=np.int64)]))
    coef = torch.cat(
        [torch.full((n_in,), canary_scale * R, dtype=torch.float64), torch.zeros(_N_ORD, dtype=torch.float64)]
    )
    G = torch.from_numpy(np.concatenate([np.zeros((n_in, _D_ORD)), _ordinary_coefs(rng, _N_ORD, _D_ORD, R)]))
    model = nn.Linear(_D_IN, S + _D_ORD).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=gen, dtype=torch.float64) * 0.1)
        model.bias.zero_()
    if task in ("bitfit", "sparta"):
        bitfit(model)
    if task == "sparta":
        rows = torch.zeros(S + _D_ORD, dtype=torch.bool)
        rows[:S] = True
        rows[S::2] = True
        restrict(model, {"weight": rows})

    def loss(batch: torch.Tensor) -> torch.Tensor:
        y = model(X[batch])
        per = coef[batch] * y.gather(1, col[batch, None]).squeeze(1) + (G[batch] * y[:, S:]).sum(1)
        return -per.mean()

    x_dir = torch.from_numpy(x_can)

    def position() -> np.ndarray:
        with torch.no_grad():
            if task == "bitfit":
                return model.bias[:S].numpy().copy()
            w = (model.weight[:S] * x_dir).sum(1)
            return ((w + model.bias[:S]) / math.sqrt(2.0)).numpy()

    return _Task(model, loss, position, n_in + _N_ORD)


# --------------------------------------------------------------------------
# the audit


def distinguishing_audit(
    task: Literal["embedding", "bitfit", "full", "sparta"] = "embedding",
    *,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 500,
    sample_size: int = 2000,
    options: EngineOptions | None = None,
    trials: int = 50_000,
    confidence: float = 0.95,
    score: Literal["llr", "sum"] = "llr",
    canary_scale: float = 10.0,
    slots_per_run: int | None = None,
    max_physical_batch_size: int | None = None,
    seed: int | None = None,
    _plant: str | None = None,
    **engine_options: Any,
) -> DistinguishingResult:
    """Audit a :class:`dpft.PrivacyEngine` configuration with ``trials``
    independent trials per world (canary present / absent) and threshold
    tests with Clopper–Pearson bounds (module docstring).

    Args:
        task: ``"embedding"`` (default, cost linear in the trials), or the
            linear canary tasks ``"bitfit"``, ``"full"``, ``"sparta"``.
        target_epsilon / noise_multiplier, steps / epochs, batch_size,
            sample_size, options / engine_options (a :class:`dpft.EngineOptions`
            or its fields as keywords, as for :func:`dpft.audit.one_run_audit`):
            the engine configuration audited (the sampling rate is
            ``batch_size / sample_size``; neither steps nor epochs: 20 steps).
            The runs' data sets hold the present canaries plus 256 ordinary
            examples, whatever ``sample_size`` is: under add/remove adjacency
            the mechanism, and its ε, depend on the rate, not on N.
        trials: independent trials per world (>= 100).
        confidence: 1 - β of the bound.
        score: ``"llr"`` (default) or ``"sum"``.
        canary_scale: ``|u| / R`` of a canary's gradient (> 1 so that clipping binds).
        slots_per_run: trials of both worlds hosted by one run (even; default
            all of them for ``"embedding"``, at most 400 000, else 2000).
        max_physical_batch_size: examples per backward pass (memory only).
        seed: seeds everything (inclusion, data, batches, noise, the
            threshold grid's simulation) for a reproducible audit; default OS
            entropy.  Fix it before looking at any result.

    Returns:
        :class:`DistinguishingResult` (``.violation``: the bound exceeds the claim).

    Raises:
        ValueError: bad settings (as the engine raises them, plus bad
            ``task``, ``trials``, ``score``, ``slots_per_run``).
    """
    from .harness import _plant_bug, _quiet_absl, audit_options
    from ..data import PoissonBatchSampler
    from ..engine import PrivacyEngine

    start = time.perf_counter()
    opts = audit_options(options, engine_options)
    if task not in TRIAL_TASKS:
        raise ValueError(f"task must be one of {TRIAL_TASKS}, got {task!r}")
    if score not in ("llr", "sum"):
        raise ValueError(f"score must be 'llr' or 'sum', got {score!r}")
    if _plant not in _PLANTS:
        raise ValueError(f"_plant must be one of {_PLANTS}, got {_plant!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 100:
        raise ValueError(f"trials must be an integer >= 100, got {trials!r}")
    if not (isinstance(confidence, numbers.Real) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not (isinstance(canary_scale, numbers.Real) and canary_scale > 1):
        raise ValueError(f"canary_scale must be > 1 (so that clipping binds), got {canary_scale!r}")
    if slots_per_run is None:
        slots_per_run = min(2 * trials, 400_000) if task == "embedding" else 2000
    if isinstance(slots_per_run, bool) or not isinstance(slots_per_run, int) or slots_per_run < 2 or slots_per_run % 2:
        raise ValueError(f"slots_per_run must be an even integer >= 2, got {slots_per_run!r}")
    if max_physical_batch_size is None:
        max_physical_batch_size = 65536 if task == "embedding" else 512
    if steps is None and epochs is None:
        steps = 20
    R = float(opts.max_grad_norm)
    root = np.random.SeedSequence(seed)
    s_grid, s_runs = root.spawn(2)

    # per-run slot counts: trials per world in total, half of each run's slots present
    per_run = slots_per_run // 2
    counts = [per_run] * (trials // per_run) + ([trials % per_run] if trials % per_run else [])
    scores_in: list[np.ndarray] = []
    scores_out: list[np.ndarray] = []
    engine_args = dict(
        batch_size=batch_size,
        sample_size=sample_size,
        steps=steps,
        epochs=epochs,
        target_epsilon=target_epsilon,
        noise_multiplier=noise_multiplier,
    )
    sigma = q = claimed = delta = None
    T = 0
    taus: list[float] = []
    for k, run_seed in zip(counts, s_runs.spawn(len(counts))):
        s_bits, s_data, s_batches, s_noise = (int(s) for s in run_seed.generate_state(4, np.uint64))
        perm = np.random.default_rng(s_bits).permutation(2 * k)
        included = np.zeros(2 * k, dtype=bool)
        included[perm[:k]] = True  # exactly k present, k absent
        rng = np.random.default_rng(s_data)
        gen = torch.Generator().manual_seed(s_data % 2**63)
        t = (
            _embedding_task(included, R, canary_scale, rng)
            if task == "embedding"
            else _linear_task(task, included, R, canary_scale, rng, gen)
        )
        with _quiet_absl():
            engine = PrivacyEngine(t.model, options=opts.replace(noise_seed=s_noise), **engine_args)
        if sigma is None:  # first run: the engine calibrates; later runs reuse its σ
            sigma, q, T, delta = engine.noise_multiplier, engine.sample_rate, engine.planned_steps, engine.target_delta
            engine_args.update(target_epsilon=None, noise_multiplier=sigma, steps=T, epochs=None)
            opts = opts.replace(target_delta=delta)
            taus = _thresholds(T, q, sigma, "sum" if sigma == 0 else score, trials, int(s_grid.generate_state(1)[0]))
        engine.sampling_check.population = t.present  # the data set is the present canaries + ordinary examples
        _plant_bug(engine, _plant, _PLANT_NOISE)
        run_score = "sum" if sigma == 0 else score
        opt = torch.optim.SGD([p for p in t.model.parameters() if p.requires_grad], lr=float(batch_size))
        engine.attach(opt)
        sampler = PoissonBatchSampler(t.present, sample_rate=q, steps=T, seed=s_batches)
        total = np.zeros(2 * k)
        prev = t.position()
        try:
            for batch in sampler:
                if not batch:
                    engine.record_empty_batch()
                else:
                    for chunk in torch.tensor(batch).split(max_physical_batch_size):
                        t.loss(chunk).backward()
                opt.step()
                opt.zero_grad()
                now = t.position()
                total += _step_score((now - prev) / R, run_score, q, sigma)
                prev = now
        finally:
            engine.detach()
        if claimed is None:
            with _quiet_absl():
                claimed = float(engine.epsilon)
        scores_in.append(total[included])
        scores_out.append(total[~included])
    best = threshold_lower_bound(np.concatenate(scores_in), np.concatenate(scores_out), taus, delta, confidence)
    return DistinguishingResult(
        epsilon_lower_bound=float(best["epsilon"]),
        claimed_epsilon=float(claimed),
        delta=float(delta),
        confidence=float(confidence),
        trials=trials,
        runs=len(counts),
        threshold=best["threshold"],
        direction=best["direction"],
        true_positives=best["true_positives"],
        false_positives=best["false_positives"],
        tpr_lower=best["tpr_lower"],
        fpr_upper=best["fpr_upper"],
        task=task,
        score="sum" if sigma == 0 else score,
        noise_multiplier=float(sigma),
        sample_rate=float(q),
        steps=int(T),
        max_grad_norm=R,
        seconds=time.perf_counter() - start,
        planted=_plant,
    )
