"""The generic path's substitution (issue 22, Measure): a module's own
parameters that meet the examples only in broadcasting element-wise
operations (layer scale, a relative position bias added to attention
logits, a norm's ``weight * x``) get each example's gradient from the
forward itself, with no recomputation of the module, once the first passes
have checked it against the reference pull-back.  Exact against the brute
force over several steps and batch sizes (per tensor), taken only where it
agreed and for calls that substitute as the verified ones did; refused
where a parameter meets the examples otherwise (a matmul) or where rows are
not example by example."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo_models as Z
from reference import clipped_mean, per_example_grads, pick_threshold

import dpft
from dpft.rules import fallback
from dpft.rules.fallback import FallbackRule

C, D, T, W = 4, 6, 4, 2  # channels, width, tokens per window, windows per example


class Counter:
    """Counts the generic path's computations: the reference pull-backs,
    the substitutions read (first passes: checked beside the reference) and
    the vectorized / looped passes."""

    def __init__(self, monkeypatch):
        self.reference = self.substituted = self.vectorized = self.looped = 0
        pulled, sub, vec, loop = (
            FallbackRule._pulled_back,
            fallback._substituted,
            fallback._vectorized,
            fallback._looped,
        )

        def counted_pull(rule, *a, **k):
            self.reference += 1
            return pulled(rule, *a, **k)

        def counted_sub(*a, **k):
            got = sub(*a, **k)
            self.substituted += got is not None
            return got

        def counted_vec(*a, **k):
            self.vectorized += 1
            return vec(*a, **k)

        def counted_loop(*a, **k):
            self.looped += 1
            return loop(*a, **k)

        monkeypatch.setattr(FallbackRule, "_pulled_back", counted_pull)
        monkeypatch.setattr(fallback, "_substituted", counted_sub)
        monkeypatch.setattr(fallback, "_vectorized", counted_vec)
        monkeypatch.setattr(fallback, "_looped", counted_loop)


# -- modules -----------------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block: depthwise conv, channels-last norm and MLP, a
    layer scale held by the block, ``x.mul(gamma.reshape(1, -1, 1, 1))``."""

    def __init__(self):
        super().__init__()
        self.conv_dw = nn.Conv2d(C, C, 3, padding=1, groups=C)
        self.norm = nn.LayerNorm(C)
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)
        self.gamma = nn.Parameter(torch.rand(C) + 0.5)

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.fc2(F.gelu(self.fc1(self.norm(x)))).permute(0, 3, 1, 2)
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return x + shortcut


class ConvNeXtModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 1)
        self.block = ConvNeXtBlock()
        self.head = nn.Linear(C, 3)

    def forward(self, x):  # (n, 3, 4, 4)
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class WindowAttention(nn.Module):
    """timm's Swin window attention: a relative position table indexed by a
    buffer, reshaped and added to the logits of the windows ``(n * W, heads,
    T, T)``, through ``scaled_dot_product_attention``'s mask (``fused``) or
    explicitly; a shifted block adds the windows' mask (one per window)."""

    def __init__(self, fused: bool, heads: int = 2):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.table = nn.Parameter(torch.randn(2 * T - 1, heads) * 0.5)
        pos = torch.arange(T)
        self.register_buffer("index", pos[:, None] - pos[None, :] + T - 1)

    def _bias(self):
        bias = self.table[self.index.view(-1)].view(T, T, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x, mask=None):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            bias = self._bias()
            if mask is not None:
                w = mask.shape[0]
                bias = bias + mask.view(1, w, 1, t, t).expand(b // w, -1, self.heads, -1, -1).reshape(
                    -1, self.heads, t, t
                )
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            attn = attn + self._bias()
            if mask is not None:
                w = mask.shape[0]
                attn = (attn.view(-1, w, self.heads, t, t) + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.heads, t, t)
            x = attn.softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, t, -1))


class SwinModel(nn.Module):
    """Examples' windows flattened into the batch dimension, example by example."""

    def __init__(self, fused: bool = True, shifted: bool = False):
        super().__init__()
        self.attn = WindowAttention(fused)
        self.register_buffer("mask", torch.randn(W, T, T) if shifted else None)
        self.head = nn.Linear(D, 3)

    def forward(self, x):  # (n, W * T, D)
        n = x.shape[0]
        h = self.attn(x.reshape(n * W, T, D), self.mask)
        return self.head(h.reshape(n, -1, D).mean(1))


class WindowMajor(WindowAttention):
    """Takes the examples batch-first ``(n, W * T, D)`` and flattens their
    windows window by window inside: the rows where the table meets the
    examples are not example by example."""

    def forward(self, x):
        n = x.shape[0]
        h = super().forward(x.reshape(n, W, T, D).transpose(0, 1).reshape(-1, T, D))
        return h.view(W, n, T, D).transpose(0, 1).reshape(n, W * T, D)


