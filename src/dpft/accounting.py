"""Privacy accounting for DP-SGD: ε of Poisson-subsampled Gaussian steps.

All privacy mathematics is delegated to Google's ``dp_accounting`` package;
this module only builds the ``DpEvent`` describing a run, picks accountant
settings, validates inputs and calibrates σ by a bracketing search.

The mechanism
    One DP-SGD step with sample rate ``q`` and noise multiplier ``σ`` is a
    ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``: every example enters the
    logical batch independently with probability ``q`` and the clipped sum
    (sensitivity ``R``) receives ``N(0, σ²R²)`` noise.  Adjacency is
    add/remove-one (``NeighboringRelation.ADD_OR_REMOVE_ONE``), the usual
    relation for Poisson sampling.  A run is a sequence of *segments*
    ``(σ, q, steps)``; its event is
    ``ComposedDpEvent([SelfComposedDpEvent(step_event(σ, q), steps), ...])``.

Accountants
    ``"pld"`` (default): ``dp_accounting.pld.PLDAccountant``, privacy loss
    distributions with the library's *pessimistic* rounding, so the reported
    ε is an upper bound on the true ε (up to floating point), and is the
    tightest of the two.  The discretization interval ``h`` is refined per
    query (see :func:`_pld_epsilon`): ``h = 10^-2.5, 1e-3, 10^-3.5, ...``
    until two successive passes agree within 0.2 %, which leaves an error of
    about 2e-4·ε.  A fixed ``h`` is either slow (large ε) or inaccurate
    (small ε: at ``h = 1e-4``, σ = 5 and q = 0.001 come out 2 % too
    pessimistic).  Every pass is pessimistic, so the smallest value found is
    returned.  (Aside: at very fine ``h`` (≈ 3e-7) dp_accounting's
    connect-the-dots answer drifts *up* again by ~5e-4 relative, e.g. σ=5,
    q=0.1, 10³ steps: 2.6507 for h ∈ [1e-6, 1e-4] but 2.6521 at 3e-7, while
    the privacy-buckets method converges from above to 2.6508; a numerical
    artifact on the conservative side, and the refinement stops before it.)

    ``"rdp"``: ``dp_accounting.rdp.RdpAccountant`` with its default orders
    (1.1 … 10.9 by 0.1, 11 … 63, 128, 256, 512, 1024).  Looser (larger ε) than
    PLD, very cheap.  For small σ and large q dp_accounting logs warnings that
    some fractional orders did not converge; it drops those orders, which
    can only make ε larger, never smaller.

Cost
    A query takes a fraction of a second to a few seconds (PLD refines its
    discretization until two passes agree; measured times in
    ``docs/benchmarks.md``, "Accounting").  :class:`Ledger` caches its
    answers, so repeated queries on an unchanged history take microseconds,
    and :class:`BudgetGuard` asks once for a whole planned horizon.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

__all__ = [
    "ACCOUNTANTS",
    "BudgetGuard",
    "Ledger",
    "PrivacyBudgetExceeded",
    "default_delta",
    "epsilon",
    "noise_multiplier",
]

#: Accountant names accepted everywhere in this module.
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")

_NEIGHBORING = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

# PLD discretization (see _pld_epsilon): h = 10^(-2.5 - k/2), k = 0, 1, ...
# until two passes agree within _PLD_RELATIVE_CHANGE.
_PLD_COARSE_INTERVAL = 10.0**-2.5  # ≈ 3.16e-3; the first comparison is then at 1e-3
_PLD_RELATIVE_CHANGE = 2e-3
_PLD_MIN_INTERVAL = 1e-8
_PLD_MAX_PASSES = 11

# Calibration: stop once ε(σ) is in [(1 - _CALIBRATION_TOL)·target, target].
_CALIBRATION_TOL = 0.004

Segment = tuple[float, float, int]


class PrivacyBudgetExceeded(RuntimeError):
    """Raised when a step would take the spent ε past the target ε."""


# --------------------------------------------------------------------------
# validation


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_noise_multiplier(x: Any, name: str = "noise_multiplier") -> float:
    if not _is_real(x) or math.isnan(x) or x < 0 or math.isinf(x):
        raise ValueError(f"{name} must be a finite float >= 0, got {x!r}")
    return float(x)


def _check_sample_rate(x: Any, name: str = "sample_rate") -> float:
    if not _is_real(x) or not (0 < x <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {x!r}")
    return float(x)


def _check_steps(x: Any, name: str = "steps") -> int:
    if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {x!r}")
    return int(x)


def _check_delta(x: Any, name: str = "delta") -> float:
    if not _is_real(x) or not (0 < x < 1):
        raise ValueError(f"{name} must be in (0, 1), got {x!r}")
    return float(x)


def _check_accountant(x: Any, name: str = "accountant") -> str:
    if x not in ACCOUNTANTS:
        raise ValueError(f"{name} must be one of {ACCOUNTANTS}, got {x!r}")
    return str(x)


def _check_target_epsilon(x: Any, name: str = "target_epsilon") -> float:
    if not _is_real(x) or math.isnan(x) or x <= 0 or math.isinf(x):
        raise ValueError(f"{name} must be a finite float > 0, got {x!r}")
    return float(x)


# --------------------------------------------------------------------------
# events and accountants (the only place that talks to dp_accounting)


def _step_event(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    """One DP-SGD step: Poisson-subsampled Gaussian."""
    return dp_accounting.PoissonSampledDpEvent(
        sampling_probability=sample_rate,
        event=dp_accounting.GaussianDpEvent(noise_multiplier=noise_multiplier),
    )


def _run_event(segments: Sequence[Segment]) -> dp_accounting.DpEvent:
    """The whole history: a composition of self-composed step events."""
    return dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(_step_event(s, q), n) for s, q, n in segments]
    )


def _pld_epsilon_at(event: dp_accounting.DpEvent, delta: float, interval: float) -> float:
    acc = PLDAccountant(neighboring_relation=_NEIGHBORING, value_discretization_interval=interval)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _pld_epsilon(event: dp_accounting.DpEvent, delta: float) -> float:
    """PLD ε, refining the discretization interval until ε has converged.

    Passes use ``h = 10^-2.5, 1e-3, 10^-3.5, 1e-4, ...`` (down to ``1e-8``) and stop
    when two successive passes differ by at most ``2e-3`` relative.  The
    discretization error shrinks about 10× per pass (roughly ∝ h²), so the
    last pass is then within about ``2e-4`` relative of the h → 0 limit.  A
    fixed ``h`` would be either slow (large ε) or inaccurate (small ε: at
    ``h = 1e-4`` σ = 5, q = 0.001 comes out 2 % too large).  Every pass is
    pessimistic (an upper bound), so the smallest value is returned.
    """
    interval = _PLD_COARSE_INTERVAL
    best = _pld_epsilon_at(event, delta, interval)
    for _ in range(_PLD_MAX_PASSES - 1):
        if not math.isfinite(best) or best <= 0.0:
            break
        interval /= math.sqrt(10.0)
        if interval < _PLD_MIN_INTERVAL:
            break
        value = _pld_epsilon_at(event, delta, interval)
        converged = abs(best - value) <= _PLD_RELATIVE_CHANGE * min(best, value)
        best = min(best, value)
        if converged:
            break
    return best


def _rdp_epsilon(event: dp_accounting.DpEvent, delta: float) -> float:
    # dp-accounting logs (through absl) a WARNING for each fractional RDP order whose
    # series does not converge and is dropped; dropping an order only makes ε larger
    # (never an under-count), so these lines are noise for our callers: silenced here.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(max(level, logging.ERROR))
    try:
        acc = RdpAccountant(neighboring_relation=_NEIGHBORING)
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def _segments_epsilon(segments: Sequence[Segment], delta: float, accountant: str) -> float:
    """ε of already validated and merged segments (zero-step ones dropped)."""
    segments = [s for s in segments if s[2] > 0]
    if not segments:
        return 0.0
    if any(s == 0.0 for s, _, _ in segments):
        return math.inf
    event = _run_event(segments)
    if accountant == "pld":
        return _pld_epsilon(event, delta)
    return _rdp_epsilon(event, delta)


# --------------------------------------------------------------------------
# public functions


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """ε after ``steps`` Poisson-subsampled Gaussian steps, at ``delta``.

    Args:
        noise_multiplier: σ, noise std divided by the clipping norm; ``>= 0``.
            σ = 0 means no noise: ε = ``inf`` (for ``steps > 0``).
        sample_rate: Poisson sampling probability ``q = B / N`` in (0, 1].
        steps: number of steps (int ``>= 0``); 0 steps cost ε = 0.
        delta: target δ in (0, 1).
        accountant: ``"pld"`` (default, tight) or ``"rdp"``.

    Returns:
        ε as a float (an upper bound: pessimistic PLD, or RDP conversion).

    Raises:
        ValueError: an argument is out of range; the message names it.

    This is exactly the ε a :class:`Ledger` holding one segment
    ``(noise_multiplier, sample_rate, steps)`` reports (same code path).
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sample_rate(sample_rate)
    n = _check_steps(steps)
    d = _check_delta(delta)
    acc = _check_accountant(accountant)
    return _segments_epsilon([(sigma, q, n)], d, acc)


