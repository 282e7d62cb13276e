"""Empirical privacy auditing in one training run (Steinke, Nasr & Jagielski 2023).

An audit gives a *lower* bound on the ε of a training configuration: if the
engine claims (ε, δ)-DP but the audit certifies, at confidence ``1 - β``, that
the run is *not* (ε', δ)-DP for some ε' > ε, then something is wrong (a bug in
clipping, noise or accounting).  A lower bound below the claim proves nothing
about privacy: it only says this attack did not catch a violation.

Two layers:

* :func:`epsilon_lower_bound` / :func:`one_run_p_value`: the statistics of a
  one-run audit.  ``m`` canaries are each included in the training set
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

from .trials import Claim, DistinguishingResult, distinguishing_audit

__all__ = [
    "AuditResult",
    "DistinguishingResult",
    "MODES",
    "SCORES",
    "distinguishing_audit",
    "epsilon_lower_bound",
    "one_run_audit",
    "one_run_p_value",
    "perfect_guess_ceiling",
]

MODES: tuple[str, ...] = ("bitfit", "full", "sparta")
SCORES: tuple[str, ...] = ("llr", "sum")

# --------------------------------------------------------------------------
# the statistics


def _check_count(x: Any, name: str) -> int:
    if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {x!r}")
    return int(x)


def _check_mrv(m: Any, r: Any, v: Any) -> tuple[int, int, int]:
    m, r, v = _check_count(m, "m"), _check_count(r, "r"), _check_count(v, "v")
    if m < 1:
        raise ValueError(f"m must be >= 1 (the number of canaries), got {m}")
    if not v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    return m, r, v


def _check_delta(delta: Any) -> float:
    if not isinstance(delta, numbers.Real) or isinstance(delta, bool) or not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return float(delta)


def _check_confidence(confidence: Any) -> float:
    if not isinstance(confidence, numbers.Real) or isinstance(confidence, bool) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(confidence)


def _p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The bound on P[W >= v] for an (epsilon, delta)-DP run (no input checks)."""
    from scipy import special, stats

    if v == 0:
        return 1.0
    q = float(special.expit(epsilon))  # accuracy of epsilon-randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0.0 or tail >= 1.0:
        return min(1.0, tail)
    # f(v - i) - f(v) = P[v - i <= B <= v - 1]: cumulative pmf going down from v - 1
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    window = np.cumsum(below) / np.arange(1, v + 1)
    return min(1.0, tail + 2.0 * m * delta * float(window.max()))


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on the probability of ``v`` or more correct guesses out of
    ``r`` (``m`` canaries) if the run is (``epsilon``, ``delta``)-DP.

    ``min(1, f(v) + 2 m δ max_{1<=i<=v} (f(v-i) - f(v)) / i)`` with
    ``f(k) = P[Binomial(r, e^ε/(1+e^ε)) >= k]`` (Steinke, Nasr & Jagielski
    2023; see the module docstring).  A value below ``β`` rejects the claim
    "(epsilon, delta)-DP" at confidence ``1 - β``.
    """
    m, r, v = _check_mrv(m, r, v)
    delta = _check_delta(delta)
    if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool) or not epsilon >= 0:
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    return _p_value(m, r, v, float(epsilon), delta)


def _bisect(p, lo: float, hi: float, beta: float, tol: float) -> float:
    """Invariant p(lo) < beta <= p(hi); returns the final lo (within ``tol`` of a crossing)."""
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p(mid) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def _lower_bound(m: int, r: int, v: int, delta: float, beta: float, tol: float) -> float:
    """:func:`epsilon_lower_bound` without input checks, to absolute tolerance ``tol``."""
    if v == 0:
        return 0.0

    def pure(e: float) -> float:
        return _p_value(m, r, v, e, 0.0)

    def p(e: float) -> float:
        return _p_value(m, r, v, e, delta)

    # p(e) >= pure(e), and pure is increasing in e: the bound lies below the
    # first e with pure(e) >= beta.
    if pure(0.0) >= beta:
        return 0.0
    hi = 1.0
    while pure(hi) < beta:
        hi *= 2.0
        if hi > 1e4:  # cannot happen for v <= r (pure -> 1); guards against float trouble
            raise RuntimeError(f"no upper bracket for m={m}, r={r}, v={v}")
    if delta == 0.0:
        return _bisect(pure, 0.0, hi, beta, tol)
    hi = _bisect(pure, 0.0, hi, beta, tol) + tol  # pure(hi) >= beta still
    if 2.0 * m * delta <= 1.0:  # p increasing in epsilon: plain bisection is exact
        if p(0.0) >= beta:
            return 0.0
        return _bisect(p, 0.0, hi, beta, tol)
    # p may be non-monotone: take the largest rejected grid point, refine above it
    grid = np.linspace(0.0, hi, 257)
    rejected = [i for i, e in enumerate(grid) if p(float(e)) < beta]
    if not rejected:
        return 0.0
    i = rejected[-1]
    if i == len(grid) - 1:  # p(hi) >= pure(hi) >= beta: cannot happen, kept for safety
        return float(grid[i])
    return _bisect(p, float(grid[i]), float(grid[i + 1]), beta, tol)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that ``v`` correct guesses out of ``r`` (``m`` canaries)
    rule out at ``confidence``: with probability at least ``confidence`` over
    the canaries' inclusion bits, a run that is (ε, ``delta``)-DP for the
    returned ε would not have produced this many correct guesses.

    Implements the one-run audit bound of Steinke, Nasr & Jagielski (NeurIPS
    2023, arXiv:2305.08846) for (ε, δ)-DP (δ = 0: their pure-DP main
    theorem), via :func:`one_run_p_value`; the module docstring states the
    bound, why the returned value is valid and the theorem numbering.  The
    returned ε always has ``one_run_p_value(m, r, v, ε, delta) < 1 - confidence``
    (or is 0) and is within 1e-9 below the threshold.

    Args:
        m: number of canaries, each included independently with probability 1/2.
        r: number of guesses (canaries not abstained on), fixed before looking
            at the canaries' inclusion bits.
        v: number of correct guesses.
        delta: the δ of the claim being audited (0 for pure DP).
        confidence: ``1 - β``, e.g. 0.95.

    Returns:
        ε >= 0 (0 when nothing is ruled out).  Never more than the δ = 0 value,
        which for ``v = r`` is ``-log(β^(-1/r) - 1)`` (:func:`perfect_guess_ceiling`).
    """
    m, r, v = _check_mrv(m, r, v)
    delta = _check_delta(delta)
    beta = 1.0 - _check_confidence(confidence)
    return _lower_bound(m, r, v, delta, beta, 1e-9)


