"""The statistics of dpft's privacy audits: plain numbers in, bounds out (no torch).

* :func:`one_run_p_value` / :func:`epsilon_lower_bound` / :func:`perfect_guess_ceiling`:
  the one-run audit's bound (Steinke, Nasr & Jagielski 2023; derivation in
  :mod:`dpft.audit.harness`).
* :func:`clopper_pearson` / :func:`threshold_lower_bound`: the many-trial
  distinguishing test's bound (:mod:`dpft.audit.trials`).
* the attack's per-step score and its simulation under the *nominal* mechanism
  (clipped contribution exactly R, noise σR), from which both audits fix their
  guesses and thresholds before seeing any audited bit.
* :class:`Claim`: what both audits report (a certified ε next to the claimed ε).

Imports numpy and (lazily) scipy only, so that the bounds can be checked and
reused without torch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

__all__ = [
    "Claim",
    "clopper_pearson",
    "epsilon_lower_bound",
    "one_run_p_value",
    "perfect_guess_ceiling",
    "threshold_lower_bound",
]

_GRID = 10  # thresholds per tail (the distinguishing test)


# --------------------------------------------------------------------------
# the one-run bound


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
# the attack's score, simulated under the nominal mechanism


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


# --------------------------------------------------------------------------
# the many-trial bound


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided Clopper–Pearson bounds for a binomial rate from ``k`` successes
    in ``n`` trials: ``(lo, hi)`` with ``P[p < lo] <= alpha`` and ``P[p > hi] <= alpha``
    (each exact, from the beta quantiles)."""
    from scipy import stats

    if not (isinstance(n, numbers.Integral) and n >= 1 and isinstance(k, numbers.Integral) and 0 <= k <= n):
        raise ValueError(f"need integers 0 <= k <= n, n >= 1, got k={k!r}, n={n!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def threshold_lower_bound(
    scores_in: np.ndarray,
    scores_out: np.ndarray,
    thresholds: Sequence[float],
    delta: float,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The ε lower bound of threshold tests ``score >= τ`` for every ``τ`` in
    ``thresholds`` (fixed before looking at the scores), at ``confidence``
    jointly over all of them (Bonferroni: each of the ``2 G`` one-sided
    Clopper–Pearson bounds at level ``(1 - confidence) / (2 G)``).

    Returns a dict: ``epsilon`` (the largest bound, >= 0), ``threshold`` and
    ``direction`` (``"in"``: ``log((TPR-δ)/FPR)``, ``"out"``:
    ``log((1-FPR-δ)/(1-TPR))``) where it was reached, the counts
    ``true_positives`` / ``false_positives`` there, and the bounds
    ``tpr_lower`` / ``fpr_upper``."""
    s_in = np.sort(np.asarray(scores_in, dtype=np.float64))
    s_out = np.sort(np.asarray(scores_out, dtype=np.float64))
    n_in, n_out = len(s_in), len(s_out)
    if n_in < 1 or n_out < 1:
        raise ValueError("need at least one trial in each world")
    taus = [float(t) for t in thresholds]
    if not taus:
        raise ValueError("need at least one threshold")
    a = (1.0 - confidence) / (2 * len(taus))
    best: dict[str, Any] = {
        "epsilon": 0.0,
        "threshold": None,
        "direction": None,
        "true_positives": None,
        "false_positives": None,
        "tpr_lower": None,
        "fpr_upper": None,
    }
    for tau in taus:
        tp = n_in - int(np.searchsorted(s_in, tau, side="left"))
        fp = n_out - int(np.searchsorted(s_out, tau, side="left"))
        tpr_lo = clopper_pearson(tp, n_in, a)[0]
        fpr_hi = clopper_pearson(fp, n_out, a)[1]
        for direction, num, den in (("in", tpr_lo - delta, fpr_hi), ("out", 1.0 - fpr_hi - delta, 1.0 - tpr_lo)):
            if num > 0 and den > 0:
                eps = math.log(num / den)
                if eps > best["epsilon"]:
                    best = {
                        "epsilon": eps,
                        "threshold": tau,
                        "direction": direction,
                        "true_positives": tp,
                        "false_positives": fp,
                        "tpr_lower": tpr_lo,
                        "fpr_upper": fpr_hi,
                    }
    return best


def _thresholds(steps: int, q: float, sigma: float, score: str, trials: int, seed: int) -> list[float]:
    """The threshold grid: quantiles of the *nominal* mechanism's score (a
    canary's clipped contribution exactly R, noise σR), simulated from the
    public settings only: upper-tail quantiles of the score without the canary
    and lower-tail quantiles of the score with it, at probabilities from 1/2
    down to about 3 / trials."""
    rng = np.random.default_rng(seed)
    budget = 40_000_000 if score == "llr" else 400_000_000  # draws
    n_sim = int(min(max(20_000, 10 * trials), max(20_000, budget // max(1, steps))))
    out = _simulate_scores(np.zeros(n_sim, dtype=bool), steps, q, sigma, score, rng)
    inn = _simulate_scores(np.ones(n_sim, dtype=bool), steps, q, sigma, score, rng)
    p_min = max(3.0 / trials, 10.0 / n_sim)
    probs = np.geomspace(0.5, min(0.5, p_min), _GRID)
    taus = np.concatenate([np.quantile(out, 1.0 - probs), np.quantile(inn, probs)])
    return sorted({float(t) for t in taus if np.isfinite(t)})


# --------------------------------------------------------------------------
# what an audit reports


class Claim:
    """What an audit reports: an ε it certifies (a lower bound) next to the
    ε the engine claimed.  Mixed into the audits' result dataclasses."""

    epsilon_lower_bound: float
    claimed_epsilon: float

    @property
    def violation(self) -> bool:
        """Whether the certified lower bound exceeds the claimed ε (a privacy bug)."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def as_dict(self) -> dict[str, Any]:
        """Plain-python fields plus ``violation``."""
        out = asdict(self)  # type: ignore[call-overload]
        out["violation"] = self.violation
        return out

    def verdict(self) -> str:
        return (
            "VIOLATION: the run leaks more than claimed"
            if self.violation
            else "consistent with the claim (a lower bound, not a proof of privacy)"
        )