def noise_multiplier(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """The σ whose ε after ``steps`` steps lies in ``[0.99·target, target]``.

    Bracketing search on σ (regula falsi on log ε vs log σ, Illinois variant,
    with bisection as fallback).  The bracket comes from doubling/halving;
    for PLD it starts at the RDP-calibrated σ, which is feasible because
    RDP's ε upper-bounds PLD's.  The search stops as soon as
    ``ε(σ) ∈ [0.996·target, target]`` (well inside the 1 % contract), and the
    result is checked against ``[0.99·target, target]`` before returning.

    Args:
        target_epsilon: ε to spend, ``> 0``.
        sample_rate: q in (0, 1].
        steps: planned number of steps, ``>= 1``.
        delta: δ in (0, 1).
        accountant: ``"pld"`` or ``"rdp"``.

    Raises:
        ValueError: bad argument (named in the message), including
            ``steps == 0`` (no σ is defined: any σ spends ε = 0).
        RuntimeError: the bisection failed to land in the window (should not
            happen; it would mean ε(σ) is discontinuous at this precision).
    """
    target = _check_target_epsilon(target_epsilon)
    q = _check_sample_rate(sample_rate)
    n = _check_steps(steps)
    if n == 0:
        raise ValueError("steps must be >= 1 to calibrate a noise multiplier, got 0")
    d = _check_delta(delta)
    acc = _check_accountant(accountant)

    def eps(sigma: float, which: str = acc) -> float:
        return _segments_epsilon([(sigma, q, n)], d, which)

    if acc == "pld":
        # RDP's ε >= PLD's ε, so the RDP-calibrated σ is PLD-feasible.
        hi = _calibrate(lambda s: eps(s, "rdp"), target, 1.0)
        return _calibrate(eps, target, hi, factor=1.25)
    return _calibrate(eps, target, 1.0)


def _calibrate(eps: Any, target: float, start: float, factor: float = 2.0) -> float:
    """σ with ``eps(σ)`` in ``[(1 - tol)·target, target]``; ``eps`` decreasing.

    Brackets by multiplying/dividing ``start`` by ``factor``, then runs the
    Illinois variant of regula falsi on ``log ε`` as a function of ``log σ``
    (nearly linear, so 2–4 evaluations usually suffice), falling back to a
    geometric bisection step whenever interpolation is not possible.
    """
    lo_ok = (1.0 - _CALIBRATION_TOL) * target
    aim = math.log((1.0 - 0.5 * _CALIBRATION_TOL) * target)
    hi = start
    e_hi = eps(hi)
    if lo_ok <= e_hi <= target:
        return hi
    if e_hi > target:  # too little noise: grow σ until feasible
        while True:
            lo, e_lo = hi, e_hi
            hi *= factor
            if hi > 1e8:
                raise RuntimeError(f"no noise_multiplier <= 1e8 reaches target_epsilon={target!r}")
            e_hi = eps(hi)
            if e_hi <= target:
                break
    else:  # feasible with room to spare: shrink σ until infeasible
        while True:
            lo = hi / factor
            if lo < 1e-6:
                raise RuntimeError(f"target_epsilon={target!r} is not reached by any noise_multiplier >= 1e-6")
            e_lo = eps(lo)
            if e_lo > target:
                break
            hi, e_hi = lo, e_lo
            if e_hi >= lo_ok:
                return hi

    # invariant: eps(lo) > target >= eps(hi); regula falsi in (log σ, log ε - aim)
    def f(e: float) -> float:
        return math.log(e) - aim if e > 0 else -math.inf

    x_lo, f_lo = math.log(lo), f(e_lo)
    x_hi, f_hi = math.log(hi), f(e_hi)
    side = 0
    for _ in range(200):
        if e_hi >= lo_ok:
            break
        if math.isfinite(f_lo) and math.isfinite(f_hi) and f_lo != f_hi:
            x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
        else:
            x = 0.5 * (x_lo + x_hi)
        if not x_lo < x < x_hi:
            x = 0.5 * (x_lo + x_hi)
            if not x_lo < x < x_hi:
                break
        e = eps(math.exp(x))
        if e > target:
            x_lo, f_lo, lo = x, f(e), math.exp(x)
            if side == -1:
                f_hi *= 0.5  # Illinois: the kept endpoint has been kept twice
            side = -1
        else:
            x_hi, f_hi, hi, e_hi = x, f(e), math.exp(x), e
            if side == 1:
                f_lo *= 0.5
            side = 1
    if not (0.99 * target <= e_hi <= target):
        raise RuntimeError(f"calibration failed: eps({hi!r}) = {e_hi!r} is not in [0.99, 1]·{target!r}")
    return hi


def default_delta(sample_size: int) -> float:
    """Default δ for a data set of ``sample_size`` examples.

    The largest power of ten that is at most ``1 / (10·N)``, and at most
    ``1e-5``::

        N = 1_000   -> 1e-5         N = 12_808 -> 1e-6
        N = 60_000  -> 1e-6         N = 1e6    -> 1e-7

    Why: (ε, δ)-DP allows a mechanism that publishes each record with
    probability δ, so δ must be well below ``1/N``; ``δ·N <= 0.1`` keeps the
    expected number of such records at most 0.1.  Powers of ten keep reported
    δ readable and comparable across papers; the ``1e-5`` cap keeps δ in the
    range used in the literature for small data sets.  The ε cost of a
    ten-times smaller δ is modest (typically 10–20 % more ε).  Note the
    common choice δ = 1e-5 for N = 50–60k (δ·N ≈ 0.5) is one step looser; pass
    ``target_delta`` explicitly to reproduce such numbers.
    """
    if not isinstance(sample_size, numbers.Integral) or isinstance(sample_size, bool) or sample_size < 1:
        raise ValueError(f"sample_size must be an integer >= 1, got {sample_size!r}")
    exponent = math.floor(math.log10(0.1 / int(sample_size)))
    # guard against log10 rounding: ensure 10**exponent <= 0.1 / N
    while 10.0**exponent > 0.1 / int(sample_size):
        exponent -= 1
    return min(1e-5, 10.0**exponent)


# --------------------------------------------------------------------------
# ledger


class Ledger:
    """The privacy history of a run, as segments ``(σ, q, steps)``.

    ``record`` appends steps (merging with the last segment when σ and q are
    equal); ``epsilon(delta)`` composes all segments as one ``dp_accounting``
    event (``ComposedDpEvent`` of ``SelfComposedDpEvent``).  Different σ / q
    per phase (warm-up, SPARTA scoring, sparse training, ...) compose
    exactly.  Answers are cached per (segments, δ, accountant) in a small LRU
    cache, so asking twice (or asking ``epsilon`` after ``epsilon_if`` for
    the step just recorded) costs nothing.

    A ledger holding the single segment ``(σ, q, S)`` reports exactly
    ``epsilon(noise_multiplier=σ, sample_rate=q, steps=S, ...)`` (same code
    path), so a σ calibrated for S steps never trips a budget check at step S.
    """

    _CACHE_SIZE = 64

    def __init__(self, segments: Iterable[Sequence[Any]] = (), caveats: Iterable[str] = ()) -> None:
        self._segments: list[Segment] = []
        self._caveats: list[str] = []
        self._cache: OrderedDict[tuple[Any, ...], float] = OrderedDict()
        for text in caveats:
            self.add_caveat(text)
        for seg in segments:
            if len(seg) != 3:
                raise ValueError(f"segments must hold (noise_multiplier, sample_rate, steps) triples, got {seg!r}")
            self.record(*seg)

    # -- recording ---------------------------------------------------------

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps with σ = ``noise_multiplier``, q = ``sample_rate``."""
        sigma = _check_noise_multiplier(noise_multiplier)
        q = _check_sample_rate(sample_rate)
        n = _check_steps(steps)
        self._segments = _merged(self._segments, (sigma, q, n))

    def add_caveat(self, text: str) -> None:
        """Attach a label to every ε this ledger reports: a condition the
        accountant's assumptions did not meet (e.g. "assumes Poisson sampling;
        the batches were not Poisson-sampled").  Kept once, in order."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a caveat must be a non-empty string, got {text!r}")
        if text not in self._caveats:
            self._caveats.append(text)

    @property
    def caveats(self) -> tuple[str, ...]:
        """The labels of :meth:`add_caveat`: empty when ε rests only on the
        accountant's own assumptions (Poisson subsampled Gaussian steps)."""
        return tuple(self._caveats)

    @property
    def steps(self) -> int:
        """Total number of recorded steps."""
        return sum(n for _, _, n in self._segments)

    @property
    def segments(self) -> list[Segment]:
        """A copy of the segments, oldest first."""
        return list(self._segments)

    def __len__(self) -> int:
        return len(self._segments)

    # -- queries -----------------------------------------------------------

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        """ε spent so far at ``delta`` (0.0 for an empty ledger)."""
        d = _check_delta(delta)
        acc = _check_accountant(accountant)
        return self._cached(tuple(self._segments), d, acc)

    def epsilon_if(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: str = "pld",
    ) -> float:
        """ε if ``steps`` more steps (σ, q) were recorded; the ledger is unchanged.

        The engine's budget check: ``ledger.epsilon_if(σ, q, 1, δ)`` before a
        step, then ``ledger.record(σ, q)`` after it; the following
        ``ledger.epsilon(δ)`` is then a cache hit.
        """
        sigma = _check_noise_multiplier(noise_multiplier)
        q = _check_sample_rate(sample_rate)
        n = _check_steps(steps)
        d = _check_delta(delta)
        acc = _check_accountant(accountant)
        return self._cached(tuple(_merged(self._segments, (sigma, q, n))), d, acc)

    def _cached(self, segments: tuple[Segment, ...], delta: float, accountant: str) -> float:
        key = (segments, delta, accountant)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = _segments_epsilon(segments, delta, accountant)
        self._cache[key] = value
        if len(self._cache) > self._CACHE_SIZE:
            self._cache.popitem(last=False)
        return value

    # -- state ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain-python state (lists, floats, ints): safe for ``torch.save``
        with ``weights_only=True`` and for JSON."""
        return {
            "version": 1,
            "noise_multipliers": [s for s, _, _ in self._segments],
            "sample_rates": [q for _, q, _ in self._segments],
            "steps": [n for _, _, n in self._segments],
            "caveats": list(self._caveats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the history with ``state`` (from :meth:`state_dict`)."""
        try:
            sigmas, rates, steps = state["noise_multipliers"], state["sample_rates"], state["steps"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"state is not a Ledger state_dict: {state!r}") from exc
        if not (len(sigmas) == len(rates) == len(steps)):
            raise ValueError(f"state has lists of different lengths: {state!r}")
        fresh = Ledger(caveats=state.get("caveats", ()))
        for s, q, n in zip(sigmas, rates, steps):
            fresh.record(s, q, n)
        self._segments = fresh._segments
        self._caveats = fresh._caveats
        self._cache.clear()

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Ledger:
        """A new ledger holding ``state``."""
        ledger = cls()
        ledger.load_state_dict(state)
        return ledger

    def copy(self) -> Ledger:
        """An independent copy (the cache is shared-nothing but pre-filled)."""
        other = Ledger()
        other._segments = list(self._segments)
        other._caveats = list(self._caveats)
        other._cache = OrderedDict(self._cache)
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ledger):
            return NotImplemented
        return self._segments == other._segments

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        if self._caveats:
            return f"Ledger({self._segments!r}, caveats={self._caveats!r})"
        return f"Ledger({self._segments!r})"


