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


@pytest.mark.parametrize("mode", ["ghost", "instantiate", "bk", "auto"])
def test_bf16_autocast_cuda(mode):
    """bf16 autocast on the GPU (the half-precision kernels with float32
    results): the update matches the float32 one to bfloat16 accuracy, for
    every clipping mode."""
    import copy

    from reference import dpft_update

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 64),
        torch.nn.GELU(), torch.nn.Linear(64, 4),
    ).cuda()
    x = torch.randn(8, 12, 16, device="cuda")

    def loss(m, b):
        return m(b).float().pow(2).mean()

    def amp_loss(m, b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(b)
        return out.float().pow(2).mean()

    ref, _ = dpft_update(copy.deepcopy(model), [x], loss, batch_size=8, R=0.05, mode=mode)
    got, _ = dpft_update(copy.deepcopy(model), [x], amp_loss, batch_size=8, R=0.05, mode=mode)
    num = sum(float((got[k] - ref[k]).pow(2).sum()) for k in ref) ** 0.5
    den = sum(float(ref[k].pow(2).sum()) for k in ref) ** 0.5
    assert num / den < 3e-2
