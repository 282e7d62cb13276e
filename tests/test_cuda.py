"""The same exactness checks on a CUDA device (skipped without one)."""

import pytest
import torch

from layer_zoo import ZOO, collate, loss_fn
from reference import check_model

import dpft

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("subset", ["bias", "all"])
def test_layer_exact_cuda(name, subset):
    factory, make = ZOO[name]
    model = factory()
    if subset == "bias" and not dpft.bitfit(model):
        pytest.skip("no biases")
    check_model(model, [make() for _ in range(6)], collate, loss_fn, device="cuda")


def test_models_cuda():
    from test_models import MODELS

    for name, build in MODELS.items():
        for subset in ("bias", "all"):
            model, make, coll, loss = build()
            model.eval()
            if subset == "bias" and not dpft.bitfit(model):
                continue
            check_model(model, [make() for _ in range(5)], coll, loss, device="cuda")
