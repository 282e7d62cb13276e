"""dpft.sparta.restrict: selected rows only -- exact, noise-free, immobile elsewhere."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from layer_zoo import ZOO, collate, loss_fn
from reference import clipped_mean, per_example_grads, pick_threshold, to_double

import dpft

B = 6


def masked_reference(model, examples, masks, R):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = per_example_grads(copy.deepcopy(model), names, [to_double(collate([e])) for e in examples], loss_fn)
    for g in grads:  # unselected rows take no part
        for n, (m, dim) in masks.items():
            shape = [1] * g[n].ndim
            shape[dim] = -1
            g[n] = g[n] * m.view(shape).double()
    return clipped_mean(grads, [names], R, "abadi", len(examples)), grads


@pytest.mark.parametrize(
    "name, targets",
    [
        ("linear-3d", {"0.weight": 0, "2.weight": 0}),
        ("conv2d", {"0.weight": 0, "4.weight": 0}),
        ("conv2d", {"2.weight": 0}),  # grouped convolution
        ("hf-conv1d", {"2.weight": 1, "4.weight": 1}),
        ("embedding-tied", {"emb.weight": 0}),
        ("layernorm", {"1.weight": 0}),
    ],
)
@pytest.mark.parametrize("mode", ["ghost", "instantiate", "auto"])
def test_restrict_exact(name, targets, mode):
    factory, make = ZOO[name]
    model = factory().double()
    dpft.bitfit(model)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    masks = {}
    for n, dim in targets.items():
        rows = params[n].shape[dim]
        m = torch.rand(rows, generator=g) < 0.5
        m[0], m[-1] = True, False
        masks[n] = (m, dim)
    assert dpft.sparta.restrict(model, {n: m for n, (m, _) in masks.items()}) == list(masks)
    examples = [make() for _ in range(B)]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    probe = per_example_grads(copy.deepcopy(model), names, [to_double(collate([e])) for e in examples], loss_fn)
    R = pick_threshold(probe)
    want, _ = masked_reference(model, examples, masks, R)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model, batch_size=B, sample_size=100, steps=5, noise_multiplier=0.0, max_grad_norm=R, clipping_mode=mode
        )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine.attach(opt)
    loss_fn(model, to_double(collate(examples))).backward()
    opt.step()
    got = {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}
    num = math.sqrt(sum(float((got[n] - want[n]).pow(2).sum()) for n in want))
    den = math.sqrt(sum(float(want[n].pow(2).sum()) for n in want))
    assert num / den < 1e-6
    for n, (m, dim) in masks.items():
        assert torch.equal(
            params[n].detach().index_select(dim, (~m).nonzero().flatten()),
            before[n].index_select(dim, (~m).nonzero().flatten()),
        )


def test_unselected_rows_get_no_noise_and_survive_weight_decay():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    dpft.bitfit(model)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[:3] = True
    dpft.sparta.restrict(model, {"0.weight": mask})
    engine = dpft.PrivacyEngine(model, batch_size=8, sample_size=100, steps=5, noise_multiplier=5.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    engine.attach(opt)
    w0 = model[0].weight.detach().clone()
    for _ in range(3):
        model(torch.randn(8, 4)).sum().backward()
        assert model[0].weight.grad is None or True
        opt.step()
        assert torch.count_nonzero(model[0].weight.grad[3:]) == 0
        opt.zero_grad()
    assert torch.equal(model[0].weight[3:], w0[3:])
    assert not torch.equal(model[0].weight[:3], w0[:3])


def test_restriction_survives_deepcopy():
    """copy.deepcopy drops a Parameter's attributes; the engine must still see
    the selection of a copied model (not silently train every row)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    dpft.bitfit(model)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[:3] = True
    dpft.sparta.restrict(model, {"0.weight": mask})
    twin = copy.deepcopy(model)
    assert not hasattr(twin[0].weight, dpft.sparta.ATTR)  # what torch does
    engine = dpft.PrivacyEngine(twin, batch_size=8, sample_size=100, steps=5, noise_multiplier=5.0)
    assert set(engine.row_masks) == {"0.weight"}
    assert torch.equal(engine.row_masks["0.weight"].mask, mask)
    opt = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1)
    engine.attach(opt)
    w0 = twin[0].weight.detach().clone()
    twin(torch.randn(8, 4)).sum().backward()
    opt.step()
    assert torch.equal(twin[0].weight[3:], w0[3:]) and not torch.equal(twin[0].weight[:3], w0[:3])
    engine.detach()
    dpft.sparta.unrestrict(twin)
    assert dpft.PrivacyEngine(twin, batch_size=8, sample_size=100, steps=5, noise_multiplier=1.0).row_masks == {}


