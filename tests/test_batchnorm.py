"""dpft.convert_batchnorm_to_groupnorm keeps the network: a BatchNorm with a
fused activation (timm's BatchNormAct2d) keeps its activation, dtype and
device are preserved, and an unknown BatchNorm subclass is refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import check_model

import dpft
from dpft.batchnorm import GroupNormAct, register_batchnorm_act


class BatchNormAct2d(nn.BatchNorm2d):
    """Stand-in for timm's ``timm.layers.norm_act.BatchNormAct2d`` (timm needs
    torchvision, which the test environment lacks): a BatchNorm2d subclass
    whose own forward normalises, then applies its ``drop`` and ``act``
    submodules.  Its module path is timm's, which is how dpft recognises the
    real class without importing timm."""

    def __init__(self, num_features, act: nn.Module | None = None, drop: nn.Module | None = None, **kw):
        super().__init__(num_features, **kw)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        use_batch = self.training or self.running_mean is None
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, use_batch, self.momentum or 0.0, self.eps
        )
        return self.act(self.drop(x))


BatchNormAct2d.__module__ = "timm.layers.norm_act"


class NormThenScale(nn.BatchNorm2d):
    """A subclass whose forward does something dpft cannot know about."""

    def forward(self, x):
        return 3 * super().forward(x)


def bnact_net(dtype=torch.float64, bnact=BatchNormAct2d):
    """A small efficientnet-like stack: conv, BN+SiLU, depthwise conv, BN+ReLU
    (with dropout), conv, BN without activation, max-pooled linear head."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bnact(8, act=nn.SiLU()),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        bnact(8, act=nn.ReLU(), drop=nn.Dropout(0.2)),
        nn.Conv2d(8, 16, 1, bias=False),
        bnact(16),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),  # (an average would see only the bias)
    ).to(dtype)
    # non-trivial affine parameters and running statistics
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net


def by_hand(net, max_groups=32):
    """The reference: every BatchNorm replaced by GroupNorm, with a fused act and drop kept after it."""
    ref = copy.deepcopy(net)
    for name, m in list(ref.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            gn = nn.GroupNorm(math.gcd(c, max_groups), c, eps=m.eps).to(m.weight.dtype)
            with torch.no_grad():
                gn.weight.copy_(m.weight)
                gn.bias.copy_(m.bias)
            new = nn.Sequential(gn, getattr(m, "drop", nn.Identity()), m.act) if hasattr(m, "act") else gn
            setattr(ref, name, new)
    return ref


def count_acts(net):
    return sum(1 for m in net.modules() if isinstance(m, (nn.SiLU, nn.ReLU)))


def test_fused_activation_is_kept_outputs_differ_only_by_the_norm():
    net = bnact_net().eval()
    ref = by_hand(net).eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    acts = count_acts(net)
    assert acts == 2
    out = dpft.convert_batchnorm_to_groupnorm(net)
    assert out is net
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(type(m) is GroupNormAct for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert count_acts(net) == acts
    assert net(x).equal(ref(x))
    # the activations matter: the old conversion (a bare GroupNorm) gives another network
    bare = by_hand(bnact_net()).eval()
    for i in (1, 3, 5):
        bare[i] = bare[i][0]
    assert not torch.allclose(bare(x), net(x))


def test_reuses_the_original_submodules_and_parameters():
    net = bnact_net()
    bn = net[3]
    act, drop, weight, bias = bn.act, bn.drop, bn.weight, bn.bias
    bn.bias.requires_grad_(False)
    net.eval()
    dpft.convert_batchnorm_to_groupnorm(net)
    gn = net[3]
    assert gn.act is act and gn.drop is drop and gn.weight is weight and gn.bias is bias
    assert [n for n, _ in gn.named_parameters()] == ["weight", "bias"]  # names unchanged: 3.weight, 3.bias
    assert not gn.bias.requires_grad and gn.weight.requires_grad
    assert not gn.training and gn.num_groups == 8 and gn.eps == bn.eps


def test_training_mode_matches_too():
    """In training mode (dropout off for determinism) the GroupNorm network is the
    hand-built one as well; BatchNorm's batch statistics are what it replaces."""
    net = bnact_net()
    net[3].drop.p = 0.0
    ref = by_hand(net).train()
    dpft.convert_batchnorm_to_groupnorm(net.train())
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    assert net(x).equal(ref(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dtype_is_preserved(dtype):
    net = bnact_net(dtype)
    net.add_module("plain", nn.BatchNorm1d(3).to(dtype))
    net.add_module("no_affine", nn.BatchNorm2d(4, affine=False).to(dtype))
    dpft.convert_batchnorm_to_groupnorm(net)
    assert {p.dtype for p in net.parameters()} == {dtype}
    assert type(net.plain) is nn.GroupNorm and net.plain.weight.dtype == dtype
    assert type(net.no_affine) is nn.GroupNorm and not net.no_affine.affine


def test_device_is_preserved():
    """The meta device stands in for an accelerator (no GPU here)."""
    with torch.device("meta"):
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act=nn.ReLU()), nn.BatchNorm2d(8), nn.BatchNorm2d(8, affine=False)
        )
    dpft.convert_batchnorm_to_groupnorm(net)
    assert {p.device.type for p in net.parameters()} == {"meta"}
    assert type(net[1]) is GroupNormAct and type(net[2]) is nn.GroupNorm


def test_plain_batchnorms_become_plain_groupnorm():
    for bn, x in (
        (nn.BatchNorm1d(6), torch.randn(5, 6)),
        (nn.BatchNorm1d(6), torch.randn(5, 6, 4)),
        (nn.BatchNorm2d(6), torch.randn(5, 6, 3, 3)),
        (nn.BatchNorm3d(6), torch.randn(5, 6, 2, 2, 2)),
        (nn.SyncBatchNorm(6), torch.randn(5, 6, 3, 3)),
    ):
        bn = bn.double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        x = x.double()
        gn = dpft.convert_batchnorm_to_groupnorm(bn)  # a BatchNorm itself: the new module is returned
        assert type(gn) is nn.GroupNorm and gn.num_groups == 2 and gn.weight is bn.weight
        assert gn(x).equal(F.group_norm(x, 2, bn.weight, bn.bias, bn.eps))


def test_lazy_batchnorm():
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"module '0' \(LazyBatchNorm2d\) is not initialised yet"):
        dpft.convert_batchnorm_to_groupnorm(lazy)
    lazy(torch.randn(2, 4, 3, 3))
    dpft.convert_batchnorm_to_groupnorm(lazy)
    assert type(lazy[0]) is nn.GroupNorm and lazy[0].num_channels == 4


def test_unknown_subclass_is_refused_naming_it_and_nothing_changes():
    net = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.Conv2d(4, 4, 1), NormThenScale(4)))
    with pytest.raises(TypeError, match=r"module '1\.1' \(NormThenScale, a BatchNorm subclass\) has its own forward"):
        dpft.convert_batchnorm_to_groupnorm(net)
    assert type(net[0]) is nn.BatchNorm2d and type(net[1][1]) is NormThenScale  # checked before changing anything


