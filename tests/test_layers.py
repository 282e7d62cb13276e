"""Every supported layer type: dpft's update equals the brute-force per-example
clipped mean (float64, relative error <= 1e-6)."""

import pytest
import torch
from torch import nn

from layer_zoo import ZOO, collate, loss_fn
from reference import check_model, check_steps

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


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("subset", ["bias", "all"])
@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_layer_exact_over_steps(name, subset, mode):
    """Four steps in a row, each exact: past the first backward passes the
    engine switches the parameters it clips off for autograd (book-keeping)."""
    factory, make = ZOO[name]
    model = factory()
    if subset == "bias" and not dpft.bitfit(model):
        pytest.skip("no biases")
    torch.manual_seed(1)
    check_steps(model, make, collate, loss_fn, mode=mode)


@pytest.mark.parametrize(
    "name",
    ["linear-3d", "conv2d", "embedding-tied", "layernorm", "mha", "container-tokens", "same-shapes", "shared-input"],
)
@pytest.mark.parametrize("mode", ["ghost", "instantiate", "mixed", "bk"])
def test_modes_exact(name, mode):
    model, examples = build(name, "all")
    check_model(model, examples, collate, loss_fn, mode=mode)


@pytest.mark.parametrize("name", ["linear-3d", "groupnorm", "hf-conv1d", "embedding-tied", "same-shapes"])
@pytest.mark.parametrize("subset", ["bias", "all"])
@pytest.mark.parametrize("fn", ["abadi", "automatic"])
@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_styles_and_accumulation(name, subset, fn, style):
    model, examples = build(name, subset)
    check_model(model, examples, collate, loss_fn, fn=fn, style=style, splits=[2, 1, 3])


_CONV_CASES = {
    "1d-stride": lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
    "2d-same-dilated": lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2),
    "2d-same-even-kernel": lambda: nn.Conv2d(4, 6, (2, 3), padding="same"),
    "2d-valid": lambda: nn.Conv2d(4, 6, 3, padding="valid", stride=(2, 1)),
    "2d-reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "2d-circular": lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="circular", dilation=2),
    "2d-replicate": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate", stride=2),
    "2d-groups": lambda: nn.Conv2d(4, 6, 3, groups=2, stride=2, padding=1),
    "2d-depthwise": lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1),
    "2d-1x1": lambda: nn.Conv2d(4, 6, 1),
    "3d": lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1),
}


@pytest.mark.parametrize("name", sorted(_CONV_CASES))
def test_conv_weight_gradient_kernel_paths(name):
    """The convolution's own weight-gradient kernel (batch folded into the
    groups) gives the brute-force per-example weight gradients, their
    weighted sum, the same for a subset of output channels (SPARTA rows),
    and the lazily unfolded factors agree with it (float64, 1e-10)."""
    from dpft.rules.base import Factored
    from dpft.rules.conv import ConvFactored

    torch.manual_seed(1)
    conv = _CONV_CASES[name]().double()
    nd = conv.weight.ndim - 2
    n = 5
    x = torch.randn(n, conv.in_channels, *([7] * nd), dtype=torch.float64)
    g = torch.randn_like(conv(x))
    want = torch.stack([torch.autograd.grad(conv(x[i : i + 1]), conv.weight, g[i : i + 1])[0] for i in range(n)])

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    direct = ConvFactored(conv, x, g, n).per_example(torch.float64)  # the default path (None: generic)
    assert (direct is not None) == (conv.groups == 1), name
    if direct is not None:
        assert rel(direct, want) < 1e-10
    c = ConvFactored(conv, x, g, n)
    w = torch.rand(n, dtype=torch.float64)
    wv = w.view(-1, *([1] * conv.weight.ndim))
    assert rel(c.per_example(torch.float64, grouped=True), want) < 1e-10  # batch-in-groups kernel
    assert rel(c.weighted(w, torch.float64), (wv * want).sum(0)) < 1e-10
    generic = Factored(right=c.right, shape=c.shape, left=c.left)
    assert rel(dpft.clip.norms.instantiate(generic, torch.float64), want) < 1e-10
    assert rel(dpft.clip.norms.ghost_sq_norm([c], torch.float64), want.flatten(1).pow(2).sum(1)) < 1e-10
    if conv.groups == 1:
        idx = torch.tensor([conv.out_channels - 1, 0, 2])
        sel = c.select_rows(idx)
        assert tuple(sel.shape) == (3, *conv.weight.shape[1:])
        assert rel(sel.per_example(torch.float64, grouped=True), want[:, idx]) < 1e-10
        assert rel(sel.weighted(w, torch.float64), (wv * want[:, idx]).sum(0)) < 1e-10
        assert rel(dpft.clip.norms.ghost_sq_norm([sel], torch.float64), want[:, idx].flatten(1).pow(2).sum(1)) < 1e-10
        # the default (unfolded) path on the selected rows, and after a release
        sel2 = c.select_rows(idx)
        sq, inst = dpft.clip.norms.sq_norm([sel2], "instantiate", torch.float64)
        assert rel(inst, want[:, idx]) < 1e-10 and sel2._factors is None
        assert rel(sel2.weighted(w, torch.float64), (wv * want[:, idx]).sum(0)) < 1e-10
    else:
        assert c.select_rows(torch.tensor([0])) is None


@pytest.mark.parametrize("mode", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("rows", [False, True], ids=["full", "sparta-rows"])
def test_conv_input_is_unfolded_at_most_once_per_layer_and_step(monkeypatch, mode, rows):
    """The unfolded input of a convolution (kernel-size times its input) is
    built for the per-example norm and dropped; nothing builds it again in
    the same step (a dtype query once did, doubling the unfold work), and a
    pointwise convolution never copies its input at all."""
    import dpft.rules.conv as conv_rules

    calls = []
    real = conv_rules.unfold_nd

    def spy(x, kernel_size, *args, **kwargs):
        out = real(x, kernel_size, *args, **kwargs)
        calls.append(out.data_ptr() == x.data_ptr())  # True: a view of the input
        return out

    monkeypatch.setattr(conv_rules, "unfold_nd", spy)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 1),
        nn.Tanh(),
        nn.Conv2d(8, 4, 3, stride=2),
        nn.Flatten(),
        nn.LazyLinear(2),
    )
    x = torch.randn(6, 3, 9, 9)
    model(x)
    if rows:
        masks = {f"{i}.weight": torch.arange(model[i].out_channels) % 3 == 0 for i in (0, 2, 4)}
        dpft.sparta.restrict(model, masks)
    engine = dpft.PrivacyEngine(model, batch_size=6, sample_size=100, steps=5, noise_multiplier=1.0, clipping_mode=mode)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine.attach(opt)
    for step in range(4):
        calls.clear()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step < 2:
            continue  # the first passes' self-check sums each contribution once more
        assert len(calls) <= 3, calls
        # the pointwise layer (the second) needs no unfolded copy
        assert calls.count(True) <= 1 and calls.count(False) <= 2
    assert len(calls) >= 1  # the spy sees the unfold (ghost or instantiated norms both build it)
