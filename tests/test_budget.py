"""The engine's privacy ledger: calibration, hard stop, resume, and numbers
checked against dp-accounting called directly."""

from __future__ import annotations

import copy

import dp_accounting
import pytest
import torch
from torch import nn

import dpft


def direct_pld_epsilon(sigma, q, steps, delta):
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def direct_rdp_epsilon(sigma, q, steps, delta):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def small():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    dpft.bitfit(m)
    return m


def step(model, opt, n=10):
    x = torch.randn(n, 4)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibrated_engine_spends_target(accountant):
    engine = dpft.PrivacyEngine(
        small(), batch_size=50, sample_size=1000, epochs=2, target_epsilon=2.0, target_delta=1e-5, accountant=accountant
    )
    assert engine.planned_steps == 40
    direct = direct_pld_epsilon if accountant == "pld" else direct_rdp_epsilon
    eps = direct(engine.noise_multiplier, 0.05, 40, 1e-5)
    assert 0.99 * 2.0 * 0.99 <= eps <= 2.0 * 1.01  # independent accountant, within its own precision


def test_epsilon_matches_dp_accounting_as_steps_go():
    model = small()
    engine = dpft.PrivacyEngine(model, batch_size=10, sample_size=200, steps=30, noise_multiplier=1.3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine.attach(opt)
    assert engine.epsilon == 0.0
    for _ in range(5):
        step(model, opt)
    want = direct_pld_epsilon(1.3, 0.05, 5, engine.target_delta)
    assert engine.epsilon == pytest.approx(want, rel=0.01)
    assert engine.target_delta < 1 / 200


def test_overspending_step_raises_and_changes_nothing():
    model = small()
    engine = dpft.PrivacyEngine(model, batch_size=10, sample_size=100, steps=3, target_epsilon=4.0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine.attach(opt)
    for _ in range(3):
        step(model, opt)
    assert engine.epsilon <= 4.0
    params = [p.detach().clone() for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    ledger = engine.ledger.state_dict()
    model(torch.randn(10, 4)).pow(2).mean().backward()
    with pytest.raises(dpft.PrivacyBudgetExceeded, match="nothing was changed"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert engine.ledger.state_dict() == ledger and engine.steps == 3
    assert str(opt.state_dict()) == str(opt_state)


def test_overspending_can_warn():
    model = small()
    engine = dpft.PrivacyEngine(
        model, batch_size=10, sample_size=100, steps=1, target_epsilon=2.0, on_budget_exceeded="warn"
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine.attach(opt)
    step(model, opt)
    with pytest.warns(UserWarning, match="budget"):
        step(model, opt)
    assert engine.steps == 2 and engine.epsilon > 2.0


def run(steps, resume_at=None, tmp_path=None):
    model = small()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    engine = dpft.PrivacyEngine(model, batch_size=10, sample_size=100, steps=steps, noise_multiplier=0.9, noise_seed=3)
    engine.attach(opt)
    g = torch.Generator().manual_seed(11)
    data = [torch.randn(10, 4, generator=g) for _ in range(steps)]
    for i in range(steps):
        if resume_at is not None and i == resume_at:
            path = tmp_path / "ckpt.pt"
            dpft.save_checkpoint(path, model=model, optimizer=opt, engine=engine, step=i)
            engine.detach()
            # a fresh process: new objects, state from the checkpoint
            model = small()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.Adam(params, lr=0.05)
            engine = dpft.PrivacyEngine(model, batch_size=10, sample_size=100, steps=steps, noise_multiplier=0.9)
            engine.attach(opt)
            extra = dpft.load_checkpoint(path, model=model, optimizer=opt, engine=engine)
            assert extra == {"step": i} and engine.steps == i
        model(data[i]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], engine.epsilon, engine.ledger.state_dict()


def test_resume_continues_exactly(tmp_path):
    p1, e1, l1 = run(6)
    p2, e2, l2 = run(6, resume_at=3, tmp_path=tmp_path)
    assert e1 == e2 and l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))  # same noise stream too


def test_state_dict_rejects_other_config():
    a = dpft.PrivacyEngine(small(), batch_size=10, sample_size=100, steps=5, noise_multiplier=1.0)
    b = dpft.PrivacyEngine(small(), batch_size=10, sample_size=100, steps=5, noise_multiplier=2.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        b.load_state_dict(a.state_dict())


def test_physical_chunks_same_noise_std():
    """Noise once per logical step, whatever the number of physical chunks."""
    torch.manual_seed(0)
    model = nn.Linear(3, 400)
    dpft.bitfit(model)
    sigma, B = 1.0, 12
    engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=120, steps=100, noise_multiplier=sigma, noise_seed=0)
    opt = torch.optim.SGD([model.bias], lr=1.0)
    engine.attach(opt)
    deltas = []
    for _ in range(20):
        before = model.bias.detach().clone()
        batch = torch.randn(B, 3)
        for chunk in dpft.data.split_physical(batch, 5):
            (0 * model(chunk)).sum().backward()
        opt.step()
        opt.zero_grad()
        deltas.append(model.bias.detach() - before)
    std = torch.stack(deltas).std().item()
    assert abs(std / (sigma / B) - 1) < 0.05


def test_poisson_loop_with_empty_batches():
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randn(40, 2))
    loader = dpft.data.poisson_loader(data, batch_size=1, seed=0)  # q = 1/40: many empty batches
    model = small()
    engine = dpft.PrivacyEngine(model, batch_size=1, sample_size=40, steps=len(loader), noise_multiplier=1.0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine.attach(opt)
    empty = 0
    for x, y in loader:
        if len(x) == 0:
            engine.record_empty_batch()
            empty += 1
        else:
            (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert empty > 0 and engine.steps == len(loader)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_two_phase_schedule_one_ledger():
    from dpft.methods.schedules import TwoPhase

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    sched = TwoPhase(model, batch_size=10, sample_size=100, phase1_epochs=1, phase2_epochs=1, target_epsilon=3.0)
    engine = sched.phase1(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(sched.steps[0]):
        step(model, engine.optimizer)
    w = model[0].weight.detach().clone()
    engine = sched.phase2(lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.bias", "2.bias"]
    for _ in range(sched.steps[1]):
        step(model, engine.optimizer)
    assert torch.equal(w, model[0].weight)
    assert engine.steps == 20 and engine.epsilon == sched.epsilon
    want = direct_pld_epsilon(sched.noise_multiplier, 0.1, 20, sched.target_delta)
    assert sched.epsilon == pytest.approx(want, rel=0.01) and sched.epsilon <= 3.0
    with pytest.raises(dpft.PrivacyBudgetExceeded):
        step(model, engine.optimizer)


def test_budget_check_asks_the_accountant_once_per_horizon(monkeypatch):
    """The budget check runs every step; it must not recompute epsilon every
    step (a PLD query can take a second), yet still stop at the budget."""
    from dpft.methods.schedules import TwoPhase

    calls = []
    real = dpft.accounting.Ledger.epsilon_if

    def spy(self, *a, **k):
        calls.append(a)
        return real(self, *a, **k)

    monkeypatch.setattr(dpft.accounting.Ledger, "epsilon_if", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    sched = TwoPhase(model, batch_size=10, sample_size=100, phase1_epochs=2, phase2_epochs=2, target_epsilon=3.0)
    engine = sched.phase1(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(sched.steps[0]):
        step(model, engine.optimizer)
    engine = sched.phase2(lambda ps: torch.optim.SGD(ps, lr=0.1))
    for _ in range(sched.steps[1]):
        step(model, engine.optimizer)
    assert len(calls) <= 2  # one query per phase covers its 20 steps
    assert sched.epsilon <= 3.0
    with pytest.raises(dpft.PrivacyBudgetExceeded):
        step(model, engine.optimizer)


def test_shared_ledger_steps_from_elsewhere_are_rechecked():
    model = small()
    ledger = dpft.accounting.Ledger()
    engine = dpft.PrivacyEngine(
        model, batch_size=10, sample_size=100, steps=5, noise_multiplier=1.0, epsilon_budget=2.0, ledger=ledger
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine.attach(opt)
    step(model, opt)  # horizon of 5 steps checked once
    ledger.record(0.3, 0.5, 50)  # another mechanism spends a lot on the same ledger
    model(torch.randn(10, 4)).pow(2).mean().backward()
    with pytest.raises(dpft.PrivacyBudgetExceeded):
        opt.step()