def test_subclass_without_its_own_forward_is_plain():
    class MyBN(nn.BatchNorm2d):
        pass

    net = nn.Sequential(MyBN(4))
    dpft.convert_batchnorm_to_groupnorm(net)
    assert type(net[0]) is nn.GroupNorm


def test_registered_norm_act_class():
    class NormAct(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(super().forward(x))

    with pytest.raises(TypeError, match="register_batchnorm_act"):
        dpft.convert_batchnorm_to_groupnorm(nn.Sequential(NormAct(4)))
    register_batchnorm_act(NormAct)
    net = nn.Sequential(NormAct(4)).double().eval()
    ref = by_hand(net).eval()
    dpft.convert_batchnorm_to_groupnorm(net)
    assert type(net[0]) is GroupNormAct and isinstance(net[0].act, nn.Tanh) and isinstance(net[0].drop, nn.Identity)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    assert net(x).equal(ref(x))
    with pytest.raises(TypeError, match="not a BatchNorm class"):
        register_batchnorm_act(nn.LayerNorm)


def test_shared_batchnorm_stays_shared():
    bn = BatchNormAct2d(4, act=nn.ReLU())
    net = nn.ModuleDict({"a": bn, "b": nn.Sequential(bn)})
    dpft.convert_batchnorm_to_groupnorm(net)
    assert net["a"] is net["b"][0] and type(net["a"]) is GroupNormAct


def test_max_groups():
    net = nn.Sequential(nn.BatchNorm2d(12))
    dpft.convert_batchnorm_to_groupnorm(net, max_groups=8)
    assert net[0].num_groups == 4
    with pytest.raises(ValueError, match="max_groups"):
        dpft.convert_batchnorm_to_groupnorm(net, max_groups=0)


def _cls_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _stack(examples):
    return tuple(torch.stack(v) for v in zip(*examples))


def test_converted_plain_network_trains_exactly():
    """A network with plain BatchNorms, converted, then trained with dpft: exact (float64)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    dpft.convert_batchnorm_to_groupnorm(net)
    examples = [(torch.randn(2, 5, 5), torch.randint(0, 3, ())) for _ in range(5)]
    check_model(net, examples, _stack, _cls_loss)


def test_converted_fused_network_is_exact():
    """The GroupNormAct network trains exactly (the engine catches the group
    norm operator inside its forward; the activation after it is autograd's)."""
    net = bnact_net()
    net[3].drop.p = 0.0
    dpft.convert_batchnorm_to_groupnorm(net)
    examples = [(torch.randn(3, 5, 5), torch.randint(0, 3, ())) for _ in range(5)]
    check_model(net, examples, _stack, _cls_loss)


@pytest.fixture
def timm_layers():
    """timm.layers; where torchvision cannot load beside the pinned CPU torch (CI),
    timm is imported over the test-only stand-in of tests/shims and forgotten after."""
    import zoo_models

    if zoo_models.import_timm() is None:
        pytest.skip("timm not installed")
    import timm.layers

    yield timm.layers
    zoo_models.forget_timm()


def test_real_timm_batchnormact(timm_layers):
    TimmBNAct = timm_layers.BatchNormAct2d

    net = nn.Sequential(nn.Conv2d(3, 8, 3), TimmBNAct(8, act_layer=nn.SiLU), TimmBNAct(8, apply_act=False)).double()
    net.eval()
    ref = by_hand(net).eval()
    dpft.convert_batchnorm_to_groupnorm(net)
    assert type(net[1]) is GroupNormAct and isinstance(net[1].act, nn.SiLU)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert net(x).equal(ref(x))