class RMSNorm(nn.Module):
    """A custom norm (a leaf module of an unknown type): ``weight * x``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class NormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.norm = RMSNorm()
        self.head = nn.Linear(D, 3)

    def forward(self, x):  # (n, T, D)
        return self.head(self.norm(torch.tanh(self.fc(x))).mean(1))


class InplaceScale(nn.Module):
    """timm's ``LayerScale(inplace=True)``: ``x.mul_(gamma)``, beside a
    scalar times a view of another parameter (``Tensor.__rmul__``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.gamma = nn.Parameter(torch.rand(D) + 0.5)
        self.beta = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x):
        h = torch.tanh(self.fc(x)) * 1.0
        return 2.0 * self.beta.view(1, 1, -1) + h.mul_(self.gamma)


class TwiceModel(ConvNeXtModel):
    """One layer-scale block applied twice in a forward: two calls."""

    def forward(self, x):
        return self.head(self.block(self.block(self.stem(x))).mean((2, 3)))


class Mixer(nn.Module):
    """A parameter that meets the examples in a matmul: no substitution."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.w = nn.Parameter(torch.randn(D, D) * 0.4)

    def forward(self, x):
        return torch.tanh(self.fc(x)) @ (self.w * 2.0)


class SizeDependent(nn.Module):
    """A layer scale whose use depends on the batch size: from batches of 5
    on, it meets the examples in a matmul (a call that substitutes
    otherwise than the verified ones)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.gamma = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return h @ torch.diag(self.gamma) if x.shape[0] >= 5 else h * self.gamma


class TokenModel(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(1))


# -- the check ---------------------------------------------------------------------------------------


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _compare(got, want, where, tol=1e-6):
    """Each tensor's update against the brute force's (relative error; a
    tensor whose update is below 1e-6 of the whole update's norm is measured
    against that floor, so that float64 rounding is not compared with itself)."""
    total = math.sqrt(sum(float(w.pow(2).sum()) for w in want.values()))
    for k, w in want.items():
        err = float((got[k] - w).norm()) / max(float(w.norm()), 1e-6 * total, 1e-300)
        assert err <= tol, f"{where}: {k} off by {err:.3e}"


def _steps(model, shape, sizes, tol=1e-6):
    """dpft steps (noise 0, SGD lr 1, clipping some examples) on batches of
    the given sizes, each update checked tensor by tensor against the
    brute-force clipped mean at the current weights."""
    model = model.double()
    ref = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in sizes:
        x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
        batches.append(((x, y), [(x[i : i + 1], y[i : i + 1]) for i in range(n)]))
    R = pick_threshold(per_example_grads(ref, names, batches[0][1], _loss))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0
        engine = dpft.PrivacyEngine(
            model,
            batch_size=max(sizes),
            sample_size=1000,
            steps=100,
            noise_multiplier=0.0,
            max_grad_norm=R,
        )
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine.attach(opt)
    try:
        for step, (batch, singles) in enumerate(batches):
            ref.load_state_dict(model.state_dict())
            want = clipped_mean(
                per_example_grads(ref, names, singles, _loss),
                [names],
                R,
                "abadi",
                max(sizes),
            )
            before = {k: params[k].detach().clone() for k in names}
            _loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
            _compare(
                {k: before[k] - params[k].detach() for k in names},
                want,
                f"step {step}",
                tol,
            )
    finally:
        engine.detach()
    return model


def _memo(module):
    return next(iter(fallback._MEMOS[module].values()))


SIZES = [4, 3, 4, 5, 4]


@pytest.mark.parametrize(
    "case",
    [
        "convnext",
        "convnext-twice",
        "in-place",
        "swin-fused",
        "swin-fused-shifted",
        "swin-explicit",
        "swin-explicit-shifted",
        "rmsnorm",
    ],
)
def test_substitution_after_the_first_passes(monkeypatch, case):
    """The first two passes compute the reference and check substitution
    beside it; the three after read the substitution alone (no reference,
    no vectorized pass)."""
    count = Counter(monkeypatch)
    torch.manual_seed(0)
    calls = 1
    if case == "convnext":
        model, shape, module = ConvNeXtModel(), (3, 4, 4), "block"
    elif case == "convnext-twice":
        model, shape, module, calls = TwiceModel(), (3, 4, 4), "block", 2
    elif case == "rmsnorm":
        model, shape, module = NormModel(), (T, D), "norm"
    elif case == "in-place":
        model, shape, module = TokenModel(InplaceScale()), (T, D), "body"
    else:
        model = SwinModel(fused="fused" in case, shifted="shifted" in case)
        shape, module = (W * T, D), "attn"
    model = _steps(model, shape, SIZES)
    body = getattr(model, module)
    assert _memo(body).subst is True and fallback.computation(body) == "substitution"
    assert (count.reference, count.substituted) == (2 * calls, 5 * calls)
    assert count.vectorized + count.looped <= 2 * calls  # (tried beside the reference in the first passes only)


