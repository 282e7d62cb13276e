"""dpft.EngineOptions: the engine's options written once, checked once, passed to the engine and the audits."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import dpft
from dpft import EngineOptions
from dpft.audit import distinguishing_audit, one_run_audit


def _one_step(**engine_kw) -> tuple[torch.Tensor, dpft.PrivacyEngine]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    dpft.bitfit(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(model, batch_size=8, sample_size=100, steps=5, noise_multiplier=0.7, **engine_kw)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine.attach(opt)
    model(torch.randn(8, 3)).square().mean().backward()
    opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), engine


SETTINGS = dict(
    max_grad_norm=0.3,
    clipping_fn="automatic",
    clipping_style="layer-wise",
    clipping_mode="ghost",
    accountant="rdp",
    noise_seed=11,
    secure_mode=True,
    target_delta=1e-3,
)


def test_options_object_and_keywords_train_identically():
    by_kw, e1 = _one_step(**SETTINGS)
    by_obj, e2 = _one_step(options=EngineOptions(**SETTINGS))
    assert torch.equal(by_kw, by_obj)
    assert e1.options == e2.options == EngineOptions(**SETTINGS)
    assert (e2.max_grad_norm, e2.clipping_fn, e2.accountant, e2.target_delta, e2.secure_mode) == (
        0.3,
        "automatic",
        "rdp",
        1e-3,
        True,
    )
    other, _ = _one_step(**{**SETTINGS, "noise_seed": 12})
    assert not torch.equal(by_kw, other)  # the seed reached the noise


def test_defaults_are_the_engines():
    _, engine = _one_step()
    assert engine.options == EngineOptions()
    assert EngineOptions().max_grad_norm == 1.0 and EngineOptions().clipping_mode == "auto"


def test_an_option_given_twice_is_refused():
    with pytest.raises(ValueError, match="max_grad_norm given both in options= and as keyword"):
        _one_step(options=EngineOptions(max_grad_norm=0.5), max_grad_norm=2.0)
    with pytest.raises(ValueError, match="options must be a dpft.EngineOptions"):
        _one_step(options={"max_grad_norm": 0.5})


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_grad_norm", 0.0),
        ("max_grad_norm", float("inf")),
        ("clipping_fn", "tanh"),
        ("clipping_style", "block"),
        ("clipping_mode", "fast"),
        ("accountant", "moments"),
        ("loss_reduction", "max"),
        ("on_budget_exceeded", "ok"),
        ("privacy_unit", "group"),
        ("secure_mode", 1),
        ("poisson", "yes"),
        ("strict", None),
        ("target_delta", 1.5),
    ],
)
def test_each_option_is_checked_once(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be .*got {value!r}$"):
        EngineOptions(**{field: value})
    with pytest.raises(ValueError, match=f"^{field} must be"):
        EngineOptions().replace(**{field: value})


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineOptions().max_grad_norm = 2.0  # type: ignore[misc]


AUDIT = dict(noise_multiplier=1.0, num_canaries=100, sample_size=200, batch_size=50, steps=4, seed=7)


def test_one_run_audit_takes_the_options_object():
    opts = EngineOptions(max_grad_norm=0.5, clipping_fn="automatic", accountant="rdp")
    a = one_run_audit("bitfit", options=opts, **AUDIT)
    b = one_run_audit("bitfit", max_grad_norm=0.5, clipping_fn="automatic", accountant="rdp", **AUDIT)
    c = one_run_audit("bitfit", **AUDIT)
    assert a.as_dict() | {"seconds": 0} == b.as_dict() | {"seconds": 0}
    assert a.max_grad_norm == 0.5 and c.max_grad_norm == 1.0


def test_audits_refuse_what_they_set_themselves():
    with pytest.raises(ValueError, match="noise_seed=3: the audit sets noise_seed itself"):
        one_run_audit("bitfit", options=EngineOptions(noise_seed=3), **AUDIT)
    with pytest.raises(ValueError, match="loss_reduction='sum'"):
        distinguishing_audit("embedding", noise_multiplier=1.0, trials=100, loss_reduction="sum")
    with pytest.raises(ValueError, match="clipping_fn given both"):
        one_run_audit("bitfit", options=EngineOptions(clipping_fn="automatic"), clipping_fn="abadi", **AUDIT)
    with pytest.raises(TypeError, match="max_grad_nrm"):
        one_run_audit("bitfit", max_grad_nrm=2.0, **AUDIT)


def test_distinguishing_audit_takes_the_options_object():
    kw = dict(noise_multiplier=1.0, steps=3, batch_size=250, sample_size=1000, trials=200, seed=5)
    a = distinguishing_audit("embedding", options=EngineOptions(max_grad_norm=0.25, secure_mode=True), **kw)
    b = distinguishing_audit("embedding", max_grad_norm=0.25, secure_mode=True, **kw)
    assert a.as_dict() | {"seconds": 0} == b.as_dict() | {"seconds": 0}


def _dp_accounting_epsilon(sigma, q, steps, delta):
    """ε of ``steps`` Poisson-subsampled Gaussian steps, from dp-accounting's RDP accountant directly."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    return RdpAccountant().compose(event).get_epsilon(delta)


