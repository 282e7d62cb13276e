"""Engine behaviour: noise, activation-free bias mode, book-keeping, errors."""

from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
from torch import nn

import dpft
from dpft.rules.base import Call


def mlp(bias_only=True):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))
    if bias_only:
        dpft.bitfit(model)
    return model


def engine_for(model, **kw):
    args = dict(batch_size=8, sample_size=100, steps=10, noise_multiplier=0.0, max_grad_norm=1.0)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpft.PrivacyEngine(model, **args)


def test_noise_std_and_freshness():
    torch.manual_seed(0)
    model = nn.Linear(3, 500)
    dpft.bitfit(model)
    sigma, R, B = 1.7, 0.6, 8
    engine = engine_for(model, noise_multiplier=sigma, max_grad_norm=R, batch_size=B, noise_seed=1)
    opt = torch.optim.SGD([model.bias], lr=1.0)
    engine.attach(opt)
    deltas = []
    for _ in range(40):
        before = model.bias.detach().clone()
        x = torch.randn(B, 3)
        (0.0 * model(x)).sum().backward()  # zero gradients: the update is the noise alone
        opt.step()
        opt.zero_grad()
        deltas.append((model.bias.detach() - before).clone())
    d = torch.stack(deltas)
    expected = sigma * R / B
    assert abs(d.std().item() / expected - 1) < 0.03
    assert abs(d.mean().item()) < 0.05 * expected
    # fresh each step: consecutive draws are uncorrelated
    corr = torch.corrcoef(torch.stack([d[:-1].flatten(), d[1:].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.05


@pytest.mark.parametrize("divide", [1, 2, 8])
def test_noise_added_and_divided_in_one_pass(divide):
    """``GaussianNoise.add_(t, alpha, divide)`` gives ``(t + alpha z) / divide``
    (noise and division in one pass for ``divide > 1``): over many values,
    ``divide * t' - t`` has mean 0 and standard deviation ``alpha``, and is
    uncorrelated with ``t``; float64 and float32, in several chunks."""
    import dpft.clip.noise
    import dpft.clip.tuning

    for dtype in (torch.float64, torch.float32):
        noise = dpft.clip.noise.GaussianNoise(seed=3)
        t = torch.linspace(-50.0, 50.0, 300_000, dtype=dtype)
        parts = [t[:100_000].clone(), t[100_000:].clone().view(100, -1)]
        old = dpft.clip.tuning.NOISE_CHUNK
        dpft.clip.tuning.NOISE_CHUNK = 70_000  # several chunks, one tensor filled piece by piece
        try:
            noise.add_(parts, 0.7, divide=divide)
        finally:
            dpft.clip.tuning.NOISE_CHUNK = old
        z = (torch.cat([parts[0], parts[1].reshape(-1)]) * divide - t).double()
        assert abs(z.mean().item()) < 0.01
        assert abs(z.std().item() / 0.7 - 1) < 0.01
        assert abs(torch.corrcoef(torch.stack([z, t.double()]))[0, 1].item()) < 0.01
    with pytest.raises(ValueError, match="divide"):
        noise.add_([t], 1.0, divide=0)


def test_noise_seed_reproducible():
    outs = []
    for _ in range(2):
        model = nn.Linear(3, 10)
        dpft.bitfit(model)
        with torch.no_grad():
            model.bias.zero_()
        engine = engine_for(model, noise_multiplier=1.0, noise_seed=7)
        opt = torch.optim.SGD([model.bias], lr=1.0)
        engine.attach(opt)
        model(torch.ones(8, 3)).sum().mul(0).backward()
        opt.step()
        outs.append(model.bias.detach().clone())
    assert torch.equal(outs[0], outs[1])


def _packed_bytes(model, x, engine=None):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, total[0]


def test_bias_only_keeps_no_activations():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.Linear(16, 4),
    )
    dpft.bitfit(model)
    x = torch.randn(8, 3, 8, 8)
    _, plain = _packed_bytes(model, x)
    engine = engine_for(model)
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    out, private = _packed_bytes(model, x)
    assert private == plain  # autograd saves exactly what non-private BiTFiT saves
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = {id(m) for m in model.modules()}  # (not another test's leftovers)
        calls = [o for o in gc.get_objects() if isinstance(o, Call) and id(o.module) in mine]
    assert calls, "hooks should have created call records"
    for c in calls:  # and dpft itself keeps no tensor from the forward pass
        assert not any(torch.is_tensor(v) for v in c.saved.values()) and not c.versions
    out.sum().backward()
    engine.detach()


def test_book_keeping_skips_weight_grads():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    engine = engine_for(model, clipping_mode="bk")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(opt)
    for _ in range(2):  # the first backward passes check every sum against autograd's gradient
        model(torch.randn(8, 4)).sum().backward()
        # ... reduced to a fingerprint: autograd's (non-private) gradients are not kept
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    # after them, the non-private weight gradients are never computed
    assert model[2].weight.grad is None and model[4].weight.grad is None
    assert all(p.requires_grad for p in model.parameters())
    opt.step()
    assert model[2].weight.grad is not None


def test_step_without_backward_raises_and_changes_nothing():
    model = mlp()
    engine = engine_for(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine.attach(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not opt.state
    engine.record_empty_batch()
    opt.step()  # noise only (here 0): allowed
    assert engine.steps == 1


def test_zero_grad_discards_accumulated():
    model = mlp()
    engine = engine_for(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine.attach(opt)
    model(torch.randn(8, 4)).sum().backward()
    opt.zero_grad()
    with pytest.raises(RuntimeError):
        opt.step()


def test_closure_and_detach():
    model = mlp()
    engine = engine_for(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine.attach(opt)
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and engine.steps == 1
    engine.detach()
    assert "step" not in opt.__dict__
    # detached: plain (non-private) training again, no hooks
    model(x).sum().backward()
    opt.step()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-3), "batch_size"),
        (dict(batch_size=200), "batch_size"),
        (dict(sample_size=0), "sample_size"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(noise_multiplier=None, target_epsilon=-1.0), "target_epsilon"),
        (dict(noise_multiplier=None, target_epsilon=0.0), "target_epsilon"),
        (dict(noise_multiplier=1.0, target_epsilon=3.0), "target_epsilon"),
        (dict(noise_multiplier=None), "target_epsilon"),
        (dict(noise_multiplier=-0.5), "noise_multiplier"),
        (dict(clipping_mode="fast"), "clipping_mode"),
        (dict(clipping_fn="tanh"), "clipping_fn"),
        (dict(clipping_style="block"), "clipping_style"),
        (dict(accountant="moments"), "accountant"),
        (dict(loss_reduction="max"), "loss_reduction"),
        (dict(steps=None), "epochs"),
        (dict(epochs=2), "epochs"),
        (dict(target_delta=1.5), "target_delta"),
        (dict(clipping_style=[["0.bias"]]), "clipping_style"),
    ],
)
def test_bad_arguments(kwargs, name):
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=name):
        engine_for(model, **kwargs)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_bad_value_echoed():
    with pytest.raises(ValueError, match="'fast'"):
        engine_for(mlp(), clipping_mode="fast")


def test_zero_noise_warns():
    with pytest.warns(UserWarning, match="NOT differentially private"):
        engine = dpft.PrivacyEngine(mlp(), batch_size=8, sample_size=100, steps=5, noise_multiplier=0.0)
    assert engine.epsilon == math.inf


def test_optimizer_with_foreign_trainable_param():
    model = mlp()
    stray = nn.Parameter(torch.zeros(3))
    engine = engine_for(model)
    with pytest.raises(ValueError, match="not a trainable parameter"):
        engine.attach(torch.optim.SGD([*model.parameters(), stray], lr=0.1))


def test_frozen_params_in_optimizer_are_fine():
    model = mlp()
    engine = engine_for(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # includes frozen weights
    engine.attach(opt)
    w = model[0].weight.detach().clone()
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    assert torch.equal(w, model[0].weight)


def test_batchnorm_is_rejected_and_convertible():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with pytest.raises(dpft.BatchNormError, match="GroupNorm"):
        engine_for(model)
    dpft.bitfit(model)  # BatchNorm bias trainable too
    with pytest.raises(dpft.BatchNormError, match="mixes examples|depends on the other examples"):
        engine_for(model)
    model[1].requires_grad_(False)
    engine = engine_for(model)
    engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    with pytest.raises(dpft.BatchNormError, match="training mode"):
        model(torch.randn(8, 3, 6, 6))
    engine.detach()
    model = dpft.convert_batchnorm_to_groupnorm(model)
    assert isinstance(model[1], nn.GroupNorm)
    dpft.bitfit(model)
    engine = engine_for(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine.attach(opt)
    model(torch.randn(8, 3, 6, 6)).sum().backward()
    opt.step()


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x) * self.scale


def test_container_parameter_takes_the_generic_path():
    """A parameter held directly by a module with children (here a scale,
    like a layer scale) is no longer refused: the container is bound to the
    exact generic path (its exactness: tests/test_generic_path.py)."""
    from dpft.capture import plan_model
    from dpft.rules import FALLBACK

    bindings, _ = plan_model(Holder())
    (container,) = [b for b in bindings if b.name == "Holder"]
    assert container.rule is FALLBACK and container.params == {"scale"}


def test_bitfit_names():
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1, bias=False))
    assert dpft.bitfit(model) == ["0.bias", "1.bias"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.bias", "1.bias"]


def test_names_unchanged_and_any_optimizer():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    names = [n for n, _ in model.named_parameters()]
    engine = engine_for(model, noise_multiplier=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine.attach(opt)
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert [n for n, _ in model.named_parameters()] == names
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(engine.noise_multiplier)


class FunctionalUse(nn.Module):
    """Uses another module's bias outside that module (functionally)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x):
        return self.b(self.a(x)) + self.a.bias * x


def test_use_outside_module_is_caught():
    model = FunctionalUse()
    dpft.bitfit(model)
    engine = engine_for(model)
    engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    with pytest.raises(dpft.UnsupportedModuleError, match="a.bias"):
        model(torch.randn(8, 3)).pow(2).mean().backward()


class OnlyFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x) + nn.functional.linear(x, self.b.weight, self.b.bias)


@pytest.mark.parametrize("mode", ["ghost", "auto"])
def test_functional_only_use_is_exact(mode):
    """``b`` never runs (its parent reads its weight and bias): found in the
    first forward and handed to the parent's recomputation (issue 22)."""
    from reference import check_steps

    torch.manual_seed(0)
    check_steps(
        OnlyFunctional(),
        lambda: torch.randn(3),
        lambda xs: torch.stack(xs),
        lambda m, x: m(x).pow(2).sum(1).mean(),
        steps=3,
        batch_size=8,
        mode=mode,
    )


class UsedByTheLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)


def test_use_outside_the_forward_is_caught():
    """A use of a parameter outside the model's forward (in the loss) has no
    per-example account anywhere: refused, naming the parameter."""
    model = UsedByTheLoss()
    engine = engine_for(model, clipping_mode="ghost")
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(dpft.UnsupportedModuleError, match="a\\.weight"):
        (model.a(torch.randn(8, 3)).pow(2).mean() + model.a.weight.sum()).backward()


@pytest.mark.parametrize("where", ["loss", "one-example"])
def test_nonfinite_gradients_never_reach_parameters(where):
    model = mlp(bias_only=False)
    engine = engine_for(model, noise_multiplier=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    engine.attach(opt)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 4)
    if where == "one-example":
        x[3, 0] = float("inf")
        out = model(x)
    else:
        out = model(x) * float("nan")
    out.pow(2).mean().backward()
    with pytest.raises(FloatingPointError, match="not applied"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert engine.steps == 0 and not opt.state
    assert all(p.grad is None for p in model.parameters())  # the refused gradient is dropped
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()  # training goes on
    opt.step()
    assert engine.steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("accumulate", [False, True])
def test_nonfinite_examples_are_left_out_in_bias_only_mode(accumulate):
    """DP-BiTFiT never waits for the non-finite check: an example whose
    gradient is NaN/Inf contributes zero (on the device) and the others are
    applied exactly; the step is accounted and a warning gives the count."""
    from reference import clipped_mean, per_example_grads

    torch.manual_seed(0)
    model = mlp(bias_only=True).double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    x = torch.randn(8, 4, dtype=torch.float64)
    x[2, 1] = float("nan")
    x[5, 3] = float("nan")
    loss = lambda m, xb: m(xb).pow(2).sum(1).mean()  # noqa: E731
    good = [i for i in range(8) if i not in (2, 5)]
    grads = per_example_grads(model, names, [x[i : i + 1] for i in good], loss)
    want = clipped_mean(grads, [names], 0.3, "abadi", 8)  # the bad examples count in B but add zero
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = engine_for(model, max_grad_norm=0.3)
    assert engine._sum.drop_nonfinite
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine.attach(opt)
    halves = [x[:4], x[4:]] if accumulate else [x]
    for xb in halves:
        loss(model, xb).backward()  # a mean over the physical batch (the engine's default loss_reduction)
    with pytest.warns(RuntimeWarning, match="step 1: 2 example"):
        opt.step()
    assert engine.steps == 1
    for n, p in model.named_parameters():
        got = before[n] - p.detach()
        if n in want:
            assert torch.allclose(got, want[n], rtol=1e-9, atol=1e-12), n
        else:
            assert torch.equal(got, torch.zeros_like(got)), n
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean step warns about nothing
        loss(model, torch.randn(8, 4, dtype=torch.float64)).backward()
        opt.step()
    assert engine.steps == 2


class _MixesExamples(nn.Module):
    """Centers over the batch: every example's output depends on every input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.w


class _RowWise(nn.Module):
    """No rule, no mixing; scales its (cloned) input in place."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        y = x.clone()
        y.mul_(self.w)
        return torch.tanh(y)


@pytest.mark.parametrize("where", ["trainable", "frozen-rest"])
def test_fallback_module_that_mixes_examples_is_refused(where):
    """A module without a rule whose output for one example depends on other
    examples' inputs gets no per-example gradient with bounded influence:
    refused at the first backward (it used to pass silently: the sum of the
    fallback's per-row gradients equals autograd's, so no other check fires)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _MixesExamples(), nn.Linear(4, 2))
    if where == "frozen-rest":
        for p in [*model[0].parameters(), *model[2].parameters()]:
            p.requires_grad_(False)
    engine = engine_for(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine.attach(opt)
    with pytest.raises(dpft.UnsupportedModuleError, match="'1' .*mixes examples"):
        model(torch.randn(8, 3)).pow(2).sum().backward()


def test_fallback_module_that_keeps_examples_apart_is_exact():
    from reference import check_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _RowWise(), nn.Linear(4, 2)).double()
    examples = [torch.randn(5, 3, dtype=torch.float64) for _ in range(8)]
    for mode in ("auto", "ghost"):
        check_model(model, examples, torch.stack, lambda m, b: m(b).pow(2).sum(2).mean(1).mean(), mode=mode)


def test_batch_dimension_not_first_is_exact():
    """A layer run sequence-first (its leading dimension is not the batch) is
    handed to the enclosing module, whose output is batch-first (issue 22)."""
    from reference import check_steps

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):  # x: (B, T, 3) but the layer runs sequence-first
            return self.lin(x.transpose(0, 1)).transpose(0, 1)

    torch.manual_seed(0)
    check_steps(
        SeqFirst(),
        lambda: torch.randn(5, 3),
        lambda xs: torch.stack(xs),
        lambda m, x: m(x).pow(2).sum((1, 2)).mean(),
        steps=3,
        batch_size=8,
    )


def test_sequence_first_multihead_attention_is_exact():
    from layer_zoo import collate, loss_fn
    from reference import check_model

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=False)

        def forward(self, x):
            h = self.inp(x).transpose(0, 1)  # (T, B, E): MHA's own batch_first=False layout
            return self.attn(h, h, h, need_weights=False)[0].transpose(0, 1)

    check_model(M(), [torch.randn(5, 3) for _ in range(6)], collate, loss_fn)


def test_batch_size_does_not_leak_into_later_submodule_calls():
    """A one-example call of a submodule after a full forward must not be
    expanded to the previous batch size (each copy would be clipped separately)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    engine = engine_for(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(opt)
    model(torch.randn(8, 3)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    out = model[2](torch.randn(1, 4))
    assert out.shape == (1, 2)


def test_norms_and_sums_run_without_tf32_and_restore_user_setting(monkeypatch):
    """A user who turned TF32 on for float32 matrix products keeps it for the
    model, but dpft's per-example norms and clipped sums run in IEEE float32
    (a TF32 norm can come out ~0.1 % small); the setting is restored after."""
    mm = torch.backends.cuda.matmul
    conv = torch.backends.cudnn.conv
    if not (hasattr(mm, "fp32_precision") and hasattr(conv, "fp32_precision")):
        pytest.skip("this PyTorch has no per-backend fp32_precision settings")
    seen = []
    orig = dpft.clip.norms.bmm_acc

    def spy(x, y, dtype):
        seen.append((mm.fp32_precision, conv.fp32_precision))
        return orig(x, y, dtype)

    monkeypatch.setattr(dpft.clip.norms, "bmm_acc", spy)
    old = (mm.fp32_precision, conv.fp32_precision)
    try:
        mm.fp32_precision = "tf32"
        conv.fp32_precision = "tf32"
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        engine = engine_for(model, clipping_mode="ghost")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine.attach(opt)
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        assert seen and all(s == ("ieee", "ieee") for s in seen)
        assert (mm.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        mm.fp32_precision, conv.fp32_precision = old


def test_full_fp32_nests_and_restores_on_error():
    """``full_fp32`` sets IEEE float32 inside, leaves a setting that already
    is IEEE alone, and restores the user's settings on exit, nested or after
    an exception."""
    from dpft.precision import full_fp32

    mm = torch.backends.cuda.matmul
    conv = torch.backends.cudnn.conv
    if not (hasattr(mm, "fp32_precision") and hasattr(conv, "fp32_precision")):
        pytest.skip("this PyTorch has no per-backend fp32_precision settings")
    old = (mm.fp32_precision, conv.fp32_precision)
    try:
        mm.fp32_precision, conv.fp32_precision = "ieee", "tf32"
        with full_fp32():
            assert (mm.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
            with full_fp32():
                assert (mm.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
            assert (mm.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (mm.fp32_precision, conv.fp32_precision) == ("ieee", "tf32")
        mm.fp32_precision = "tf32"
        with pytest.raises(ValueError):
            with full_fp32():
                raise ValueError("inside")
        assert (mm.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        mm.fp32_precision, conv.fp32_precision = old


def test_fast_output_hooks_coexist_with_user_hooks():
    """dpft adds its output-gradient hooks without removable handles; a user's
    own hooks on the same tensors (registered after, and removed again) and
    retain_grad must keep working, in order."""
    from dpft.capture import _add_grad_hook

    w = torch.randn(3, requires_grad=True)
    y = w * 2
    seen = []
    _add_grad_hook(y, lambda g: seen.append("dpft"))
    h = y.register_hook(lambda g: seen.append("user"))
    y.retain_grad()
    _add_grad_hook(y, lambda g: seen.append("dpft2"))
    y.sum().backward(retain_graph=True)
    assert seen == ["dpft", "user", "dpft2"] and torch.equal(y.grad, torch.ones(3))
    h.remove()
    seen.clear()
    y.sum().backward()
    assert seen == ["dpft", "dpft2"]
    leaf = torch.randn(2, requires_grad=True)  # no grad_fn: the public path
    _add_grad_hook(leaf, lambda g: seen.append("leaf"))
    leaf.sum().backward()
    assert seen[-1] == "leaf"


def test_container_parameter_indexed_instead_of_broadcast_is_refused():
    """A container parameter used as ``self.tok[0]`` (not broadcast over the
    batch) would credit every example's gradient to example 0; refused."""

    class Indexed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.tok = nn.Parameter(torch.randn(1, 3))

        def forward(self, x):
            return self.lin(x + self.tok[0])

    model = Indexed()
    engine = engine_for(model)
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(dpft.UnsupportedModuleError, match="tok.*through example 0"):
        model(torch.randn(8, 3)).pow(2).mean().backward()

    class Broadcast(Indexed):
        def forward(self, x):
            return self.lin(x + self.tok)

    model = Broadcast()
    engine = engine_for(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(opt)
    model(torch.randn(8, 3)).pow(2).mean().backward()  # the usual way: accepted
    opt.step()


def test_noise_added_in_bounded_chunks(monkeypatch):
    """``GaussianNoise.add_`` never draws more than ``CHUNK`` values at once
    (no model-sized noise buffer), fills every entry (large contiguous tensors
    piece by piece, a large non-contiguous one whole) with fresh N(0, alpha^2)
    values, and is reproducible from the seed."""
    import dpft.clip.noise
    import dpft.clip.tuning

    monkeypatch.setattr(dpft.clip.tuning, "NOISE_CHUNK", 1000)
    sizes = []
    orig = dpft.clip.noise._draw
    monkeypatch.setattr(dpft.clip.noise, "_draw", lambda n, *a: sizes.append(n) or orig(n, *a))

    def draw(seed):
        ts = [torch.zeros(3, 5), torch.zeros(2500), torch.zeros(40, 30).t(), torch.zeros(7), torch.zeros(600)]
        dpft.clip.noise.GaussianNoise(seed).add_(ts, 2.0)
        return ts

    sizes.clear()
    ts = draw(1)
    big_noncontiguous = 1200
    assert max(sizes) <= 1000 or max(sizes) == big_noncontiguous
    assert sum(sizes) == sum(t.numel() for t in ts)
    assert len(sizes) > 4  # several chunks, not one buffer
    flat = torch.cat([t.reshape(-1) for t in ts])
    assert bool((flat != 0).all()) and len(torch.unique(flat)) == flat.numel()  # every entry, no reuse
    assert abs(float(flat.std()) - 2.0) < 0.1
    assert all(torch.equal(a, b) for a, b in zip(ts, draw(1)))
    assert not torch.equal(ts[1], draw(2)[1])


@pytest.mark.parametrize("bias_only", [True, False])
def test_few_garbage_collected_objects_per_hooked_module(bias_only):
    """Between a forward and its backward pass, dpft keeps only a few objects
    tracked by Python's garbage collector per hooked module (the call record,
    its hook, the hook table, the node's Python object, the saved input): the
    more there are, the more young-generation collections each step triggers
    and the more objects get promoted, until a full collection walks every
    object of the process.  Counted here (beyond 40 for the plain forward):
    3 per module bias-only and 5.5 with weights; 7 and 9.5 before the call
    record dropped its ``partial`` hook (with the argument tuple and bound
    method) and its two empty lists."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh()) for _ in range(12)]
    model = nn.Sequential(*blocks)
    if bias_only:
        dpft.bitfit(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = engine_for(model, batch_size=4)
    engine.attach(opt)
    x = torch.randn(4, 5, 8)
    for _ in range(3):  # past the first (cross-checked) passes
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        before = {id(o) for o in gc.get_objects()}
        out = model(x).sum()
        alive = [o for o in gc.get_objects() if id(o) not in before]
    finally:
        if was:
            gc.enable()
    hooked = 24
    per_module = (len(alive) - 40) / hooked  # 40: what a plain forward keeps (its tensors), generously
    assert per_module <= (5 if bias_only else 7), (per_module, sorted({type(o).__name__ for o in alive}))
    out.backward()
    opt.step()
