"""Empirical privacy auditing in one training run (Steinke, Nasr & Jagielski 2023).

An audit gives a *lower* bound on the ε of a training configuration: if the
engine claims (ε, δ)-DP but the audit certifies, at confidence ``1 - β``, that
the run is *not* (ε', δ)-DP for some ε' > ε, then something is wrong (a bug in
clipping, noise or accounting).  A lower bound below the claim proves nothing
about privacy: it only says this attack did not catch a violation.

Two layers:

* :func:`epsilon_lower_bound` / :func:`one_run_p_value` (in :mod:`dpft.audit.stats`,
  no torch): the statistics of a one-run audit.  ``m`` canaries are each included in the training set
  independently with probability 1/2; after training the auditor guesses
  "included" or "excluded" for ``r`` of them (abstaining on the rest) and
  gets ``v`` right.  For an (ε, δ)-DP training run, ``v`` cannot be much
  larger than what randomized response with parameter ε would give.
* :func:`one_run_audit`: trains a small model with a :class:`dpft.PrivacyEngine`
  configured from your settings (σ or target ε, sampling rate, steps,
  clipping threshold / function / style / mode, accountant, δ) with
  white-box gradient canaries, runs the attack and returns an
  :class:`AuditResult` with the certified lower bound next to the engine's
  own claimed ε for exactly the steps run.
* :func:`distinguishing_audit` (in :mod:`dpft.audit.trials`): the classical
  many-trial test, with up to 10^5 or more independent trials per world,
  threshold tests and Clopper–Pearson bounds; it does not saturate like the
  one-run bound and catches subtler bugs (noise of half the claimed σ).
  ``dpft audit`` runs both.

The bound (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023, arXiv:2305.08846)
    Let the training run be (ε, δ)-DP with respect to adding/removing one
    canary, let ``S`` be the uniformly random inclusion bits of the ``m``
    canaries and let the auditor make ``r`` guesses (abstaining on ``m - r``)
    of which ``W`` are correct.  Then for every ``v``::

        P[W >= v]  <=  f(v) + 2 m δ · max_{i = 1..v} (f(v - i) - f(v)) / i,

        f(k) := P[Binomial(r, e^ε / (1 + e^ε)) >= k].

    For δ = 0 this is the paper's main theorem for pure DP (the number of
    correct guesses is stochastically dominated by ``Binomial(r, e^ε/(1+e^ε))``:
    the auditor does no better than randomized response); the δ > 0 form is
    the paper's statement for approximate DP, whose p-value its Appendix D
    computes (``p_value_DP_audit``).  We could not open the paper's own text
    while writing this module; the numbering we found cited for the
    approximate-DP p-value is Corollary 5.4 of arXiv:2305.08846v1 (with
    Lemma 4.7 turning a p-value into a rejection of the (ε, δ) claim), and
    our implementation reproduces the two worked values printed in that
    version (Appendix D: m=1000, r=100, v=75, δ=1e-4 -> ε >= 0.673 at 95 %;
    §7: m=10^5, r=1510, v=1439, δ=1e-5 -> ε >= 2.675), see
    ``tests/test_audit.py``.

From the p-value to an ε (why any search is valid)
    :func:`epsilon_lower_bound` returns an ε' with ``p(ε') < β`` for the
    observed ``v`` (or 0).  This is a valid 1 - β lower bound whatever search
    found ε': if the run is (ε0, δ)-DP, it is (ε1, δ)-DP for every ε1 > ε0, so
    the event "some ε1 > ε0 has p(ε1; W) < β" is contained in ``W >= v1`` for
    the smallest count ``v1`` rejected at any ε1 > ε0, an event which has
    probability at most ``p(ε1; v1) < β``.  For ``2mδ <= 1`` the p-value is
    increasing in ε (each ``(1 - 2mδ/i) f(v) + (2mδ/i) f(v - i)`` is a
    non-negative combination of increasing functions of ε), so bisection finds
    the exact threshold; for ``2mδ > 1`` a grid scan plus bisection finds the
    largest rejected ε it can see, which can only err low.

What a one-run audit can reach
    With ``r`` guesses, all correct, the largest certifiable ε is about
    ``log(r / log(1/β))`` (δ = 0: exactly ``-log(β^(-1/r) - 1)``): 5.8 for
    r = 1000 at 95 %, 8.1 for r = 10^4.  The δ term grows with ``m δ``:
    10^4 perfect guesses certify 8.09 at δ = 1e-6 but only 7.83 at δ = 1e-5
    (15 000 are needed there).  ``docs/audit.md`` has the measured numbers.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..options import EngineOptions
from .stats import Claim, _check_confidence, _check_count, _choose_guesses, _guess, _step_score, epsilon_lower_bound

__all__ = ["AuditResult", "MODES", "SCORES", "one_run_audit"]

MODES: tuple[str, ...] = ("bitfit", "full", "sparta")
SCORES: tuple[str, ...] = ("llr", "sum")

# --------------------------------------------------------------------------
# planted bugs (tests only): the audit must catch them


class _ScaledNoise:
    """Wraps an engine's noise generator so that every draw is multiplied by
    ``factor`` (the engine keeps accounting for its own noise multiplier)."""

    def __init__(self, inner: Any, factor: float) -> None:
        self._inner = inner
        self._factor = factor

    def standard_normal(self, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [z * self._factor for z in self._inner.standard_normal(like)]

    def add_(self, tensors: Sequence[torch.Tensor], alpha: float, divide: int = 1) -> None:
        self._inner.add_(tensors, alpha * self._factor, divide=divide)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _no_clip(norms: torch.Tensor, max_norm: float, fn: str) -> torch.Tensor:
    return torch.ones_like(norms)


def _plant_bug(engine: Any, plant: str | None, noise_factors: dict[str, float]) -> None:
    """Plant a bug (tests only) in this one engine, nothing else in the process:
    ``"no_clipping"``: every per-example gradient enters the sum unclipped (the
    engine's clipped sum gets clipping factors of one); a name in ``noise_factors``:
    the engine's noise is that factor of the claimed σ."""
    if plant == "no_clipping":
        engine._sum.clip_factors = _no_clip
    elif plant in noise_factors:
        engine.noise = _ScaledNoise(engine.noise, noise_factors[plant])


_PLANTS = (None, "no_clipping", "noise_div10")


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    import logging

    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------
# the audit task


@dataclass(frozen=True)
class AuditResult(Claim):
    """The outcome of :func:`one_run_audit`.

    Attributes:
        epsilon_lower_bound: ε certified at ``confidence``: unless an event of
            probability at most ``1 - confidence`` happened, the run is not
            (ε', ``delta``)-DP for any ε' below it.
        claimed_epsilon: the engine's own ε at ``delta`` for exactly the steps run.
        delta: δ of the claim and of the bound (the engine's ``target_delta``).
        confidence: 1 - β.
        num_canaries / num_guesses / num_correct: m, r, v.
        guessed_in / guessed_out: how many canaries were guessed included
            (top scores) / excluded (bottom scores); r = their sum.
        ceiling: the bound r perfect guesses would give (what this audit
            could certify at most).
        mode, score, noise_multiplier, sample_rate, steps, max_grad_norm:
            the configuration audited.
        seconds: wall time of the whole audit.
        planted: name of a planted bug (tests only), else ``None``.
    """

    epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    confidence: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    guessed_in: int
    guessed_out: int
    ceiling: float
    mode: str
    score: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    seconds: float
    planted: str | None = None

    def summary(self) -> str:
        """One human-readable paragraph."""
        verdict = self.verdict()
        return (
            f"one-run audit ({self.mode}, {self.score} score): ε >= {self.epsilon_lower_bound:.3f} at "
            f"{100 * self.confidence:g}% confidence; claimed ε = {self.claimed_epsilon:.3f} "
            f"(δ = {self.delta:.3g}, σ = {self.noise_multiplier:.4g}, q = {self.sample_rate:.4g}, "
            f"{self.steps} steps); m = {self.num_canaries} canaries, {self.num_correct}/{self.num_guesses} "
            f"guesses correct ({self.guessed_in} 'in', {self.guessed_out} 'out'; "
            f"ceiling {self.ceiling:.2f}); {self.seconds:.1f} s -> {verdict}"
        )


_D_IN = 4  # input features; canary inputs are unit vectors
_D_ORD = 8  # output coordinates used by ordinary examples


def _seeds(seed: int | None) -> list[int]:
    ss = np.random.SeedSequence(seed)
    return [int(s) for s in ss.generate_state(6, np.uint32)]


#: engine options an audit sets itself: the noise is seeded from ``seed``, and its tasks' loss
#: is the mean over the examples of one example each
_AUDIT_FIXED = {"noise_seed": None, "loss_reduction": "mean", "privacy_unit": "example"}


def audit_options(options: EngineOptions | None, engine_options: dict[str, Any]) -> EngineOptions:
    """The engine options an audit runs: ``options`` or the keywords ``engine_options`` (not
    both: ``ValueError``); ``noise_seed``, ``loss_reduction`` and ``privacy_unit`` are the audit's."""
    fields = set(EngineOptions.__dataclass_fields__)
    unknown = sorted(set(engine_options) - fields)
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(unknown)}; the engine's options are {', '.join(sorted(fields))}"
        )
    if options is not None and engine_options:  # here a keyword is given even at its default value
        raise ValueError(
            f"{', '.join(sorted(engine_options))} given both in options= and as keyword arguments; "
            "give each option once"
        )
    opts = EngineOptions.merge(options, **engine_options)
    for name, value in _AUDIT_FIXED.items():
        if getattr(opts, name) != value:
            raise ValueError(
                f"{name}={getattr(opts, name)!r}: the audit sets {name} itself (leave it {value!r}"
                + ("; seed= seeds the noise)" if name == "noise_seed" else ")")
            )
    return opts


