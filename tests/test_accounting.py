"""Tests for dpft.accounting against dp_accounting called directly.

The references below build their own DpEvents and accountants; they never go
through dpft's code path.  The reference PLD discretization interval is
chosen here from the (cheap) RDP ε so that the reference itself is accurate
to far better than 1 % (its error is roughly absolute, so large ε tolerates a
coarse interval and small ε needs a fine one) while the whole grid stays fast.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from dpft.accounting import Ledger, PrivacyBudgetExceeded, default_delta, epsilon, noise_multiplier

# dp_accounting's RDP logs non-convergence of some fractional orders at small σ, large q
logging.getLogger("absl").setLevel(logging.ERROR)

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def ref_event(sigma: float, q: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


_REF_CACHE: dict[tuple, object] = {}


def ref_accountant(sigma: float, q: float, steps: int, kind: str):
    """A dp_accounting accountant holding `steps` subsampled Gaussian steps (cached per test session)."""
    key = (sigma, q, steps, kind)
    if key not in _REF_CACHE:
        if kind == "rdp":
            acc = RdpAccountant(neighboring_relation=ADD_REMOVE)
        else:
            eps_rdp = RdpAccountant().compose(ref_event(sigma, q), steps).get_epsilon(1e-6)
            h = 1e-3 if eps_rdp > 10 else 1e-4 if eps_rdp > 1 else 3e-5
            acc = PLDAccountant(neighboring_relation=ADD_REMOVE, value_discretization_interval=h)
        acc.compose(ref_event(sigma, q), steps)
        _REF_CACHE[key] = acc
    return _REF_CACHE[key]


# --------------------------------------------------------------------------
# agreement with dp_accounting on the grid


@pytest.mark.parametrize("delta", [1e-5, 1e-6])
@pytest.mark.parametrize("steps", [10, 1000, 10000])
@pytest.mark.parametrize("q", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_epsilon_matches_dp_accounting(kind, sigma, q, steps, delta):
    ref = ref_accountant(sigma, q, steps, kind).get_epsilon(delta)
    ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=kind)
    assert isinstance(ours, float)
    assert ours == pytest.approx(ref, rel=0.01)


def test_default_accountant_is_pld():
    kw = dict(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5)
    assert epsilon(**kw) == epsilon(**kw, accountant="pld")
    assert epsilon(**kw) < epsilon(**kw, accountant="rdp")


def test_pld_query_is_fast():
    # the engine may ask once per step; 10^4 steps must be well under a second
    start = time.perf_counter()
    epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=10_000, delta=1e-5)
    assert time.perf_counter() - start < 2.0  # ~0.2 s measured; loose against CI noise


def test_special_cases():
    assert epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=10, delta=1e-5) == math.inf
    assert epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=10, delta=1e-5, accountant="rdp") == math.inf
    for kind in ("pld", "rdp"):
        assert epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5, accountant=kind) == 0.0
        assert epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=0, delta=1e-5, accountant=kind) == 0.0


def test_epsilon_monotone():
    base = dict(sample_rate=0.01, delta=1e-5)
    e = [epsilon(noise_multiplier=s, steps=500, **base) for s in (0.7, 1.0, 1.5)]
    assert e[0] > e[1] > e[2]
    e = [epsilon(noise_multiplier=1.0, steps=n, **base) for n in (100, 500, 2000)]
    assert e[0] < e[1] < e[2]


# --------------------------------------------------------------------------
# calibration


@pytest.mark.parametrize("kind", ["pld", "rdp"])
@pytest.mark.parametrize(
    "target, q, steps, delta",
    [(3.0, 0.01, 1000, 1e-5), (1.0, 0.02, 200, 1e-6), (8.0, 0.1, 500, 1e-5), (0.3, 0.004, 2500, 1e-5)],
)
def test_calibration_round_trip(kind, target, q, steps, delta):
    sigma = noise_multiplier(target_epsilon=target, sample_rate=q, steps=steps, delta=delta, accountant=kind)
    ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=kind)
    assert 0.99 * target <= ours <= target
    # and by dp_accounting directly (fine PLD interval), within 1 % of the target
    if kind == "rdp":
        ref = RdpAccountant().compose(ref_event(sigma, q), steps).get_epsilon(delta)
    else:
        acc = PLDAccountant(value_discretization_interval=min(1e-4, 1e-4 * target))
        ref = acc.compose(ref_event(sigma, q), steps).get_epsilon(delta)
    assert ref == pytest.approx(ours, rel=0.01)


def test_calibration_pld_needs_less_noise_than_rdp():
    kw = dict(target_epsilon=3.0, sample_rate=0.01, steps=1000, delta=1e-5)
    assert noise_multiplier(**kw) < noise_multiplier(**kw, accountant="rdp")


def test_calibration_zero_steps_raises():
    with pytest.raises(ValueError, match="steps"):
        noise_multiplier(target_epsilon=1.0, sample_rate=0.01, steps=0, delta=1e-5)


# --------------------------------------------------------------------------
# bad inputs

GOOD = dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5, accountant="pld")
BAD = [
    ("sample_rate", 1.5),
    ("sample_rate", 0.0),
    ("sample_rate", -0.1),
    ("steps", -1),
    ("steps", 2.5),
    ("delta", 1.0),
    ("delta", 1.5),
    ("delta", 0.0),
    ("delta", -1e-5),
    ("noise_multiplier", -0.5),
    ("noise_multiplier", float("nan")),
    ("accountant", "prv"),
    ("accountant", "PLD "),
]


@pytest.mark.parametrize("name, value", BAD)
def test_epsilon_bad_input(name, value):
    with pytest.raises(ValueError, match=name) as info:
        epsilon(**{**GOOD, name: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    "name, value",
    [b for b in BAD if b[0] != "noise_multiplier"]
    + [("target_epsilon", 0.0), ("target_epsilon", -1.0), ("target_epsilon", math.inf)],
)
def test_noise_multiplier_bad_input(name, value):
    good = dict(target_epsilon=1.0, sample_rate=0.01, steps=10, delta=1e-5, accountant="pld")
    with pytest.raises(ValueError, match=name) as info:
        noise_multiplier(**{**good, name: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("name, value", [b for b in BAD if b[0] in ("noise_multiplier", "sample_rate", "steps")])
def test_ledger_record_bad_input(name, value):
    ledger = Ledger()
    args = dict(noise_multiplier=1.0, sample_rate=0.01, steps=1)
    with pytest.raises(ValueError, match=name):
        ledger.record(**{**args, name: value})
    assert ledger.steps == 0


@pytest.mark.parametrize("name, value", [("delta", 0.0), ("delta", 1.0), ("accountant", "prv")])
def test_ledger_query_bad_input(name, value):
    ledger = Ledger([(1.0, 0.01, 10)])
    with pytest.raises(ValueError, match=name):
        ledger.epsilon(**{**dict(delta=1e-5, accountant="pld"), name: value})
    with pytest.raises(ValueError, match=name):
        ledger.epsilon_if(1.0, 0.01, 1, **{**dict(delta=1e-5, accountant="pld"), name: value})


def test_budget_exception_type():
    assert issubclass(PrivacyBudgetExceeded, RuntimeError)


# --------------------------------------------------------------------------
# default delta


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, 1e-5),
        (1000, 1e-5),
        (10_000, 1e-5),
        (12_808, 1e-6),
        (60_000, 1e-6),
        (100_000, 1e-6),
        (100_001, 1e-7),
        (10**6, 1e-7),
        (10**9, 1e-10),
    ],
)
def test_default_delta(n, expected):
    d = default_delta(n)
    assert d == expected
    assert d * n <= 0.1 + 1e-12
    assert d <= 1e-5


@pytest.mark.parametrize("bad", [0, -5, 2.5, None])
def test_default_delta_bad(bad):
    with pytest.raises(ValueError, match="sample_size"):
        default_delta(bad)


# --------------------------------------------------------------------------
# ledger


def test_ledger_records_and_merges():
    ledger = Ledger()
    assert ledger.steps == 0 and ledger.segments == []
    assert ledger.epsilon(1e-5) == 0.0
    for _ in range(5):
        ledger.record(1.0, 0.01)
    ledger.record(1.0, 0.01, 3)
    ledger.record(2.0, 0.01, 4)
    ledger.record(2.0, 0.02)
    ledger.record(2.0, 0.02, 0)  # no-op
    assert ledger.segments == [(1.0, 0.01, 8), (2.0, 0.01, 4), (2.0, 0.02, 1)]
    assert ledger.steps == 13
    ledger.segments.append((9.0, 0.5, 1))  # a copy: the ledger is unchanged
    assert ledger.steps == 13


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_ledger_single_segment_equals_epsilon_exactly(kind):
    ledger = Ledger()
    for _ in range(300):
        ledger.record(1.1, 0.02)
    e = epsilon(noise_multiplier=1.1, sample_rate=0.02, steps=300, delta=1e-5, accountant=kind)
    assert ledger.epsilon(1e-5, kind) == e  # same code path: no surprise at the last planned step


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_ledger_composition_matches_dp_accounting(kind):
    segs = [(1.0, 0.01, 300), (2.0, 0.05, 200)]
    ledger = Ledger()
    for s, q, n in segs:
        ledger.record(s, q, n)
    if kind == "rdp":
        acc = RdpAccountant(neighboring_relation=ADD_REMOVE)
    else:
        acc = PLDAccountant(neighboring_relation=ADD_REMOVE, value_discretization_interval=3e-5)
    for s, q, n in segs:  # composed step by step, not as one ComposedDpEvent
        acc.compose(ref_event(s, q), n)
    for delta in (1e-5, 1e-6):
        ref = acc.get_epsilon(delta)
        assert ledger.epsilon(delta, kind) == pytest.approx(ref, rel=0.01)
    # strictly more than either phase alone
    for s, q, n in segs:
        assert ledger.epsilon(1e-5, kind) > epsilon(
            noise_multiplier=s, sample_rate=q, steps=n, delta=1e-5, accountant=kind
        )


def test_ledger_epsilon_if_does_not_modify():
    ledger = Ledger([(1.0, 0.01, 100)])
    before = ledger.copy()
    e_if = ledger.epsilon_if(1.0, 0.01, 1, 1e-5)
    assert ledger == before and ledger.steps == 100
    assert e_if > ledger.epsilon(1e-5)
    ledger.record(1.0, 0.01)
    assert ledger.epsilon(1e-5) == e_if
    # hypothetical with a different sigma appends a segment
    e2 = ledger.epsilon_if(3.0, 0.01, 10, 1e-5)
    ref = Ledger([(1.0, 0.01, 101), (3.0, 0.01, 10)]).epsilon(1e-5)
    assert e2 == ref


def test_ledger_cache_makes_repeats_cheap():
    ledger = Ledger([(1.0, 0.01, 1000)])
    t0 = time.perf_counter()
    e1 = ledger.epsilon(1e-5)
    t1 = time.perf_counter()
    e2 = ledger.epsilon(1e-5)
    t2 = time.perf_counter()
    assert e1 == e2
    assert t2 - t1 < 0.01 < t1 - t0
    # a different delta or accountant is a different query
    assert ledger.epsilon(1e-6) > e1
    assert ledger.epsilon(1e-5, "rdp") > e1


def test_ledger_zero_sigma_is_inf():
    ledger = Ledger([(1.0, 0.01, 10)])
    ledger.record(0.0, 0.01, 1)
    assert ledger.epsilon(1e-5) == math.inf


def test_ledger_state_dict_round_trip():
    ledger = Ledger()
    ledger.record(0.7312345678901234, 0.0123456789, 17)
    ledger.record(1.3, 1 / 3, 5)
    ledger.record(0.7312345678901234, 0.0123456789, 2)
    state = ledger.state_dict()

    # JSON
    restored = Ledger()
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored == ledger
    assert restored.segments == ledger.segments
    assert restored.steps == ledger.steps == 24

    # torch.save with weights_only=True (plain python only)
    buf = io.BytesIO()
    torch.save({"ledger": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["ledger"]
    restored2 = Ledger.from_state_dict(loaded)
    assert restored2 == ledger
    assert restored2.epsilon(1e-5) == ledger.epsilon(1e-5)
    assert restored2.state_dict() == state

    # plain types only
    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return type(x) in (int, float, str)

    assert plain(state)


def test_ledger_load_replaces_history_and_rejects_garbage():
    ledger = Ledger([(1.0, 0.01, 10)])
    ledger.epsilon(1e-5)
    ledger.load_state_dict(Ledger([(2.0, 0.1, 3)]).state_dict())
    assert ledger.segments == [(2.0, 0.1, 3)]
    assert ledger.epsilon(1e-5) == Ledger([(2.0, 0.1, 3)]).epsilon(1e-5)
    with pytest.raises(ValueError):
        ledger.load_state_dict({"nope": 1})
    with pytest.raises(ValueError, match="sample_rate"):
        ledger.load_state_dict({"noise_multipliers": [1.0], "sample_rates": [2.0], "steps": [1]})
    assert ledger.segments == [(2.0, 0.1, 3)]  # unchanged after a failed load


def test_ledger_copy_and_eq():
    a = Ledger([(1.0, 0.01, 10)])
    b = a.copy()
    assert a == b and a is not b
    b.record(1.0, 0.01)
    assert a != b and a.steps == 10
    assert Ledger([(1.0, 0.01, 4), (1.0, 0.01, 6)]) == a  # merged on construction
    assert (a == "ledger") is False
