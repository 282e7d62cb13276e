"""The many-trial distinguishing audit (dpft.audit.trials): its statistics
(Clopper–Pearson, the threshold bound's coverage), that a correct engine stays
below its claim, and that it has the power to catch planted bugs (noise of
half the claimed σ, clipping switched off)."""

from __future__ import annotations

import functools
import json
import math
import warnings

import numpy as np
import pytest

from dpft import accounting
from dpft.clip import clipped_sum
from dpft.app import cli
from dpft.audit.stats import clopper_pearson, threshold_lower_bound
from dpft.audit.trials import distinguishing_audit
from dpft.sampling_check import SamplingMismatchWarning


def test_clopper_pearson_matches_scipy_exact_interval():
    from scipy import stats

    for k, n in ((0, 10), (3, 10), (10, 10), (17, 20_000), (19_990, 20_000)):
        lo, hi = clopper_pearson(k, n, 0.025)
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert lo == pytest.approx(ci.low, rel=1e-9, abs=1e-15)
        assert hi == pytest.approx(ci.high, rel=1e-9, abs=1e-15)
    with pytest.raises(ValueError):
        clopper_pearson(5, 3, 0.05)


def test_bound_covers_and_is_close_on_randomized_response():
    """Randomized response with ε0 = 1 is exactly ε0-DP and a threshold test at
    0.5 is optimal for it: over 300 independent repetitions the 95 % bound
    exceeds ε0 in at most ~5 % of them (here: a binomial test of the count),
    and its median is close to ε0."""
    from scipy import stats

    eps0, n, reps = 1.0, 4000, 300
    p = math.exp(eps0) / (1 + math.exp(eps0))
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(reps):
        s_in = (rng.random(n) < p).astype(float)
        s_out = (rng.random(n) < 1 - p).astype(float)
        bounds.append(threshold_lower_bound(s_in, s_out, [0.5], 0.0, 0.95)["epsilon"])
    bounds = np.array(bounds)
    over = int((bounds > eps0).sum())
    assert stats.binomtest(over, reps, 0.05, alternative="greater").pvalue > 0.01
    assert 0.8 < np.median(bounds) <= eps0


def test_bound_with_a_grid_stays_below_a_gaussian_mechanism():
    """Sums of Gaussian updates of a correct mechanism (σ = 1, 2 steps, q = 1):
    over 40 repetitions with the audit's own threshold grid, no bound exceeds
    the true ε."""
    from dpft.audit.stats import _thresholds

    sigma, steps, trials, delta = 1.0, 2, 5000, 1e-5
    true_eps = accounting.epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=delta)
    taus = _thresholds(steps, 1.0, sigma, "sum", trials, 0)
    rng = np.random.default_rng(1)
    for _ in range(40):
        s_in = steps + sigma * math.sqrt(steps) * rng.standard_normal(trials)
        s_out = sigma * math.sqrt(steps) * rng.standard_normal(trials)
        assert threshold_lower_bound(s_in, s_out, taus, delta)["epsilon"] <= true_eps


# --------------------------------------------------------------------------
# through the engine: q = 1, 2 steps, claimed ε = 2, 10^5 trials per world

CFG = dict(steps=2, batch_size=1000, sample_size=1000)


@functools.cache
def _sigma(eps: float) -> float:
    return accounting.noise_multiplier(target_epsilon=eps, sample_rate=1.0, steps=2, delta=1e-5)


@functools.cache
def _audit(plant=None, trials=100_000, task="embedding", eps=2.0, seed=0, slots_per_run=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplingMismatchWarning)  # the audit's own data never sets the check off
        return distinguishing_audit(
            task,
            noise_multiplier=_sigma(eps),
            trials=trials,
            seed=seed,
            _plant=plant,
            slots_per_run=slots_per_run,
            **CFG,
        )


def test_correct_engine_stays_below_its_claim():
    res = _audit()
    assert res.claimed_epsilon == pytest.approx(
        accounting.epsilon(noise_multiplier=_sigma(2.0), sample_rate=1.0, steps=2, delta=1e-5), rel=1e-9
    )
    assert 0.99 * 2.0 <= res.claimed_epsilon <= 2.0
    assert res.trials == 100_000 and res.runs == 1 and res.delta == 1e-5
    # it certifies a good part of the claim (the test has power), but not more
    assert 0.4 * res.claimed_epsilon < res.epsilon_lower_bound <= res.claimed_epsilon, res.summary()
    assert not res.violation


def test_catches_halved_noise():
    res = _audit("noise_half")
    assert res.violation, res.summary()
    assert res.planted == "noise_half" and "VIOLATION" in res.summary()


def test_catches_missing_clipping():
    res = _audit("no_clipping", trials=20_000)
    assert res.violation and res.epsilon_lower_bound > 2 * res.claimed_epsilon, res.summary()
    assert clipped_sum.clip_factors.__module__ == "dpft.clip.functions"  # the patch is gone afterwards


@pytest.mark.parametrize("task", ["bitfit", "full"])
def test_linear_tasks_in_several_runs(task):
    """The linear canary tasks, 1000 trials per world in 2 runs of 1000 slots:
    a correct engine stays below its claim, missing clipping is caught."""
    clean = _audit(trials=1000, task=task, eps=1.0, slots_per_run=1000)
    assert clean.runs == 2 and not clean.violation, clean.summary()
    bad = _audit("no_clipping", trials=1000, task=task, eps=1.0, slots_per_run=1000)
    assert bad.violation, bad.summary()


def test_target_epsilon_subsampling_and_settings():
    """The engine calibrates σ; q < 1 (LLR score over steps), automatic
    clipping, RDP and secure mode pass through."""
    res = distinguishing_audit(
        "embedding",
        target_epsilon=3.0,
        steps=5,
        batch_size=250,
        sample_size=1000,
        clipping_fn="automatic",
        accountant="rdp",
        secure_mode=True,
        trials=5000,
        seed=1,
    )
    assert 0.99 * 3.0 <= res.claimed_epsilon <= 3.0 and res.sample_rate == 0.25 and res.steps == 5
    assert not res.violation, res.summary()
    assert json.loads(json.dumps(res.as_dict()))["violation"] is False


def test_reproducible_with_a_seed():
    kw = dict(noise_multiplier=1.0, steps=3, batch_size=100, sample_size=400, trials=1000, seed=5)
    a, b = distinguishing_audit(**kw), distinguishing_audit(**kw)
    assert (a.epsilon_lower_bound, a.true_positives, a.false_positives) == (
        b.epsilon_lower_bound,
        b.true_positives,
        b.false_positives,
    )


def test_bad_settings():
    with pytest.raises(ValueError, match="task"):
        distinguishing_audit("lora", noise_multiplier=1.0)
    with pytest.raises(ValueError, match="trials"):
        distinguishing_audit(noise_multiplier=1.0, trials=10)
    with pytest.raises(ValueError, match="slots_per_run"):
        distinguishing_audit(noise_multiplier=1.0, trials=1000, slots_per_run=3)
    with pytest.raises(ValueError, match="target_epsilon"):
        distinguishing_audit(trials=1000)


def test_cli_runs_both_audits(capsys):
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
        "--trials",
        "2000",
        "--json",
    ]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["violation"] is False and out["num_canaries"] == 100
    d = out["distinguishing"]
    assert (
        d["trials"] == 2000
        and d["violation"] is False
        and d["claimed_epsilon"] == pytest.approx(out["claimed_epsilon"])
    )
    assert cli.main(argv[:-1] + ["--trials", "0"]) == 0
    text = capsys.readouterr().out
    assert "one-run audit" in text and "distinguishing audit" not in text