@pytest.mark.parametrize("method", ["two-phase", "sparta"])
def test_phase_schedules_take_an_options_object_and_calibrate_sigma_once(method, monkeypatch):
    """TwoPhase and Sparta take options= like the engine: every phase's engine uses them (accountant
    and δ included), σ is calibrated once for the steps of all phases (checked with dp-accounting
    directly), and all phases record into one ledger."""
    import dpft.accounting
    from dpft.methods.schedules import TwoPhase
    from dpft.methods.sparta import Sparta

    calls = []
    real = dpft.accounting.noise_multiplier
    monkeypatch.setattr(dpft.accounting, "noise_multiplier", lambda **kw: calls.append(kw) or real(**kw))
    opts = EngineOptions(accountant="rdp", target_delta=1e-4, max_grad_norm=0.5, clipping_fn="automatic")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    if method == "two-phase":
        sched = TwoPhase(
            model, batch_size=10, sample_size=100, phase1_epochs=2, phase2_epochs=3, target_epsilon=3.0, options=opts
        )
        total = 50
        e1 = sched.phase1(torch.optim.SGD(model.parameters(), lr=0.1))
        nn.functional.cross_entropy(model(x), y).backward()
        e1.optimizer.step()
        e2 = sched.phase2(lambda ps: torch.optim.SGD(ps, lr=0.1))
        engines = [e1, e2]
    else:
        sched = Sparta(
            model,
            batch_size=10,
            sample_size=100,
            target_epsilon=3.0,
            warmup_epochs=1,
            train_epochs=3,
            density=0.5,
            selection="random",
            options=opts,
        )
        total = 40
        e1 = sched.warmup(torch.optim.SGD(model.parameters(), lr=0.1))
        nn.functional.cross_entropy(model(x), y).backward()
        e1.optimizer.step()
        sched.select(seed=0)
        e2 = sched.train(lambda ps: torch.optim.SGD(ps, lr=0.1))
        engines = [e1, e2]
    assert len(calls) == 1 and calls[0]["steps"] == total and calls[0]["accountant"] == "rdp"
    sigma = sched.noise_multiplier
    eps = _dp_accounting_epsilon(sigma, 0.1, total, 1e-4)
    assert 3.0 * 0.99 <= eps <= 3.0 * (1 + 1e-9)  # calibrated for all phases together, at this accountant and δ
    assert _dp_accounting_epsilon(sigma, 0.1, total - 10, 1e-4) < 3.0 * 0.95  # (not for fewer steps)
    for e in engines:
        assert (e.noise_multiplier, e.accountant, e.target_delta, e.max_grad_norm, e.clipping_fn) == (
            sigma,
            "rdp",
            1e-4,
            0.5,
            "automatic",
        )
        assert e.ledger is sched.ledger
    assert sched.ledger.segments == [(sigma, 0.1, 1)]
    assert sched.epsilon == pytest.approx(_dp_accounting_epsilon(sigma, 0.1, 1, 1e-4), rel=1e-9)


def test_phase_schedules_refuse_an_option_given_twice():
    from dpft.methods.schedules import TwoPhase

    with pytest.raises(ValueError, match="max_grad_norm given both"):
        TwoPhase(
            nn.Linear(3, 2),
            batch_size=10,
            sample_size=100,
            phase1_epochs=1,
            phase2_epochs=1,
            target_epsilon=3.0,
            options=EngineOptions(),
            max_grad_norm=0.5,
        )
