"""An empty Poisson batch sent through forward/backward says what to do instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpft


@pytest.mark.parametrize("what", ["full", "bitfit"])
def test_empty_batch_backward_names_record_empty_batch(what):
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.ReLU(), nn.Linear(3, 2))
    if what == "bitfit":
        dpft.bitfit(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = dpft.PrivacyEngine(model, batch_size=8, sample_size=64, epochs=1, target_epsilon=3.0)
    engine.attach(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(torch.zeros(0, 4)), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"0 examples.*record_empty_batch\(\)"):
        loss.backward()
    optimizer.zero_grad()
    # the advice works: a noise-only step, accounted
    engine.record_empty_batch()
    optimizer.step()
    assert engine.steps == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.requires_grad)
