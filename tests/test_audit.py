"""One-run privacy auditing (``dpft.audit``).

Two parts:

* the bound (:func:`dpft.audit.epsilon_lower_bound`) checked independently
  of how it is computed: against the binomial tail it is defined by, the
  values printed in the paper, a simulated ε0-DP randomized-response
  mechanism (coverage at 95 % and closeness), monotonicity, chance-level and
  perfect guessing;
* :func:`dpft.audit.one_run_audit` with the real engine: for DP-BiTFiT, full
  fine-tuning and SPARTA at claimed ε ∈ {1, 8} the certified lower bound stays
  below the claim, and two planted bugs (clipping disabled; noise divided by
  10 while the claim keeps the true σ) are caught at claimed ε = 1.

Catching the planted bugs at claimed ε = 8 needs ~10^4 canaries (one-run
bounds saturate near log(m / 3)); that run takes about a minute and is
gated behind ``DPFT_LONG_AUDIT=1``.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from dpft import accounting
from dpft.clip import clipped_sum
from dpft.app import cli
from dpft.audit import (
    AuditResult,
    epsilon_lower_bound,
    one_run_audit,
    one_run_p_value,
    perfect_guess_ceiling,
)

LONG = os.environ.get("DPFT_LONG_AUDIT") == "1"
BETA = 0.05


# --------------------------------------------------------------------------
# the bound


def test_reproduces_the_papers_printed_values():
    # arXiv:2305.08846v1: the Appendix D example (printed 0.673, rounded) and
    # the §7 / Fig. 11 example (printed 2.675, truncated)
    assert epsilon_lower_bound(1000, 100, 75, 1e-4, 0.95) == pytest.approx(0.673, abs=1e-3)
    assert 2.675 <= epsilon_lower_bound(100_000, 1510, 1439, 1e-5, 0.95) < 2.676


@pytest.mark.parametrize("r,v", [(10, 9), (100, 75), (100, 100), (1000, 600), (1000, 990), (5000, 4000)])
def test_pure_bound_is_the_binomial_tail_threshold(r, v):
    """δ = 0: ε̂ is where P[Binomial(r, e^ε/(1+e^ε)) >= v] crosses β (computed here by scipy directly)."""
    eps = epsilon_lower_bound(r, r, v, 0.0, 0.95)
    assert eps > 0
    tail = lambda e: stats.binom.sf(v - 1, r, special.expit(e))  # noqa: E731
    assert tail(eps) < BETA <= tail(eps + 1e-6)


def test_randomized_response_coverage_and_closeness():
    """A pure ε0-DP mechanism (randomized response on each canary's bit): the
    95 % bound exceeds ε0 in at most ~5 % of 200 runs, and is close to ε0."""
    rng = np.random.default_rng(1234)
    m, trials = 1000, 200
    for eps0 in (0.5, 2.0):
        p_keep = special.expit(eps0)
        bounds, correct = [], []
        for _ in range(trials):
            bits = rng.random(m) < 0.5
            out = np.where(rng.random(m) < p_keep, bits, ~bits)  # randomized response
            v = int((out == bits).sum())  # guess = the released bit, no abstention
            correct.append(v)
            bounds.append(epsilon_lower_bound(m, m, v, 0.0, 0.95))
        bounds = np.array(bounds)
        exceed = float((bounds > eps0).mean())
        # 5 % + 3.2 standard deviations of a Binomial(200, 0.05) frequency
        assert exceed <= 0.05 + 3.2 * math.sqrt(0.05 * 0.95 / trials), (eps0, exceed)
        # close: the median sits one-sided-95 % standard error below ε0, as for a
        # binomial lower confidence limit on the accuracy e^ε0 / (1 + e^ε0)
        expected = eps0 - 1.645 / math.sqrt(m * p_keep * (1 - p_keep))
        assert abs(float(np.median(bounds)) - expected) < 0.05, (eps0, np.median(bounds), expected)
        # the same runs audited as (ε, δ)-claims: never a larger bound than with δ = 0
        for b, v in zip(bounds[:10], correct[:10]):
            assert epsilon_lower_bound(m, m, v, 1e-5, 0.95) <= b
    # many canaries, good guesses: within 2 % of ε0
    m = 200_000
    bits = rng.random(m) < 0.5
    out = np.where(rng.random(m) < special.expit(1.0), bits, ~bits)
    v = int((out == bits).sum())
    assert 0.98 <= epsilon_lower_bound(m, m, v, 0.0, 0.95) <= 1.0


@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])  # 1e-3: 2mδ = 2 > 1, the grid search
def test_monotone_in_correct_guesses(delta):
    m = r = 1000
    bounds = [epsilon_lower_bound(m, r, v, delta) for v in range(500, 1001, 25)]
    assert all(a <= b + 1e-9 for a, b in zip(bounds, bounds[1:])), bounds
    assert bounds[0] == 0.0 and bounds[-1] > 3


def test_monotone_in_delta_and_confidence():
    values = [epsilon_lower_bound(2000, 1000, 900, d) for d in (0.0, 1e-6, 1e-5, 1e-4)]
    assert all(a >= b for a, b in zip(values, values[1:])), values
    assert epsilon_lower_bound(2000, 1000, 900, 1e-5, 0.99) < epsilon_lower_bound(2000, 1000, 900, 1e-5, 0.9)


@pytest.mark.parametrize("r", [1, 10, 100, 1000, 10_000])
def test_zero_at_chance(r):
    for v in (0, r // 2, (r + 1) // 2):
        assert epsilon_lower_bound(max(r, 1), r, v, 1e-5) == 0.0
        assert epsilon_lower_bound(max(r, 1), r, v, 0.0) == 0.0


def test_perfect_guesses_saturate_at_a_value_growing_like_log_r():
    rs = [10, 100, 1000, 10_000, 100_000]
    values = [epsilon_lower_bound(r, r, r, 0.0) for r in rs]
    assert all(a < b for a, b in zip(values, values[1:]))
    for r, eps in zip(rs, values):
        # independent closed form: expit(ε)^r = β
        assert special.expit(eps) ** r == pytest.approx(BETA, rel=1e-6)
        assert eps == pytest.approx(perfect_guess_ceiling(r), abs=1e-6)
        if r >= 100:  # the asymptotic form
            assert abs(eps - math.log(r / math.log(1 / BETA))) < 0.02
    # each factor of 10 in r buys about log(10) = 2.3 of ε
    assert np.all(np.abs(np.diff(values) - math.log(10)) < 0.15)
    # with δ > 0 perfect guessing certifies a bit less
    assert epsilon_lower_bound(10_000, 10_000, 10_000, 1e-5) < values[3]
    assert perfect_guess_ceiling(1) == 0.0


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 20_000),
    r_frac=st.floats(0.0, 1.0),
    v_frac=st.floats(0.4, 1.0),
    delta=st.sampled_from([0.0, 1e-7, 1e-5, 1e-4]),
    confidence=st.sampled_from([0.9, 0.95, 0.99]),
)
def test_returned_epsilon_is_rejected(m, r_frac, v_frac, delta, confidence):
    """Whatever the inputs, the returned ε has p-value < β (so the claim
    "(ε, δ)-DP" is rejected there); where p is increasing in ε (2mδ <= 1) it
    is the exact threshold."""
    r = int(round(r_frac * m))
    v = int(round(v_frac * r))
    eps = epsilon_lower_bound(m, r, v, delta, confidence)
    beta = 1 - confidence
    assert eps >= 0
    assert eps <= epsilon_lower_bound(m, r, v, 0.0, confidence) + 1e-9
    if eps > 0:
        assert one_run_p_value(m, r, v, eps, delta) < beta
        if 2 * m * delta <= 1:
            assert one_run_p_value(m, r, v, eps + 1e-6, delta) >= beta
    else:
        assert one_run_p_value(m, r, v, 0.0, delta) >= beta or v == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="v <= r <= m"):
        epsilon_lower_bound(10, 11, 5, 0.0)
    with pytest.raises(ValueError, match="v <= r <= m"):
        epsilon_lower_bound(10, 5, 6, 0.0)
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound(10, 5, 5, 1.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 5, 5, 0.0, 1.0)
    with pytest.raises(ValueError, match="m must be"):
        epsilon_lower_bound(0, 0, 0, 0.0)
    with pytest.raises(ValueError, match="epsilon"):
        one_run_p_value(10, 5, 5, -1.0, 0.0)


# --------------------------------------------------------------------------
# the audit with the real engine

# m = 500 canaries, N = 1000, B = 250 (q = 0.25), 10 steps: a few seconds per audit
CFG = dict(num_canaries=500, sample_size=1000, batch_size=250, steps=10)
MODES = ("bitfit", "full", "sparta")


@functools.cache
def _sigma(eps: float) -> float:
    """σ the engine would calibrate for CFG (computed once, not per audit)."""
    return accounting.noise_multiplier(
        target_epsilon=eps, sample_rate=0.25, steps=10, delta=accounting.default_delta(1000)
    )


@functools.cache
def _audit(mode: str, eps: float, plant: str | None = None, seed: int = 0) -> AuditResult:
    return one_run_audit(mode, noise_multiplier=_sigma(eps), seed=seed, _plant=plant, **CFG)


@pytest.mark.parametrize("eps", [1.0, 8.0])
@pytest.mark.parametrize("mode", MODES)
def test_claim_holds(mode, eps):
    res = _audit(mode, eps)
    assert 0.99 * eps <= res.claimed_epsilon <= eps
    expect = accounting.epsilon(noise_multiplier=res.noise_multiplier, sample_rate=0.25, steps=10, delta=res.delta)
    assert res.claimed_epsilon == pytest.approx(expect, rel=1e-9)
    assert res.steps == 10 and res.num_canaries == 500 and res.delta == 1e-5
    assert res.num_guesses == res.guessed_in + res.guessed_out and 0 <= res.num_correct <= res.num_guesses
    assert 0 <= res.epsilon_lower_bound <= res.ceiling
    assert res.epsilon_lower_bound <= res.claimed_epsilon and not res.violation, res.summary()


@pytest.mark.parametrize("plant", ["no_clipping", "noise_div10"])
@pytest.mark.parametrize("mode", MODES)
def test_planted_bug_is_caught_at_epsilon_1(mode, plant):
    res = _audit(mode, 1.0, plant)
    assert res.planted == plant
    assert res.epsilon_lower_bound > res.claimed_epsilon and res.violation, res.summary()
    # the same seed without the bug stays below the claim: the bug made the difference
    assert not _audit(mode, 1.0).violation
    # the patch is gone afterwards
    assert clipped_sum.clip_factors.__module__ == "dpft.clip.functions"


def test_target_epsilon_and_other_engine_settings():
    """The engine calibrates σ itself; automatic clipping, param-wise groups,
    ghost norms and the RDP accountant pass through; fixed guesses are used as given."""
    res = one_run_audit(
        "full",
        target_epsilon=2.0,
        clipping_fn="automatic",
        clipping_style="param-wise",
        clipping_mode="ghost",
        accountant="rdp",
        guesses=(50, 50),
        seed=3,
        num_canaries=200,
        sample_size=400,
        batch_size=100,
        steps=5,
    )
    assert 0.99 * 2.0 <= res.claimed_epsilon <= 2.0
    assert (res.guessed_in, res.guessed_out, res.num_guesses) == (50, 50, 100)
    assert not res.violation, res.summary()
    assert "one-run audit (full" in res.summary() and res.as_dict()["violation"] is False


def test_reproducible_with_a_seed():
    kw = dict(noise_multiplier=1.0, num_canaries=100, sample_size=200, batch_size=50, steps=4, seed=7)
    a, b = one_run_audit("bitfit", **kw), one_run_audit("bitfit", **kw)
    assert (a.num_correct, a.epsilon_lower_bound, a.guessed_in) == (b.num_correct, b.epsilon_lower_bound, b.guessed_in)


def test_bad_settings():
    with pytest.raises(ValueError, match="mode"):
        one_run_audit("lora", noise_multiplier=1.0)
    with pytest.raises(ValueError, match="sample_size"):
        one_run_audit("bitfit", noise_multiplier=1.0, num_canaries=3000)
    with pytest.raises(ValueError, match="guesses"):
        one_run_audit("bitfit", noise_multiplier=1.0, guesses=(800, 800))
    with pytest.raises(ValueError, match="guesses"):
        one_run_audit("bitfit", noise_multiplier=1.0, guesses="all")
    with pytest.raises(ValueError, match="score"):
        one_run_audit("bitfit", noise_multiplier=1.0, score="loss")
    with pytest.raises(ValueError, match="canary_scale"):
        one_run_audit("bitfit", noise_multiplier=1.0, canary_scale=1.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        one_run_audit("bitfit", num_canaries=10, sample_size=20, batch_size=5)


def test_cli(capsys):
    argv = [
        "audit",
        "--sigma",
        "1.0",
        "--steps",
        "3",
        "--num-canaries",
        "100",
        "--sample-size",
        "200",
        "--batch-size",
        "50",
        "--seed",
        "0",
        "--json",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert '"violation": false' in out and '"num_canaries": 100' in out
    assert cli.main(["audit", "--sigma", "1.0", "--guesses", "many"]) == 2
    assert "--guesses" in capsys.readouterr().err


# --------------------------------------------------------------------------
# claimed ε = 8: needs ~10^4 canaries (DPFT_LONG_AUDIT=1, about a minute)


@pytest.mark.skipif(not LONG, reason="set DPFT_LONG_AUDIT=1 (about a minute)")
def test_planted_bugs_are_caught_at_epsilon_8_with_12000_canaries():
    # full-batch steps (q = 1) so that every included canary is seen; 'wide'
    # guesses: 5780 'in' + 5780 'out'; δ = default_delta(12000) = 1e-6, where
    # 11560 correct guesses certify 8.23 > 8
    kw = dict(
        target_epsilon=8.0, steps=2, batch_size=12_000, sample_size=12_000, num_canaries=12_000, guesses="wide", seed=1
    )
    clean = one_run_audit("bitfit", **kw)
    assert not clean.violation, clean.summary()
    for plant in ("no_clipping", "noise_div10"):
        res = one_run_audit("bitfit", _plant=plant, **kw)
        assert res.violation, res.summary()


def test_planted_bug_stays_in_its_own_engine():
    """A planted bug (no clipping) changes the engine it is set on and no other:
    the process's clipping is never patched."""
    from dpft import PrivacyEngine
    from dpft.audit.harness import _plant_bug

    def update(plant):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        engine = PrivacyEngine(model, batch_size=1, sample_size=10, steps=1, noise_multiplier=0.0, max_grad_norm=0.1)
        _plant_bug(engine, plant, {})
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        engine.attach(opt)
        before = [p.detach().clone() for p in model.parameters()]
        (model(torch.full((1, 3), 10.0)).sum() * 100).backward()
        opt.step()
        engine.detach()
        return float(sum((p.detach() - b).pow(2).sum() for p, b in zip(model.parameters(), before)).sqrt())

    clipped, planted = update(None), update("no_clipping")
    assert clipped == pytest.approx(0.1, rel=1e-4)  # lr 1, one example, norm clipped to R = 0.1
    assert planted > 100 * clipped  # the planted engine did not clip
    assert update(None) == pytest.approx(clipped, rel=1e-6)  # a later engine clips again
