"""The same exactness checks on a CUDA device (skipped without one)."""

import copy
import warnings

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
        torch.nn.Linear(16, 64),
        torch.nn.GELU(),
        torch.nn.LayerNorm(64),
        torch.nn.Linear(64, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 4),
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


@pytest.mark.parametrize("where", ["loss", "one-example", "first-of-two-passes"])
def test_nonfinite_examples_left_out_on_cuda_bias_only(where):
    """DP-BiTFiT on CUDA does not wait for the non-finite check: the bad
    examples are left out on the device (the update equals the one without
    them) and the warning with their count comes once the count is known."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 3)).cuda()
    dpft.bitfit(model)
    ref = copy.deepcopy(model)
    xs = [torch.randn(8, 4, device="cuda") for _ in range(2)]
    bad_pass = 0 if where == "first-of-two-passes" else 1

    def run(m, drop_bad):
        params = [p for p in m.parameters() if p.requires_grad]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # noise 0: epsilon is infinite
            engine = dpft.PrivacyEngine(
                m, batch_size=16, sample_size=1000, steps=10, noise_multiplier=0.0, max_grad_norm=0.1
            )
        opt = torch.optim.SGD(params, lr=1.0)
        engine.attach(opt)
        for i, x in enumerate(xs):
            bad = i == bad_pass
            if bad and drop_bad:
                if where != "one-example":
                    continue  # every example of the pass is bad
                x = torch.cat([x[:3], x[4:]])
            elif bad and where == "one-example":
                x = x.clone()
                x[3, 0] = float("nan")  # (an inf input can give finite bias gradients through tanh)
            out = m(x)
            if bad and not drop_bad and where != "one-example":
                out = out * float("nan" if where == "loss" else "inf")
            out.pow(2).mean().backward()
        opt.step()
        return engine

    want = run(ref, drop_bad=True)
    with pytest.warns(RuntimeWarning, match=f"step 1: {1 if where == 'one-example' else 8} example"):
        engine = run(model, drop_bad=False)
        engine.detach()  # waits for the count
    assert engine.steps == 1
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    want.detach()


@pytest.mark.parametrize("where", ["loss", "one-example", "first-of-two-passes"])
def test_nonfinite_refused_on_cuda(where):
    """Full fine-tuning on CUDA: the step waits for the non-finite flag through an
    event (not a full synchronization): the refusal must still be reliable, also
    when the bad example is in the first of two accumulated backward passes."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 3)).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    engine = dpft.PrivacyEngine(model, batch_size=16, sample_size=1000, steps=10, noise_multiplier=1.0)
    opt = torch.optim.Adam(params, lr=0.1)
    engine.attach(opt)
    before = [p.detach().clone() for p in params]
    for i in range(2):
        x = torch.randn(8, 4, device="cuda")
        bad = (where == "first-of-two-passes" and i == 0) or (where != "first-of-two-passes" and i == 1)
        if bad and where == "one-example":
            x[3, 0] = float("nan")  # (an inf input can give finite bias gradients through tanh)
        out = model(x)
        if bad and where == "loss":
            out = out * float("nan")
        if bad and where == "first-of-two-passes":
            out = out * float("inf")
        out.pow(2).mean().backward()
    with pytest.raises(FloatingPointError, match="not applied"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert engine.steps == 0 and not opt.state and all(p.grad is None for p in params)
    opt.zero_grad()
    for _ in range(3):  # training goes on; finite steps are applied
        model(torch.randn(16, 4, device="cuda")).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert engine.steps == 3 and all(torch.isfinite(p).all() for p in params)
    assert not all(torch.equal(a, p) for a, p in zip(before, params))


def test_conv_weight_gradient_kernel_float32_is_not_tf32():
    """The clipped sum of a convolution weight comes from cuDNN's weight-gradient
    kernel; PyTorch lets cuDNN use TF32 for float32 convolutions by default
    (relative error ~1e-3), which dpft switches off around its own calls: the
    float32 result must match float64 to float32 accuracy."""
    from torch import nn

    from dpft.rules.conv import ConvFactored

    flags = getattr(torch.backends.cudnn, "conv", None)
    before = getattr(flags, "fp32_precision", None)
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3, padding=1).cuda()
    x = torch.randn(8, 64, 28, 28, device="cuda")
    g = torch.randn(8, 128, 28, 28, device="cuda")
    w = torch.rand(8, device="cuda")
    got = ConvFactored(conv, x, g, 8).weighted(w, torch.float32)
    conv64 = nn.Conv2d(64, 128, 3, padding=1).cuda().double()
    want = ConvFactored(conv64, x.double(), g.double(), 8).weighted(w.double(), torch.float64)
    rel = float((got.double() - want).norm() / want.norm())
    assert rel < 1e-5, rel
    assert getattr(flags, "fp32_precision", None) == before  # the user's setting is left as it was


