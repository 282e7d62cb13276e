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
    sp = Sparta(
        model,
        batch_size=16,
        sample_size=64,
        target_epsilon=4.0,
        warmup_epochs=1,
        train_epochs=1,
        density=0.3,
        always_train=["4"],
    )
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
    sp = Sparta(
        model, batch_size=32, sample_size=64, target_epsilon=50.0, train_epochs=1, density=0.25, candidates=["0.weight"]
    )
    sp.score(dpft.data.poisson_loader(make_data(), 32, steps=sp.steps["scoring"], seed=0), loss_fn)
    masks = sp.select()
    assert masks["0.weight"][:2].all()


def test_bad_density():
    with pytest.raises(ValueError, match="density"):
        Sparta(nn.Linear(3, 3), batch_size=2, sample_size=10, target_epsilon=1.0, train_epochs=1, density=0.0)


def test_scores_without_noise_equal_brute_force():
    """sigma = 0: each release is |sum_i c_i g_i|; scores are its row sums."""
    import math

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    data = make_data(24)
    x = data.tensors[0].double()
    y = data.tensors[1]
    R = 0.3
    sp = Sparta(
        model,
        batch_size=8,
        sample_size=24,
        target_epsilon=1.0,
        train_epochs=1,
        density=0.4,
        noise_multiplier=0.0,
        max_grad_norm=R,
        candidates=["0.weight", "2.weight"],
    )
    batches = [(x[i : i + 8], y[i : i + 8]) for i in (0, 8, 16)]
    scores = sp.score(batches, loss_fn)
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(params[n]) for n in ("0.weight", "2.weight")}
    for bx, by in batches:
        total = {n: torch.zeros_like(params[n]) for n in want}
        for i in range(len(bx)):
            grads = torch.autograd.grad(loss_fn(model, (bx[i : i + 1], by[i : i + 1])), [params[n] for n in want])
            norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
            c = min(1.0, R / norm)
            for n, g in zip(want, grads):
                total[n] += c * g
        for n in want:
            want[n] += total[n].abs()
    for n in want:
        assert torch.allclose(scores[n], want[n].sum(1), rtol=1e-6, atol=1e-12)
    masks = sp.select()
    assert int(masks["0.weight"].sum()) == math.ceil(0.4 * 5) and int(masks["2.weight"].sum()) == 1
    top = want["0.weight"].sum(1).topk(2).indices
    assert masks["0.weight"][top].all()


def test_baseline_selections():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 2))
    with torch.no_grad():
        model[0].weight[3] *= 100
    sp = Sparta(
        model,
        batch_size=8,
        sample_size=64,
        target_epsilon=2.0,
        train_epochs=1,
        density=0.2,
        always_train=["2"],
        selection="magnitude",
    )
    m = sp.select()  # the constructor's strategy
    assert m["0.weight"][3] and int(m["0.weight"].sum()) == 2
    r1, r2 = sp.select(strategy="random", seed=1), sp.select(strategy="random", seed=1)
    assert torch.equal(r1["0.weight"], r2["0.weight"]) and int(r1["0.weight"].sum()) == 2
    assert not torch.equal(r1["0.weight"], sp.select(strategy="random", seed=2)["0.weight"])
    engine = sp.train(lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert sp.steps["scoring"] == 0 and engine.planned_steps == sp.steps["train"]
    with pytest.raises(ValueError, match="strategy"):
        sp.select(strategy="best")


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """dp_accounting's PLD epsilon at a fine discretization (not dpft's own code path)."""
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_public_selection_plans_no_scoring_steps():
    """A public selection: no scoring steps, sigma calibrated for warm-up + training only (smaller
    than with scoring), and the ledger of the phases actually run reaches, not exceeds, the target."""

    def build(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 2))
        return model, Sparta(
            model,
            batch_size=16,
            sample_size=64,
            target_epsilon=3.0,
            warmup_epochs=0.5,
            train_epochs=1,
            density=0.3,
            always_train=["2"],
            **kw,
        )

    _, scored = build()
    model, sp = build(selection="random")
    assert sp.steps == {"warmup": 2, "scoring": 0, "train": 4} and scored.steps["scoring"] == 4
    assert sp.noise_multiplier < scored.noise_multiplier
    assert sp.noise_multiplier == dpft.accounting.noise_multiplier(
        target_epsilon=3.0, sample_rate=0.25, steps=6, delta=sp.target_delta
    )
    with pytest.raises(RuntimeError, match="no scoring pass"):
        sp.score([], loss_fn)
    data = make_data()
    engine = sp.warmup(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    run_phase(engine, model, dpft.data.poisson_loader(data, 16, steps=sp.steps["warmup"], seed=0))
    masks = sp.select(seed=3)
    assert int(masks["0.weight"].sum()) == 3  # ceil(0.3 * 10)
    engine = sp.train(lambda ps: torch.optim.SGD(ps, lr=0.1))
    run_phase(engine, model, dpft.data.poisson_loader(data, 16, steps=sp.steps["train"], seed=2))
    assert sp.ledger.segments == [(sp.noise_multiplier, 0.25, 6)]
    assert sp.steps == {"warmup": 2, "scoring": 0, "train": 4}  # train() leaves the plan alone
    assert 0.99 * 3.0 <= sp.epsilon <= 3.0
    assert sp.epsilon == pytest.approx(independent_epsilon(sp.noise_multiplier, 0.25, 6, sp.target_delta), rel=5e-3)


def test_selection_must_match_the_calibration():
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 2))
    kw = dict(batch_size=16, sample_size=64, target_epsilon=3.0, train_epochs=1, always_train=["2"])
    with pytest.raises(ValueError, match="scoring_epochs"):
        Sparta(model, selection="random", scoring_epochs=1.0, **kw)
    with pytest.raises(ValueError, match="selection"):
        Sparta(model, selection="best", **kw)
    with pytest.raises(ValueError, match="epochs must be positive"):
        Sparta(model, scoring_epochs=0, **kw)
    assert Sparta(model, selection="random", scoring_epochs=0, **kw).steps["scoring"] == 0
    # sigma calibrated for scoring steps that a baseline would never run: refused
    sp = Sparta(model, **kw)
    with pytest.raises(ValueError, match="selection='random'"):
        sp.select(strategy="random")
    # an explicit sigma (no calibration) may be used with any selection
    sp = Sparta(model, noise_multiplier=1.0, **kw)
    assert int(sp.select(strategy="random")["0.weight"].sum()) == 2


