"""Every supported layer type: dpft's update equals the brute-force per-example
clipped mean (float64, relative error <= 1e-6)."""

import pytest
import torch

from layer_zoo import ZOO, collate, loss_fn
from reference import check_model

import dpft

B = 6


def build(name, subset):
    factory, make = ZOO[name]
    model = factory()
    if subset == "bias":
        if not dpft.bitfit(model):
            pytest.skip("no biases")
    examples = [make() for _ in range(B)]
    return model, examples


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("subset", ["bias", "all"])
def test_layer_exact(name, subset):
    model, examples = build(name, subset)
    check_model(model, examples, collate, loss_fn)


@pytest.mark.parametrize("name", ["linear-3d", "conv2d", "embedding-tied", "layernorm", "mha", "container-tokens"])
@pytest.mark.parametrize("mode", ["ghost", "instantiate", "mixed", "bk"])
def test_modes_exact(name, mode):
    model, examples = build(name, "all")
    check_model(model, examples, collate, loss_fn, mode=mode)


@pytest.mark.parametrize("name", ["linear-3d", "groupnorm", "hf-conv1d", "embedding-tied"])
@pytest.mark.parametrize("subset", ["bias", "all"])
@pytest.mark.parametrize("fn", ["abadi", "automatic"])
@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_styles_and_accumulation(name, subset, fn, style):
    model, examples = build(name, subset)
    check_model(model, examples, collate, loss_fn, fn=fn, style=style, splits=[2, 1, 3])
