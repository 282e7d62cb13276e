"""SPARTA end to end: scoring is accounted, selection keeps the density,
training moves only selected rows, one ledger for all phases."""

import dp_accounting
import pytest
import torch
from torch import nn

import dpft
from dpft.methods.sparta import Sparta


def make_data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return torch.utils.data.TensorDataset(x, y)


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def run_phase(engine, model, loader):
    opt = engine.optimizer
    for x, y in loader:
        if len(x):
            loss_fn(model, (x, y)).backward()
        else:
            engine.record_empty_batch()
        opt.step()
        opt.zero_grad()


def test_sparta_phases_and_ledger():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 2))
    data = make_data()
    sp = Sparta(model, batch_size=16, sample_size=64, target_epsilon=4.0, warmup_epochs=1, train_epochs=1,
                density=0.3, always_train=["4"])
    assert sp.candidates == ["0.weight", "2.weight"]
    engine = sp.warmup(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    run_phase(engine, model, dpft.data.poisson_loader(data, 16, steps=sp.steps["warmup"], seed=0))
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = sp.score(dpft.data.poisson_loader(data, 16, steps=sp.steps["scoring"], seed=1), loss_fn)
    assert set(scores) == {"0.weight", "2.weight"} and scores["0.weight"].shape == (10,)
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters())  # scoring moves nothing
    masks = sp.select()
    assert all(int(m.sum()) == 3 for m in masks.values())
    engine = sp.train(lambda ps: torch.optim.SGD(ps, lr=0.1))
    run_phase(engine, model, dpft.data.poisson_loader(data, 16, steps=sp.steps["train"], seed=2))
    for n, m in masks.items():
        p = dict(model.named_parameters())[n]
        assert torch.equal(p[~m], w0[n][~m]) and not torch.equal(p[m], w0[n][m])
    total = sum(sp.steps.values())
    assert sp.ledger.steps == total
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(sp.noise_multiplier)), total)
    assert sp.epsilon == pytest.approx(acc.get_epsilon(sp.target_delta), rel=0.01)
    assert sp.epsilon <= 4.0


def test_scoring_finds_the_useful_rows():
    """With little noise, rows that matter for the loss get the top scores."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0, :2] = 3.0  # only hidden units 0 and 1 reach the output
        model[1].weight[1, :2] = -3.0
    sp = Sparta(model, batch_size=32, sample_size=64, target_epsilon=50.0, train_epochs=1, density=0.25,
                candidates=["0.weight"])
    sp.score(dpft.data.poisson_loader(make_data(), 32, steps=sp.steps["scoring"], seed=0), loss_fn)
    masks = sp.select()
    assert masks["0.weight"][:2].all()


def test_bad_density():
    with pytest.raises(ValueError, match="density"):
        Sparta(nn.Linear(3, 3), batch_size=2, sample_size=10, target_epsilon=1.0, train_epochs=1, density=0.0)