def test_noise_only_on_selected_rows():
    model = nn.Linear(4, 6)
    mask = torch.tensor([True, False, True, False, False, False])
    dpft.sparta.restrict(model, {"weight": mask})
    model.bias.requires_grad_(False)
    engine = dpft.PrivacyEngine(model, batch_size=4, sample_size=40, steps=3, noise_multiplier=3.0, noise_seed=0)
    opt = torch.optim.SGD([model.weight], lr=1.0)
    engine.attach(opt)
    # the clipped sum is zero (zero loss): whatever the gradient holds is noise
    (0 * model(torch.randn(4, 4))).sum().backward()
    released = engine.release()["weight"]  # SPARTA's scoring release
    (0 * model(torch.randn(4, 4))).sum().backward()
    opt.step()  # a training step
    for z in (released, model.weight.grad):
        assert torch.count_nonzero(z[~mask]) == 0 and torch.count_nonzero(z[mask]) == 8


class Lars(torch.optim.SGD):
    """A layer-wise trust ratio (the update of a row depends on the whole tensor): not row-separable."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(p.norm() / (p.grad.norm() + 1e-12))
        return super().step(closure)


@pytest.mark.parametrize(
    "make, compact_state, compacted",
    [
        (lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1), None, True),
        (lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1), False, False),
        (lambda ps: Lars(ps, lr=0.05), None, False),
        (lambda ps: Lars(ps, lr=0.05), True, True),
    ],
)
def test_sparta_train_compacts_the_optimizer(make, compact_state, compacted):
    """By default Sparta.train holds optimizer state for the selected rows only
    (row-separable optimizers); the unselected rows never move either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 2))
    sp = Sparta(
        model,
        batch_size=16,
        sample_size=64,
        target_epsilon=4.0,
        train_epochs=1,
        density=0.3,
        always_train=["2"],
        noise_multiplier=1.0,
    )
    masks = sp.select(strategy="random", seed=0)
    w0 = model[0].weight.detach().clone()
    engine = sp.train(make, compact_state=compact_state)
    opt = engine.optimizer
    assert isinstance(opt, dpft.sparta.RowCompact) == compacted
    run_phase(engine, model, dpft.data.poisson_loader(make_data(), 16, steps=3, seed=2))
    m = masks["0.weight"]
    assert torch.equal(model[0].weight.detach()[~m], w0[~m]) and not torch.equal(model[0].weight.detach()[m], w0[m])
    rows = dpft.sparta.compact_rows(opt)
    if compacted:
        r = rows[id(model[0].weight)]
        assert r.shape == (3, 6) and model[0].weight.grad is None
        if isinstance(opt, torch.optim.AdamW):
            assert opt.state[r]["exp_avg"].shape == (3, 6)
    else:
        assert not rows


def test_release_noise_has_std_sigma_r_and_is_accounted():
    """``engine.release()`` (SPARTA's scoring release) adds noise of std sigma R
    to the clipped sum (not divided by the batch size) and records one step."""
    model = nn.Linear(2, 400)
    model.weight.requires_grad_(False)
    engine = dpft.PrivacyEngine(
        model, batch_size=8, sample_size=800, steps=40, noise_multiplier=1.5, max_grad_norm=0.7, noise_seed=1
    )
    engine.attach(torch.optim.SGD([model.bias], lr=1.0))
    draws = []
    for i in range(20):
        (0 * model(torch.randn(8, 2))).sum().backward()  # zero clipped sum: the release is noise alone
        draws.append(engine.release()["bias"])
        assert engine.steps == i + 1
    z = torch.cat(draws)
    assert abs(float(z.std()) / (1.5 * 0.7) - 1) < 0.05
    assert not torch.equal(draws[0], draws[1])  # fresh each release