def one_run_audit(
    mode: Literal["bitfit", "full", "sparta"] = "bitfit",
    *,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 500,
    sample_size: int = 2000,
    options: EngineOptions | None = None,
    num_canaries: int = 1000,
    confidence: float = 0.95,
    guesses: tuple[int, int] | Literal["auto", "wide"] = "auto",
    score: Literal["llr", "sum"] = "llr",
    canary_scale: float = 10.0,
    max_physical_batch_size: int = 512,
    seed: int | None = None,
    _plant: str | None = None,
    **engine_options: Any,
) -> AuditResult:
    """Audit the privacy of a :class:`dpft.PrivacyEngine` configuration in one training run.

    The task is built so that the attack is as strong as the claim allows:
    an ``nn.Linear(4, m + 8)`` (float64) whose outputs ``0..m-1`` belong one
    to each canary.  Example ``i`` has the per-example loss ``-<u_i, model(x_i)>``;
    a canary's ``u`` is ``canary_scale * R`` times its own output coordinate
    and its ``x`` a unit vector, so its gradient is far above the clipping
    threshold ``R`` and, clipped, moves its own parameters by exactly ``R``
    (before noise); ordinary examples (``sample_size - m`` of them) have random
    ``u`` on the 8 other outputs and never touch a canary's parameters.  Each
    canary is in the training set independently with probability 1/2.
    Training is SGD on the plain mean loss with Poisson batches from
    :class:`dpft.data.PoissonBatchSampler` at the engine's sampling rate, for
    exactly the engine's planned steps.

    The auditor sees every iterate (white box).  A canary's update at each
    step, in units of ``R``, is ``b_t + σ z_t`` with ``b_t = 1`` if it was
    sampled (and is included); its score is the sum over steps of the
    log-likelihood ratio of one subsampled-Gaussian step
    (``score="llr"``, the optimal test for one canary) or of the updates
    (``score="sum"``).  The ``k_in`` highest scores are guessed "included", the
    ``k_out`` lowest "excluded".  ``(k_in, k_out)`` is fixed before looking at
    the audited canaries' inclusion bits: given explicitly, or chosen by
    simulating the *nominal* mechanism (σ, q, steps) (``"auto"``), or
    ``"wide"``: ``k_in = k_out = floor(m/2 - 2 sqrt(m))``, almost every canary
    guessed with a 4-standard-deviation margin for the random number
    included (for hunting gross bugs, where the nominal simulation would
    abstain far too much).

    The score assumes a canary's clipped contribution is exactly ``R``; with
    ``clipping_fn="automatic"`` it is ``R |g| / (|g| + 0.01)``, slightly less
    (much less for tiny ``R``), which makes the attack weaker, never the
    bound invalid.

    Modes: ``"bitfit"`` trains the bias only (:func:`dpft.bitfit`; a canary's
    parameter is its bias coordinate), ``"full"`` weight and bias (a canary's
    direction is its weight row along ``x`` plus its bias), ``"sparta"`` the
    biases plus selected weight rows (:func:`dpft.sparta.restrict`: every
    canary row and half of the ordinary rows).

    Args:
        mode: ``"bitfit"``, ``"full"`` or ``"sparta"``.
        target_epsilon / noise_multiplier: exactly one, as for the engine.
        steps / epochs: at most one (``steps = epochs * ceil(sample_size / batch_size)``);
            neither: 20 steps.
        batch_size / sample_size: expected batch size and data set size: the
            sampling rate is ``batch_size / sample_size``.  ``sample_size``
            counts the canary slots, so it must be at least ``num_canaries``.
        options / engine_options: the engine's options audited, a
            :class:`dpft.EngineOptions` or its fields as keywords
            (``target_delta``, ``max_grad_norm``, ``clipping_fn``,
            ``clipping_style``, ``clipping_mode``, ``accountant``, ...; give
            each once: :func:`audit_options`).  ``clipping_style`` names:
            ``"weight"``, ``"bias"``.
        num_canaries: m.  More canaries raise what the audit can certify
            (about ``log(m / 3)`` at most, see :func:`perfect_guess_ceiling`).
        confidence: 1 - β of the bound.
        guesses: ``(k_in, k_out)``, ``"auto"`` or ``"wide"`` (see above).
        score: ``"llr"`` (default) or ``"sum"``.
        canary_scale: ``|u| / R`` of a canary (> 1 so that clipping binds).
        max_physical_batch_size: examples per backward pass (memory only).
        seed: seeds everything (canary bits, data, batches, noise) for a
            reproducible audit; default: OS entropy.  The attack never uses
            the seed.  Fix it before looking at any result: re-running with
            other seeds and reporting the largest bound voids the confidence
            level.

    Returns:
        :class:`AuditResult`; ``result.violation`` is True when the certified
        lower bound exceeds the engine's claimed ε.

    Raises:
        ValueError: bad settings (as the engine raises them, plus bad
            ``mode``, ``num_canaries``, ``guesses``, ``score``).

    Example::

        >>> r = dpft.audit.one_run_audit("bitfit", target_epsilon=1.0, steps=20, seed=0)
        >>> r.epsilon_lower_bound <= r.claimed_epsilon
        True
    """
    from ..data import PoissonBatchSampler
    from ..engine import PrivacyEngine
    from ..methods.bitfit import bitfit
    from ..methods.sparta import restrict

    start = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if _plant not in _PLANTS:
        raise ValueError(f"_plant must be one of {_PLANTS}, got {_plant!r}")
    m = _check_count(num_canaries, "num_canaries")
    if m < 1:
        raise ValueError("num_canaries must be >= 1")
    confidence = _check_confidence(confidence)
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < m:
        raise ValueError(f"sample_size must be an integer >= num_canaries ({m}), got {sample_size!r}")
    if not (isinstance(canary_scale, numbers.Real) and canary_scale > 1):
        raise ValueError(f"canary_scale must be > 1 (so that clipping binds), got {canary_scale!r}")
    if isinstance(guesses, str):
        if guesses not in ("auto", "wide"):
            raise ValueError(f"guesses must be 'auto', 'wide' or (k_in, k_out), got {guesses!r}")
        if guesses == "wide":
            k_in = k_out = max(0, math.floor(m / 2 - 2 * math.sqrt(m)))
    else:
        try:
            k_in, k_out = (_check_count(k, "guesses") for k in guesses)
        except (TypeError, ValueError):
            raise ValueError(f"guesses must be 'auto', 'wide' or (k_in, k_out), got {guesses!r}") from None
        if k_in + k_out > m:
            raise ValueError(f"guesses {guesses!r} make more than num_canaries={m} guesses")
    opts = audit_options(options, engine_options)
    s_bits, s_data, s_batches, s_noise, s_guess, s_ties = _seeds(seed)

    # -- the task ------------------------------------------------------------
    rng = np.random.default_rng(s_data)
    R = float(opts.max_grad_norm)
    n_ord = sample_size - m
    d_out = m + _D_ORD
    x_can = rng.standard_normal((m, _D_IN))
    x_can /= np.linalg.norm(x_can, axis=1, keepdims=True)
    x_ord = rng.standard_normal((n_ord, _D_IN)) / math.sqrt(_D_IN)
    g_ord = rng.standard_normal((n_ord, _D_ORD))
    g_ord *= (R * rng.uniform(0.25, 2.0, size=(n_ord, 1))) / np.linalg.norm(g_ord, axis=1, keepdims=True)
    included = np.random.default_rng(s_bits).random(m) < 0.5
    n_in = int(included.sum())
    # example j: u_j = coef_j * e_{col_j} (canaries) + (0, ..., 0, G_j) (ordinary examples)
    X = torch.from_numpy(np.concatenate([x_can[included], x_ord]))
    col = torch.from_numpy(np.concatenate([np.flatnonzero(included), np.zeros(n_ord, dtype=np.int64)]))
    coef = torch.cat(
        [torch.full((n_in,), canary_scale * R, dtype=torch.float64), torch.zeros(n_ord, dtype=torch.float64)]
    )
    G = torch.from_numpy(np.concatenate([np.zeros((n_in, _D_ORD)), g_ord]))

    def batch_loss(ids: torch.Tensor) -> torch.Tensor:
        y = model(X[ids])
        per_example = coef[ids] * y.gather(1, col[ids, None]).squeeze(1) + (G[ids] * y[:, m:]).sum(1)
        return -per_example.mean()  # the engine's contract: the plain mean over the batch

    torch_gen = torch.Generator().manual_seed(s_data)
    model = nn.Linear(_D_IN, d_out).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=torch_gen, dtype=torch.float64) * 0.1)
        model.bias.zero_()
    if mode == "bitfit":
        bitfit(model)
    elif mode == "sparta":
        bitfit(model)
        rows = torch.zeros(d_out, dtype=torch.bool)
        rows[:m] = True
        rows[m::2] = True  # half of the ordinary rows
        restrict(model, {"weight": rows})
    else:
        for p in model.parameters():
            p.requires_grad_(True)

    if steps is None and epochs is None:
        steps = 20
    with _quiet_absl():  # RDP brackets during calibration log harmless warnings
        engine = PrivacyEngine(
            model,
            batch_size=batch_size,
            sample_size=sample_size,
            steps=steps,
            epochs=epochs,
            target_epsilon=target_epsilon,
            noise_multiplier=noise_multiplier,
            options=opts.replace(noise_seed=s_noise),
        )
    _plant_bug(engine, _plant, {"noise_div10": 0.1})
    sigma, q, T = engine.noise_multiplier, engine.sample_rate, engine.planned_steps
    if sigma == 0 and score == "llr":
        score = "sum"  # no noise: the likelihood ratio is degenerate
    # lr = B: an update is then (sum of clipped gradients + noise) itself
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float(batch_size))
    engine.attach(optimizer)

    # the canary's direction in parameter space (unit norm)
    idx = torch.arange(m)
    x_dir = torch.from_numpy(x_can)

    def position() -> np.ndarray:
        with torch.no_grad():
            if mode == "bitfit":
                return model.bias[:m].numpy().copy()
            w = (model.weight[idx] * x_dir).sum(1)
            return ((w + model.bias[:m]) / math.sqrt(2.0)).numpy()

    # -- training ------------------------------------------------------------
    sampler = PoissonBatchSampler(X.shape[0], sample_rate=q, steps=T, seed=s_batches)
    totals = np.zeros(m)
    prev = position()
    try:
        for batch in sampler:
            if not batch:
                engine.record_empty_batch()
            else:
                ids = torch.tensor(batch)
                for chunk in ids.split(max_physical_batch_size):
                    batch_loss(chunk).backward()
            optimizer.step()
            optimizer.zero_grad()
            now = position()
            totals += _step_score((now - prev) / R, score, q, sigma)
            prev = now
    finally:
        engine.detach()
    with _quiet_absl():
        claimed = engine.epsilon

    # -- the attack -----------------------------------------------------------
    if guesses == "auto":
        k_in, k_out = _choose_guesses(m, T, q, sigma, score, engine.target_delta, confidence, s_guess)
    g_in, g_out = _guess(totals, k_in, k_out, np.random.default_rng(s_ties))
    v = int(included[g_in].sum()) + int((~included[g_out]).sum())
    r = k_in + k_out
    bound = epsilon_lower_bound(m, r, v, engine.target_delta, confidence)
    return AuditResult(
        epsilon_lower_bound=bound,
        claimed_epsilon=float(claimed),
        delta=engine.target_delta,
        confidence=confidence,
        num_canaries=m,
        num_guesses=r,
        num_correct=v,
        guessed_in=k_in,
        guessed_out=k_out,
        ceiling=epsilon_lower_bound(m, r, r, engine.target_delta, confidence),
        mode=mode,
        score=score,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=T,
        max_grad_norm=R,
        seconds=time.perf_counter() - start,
        planted=_plant,
    )