def perfect_guess_ceiling(r: int, confidence: float = 0.95) -> float:
    """The most a one-run audit can certify with ``r`` guesses (all correct, δ = 0):
    ``-log(β^(-1/r) - 1)``, about ``log(r / log(1/β))``."""
    r = _check_count(r, "r")
    beta = 1.0 - _check_confidence(confidence)
    if r == 0:
        return 0.0
    return max(0.0, -math.log(math.expm1(-math.log(beta) / r)))


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


@contextlib.contextmanager
def _clipping_disabled() -> Iterator[None]:
    """Replace the clipping factors the engine uses (``dpft.privatize.clip_factors``)
    by ones: every per-example gradient enters the sum unclipped."""
    from .. import privatize

    original = privatize.clip_factors

    def no_clip(norms: torch.Tensor, max_norm: float, fn: str) -> torch.Tensor:
        return torch.ones_like(norms)

    privatize.clip_factors = no_clip
    try:
        yield
    finally:
        privatize.clip_factors = original


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


def _step_score(x: np.ndarray, score: str, q: float, sigma: float) -> np.ndarray:
    """Per-step evidence for "included" from a normalized update ``x`` (units of R)."""
    if score == "sum":
        return x
    # log-likelihood ratio of one Poisson-subsampled Gaussian step: the canary
    # adds 1 with probability q, noise has std sigma
    a = (2.0 * x - 1.0) / (2.0 * sigma * sigma)
    log_1mq = math.log1p(-q) if q < 1.0 else -math.inf
    return np.logaddexp(log_1mq, math.log(q) + a)


