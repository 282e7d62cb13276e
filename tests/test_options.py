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
        engine = dpft.PrivacyEngine(model, batch_size=8, sample_size=100, steps=5, noise_multiplier=0.7,
                                    **engine_kw)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine.attach(opt)
    model(torch.randn(8, 3)).square().mean().backward()
    opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), engine


SETTINGS = dict(max_grad_norm=0.3, clipping_fn="automatic", clipping_style="layer-wise", clipping_mode="ghost",
                accountant="rdp", noise_seed=11, secure_mode=True, target_delta=1e-3)


def test_options_object_and_keywords_train_identically():
    by_kw, e1 = _one_step(**SETTINGS)
    by_obj, e2 = _one_step(options=EngineOptions(**SETTINGS))
    assert torch.equal(by_kw, by_obj)
    assert e1.options == e2.options == EngineOptions(**SETTINGS)
    assert (e2.max_grad_norm, e2.clipping_fn, e2.accountant, e2.target_delta, e2.secure_mode) == (
        0.3, "automatic", "rdp", 1e-3, True)
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


@pytest.mark.parametrize("field, value", [
    ("max_grad_norm", 0.0), ("max_grad_norm", float("inf")), ("clipping_fn", "tanh"), ("clipping_style", "block"),
    ("clipping_mode", "fast"), ("accountant", "moments"), ("loss_reduction", "max"), ("on_budget_exceeded", "ok"),
    ("privacy_unit", "group"), ("secure_mode", 1), ("poisson", "yes"), ("strict", None), ("target_delta", 1.5),
])
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


def test_schedules_that_calibrate_themselves_refuse_an_options_object():
    """Sparta and TwoPhase calibrate σ with their own accountant and δ: an options object could
    disagree with them, so they take keywords only."""
    from dpft.methods.schedules import TwoPhase
    from dpft.methods.sparta import Sparta

    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="TwoPhase takes the engine's options as keywords"):
        TwoPhase(model, batch_size=10, sample_size=100, phase1_epochs=1, phase2_epochs=1, target_epsilon=3.0,
                 options=EngineOptions())
    with pytest.raises(TypeError, match="Sparta takes the engine's options as keywords"):
        Sparta(model, batch_size=10, sample_size=100, target_epsilon=3.0, train_epochs=1, scoring_epochs=1,
               options=EngineOptions())
