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
        engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=5, noise_multiplier=0.0,
                                    max_grad_norm=R, clipping_mode=mode)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine.attach(opt)
    loss_fn(model, to_double(collate(examples))).backward()
    opt.step()
    got = {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}
    num = math.sqrt(sum(float((got[n] - want[n]).pow(2).sum()) for n in want))
    den = math.sqrt(sum(float(want[n].pow(2).sum()) for n in want))
    assert num / den < 1e-6
    for n, (m, dim) in masks.items():
        assert torch.equal(params[n].detach().index_select(dim, (~m).nonzero().flatten()),
                           before[n].index_select(dim, (~m).nonzero().flatten()))


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


def test_restrict_bad_input():
    model = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="shape"):
        dpft.sparta.restrict(model, {"weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="boolean"):
        dpft.sparta.restrict(model, {"weight": torch.ones(4)})
    with pytest.raises(ValueError, match="no parameter"):
        dpft.sparta.restrict(model, {"nope.weight": torch.ones(4, dtype=torch.bool)})