def _simulate_scores(
    included: np.ndarray, steps: int, q: float, sigma: float, score: str, rng: np.random.Generator
) -> np.ndarray:
    """Scores of the nominal mechanism (clipped contribution exactly R, noise σR)."""
    m = included.shape[0]
    if score == "sum":
        k = rng.binomial(steps, q, size=m) * included
        return k + sigma * math.sqrt(steps) * rng.standard_normal(m)
    total = np.zeros(m)
    chunk = max(1, 2_000_000 // max(1, m))
    for start in range(0, steps, chunk):
        t = min(chunk, steps - start)
        hit = (rng.random((t, m)) < q) & included[None, :]
        x = hit + sigma * rng.standard_normal((t, m))
        total += _step_score(x, score, q, sigma).sum(0)
    return total


def _guess(scores: np.ndarray, k_in: int, k_out: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices guessed "in" (the ``k_in`` highest scores) and "out" (the ``k_out`` lowest);
    ties are broken at random."""
    order = np.lexsort((rng.random(scores.shape[0]), scores))  # ascending score
    return order[len(order) - k_in :] if k_in else order[:0], order[:k_out]


_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
_SIM_REPS = 8


def _choose_guesses(
    m: int, steps: int, q: float, sigma: float, score: str, delta: float, confidence: float, seed: int
) -> tuple[int, int]:
    """(k_in, k_out) maximizing the bound on ``_SIM_REPS`` simulated runs of the *nominal*
    mechanism: a fixed rule of the public settings, never of the audited bits."""
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(_SIM_REPS):
        included = rng.random(m) < 0.5
        scores = _simulate_scores(included, steps, q, sigma, score, rng)
        reps.append((included, scores))
    sizes = sorted({max(1, int(round(f * m))) for f in _FRACTIONS})
    # rank by the expected bound, then (when no choice certifies anything) by
    # the evidence against epsilon = 0
    best, best_key = (sizes[-1], sizes[-1]), (-1.0, -math.inf)
    for k_in in sizes:
        for k_out in [0, *sizes]:
            if k_in + k_out > m:
                continue
            correct = []
            for included, scores in reps:
                g_in, g_out = _guess(scores, k_in, k_out, rng)
                correct.append(int(included[g_in].sum()) + int((~included[g_out]).sum()))
            v = int(np.floor(np.mean(correct)))
            eps = _lower_bound(m, k_in + k_out, v, delta, 1.0 - confidence, 1e-3)
            key = (eps, -_p_value(m, k_in + k_out, v, 0.0, 0.0))
            if key > best_key:
                best, best_key = (k_in, k_out), key
    return best


def _seeds(seed: int | None) -> list[int]:
    ss = np.random.SeedSequence(seed)
    return [int(s) for s in ss.generate_state(6, np.uint32)]


def one_run_audit(
    mode: Literal["bitfit", "full", "sparta"] = "bitfit",
    *,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 500,
    sample_size: int = 2000,
    target_delta: float | None = None,
    max_grad_norm: float = 1.0,
    clipping_fn: str = "abadi",
    clipping_style: str | Sequence[Sequence[str]] = "all-layer",
    clipping_mode: str = "auto",
    accountant: str = "pld",
    num_canaries: int = 1000,
    confidence: float = 0.95,
    guesses: tuple[int, int] | Literal["auto", "wide"] = "auto",
    score: Literal["llr", "sum"] = "llr",
    canary_scale: float = 10.0,
    max_physical_batch_size: int = 512,
    seed: int | None = None,
    _plant: str | None = None,
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
        target_delta, max_grad_norm, clipping_fn, clipping_style,
            clipping_mode, accountant: passed to the engine (``clipping_style``
            names: ``"weight"``, ``"bias"``).
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
    s_bits, s_data, s_batches, s_noise, s_guess, s_ties = _seeds(seed)

    # -- the task ------------------------------------------------------------
    rng = np.random.default_rng(s_data)
    R = float(max_grad_norm)
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
    coef = torch.cat([torch.full((n_in,), canary_scale * R, dtype=torch.float64), torch.zeros(n_ord, dtype=torch.float64)])
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
            target_delta=target_delta,
            max_grad_norm=R,
            clipping_fn=clipping_fn,
            clipping_style=clipping_style,
            clipping_mode=clipping_mode,
            accountant=accountant,
            noise_seed=s_noise,
        )
    if _plant == "noise_div10":
        engine.noise = _ScaledNoise(engine.noise, 0.1)  # type: ignore[assignment]
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
    plant = _clipping_disabled() if _plant == "no_clipping" else contextlib.nullcontext()
    prev = position()
    try:
        with plant:
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


# --------------------------------------------------------------------------
# command line: ``dpft audit``


def add_cli_parser(subparsers: Any) -> Any:
    """Add the ``audit`` subcommand to ``dpft``'s argparse subparsers."""
    a = subparsers.add_parser(
        "audit",
        help="empirical ε lower bounds of your engine settings (one-run + many-trial audits)",
        description="Train small canary tasks with a PrivacyEngine configured like yours and "
        "report the ε lower bounds that a one-run audit (Steinke, Nasr & Jagielski 2023) and a "
        "many-trial distinguishing test (gradient canaries, Clopper-Pearson bounds; --trials) "
        "certify, next to the engine's claimed ε. A lower bound above the claim means a "
        "privacy bug; one below it proves nothing about privacy. Exit code 1 on a violation.",
    )
    a.add_argument("--mode", choices=MODES, default="bitfit", help="what trains (default bitfit)")
    what = a.add_mutually_exclusive_group(required=True)
    what.add_argument("--epsilon", type=float, help="target ε (σ calibrated by the engine)")
    what.add_argument("--sigma", "--noise-multiplier", dest="sigma", type=float, help="noise multiplier σ")
    length = a.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (default 20)")
    length.add_argument("--epochs", type=float, help="epochs (steps = epochs · ceil(N/B))")
    a.add_argument("--batch-size", type=int, default=500, help="expected batch size B (default 500)")
    a.add_argument("--sample-size", type=int, default=2000,
                   help="data set size N, canary slots included (default 2000); q = B/N")
    a.add_argument("--delta", type=float, help="δ (default dpft.accounting.default_delta(N))")
    a.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping threshold R (default 1)")
    a.add_argument("--clipping-fn", choices=("abadi", "automatic"), default="abadi")
    a.add_argument("--clipping-style", choices=("all-layer", "layer-wise", "param-wise"), default="all-layer")
    a.add_argument("--clipping-mode", choices=("auto", "bk", "ghost", "mixed", "instantiate"), default="auto")
    a.add_argument("--accountant", choices=("pld", "rdp"), default="pld")
    a.add_argument("--num-canaries", type=int, default=1000, help="m (default 1000)")
    a.add_argument("--confidence", type=float, default=0.95, help="1 - β (default 0.95)")
    a.add_argument("--guesses", default="auto",
                   help="'auto' (default), 'wide', or K_IN,K_OUT: canaries guessed in / out")
    a.add_argument("--score", choices=SCORES, default="llr", help="default llr")
    a.add_argument("--trials", type=int, default=50_000,
                   help="distinguishing test: independent trials per world (canary present / absent; "
                   "default 50000; 0 skips the test)")
    a.add_argument("--trials-task", choices=("embedding", "bitfit", "full", "sparta"), default="embedding",
                   help="distinguishing test's canary task (default embedding: cost linear in the trials)")
    a.add_argument("--seed", type=int, help="seed everything (default: OS entropy)")
    a.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return a


def run_cli(ns: Any) -> int:
    """Run ``dpft audit`` from parsed arguments; 0 = consistent, 1 = violation, 2 = bad input."""
    import json
    import sys

    guesses: Any = ns.guesses
    if guesses not in ("auto", "wide"):
        try:
            k_in, k_out = (int(k) for k in str(guesses).split(","))
            guesses = (k_in, k_out)
        except ValueError:
            print(f"dpft audit: error: --guesses must be auto, wide or K_IN,K_OUT, got {ns.guesses!r}",
                  file=sys.stderr)
            return 2
    # the configuration both audits run (the engine's arguments, as given)
    config = dict(
        target_epsilon=ns.epsilon, noise_multiplier=ns.sigma, steps=ns.steps, epochs=ns.epochs,
        batch_size=ns.batch_size, sample_size=ns.sample_size, target_delta=ns.delta,
        max_grad_norm=ns.max_grad_norm, clipping_fn=ns.clipping_fn, clipping_style=ns.clipping_style,
        clipping_mode=ns.clipping_mode, accountant=ns.accountant, confidence=ns.confidence, score=ns.score,
    )
    try:
        result = one_run_audit(ns.mode, num_canaries=ns.num_canaries, guesses=guesses, seed=ns.seed, **config)
        trials = None
        if ns.trials:
            from .trials import distinguishing_audit

            seed = None if ns.seed is None else int(np.random.SeedSequence([ns.seed, 1]).generate_state(1)[0])
            trials = distinguishing_audit(ns.trials_task, trials=ns.trials, seed=seed, **config)
    except ValueError as e:
        print(f"dpft audit: error: {e}", file=sys.stderr)
        return 2
    if ns.json:
        out = result.as_dict()
        if trials is not None:
            out["distinguishing"] = trials.as_dict()
        print(json.dumps(out))
    else:
        print(result.summary())
        if trials is not None:
            print(trials.summary())
    return 1 if result.violation or (trials is not None and trials.violation) else 0