def test_parameter_in_a_matmul_is_not_substituted(monkeypatch):
    count = Counter(monkeypatch)
    torch.manual_seed(0)
    model = _steps(TokenModel(Mixer()), (T, D), SIZES)
    assert _memo(model.body).subst is False and count.substituted == 0
    assert fallback.computation(model.body) == "vmap"


def test_rows_not_example_major_are_refused(monkeypatch):
    """Windows flattened window by window: the rows of an example are not
    contiguous, substitution's per-example sums are wrong, the first pass's
    check refuses it and the vectorized pass (which verified its own
    reading) serves every step exactly."""
    count = Counter(monkeypatch)
    torch.manual_seed(0)
    model = _steps(TokenModel(WindowMajor(fused=True)), (W * T, D), SIZES)
    assert _memo(model.body).subst is False
    assert count.substituted == 1  # (read once beside the reference: it disagreed, never again)
    assert fallback.computation(model.body) == "vmap"


def test_a_call_substituted_otherwise_takes_the_other_paths(monkeypatch):
    """Verified on batches of 4 and 3; a batch of 5 meets the parameter in a
    matmul (the call is not substituted): the vectorized pass verified for
    that layout serves it, or the reference, and the batch of 4 after it is
    substituted again."""
    count = Counter(monkeypatch)
    torch.manual_seed(0)
    model = _steps(TokenModel(SizeDependent()), (T, D), SIZES)
    assert _memo(model.body).subst is True
    assert count.substituted == 4  # (steps 1, 2, 3 and 5)
    assert count.reference + count.vectorized + count.looped >= 3


def test_substitution_leaves_the_forward_unchanged():
    """The mode substitutes equal values: the model's output with the engine
    attached equals the plain output, bit for bit."""
    torch.manual_seed(0)
    model = SwinModel(fused=True, shifted=True).double()
    x = torch.randn(4, W * T, D, dtype=torch.float64)
    plain = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model,
            batch_size=4,
            sample_size=100,
            steps=10,
            noise_multiplier=0.0,
            max_grad_norm=1.0,
        )
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        assert torch.equal(model(x), plain)
    finally:
        engine.detach()


class Failing(ConvNeXtBlock):
    def forward(self, x):
        x = super().forward(x)
        if self.fail:
            raise ValueError("the model's own error")
        return x


def test_a_forward_that_raises_leaves_no_mode_behind():
    """The mode is left in the forward hook, which runs even when the
    module's forward raises: later code runs without it."""
    torch.manual_seed(0)
    model = ConvNeXtModel().double()
    model.block = Failing().double()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model, batch_size=3, sample_size=100, steps=10, noise_multiplier=0.0, max_grad_norm=1.0
        )
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        depth = torch._C._len_torch_function_stack()
        model.block.fail = True
        with pytest.raises(ValueError, match="own error"):
            model(x)
        assert torch._C._len_torch_function_stack() == depth
        model.block.fail = False
        model(x).sum().backward()
        assert torch._C._len_torch_function_stack() == depth
    finally:
        engine.detach()


# -- real timm models (tiny configs) --------------------------------------------------------------


@pytest.fixture
def _forget_timm():
    """timm may be imported over the test-only torchvision stand-in: leave it
    unimported after the test, as the rest of the suite expects."""
    yield
    Z.forget_timm()


@pytest.mark.parametrize("name", ["timm-convnext", "timm-swin"])
def test_timm_models_take_substitution(monkeypatch, name, _forget_timm):
    """timm's ConvNeXt (layer scale) and Swin (relative position tables,
    shifted and unshifted windows): every generic-path module takes
    substitution after the first passes, exact at every step."""
    if not Z.timm_installed():
        pytest.skip("timm is not installed")
    count = Counter(monkeypatch)
    torch.manual_seed(0)
    arch = Z.timm_zoo()[name]
    model = arch.build().double()
    ref = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in (3, 2, 3, 3):
        batch = {k: v.double() if v.is_floating_point() else v for k, v in arch.make(n, g).items()}
        singles = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(n)]
        batches.append((batch, singles))
    R = pick_threshold(per_example_grads(ref, names, batches[0][1], arch.loss))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model,
            batch_size=3,
            sample_size=1000,
            steps=100,
            noise_multiplier=0.0,
            max_grad_norm=R,
        )
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine.attach(opt)
    try:
        generic = sorted({m for m in engine.generic_path().values()})
        for step, (batch, singles) in enumerate(batches):
            ref.load_state_dict(model.state_dict())
            want = clipped_mean(
                per_example_grads(ref, names, singles, arch.loss),
                [names],
                R,
                "abadi",
                3,
            )
            before = {k: params[k].detach().clone() for k in names}
            arch.loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
            _compare({k: before[k] - params[k].detach() for k in names}, want, f"step {step}")
    finally:
        engine.detach()
    modules = dict(model.named_modules())
    generic_modules = [m for m in modules.values() if m in fallback._MEMOS]
    assert generic_modules, generic
    assert all(fallback.computation(m) == "substitution" for m in generic_modules)
    k = len(generic_modules)
    assert (count.reference, count.substituted) == (2 * k, 4 * k)