@pytest.mark.parametrize("mode", ["ghost", "instantiate", "mixed"])
def test_float32_clipped_sum_exact_with_user_tf32_on(mode):
    """The user enables TF32 for float32 matrix products; dpft's per-example
    norms and clipped sum of float32 factors still match float64 to float32
    accuracy (TF32 would be off by ~1e-3), and the setting is restored."""
    from torch import nn

    from dpft.clip.clipped_sum import ClippedSum
    from dpft.rules.base import Factored

    mm = torch.backends.cuda.matmul
    if not hasattr(mm, "fp32_precision"):
        pytest.skip("this PyTorch has no per-backend fp32_precision setting")
    torch.manual_seed(0)
    n, t, p, d = 16, 64, 512, 256
    left = torch.randn(n, t, 1, p, device="cuda")
    right = torch.randn(n, t, 1, d, device="cuda")
    weight = nn.Parameter(torch.zeros(p, d, device="cuda"))
    g64 = torch.einsum("ntp,ntd->npd", left[:, :, 0].double(), right[:, :, 0].double())
    norms = g64.flatten(1).norm(dim=1)
    R = float(norms.median())
    want = (torch.clamp(R / norms, max=1.0).view(-1, 1, 1) * g64).sum(0)
    old = mm.fp32_precision
    try:
        mm.fp32_precision = "tf32"
        cs = ClippedSum({"w": weight}, [["w"]], R, "abadi", mode)
        cs.add({"w": [Factored(left=left, right=right, shape=weight.shape)]}, n, 1.0)
        assert mm.fp32_precision == "tf32"
    finally:
        mm.fp32_precision = old
    got = cs.sums["w"].double()
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-5, rel


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nonfinite_refused_when_model_is_not_on_the_current_device():
    """The flag's event must be recorded on the flag's device (a model on
    cuda:1 while cuda:0 is current)."""
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 3)).to("cuda:1")
    engine = dpft.PrivacyEngine(model, batch_size=8, sample_size=1000, steps=10, noise_multiplier=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.cuda.device(0):
        x = torch.randn(8, 4, device="cuda:1")
        x[2, 1] = float("nan")
        model(x).pow(2).mean().backward()
        with pytest.raises(FloatingPointError, match="not applied"):
            opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_switched_off_lane_steps_exact_on_cuda():
    """Past the first backward passes the lane (biases) is switched off for
    autograd and the first layer's output tied to the graph through a scalar
    on the output's device (a CPU scalar would make the backward pass hop
    between autograd's device threads).  Several steps, each exact."""
    from reference import steps_exact, tensor_batches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(5), torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double().cuda()
    dpft.bitfit(model)
    batches = tensor_batches(lambda: torch.randn(6, 3, 5, dtype=torch.float64, device="cuda"), 4)
    engine = steps_exact(
        model, copy.deepcopy(model), batches, lambda m, b: m(b).pow(2).sum(-1).mean(), batch_size=6, R=0.05, tol=1e-9
    )
    leaves = engine._capture._tap_leaves
    assert leaves and all(t.is_cuda for t in leaves.values())


def _needs_triton():
    from dpft.clip import ghost_kernel

    if not ghost_kernel.triton_ok():
        pytest.skip("Triton is not importable")
    return ghost_kernel


@pytest.mark.parametrize(
    "n,t,d,p",
    [
        (3, 129, 33, 70),
        (5, 197, 768, 96),
        (2, 300, 64, 64),
        (1, 130, 8, 8),
        (4, 256, 100, 2304),
        (6, 1, 40, 24),
        (4, 50, 30, 20),
    ],
)
def test_fused_ghost_norm_matches_float64(n, t, d, p):
    """The fused ghost-norm kernel (upper-triangular tiles of both Gram
    matrices, tf32x3 products) against float64 ``||A_i^T G_i||^2``: positions
    and columns that are not whole tiles, an input that is a strided view,
    and examples of very different scales."""
    gk = _needs_triton()
    torch.manual_seed(0)
    wide = torch.randn(n, t, d + 5, device="cuda")
    a = wide[:, :, 2 : 2 + d]  # rows of stride d + 5
    g = torch.randn(n, t, p, device="cuda") * torch.logspace(-3, 3, n, device="cuda").view(n, 1, 1)
    assert gk.usable(a, g, torch.float32)
    got = gk.ghost_sq_norm(a, g).double()
    want = torch.einsum("ntd,ntp->ndp", a.double(), g.double()).flatten(1).pow(2).sum(1)
    rel = float(((got - want).abs() / want).max())
    assert rel < 1e-6, rel


def test_fused_ghost_norm_applies_only_where_it_should():
    gk = _needs_triton()
    a = torch.randn(2, 197, 16, device="cuda")
    g = torch.randn(2, 197, 8, device="cuda")
    assert gk.usable(a, g, torch.float32)
    assert not gk.usable(a, g, torch.float64)  # float64 accumulation keeps cuBLAS's float64 products
    assert not gk.usable(a.double(), g.double(), torch.float64)
    assert not gk.usable(a.bfloat16(), g.bfloat16(), torch.float32)
    wide_a, wide_g = torch.randn(2, 100, 2000, device="cuda"), torch.randn(2, 100, 2000, device="cuda")
    assert not gk.usable(wide_a, wide_g, torch.float32)  # 6 programs over 4000 columns: cuBLAS
    assert gk.usable(
        torch.randn(32, 100, 2000, device="cuda"), torch.randn(32, 100, 2000, device="cuda"), torch.float32
    )
    assert not gk.usable(a.mT.contiguous().mT, g, torch.float32)  # columns not contiguous
    assert not gk.usable(a.cpu(), g.cpu(), torch.float32)


@pytest.mark.parametrize("layout", ["single", "shared", "stacked"])
def test_clipped_sum_uses_fused_ghost_norm_exactly(monkeypatch, layout):
    """In ghost mode a float32 layer over 197 positions takes its norm from the
    fused kernel (calls counted): layer by layer (``single``: two layers of
    different shapes) and for same-shaped layers stacked into one batch
    (``stacked``: one call for both).  Layers reading one input (``shared``,
    like query / key / value) keep cuBLAS's Gram matrices, the shared one
    computed once.  Every clipped sum matches float64."""
    gk = _needs_triton()
    from torch import nn

    from dpft.clip.clipped_sum import ClippedSum
    from dpft.rules.base import Factored

    calls = []
    real = gk.ghost_sq_norm
    monkeypatch.setattr(gk, "ghost_sq_norm", lambda a, g: calls.append(tuple(a.shape)) or real(a, g))
    torch.manual_seed(0)
    n, t, p = 8, 197, 96
    ds = [160, 160] if layout == "stacked" else [160, 72]
    left = torch.randn(n, t, 1, p, device="cuda")
    lefts = [left, left] if layout == "shared" else [left, torch.randn(n, t, 1, p, device="cuda")]
    rights = [torch.randn(n, t, 1, d, device="cuda") * (1 + k) for k, d in enumerate(ds)]
    weights = {f"w{k}": nn.Parameter(torch.zeros(p, d, device="cuda")) for k, d in enumerate(ds)}
    g64 = {
        f"w{k}": torch.einsum("ntp,ntd->npd", lefts[k][:, :, 0].double(), rights[k][:, :, 0].double()) for k in range(2)
    }
    norms = sum(g.flatten(1).pow(2).sum(1) for g in g64.values()).sqrt()
    R = float(norms.median())
    scale = torch.clamp(R / norms, max=1.0).view(-1, 1, 1)
    cs = ClippedSum(weights, [list(weights)], R, "abadi", "ghost")
    cs.add(
        {f"w{k}": [Factored(left=lefts[k], right=rights[k], shape=torch.Size((p, d)))] for k, d in enumerate(ds)},
        n,
        1.0,
    )
    assert calls == {"single": [(n, t, p)] * 2, "shared": [], "stacked": [(2 * n, t, p)]}[layout]
    for name, g in g64.items():
        want = (scale * g).sum(0)
        rel = float((cs.sums[name].double() - want).norm() / want.norm())
        assert rel < 1e-5, (name, rel)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_fused_ghost_norm_on_a_device_that_is_not_current():
    """Triton launches on the current device: factors on cuda:1 while cuda:0
    is current must still give the right norms (on cuda:1)."""
    gk = _needs_triton()
    torch.manual_seed(0)
    a = torch.randn(8, 197, 64, device="cuda:1")
    g = torch.randn(8, 197, 48, device="cuda:1")
    with torch.cuda.device(0):
        got = gk.ghost_sq_norm(a, g)
    assert got.device == a.device
    want = torch.einsum("ntd,ntp->ndp", a.double(), g.double()).flatten(1).pow(2).sum(1)
    assert float(((got.double() - want).abs() / want).max()) < 1e-6


# --------------------------------------------------------------------------
# noise generators on the GPU (Philox): full key and offset, exact round trip


def _cuda_noise(seed, n=4096, **kw):
    from dpft.clip.noise import GaussianNoise

    t = torch.zeros(n, device="cuda")
    GaussianNoise(seed, **kw).add_([t], 1.0)
    return t.cpu()


@pytest.mark.parametrize("bit", [32, 63, 64, 100, 200])
def test_cuda_seeds_differing_only_in_high_bits_give_different_noise(bit):
    s = 0x1234_5678
    assert not torch.equal(_cuda_noise(s), _cuda_noise(s + 2**bit))
    assert torch.equal(_cuda_noise(s + 2**bit), _cuda_noise(s + 2**bit))


def test_cuda_default_generator_is_keyed_and_offset_from_os_entropy(monkeypatch):
    """Without a seed the CUDA generator's Philox key (64 bits) and counter
    offset (62 bits, a multiple of 4) come from ``secrets``, as independent
    words, and the generator's state is exactly that."""
    import secrets
    import struct

    import numpy as np

    import dpft.clip.noise

    taken = []
    real = secrets.token_bytes

    def spy(n):
        b = real(n)
        taken.append(b)
        return b

    monkeypatch.setattr(dpft.clip.noise.secrets, "token_bytes", spy)
    g = dpft.clip.noise.GaussianNoise().generator(torch.device("cuda"))
    assert len(taken) == 1 and len(taken[0]) == 16
    w = [int(x) for x in np.frombuffer(taken[0], dtype=np.uint32)]
    key, offset = struct.unpack("<QQ", bytes(g.get_state().numpy()))
    assert key == w[0] | w[1] << 32
    assert offset == 4 * ((w[2] | w[3] << 32) >> 2) and offset % 4 == 0
    assert g.initial_seed() == key


def test_cuda_philox_key_and_offset_both_matter():
    from dpft.clip.noise import philox_state

    def draw(key, offset):
        g = torch.Generator(device="cuda")
        g.set_state(philox_state(key, offset))
        return torch.randn(1000, device="cuda", generator=g).cpu()

    base = draw(2**63 + 5, 4 * 2**50)
    assert torch.equal(base, draw(2**63 + 5, 4 * 2**50))
    assert not torch.equal(base, draw(5, 4 * 2**50))  # high key bit
    assert not torch.equal(base, draw(2**63 + 5, 4 * 2**50 + 2**40))  # high offset bits


@pytest.mark.parametrize("secure", [False, True])
def test_cuda_state_round_trip(secure):
    from dpft.clip.noise import GaussianNoise

    a = GaussianNoise(secure=secure)
    a.add_([torch.zeros(10_000, device="cuda")], 1.0)
    b = GaussianNoise(secure=secure)
    b.load_state_dict(a.state_dict())
    ta, tb = torch.zeros(10_000, device="cuda"), torch.zeros(10_000, device="cuda")
    a.add_([ta], 2.0, divide=3)
    b.add_([tb], 2.0, divide=3)
    assert torch.equal(ta, tb)


def test_cuda_secure_mode_sum_and_single_rounding():
    from dpft.clip.noise import SECURE_DRAWS, GaussianNoise

    alpha, divide = 0.9, 16
    t = torch.linspace(-2.0, 2.0, 1_000_000, device="cuda")
    out = t.clone()
    GaussianNoise(3, secure=True).add_([out], alpha, divide=divide)
    gens = GaussianNoise(3, secure=True).generators(torch.device("cuda"))
    assert len(gens) == SECURE_DRAWS
    z = sum(
        torch.empty(t.numel(), device="cuda", dtype=torch.float64).normal_(0.0, alpha / 2, generator=g) for g in gens
    )
    assert torch.equal(out, ((t.double() + z) / divide).float())
    noise = (out.double() * divide - t.double()) / alpha
    assert abs(float(noise.std()) - 1.0) < 0.01 and abs(float(noise.mean())) < 0.01


def test_cuda_engine_resume_gives_the_same_noise():
    import torch.nn as nn

    def make():
        torch.manual_seed(0)
        model = nn.Linear(3, 300).cuda()
        dpft.bitfit(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = dpft.PrivacyEngine(
                model, batch_size=4, sample_size=40, steps=10, noise_multiplier=1.0, poisson=False
            )
        opt = torch.optim.SGD([model.bias], lr=1.0)
        engine.attach(opt)
        return model, engine, opt

    def step(model, opt):
        model(torch.ones(4, 3, device="cuda")).sum().mul(0).backward()
        opt.step()
        opt.zero_grad()

    m1, e1, o1 = make()
    step(m1, o1)
    m2, e2, o2 = make()
    e2.load_state_dict(e1.state_dict())
    with torch.no_grad():
        m2.bias.copy_(m1.bias)
    step(m1, o1)
    step(m2, o2)
    assert torch.equal(m1.bias, m2.bias)


def test_generic_path_called_with_keywords_replays_cuda_dropout():
    """A generic-path module called with keyword arguments only (as Hugging
    Face calls T5's stacks) with dropout inside, on the GPU: its
    recomputation must replay the CUDA generator's state, or the first
    passes' check (per-example sums against autograd's gradient) refuses it
    (T5-base on an H100 before the fix)."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)
            self.drop = torch.nn.Dropout(0.3)
            self.gamma = torch.nn.Parameter(torch.ones(16))

        def forward(self, *, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.lin(x)) @ torch.diag(self.gamma)  # (a matrix product: no substitution)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Scaled()
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(x=x)).mean(1)

    torch.manual_seed(0)
    model = Net().cuda().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(model, batch_size=8, sample_size=800, steps=10, noise_multiplier=1.0)
        opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        x = torch.randn(8, 5, 16, device="cuda")
        torch.nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,), device="cuda")).backward()
        opt.step()
        opt.zero_grad()
    assert "block.gamma" in engine.generic_path()