def test_restrict_bad_input():
    model = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="shape"):
        dpft.sparta.restrict(model, {"weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="boolean"):
        dpft.sparta.restrict(model, {"weight": torch.ones(4)})
    with pytest.raises(ValueError, match="no parameter"):
        dpft.sparta.restrict(model, {"nope.weight": torch.ones(4, dtype=torch.bool)})


# ---------------------------------------------------------------------------
# compact optimizer state (dpft.sparta.compact_optimizer)

STEPS = 3


def _setup(name, targets, seed=1):
    """A float64 zoo model with biases trainable, random masks (first row in, last out),
    and STEPS batches of B examples."""
    factory, make = ZOO[name]
    torch.manual_seed(seed)
    model = factory().double()
    dpft.bitfit(model)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for n, dim in targets.items():
        m = torch.rand(params[n].shape[dim], generator=g) < 0.5
        m[0], m[-1] = True, False
        masks[n] = (m, dim)
    examples = [[make() for _ in range(B)] for _ in range(STEPS)]
    return model, masks, examples


def _run_engine(model, masks, examples, make_opt, *, compact, sigma=0.0, R=1.0, seed=0, mode="auto"):
    dpft.sparta.restrict(model, {n: m for n, (m, _) in masks.items()})
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    if compact:
        assert dpft.sparta.compact_optimizer(opt) is opt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0
        engine = dpft.PrivacyEngine(
            model,
            batch_size=B,
            sample_size=100,
            steps=10,
            noise_multiplier=sigma,
            noise_seed=seed,
            max_grad_norm=R,
            clipping_mode=mode,
        )
    engine.attach(opt)
    for exs in examples:
        loss_fn(model, to_double(collate(exs))).backward()
        opt.step()
        opt.zero_grad()
    return opt, engine


def _run_reference(model, masks, examples, make_opt, R):
    """Brute force: per-example gradients one at a time, masked, clipped, averaged;
    a full-size torch optimizer steps on them; unselected rows are put back."""
    names = [n for n, p in model.named_parameters() if p.requires_grad] + [n for n in masks]
    names = list(dict.fromkeys(names))
    params = dict(model.named_parameters())
    opt = make_opt([params[n] for n in names])
    for exs in examples:
        grads = per_example_grads(
            copy.deepcopy(model).requires_grad_(True), names, [to_double(collate([e])) for e in exs], loss_fn
        )
        for gr in grads:
            for n, (m, dim) in masks.items():
                shape = [1] * gr[n].ndim
                shape[dim] = -1
                gr[n] = gr[n] * m.view(shape).double()
        want = clipped_mean(grads, [names], R, "abadi", B)
        frozen = {n: params[n].detach().index_select(dim, (~m).nonzero().flatten()) for n, (m, dim) in masks.items()}
        for n in names:
            params[n].grad = want[n].clone()
        opt.step()
        with torch.no_grad():
            for n, (m, dim) in masks.items():
                params[n].index_copy_(dim, (~m).nonzero().flatten(), frozen[n])
        opt.zero_grad()


def _values(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def _rel(a, b):
    num = math.sqrt(sum(float((a[n] - b[n]).pow(2).sum()) for n in b))
    den = math.sqrt(sum(float(b[n].pow(2).sum()) for n in b))
    return num / den


OPTIMIZERS = {
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, weight_decay=0.1, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.3),
    "rmsprop-centered": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.05, weight_decay=0.1),
}


@pytest.mark.parametrize(
    "name, targets, opt_name",
    [
        ("linear-3d", {"0.weight": 0, "2.weight": 0}, "sgd-momentum-wd"),
        ("linear-3d", {"0.weight": 0, "2.weight": 0}, "adamw"),
        # 2: grouped convolution (its contribution is not compacted by the capture)
        ("conv2d", {"0.weight": 0, "2.weight": 0}, "adamw"),
        ("hf-conv1d", {"2.weight": 1, "4.weight": 1}, "sgd-momentum-wd"),  # rows along dim 1
        ("embedding-tied", {"emb.weight": 0}, "adamw"),  # token-id rows, tied with the output layer
        ("layernorm", {"0.weight": 0, "1.weight": 0}, "sgd-momentum-wd"),  # 1: restricted norm weight (flat bucket)
    ],
)
def test_compact_optimizer_exact(name, targets, opt_name):
    """Compact state, noise 0: several steps equal the brute-force full-size optimizer."""
    model, masks, examples = _setup(name, targets)
    probe = per_example_grads(
        copy.deepcopy(model).requires_grad_(True),
        [n for n, p in model.named_parameters() if p.requires_grad] + list(masks),
        [to_double(collate([e])) for e in examples[0]],
        loss_fn,
    )
    R = pick_threshold(probe)
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make = OPTIMIZERS[opt_name]
    opt, _ = _run_engine(model, masks, examples, make, compact=True, R=R)
    _run_reference(ref, masks, examples, make, R)
    got = {n: p.detach() for n, p in model.named_parameters()}
    want = {n: p.detach() for n, p in ref.named_parameters()}
    assert _rel(got, want) < 1e-6
    params = dict(model.named_parameters())
    for n, (m, dim) in masks.items():
        off = (~m).nonzero().flatten()
        assert torch.equal(params[n].detach().index_select(dim, off), before[n].index_select(dim, off))
        assert not torch.equal(params[n].detach(), before[n])
        assert params[n].grad is None  # the gradient went to the compact rows
    rows = dpft.sparta.compact_rows(opt)
    assert len(rows) == len(masks)
    for n, (m, dim) in masks.items():
        r = rows[id(params[n])]
        assert r.shape[dim] == int(m.sum()) and r.shape[dim] < params[n].shape[dim]
        state = [v for v in opt.state[r].values() if isinstance(v, torch.Tensor) and v.ndim]
        assert state and all(tuple(v.shape) == tuple(r.shape) for v in state)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_compact_equals_full_state(opt_name, sigma):
    """Compact and full-size optimizer state give the same weights (seeded noise
    included): the noise is drawn for the selected rows only in both."""
    model, masks, examples = _setup("linear-3d", {"0.weight": 0, "2.weight": 0}, seed=3)
    full = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make = OPTIMIZERS[opt_name]
    opt, _ = _run_engine(model, masks, examples, make, compact=True, sigma=sigma, R=0.5, seed=7)
    opt_full, _ = _run_engine(full, masks, examples, make, compact=False, sigma=sigma, R=0.5, seed=7)
    got = {n: p.detach() for n, p in model.named_parameters()}
    want = {n: p.detach() for n, p in full.named_parameters()}
    assert _rel(got, want) < 1e-6
    params = dict(model.named_parameters())
    for n, (m, dim) in masks.items():
        assert torch.equal(params[n].detach()[~m], before[n][~m])
        assert not torch.allclose(params[n].detach()[m], before[n][m])
        sizes = {
            tuple(v.shape)
            for v in opt.state[dpft.sparta.compact_rows(opt)[id(params[n])]].values()
            if isinstance(v, torch.Tensor) and v.ndim
        }
        pf = dict(full.named_parameters())[n]
        full_sizes = {tuple(v.shape) for v in opt_full.state[pf].values() if isinstance(v, torch.Tensor) and v.ndim}
        assert sizes == {(int(m.sum()), params[n].shape[1])} and full_sizes == {tuple(params[n].shape)}


def test_compact_checkpoint_resume(tmp_path):
    """save/load_checkpoint mid-run = an uninterrupted run (seeded noise, Adam);
    a full-size optimizer's state also loads into a compact one (rows kept)."""
    model, masks, examples = _setup("linear-3d", {"0.weight": 0, "2.weight": 0}, seed=5)
    examples = examples + [[ZOO["linear-3d"][1]() for _ in range(B)] for _ in range(2)]
    init = copy.deepcopy(model)
    make = OPTIMIZERS["adam"]
    _run_engine(model, masks, examples, make, compact=True, sigma=1.0, R=0.5, seed=11)  # 5 steps straight

    def first_three(compact):
        m = copy.deepcopy(init)
        opt, engine = _run_engine(m, masks, examples[:3], make, compact=compact, sigma=1.0, R=0.5, seed=11)
        path = tmp_path / f"ckpt-{compact}.pt"
        dpft.save_checkpoint(path, model=m, optimizer=opt, engine=engine)
        return path

    for saved_compact in (True, False):
        path = first_three(saved_compact)
        m = copy.deepcopy(init)  # fresh weights: the checkpoint must bring them back
        dpft.sparta.restrict(m, {n: mk for n, (mk, _) in masks.items()})
        opt = dpft.sparta.compact_optimizer(make([p for p in m.parameters() if p.requires_grad]))
        engine = dpft.PrivacyEngine(
            m, batch_size=B, sample_size=100, steps=10, noise_multiplier=1.0, noise_seed=0, max_grad_norm=0.5
        )
        engine.attach(opt)
        dpft.load_checkpoint(path, model=m, optimizer=opt, engine=engine)
        for r in dpft.sparta.compact_rows(opt).values():
            assert all(v.shape == r.shape for v in opt.state[r].values() if v.ndim)
        for exs in examples[3:]:
            loss_fn(m, to_double(collate(exs))).backward()
            opt.step()
            opt.zero_grad()
        got = {n: p.detach() for n, p in m.named_parameters()}
        want = {n: p.detach() for n, p in model.named_parameters()}
        assert _rel(got, want) < 1e-12, saved_compact


def test_compact_closure_and_plain_autograd():
    """step(closure) under the engine; without an engine the compact optimizer
    takes the selected rows of autograd's gradient and never moves the others."""
    model, masks, examples = _setup("linear-3d", {"0.weight": 0}, seed=2)
    other = copy.deepcopy(model)
    _run_engine(other, masks, examples, OPTIMIZERS["adamw"], compact=True, R=0.5)
    dpft.sparta.restrict(model, {n: m for n, (m, _) in masks.items()})
    opt = dpft.sparta.compact_optimizer(OPTIMIZERS["adamw"]([p for p in model.parameters() if p.requires_grad]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model, batch_size=B, sample_size=100, steps=10, noise_multiplier=0.0, max_grad_norm=0.5
        )
    engine.attach(opt)
    for exs in examples:

        def closure(exs=exs):
            loss = loss_fn(model, to_double(collate(exs)))
            loss.backward()
            return loss

        assert opt.step(closure) is not None
        opt.zero_grad()
    assert _rel(_values(model), _values(other)) < 1e-12

    # no engine: plain (non-private) autograd gradients, AdamW with weight decay
    engine.detach()
    plain = copy.deepcopy(model)
    dpft.sparta.unrestrict(plain)
    full_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=0.05, weight_decay=0.3)
    full_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # compact state (not shared) ...
    w = plain[0].weight
    m = masks["0.weight"][0]
    full_opt.state[w] = {
        k: (v if not v.ndim else torch.zeros_like(w).index_copy_(0, m.nonzero().flatten(), v))
        for k, v in full_opt.state[w].items()
    }  # ... as full-size state
    w0 = model[0].weight.detach().clone()
    for exs in examples:
        for mod, o in ((model, opt), (plain, full_opt)):
            loss_fn(mod, to_double(collate(exs))).backward()
            if mod is plain:
                frozen = w.detach()[~m].clone()
            o.step()
            o.zero_grad()
            if mod is plain:
                with torch.no_grad():
                    w[~m] = frozen
    assert model[0].weight.grad is None
    assert torch.equal(model[0].weight.detach()[~m], w0[~m])
    assert _rel(_values(model), _values(plain)) < 1e-12


def test_compact_misuse_and_copies():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    mask = torch.zeros(8, dtype=torch.bool)
    mask[:3] = True
    dpft.sparta.restrict(model, {"0.weight": mask})
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    engine = dpft.PrivacyEngine(model, batch_size=8, sample_size=100, steps=5, noise_multiplier=1.0)
    engine.attach(opt)
    with pytest.raises(RuntimeError, match="already wrapped"):
        dpft.sparta.compact_optimizer(opt)  # step is already wrapped
    engine.detach()
    opt = dpft.sparta.compact_optimizer(torch.optim.Adam(model.parameters(), lr=0.1))
    assert isinstance(opt, torch.optim.Adam) and isinstance(opt, dpft.sparta.RowCompact)
    assert dpft.sparta.compact_optimizer(opt) is opt  # idempotent
    assert dpft.sparta.row_separable(opt) and not dpft.sparta.row_separable(torch.optim.LBFGS)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    clone = copy.deepcopy(opt)  # a copy of the optimizer with its own copies of the weights
    assert type(clone) is type(opt) and len(dpft.sparta.compact_rows(clone)) == 1
    (w,) = [t.param for t in clone._dpft_twins.values()]
    assert w is not model[0].weight and torch.equal(w, model[0].weight)
    w.grad = torch.ones_like(w)
    clone.step()
    assert torch.equal(w.detach()[3:], model[0].weight.detach()[3:]) and not torch.equal(w[:3], model[0].weight[:3])
    dpft.sparta.restrict(model, {"0.weight": ~mask})  # a new selection: this optimizer is stale
    with pytest.raises(RuntimeError, match="selection"):
        opt.step()
    with pytest.raises(TypeError):
        dpft.sparta.compact_optimizer(object())