def _merged(segments: list[Segment], new: Segment) -> list[Segment]:
    """``segments`` plus ``new``, merged into the last segment when σ, q match."""
    sigma, q, n = new
    out = list(segments)
    if n == 0:
        return out
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (sigma, q, out[-1][2] + n)
    else:
        out.append((sigma, q, n))
    return out


class BudgetGuard:
    """Refuses (or warns about) a step that would spend more than a budget.

    ε grows with the number of steps, so one accountant query that covers the
    whole planned horizon (the ledger's steps at the start plus ``planned_steps``)
    makes every step up to it safe; the accountant is asked again only beyond
    the horizon, or if the ledger received other steps in between (a ledger
    shared by several engines or phases).  ``calibrated``: σ was calibrated
    for this budget and the planned steps on a fresh ledger, so the horizon
    is within budget by construction (no query at all)."""

    def __init__(
        self,
        ledger: Ledger,
        budget: float | None,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        accountant: str,
        planned_steps: int,
        on_exceeded: str = "raise",
        calibrated: bool = False,
    ) -> None:
        self.ledger, self.budget = ledger, budget
        self.noise_multiplier, self.sample_rate, self.delta = noise_multiplier, sample_rate, delta
        self.accountant, self.planned_steps, self.on_exceeded = accountant, planned_steps, on_exceeded
        self.start = ledger.steps
        #: (ledger segments when checked, total steps known to stay within the budget)
        self.safe: tuple[tuple, int] | None = ((), planned_steps) if calibrated and not ledger.segments else None

    def check(self) -> None:
        """Before a step: raise :class:`PrivacyBudgetExceeded` (or warn) if it
        would take ε past the budget; nothing is recorded."""
        if self.budget is None or self.noise_multiplier == 0:
            return
        ledger = self.ledger
        segments = ledger.segments
        if self.safe is not None and ledger.steps + 1 <= self.safe[1] and self._only_ours_since(self.safe[0], segments):
            return
        horizon = max(ledger.steps + 1, self.start + self.planned_steps)
        sigma, q, delta = self.noise_multiplier, self.sample_rate, self.delta
        extra = horizon - ledger.steps
        eps = ledger.epsilon_if(sigma, q, extra, delta, accountant=self.accountant)
        if eps > self.budget and extra > 1:
            horizon = ledger.steps + 1
            eps = ledger.epsilon_if(sigma, q, 1, delta, accountant=self.accountant)
        if eps <= self.budget:
            self.safe = (tuple(segments), horizon)
            return
        msg = (
            f"dpft: step {ledger.steps + 1} would spend epsilon={eps:.4g} > the budget "
            f"{self.budget:g} (delta={delta:g}); nothing was changed"
        )
        if self.on_exceeded == "raise":
            raise PrivacyBudgetExceeded(msg)
        warnings.warn(msg, stacklevel=3)

    def _only_ours_since(self, base: tuple, now: list) -> bool:
        """Whether the ledger ``now`` is ``base`` plus steps at this guard's (σ, q) only."""
        ours = (self.noise_multiplier, self.sample_rate)
        if not base:
            return all((sg[0], sg[1]) == ours for sg in now)
        k = len(base) - 1
        if tuple(now[:k]) != base[:k] or len(now) <= k:
            return False
        last = now[k]
        if (last[0], last[1]) != (base[k][0], base[k][1]):
            return False
        if (last[0], last[1]) != ours and last[2] != base[k][2]:
            return False
        return all((sg[0], sg[1]) == ours for sg in now[k + 1 :])
