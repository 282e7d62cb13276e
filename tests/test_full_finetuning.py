"""Full / any-subset fine-tuning: styles, groups, LoRA, mixed precision, memory."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from layer_zoo import ZOO, collate, loss_fn
from reference import check_model, dpft_update

import dpft
import dpft.clip.norms
import dpft.clip.tuning
from dpft.rules.base import Direct, Factored

B = 6


def test_layer_wise_style():
    model = ZOO["layernorm"][0]()
    examples = [ZOO["layernorm"][1]() for _ in range(B)]
    groups = [["0.weight", "0.bias"], ["1.weight", "1.bias"], ["2.weight", "2.bias"]]
    # layer-wise = one group per module; compared with the explicit groups reference
    check_model(copy.deepcopy(model), examples, collate, loss_fn, style=groups)
    check_model(model, examples, collate, loss_fn, style="layer-wise")


def test_explicit_groups_any_split():
    model = ZOO["embedding-tied"][0]()
    examples = [ZOO["embedding-tied"][1]() for _ in range(B)]
    names = [n for n, _ in model.named_parameters()]
    groups = [names[:2], names[2:]]
    check_model(model, examples, collate, loss_fn, style=groups, splits=[4, 2])


def test_last_layers_and_head_only():
    model = ZOO["conv2d"][0]()
    for p in model[:2].parameters():
        p.requires_grad_(False)
    examples = [ZOO["conv2d"][1]() for _ in range(B)]
    check_model(model, examples, collate, loss_fn)


def test_peft_lora():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(5, 6)
            self.v = nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.v(torch.tanh(self.q(x)))))

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], lora_dropout=0.0, modules_to_save=["head"])
    model = peft.get_peft_model(Net(), config)
    # LoRA B starts at zero: randomize so the test is not trivial
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("head" in n for n in trainable)
    examples = [torch.randn(3, 5) for _ in range(B)]
    check_model(model, examples, collate, loss_fn, splits=[3, 3])


class LayerNormSub(nn.LayerNorm):
    """Like timm's LayerNorm: a subclass with its own forward."""

    def forward(self, x):
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """Channel-first LayerNorm (timm's LayerNorm2d)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("subset", ["bias", "all"])
def test_layernorm_subclasses(subset):
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), LayerNorm2d(4), nn.Tanh(), nn.Flatten(2), nn.Linear(9, 4), LayerNormSub(4)
    )
    if subset == "bias":
        dpft.bitfit(model)
    check_model(model, [torch.randn(2, 5, 5) for _ in range(B)], collate, loss_fn)


def test_bk_never_instantiates_where_ghost_is_cheaper(monkeypatch):
    # p*d = 512*512 >> 2 T^2 = 2*4^2: instantiation would need B*p*d floats
    model = nn.Sequential(nn.Linear(8, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 2))
    x = torch.randn(B, 4, 8)
    called = []
    real = dpft.clip.norms.instantiate

    def spy(c, dtype):
        if not isinstance(c, Direct):  # (a gradient instantiated during backward is passed on as is)
            called.append(tuple(c.shape))
        return real(c, dtype)

    monkeypatch.setattr(dpft.clip.norms, "instantiate", spy)
    got, _ = dpft_update(model, [x], lambda m, b: m(b).pow(2).mean(), batch_size=B, R=0.1, mode="auto")
    assert (512, 512) not in called
    monkeypatch.setattr(dpft.clip.norms, "instantiate", real)
    called.clear()
    # and instantiate mode does build them (the spy is able to see it)
    monkeypatch.setattr(dpft.clip.norms, "instantiate", spy)
    dpft_update(copy.deepcopy(model), [x], lambda m, b: m(b).pow(2).mean(), batch_size=B, R=0.1, mode="instantiate")
    assert (512, 512) in called


def test_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(B, 5, 8)

    def loss(m, b):
        return m(b).float().pow(2).mean()

    ref, _ = dpft_update(copy.deepcopy(model), [x], loss, batch_size=B, R=0.05)

    def amp_loss(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(b)
        return out.float().pow(2).mean()

    got, _ = dpft_update(copy.deepcopy(model), [x], amp_loss, batch_size=B, R=0.05)
    num = math.sqrt(sum(float((got[k] - ref[k]).pow(2).sum()) for k in ref))
    den = math.sqrt(sum(float(ref[k].pow(2).sum()) for k in ref))
    assert num / den < 3e-2
    assert all(got[k].dtype == torch.float32 for k in got)


def test_mha_dropout_in_train_mode_is_consistent():
    """The fallback recomputes with the forward's RNG state: the per-example
    gradients sum to autograd's gradient even with attention dropout."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 2, dropout=0.5, batch_first=True)
    model = nn.Sequential()
    model.add_module("inp", nn.Linear(3, 6))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 6)
            self.attn = mha

        def forward(self, x):
            h = self.inp(x)
            return self.attn(h, h, h, need_weights=False)[0]

    model = Wrap().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model, batch_size=B, sample_size=100, steps=5, noise_multiplier=0.0, max_grad_norm=1e6
        )
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine.attach(opt)
    x = torch.randn(B, 4, 3)
    torch.manual_seed(5)
    model(x).pow(2).mean().backward()  # the engine's consistency check compares with autograd
    sums = {k: v.clone() for k, v in engine._sum.totals().items()}
    engine.detach()
    ref = copy.deepcopy(model)
    torch.manual_seed(5)
    grads = torch.autograd.grad(ref(x).pow(2).mean(), list(ref.parameters()))
    for (n, _), g in zip(ref.named_parameters(), grads):
        # huge R: no clipping, so the sum of per-example gradients = B * batch gradient
        assert torch.allclose(sums[n] / B, g, atol=1e-5, rtol=1e-4), n


def test_ghost_norm_in_row_blocks(monkeypatch):
    """Long sequences: the Gram matrices are built in row blocks; same result."""
    monkeypatch.setattr(dpft.clip.tuning, "GHOST_BLOCK", 7)  # force many tiny blocks
    for name in ["linear-3d", "embedding-tied", "conv2d"]:
        model = ZOO[name][0]()
        examples = [ZOO[name][1]() for _ in range(B)]
        check_model(model, examples, collate, loss_fn, mode="ghost")


def _half_factored(device: str, groups: int = 2, dtype=torch.bfloat16, t: int = 7):
    from dpft.rules.base import Factored

    g = torch.Generator().manual_seed(3)
    n, p, d = 5, 3, 4
    left = torch.randn(n, t, groups, p, generator=g).to(dtype).to(device)
    right = torch.randn(n, t, groups, d, generator=g).to(dtype).to(device)
    return Factored(left=left, right=right, shape=torch.Size([groups * p, d]))


def _brute(c):
    # float64 per-example gradients from the same half-precision values
    g = torch.einsum("btgp,btgd->bgpd", c.left.double().cpu(), c.right.double().cpu())
    return g.reshape(g.shape[0], -1)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("groups", [1, 2])
def test_half_precision_factors_give_exact_norms(device, groups):
    """Under autocast the factors are bfloat16: norms (ghost and instantiated)
    are exact products of those values accumulated in float32 -- never
    rounded back to bfloat16 (a norm rounded down would under-clip)."""
    c = _half_factored(device, groups)
    want = _brute(c).pow(2).sum(1)
    for mode in ("ghost", "instantiate"):
        got, _ = dpft.clip.norms.sq_norm([c], mode, torch.float32)
        assert got.dtype == torch.float32
        rel = float(((got.double().cpu() - want).abs() / want).max())
        assert rel < 1e-6, (mode, rel)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_half_precision_weighted_sum_never_exceeds_clip_factor(device):
    """The clipped sum of half-precision factors: within bfloat16 rounding of
    the float64 sum, and the scaled entries are rounded down (for one
    position, a single example with weight c gives a sum of norm <= c * ||g||;
    round-to-nearest breaks this for about half of the examples)."""
    c = _half_factored(device)
    g = _brute(c)
    w = torch.rand(g.shape[0], dtype=torch.float64) + 0.1
    got = dpft.clip.norms.weighted_sum([c], w.to(device), torch.float32).double().cpu().reshape(-1)
    want = (w.unsqueeze(1) * g).sum(0)
    assert float((got - want).norm() / want.norm()) < 1e-2
    c = _half_factored(device, t=1)
    g = _brute(c)
    w = torch.rand(40, dtype=torch.float64) + 0.1
    w = w[: g.shape[0]]
    for i in range(g.shape[0]):
        one = torch.zeros_like(w)
        one[i] = w[i]
        s = dpft.clip.norms.weighted_sum([c], one.to(device), torch.float32).double().cpu().reshape(-1)
        assert float(s.norm()) <= float(w[i] * g[i].norm()) * (1 + 1e-6)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_batched_half_precision_layers_are_padded_and_exact(device):
    """Same-shaped half-precision layers over 7 positions are stacked with zero
    positions up to 8 (tensor-core products over an unaligned number of
    positions are slow): the norms are the exact float32 products of the
    half-precision values, the clipped sums within bfloat16 rounding."""
    import dpft.clip.stacked

    cs = []
    for seed in range(3):
        c = _half_factored(device, groups=1, t=7)
        g = torch.Generator().manual_seed(10 + seed)
        c.left = (torch.randn(c.left.shape, generator=g) * (seed + 1)).to(torch.bfloat16).to(device)
        cs.append(c)
    contributions = {f"l{i}": [c] for i, c in enumerate(cs)}
    names = list(contributions)
    assert dpft.clip.stacked.plan(contributions, names, "ghost") == [names]
    ((stack, sq),) = dpft.clip.stacked.norms(contributions, names, torch.float32)
    assert stack.left.shape[2] == 8 and stack.right.shape[2] == 8
    assert not bool(stack.left[:, :, 7:].any()) and not bool(stack.right[:, :, 7:].any())
    for j, c in enumerate(cs):
        want = _brute(c).pow(2).sum(1)
        rel = float(((sq[j].double().cpu() - want).abs() / want).max())
        assert rel < 1e-6, (j, rel)
    w = torch.rand(3, cs[0].left.shape[0], dtype=torch.float64) + 0.1
    sums = dpft.clip.stacked.weighted(stack, w.to(device), torch.float32, 1.0)
    for j, c in enumerate(cs):
        want = (w[j].unsqueeze(1) * _brute(c)).sum(0)
        got = sums[j].double().cpu().reshape(-1)
        assert float((got - want).norm() / want.norm()) < 1e-2, j


def _shared_input_model(monkeypatch) -> tuple[nn.Module, list]:
    """``SharedInput`` with q, k and out trainable, and the list that records
    the first factor's shape of every matrix product ``norms.bmm_acc`` runs."""
    from layer_zoo import SharedInput

    calls: list = []
    orig = dpft.clip.norms.bmm_acc
    monkeypatch.setattr(dpft.clip.norms, "bmm_acc", lambda x, y, d: calls.append(x.shape) or orig(x, y, d))
    model = SharedInput()
    for p in model.inp.parameters():
        p.requires_grad_(False)
    model.v.requires_grad_(False)  # v reads h twice (two uses): not a plain contribution
    return model, calls


def test_layers_reading_one_input_share_its_gram_matrix(monkeypatch):
    """query/key/value-style layers reading one tensor: its Gram matrix is built
    once per backward pass (not once per layer), and the update stays exact."""
    model, calls = _shared_input_model(monkeypatch)
    examples = [torch.randn(5, 3) for _ in range(B)]
    check_model(model, examples, collate, loss_fn, mode="ghost")
    grams = [s for s in calls if s[0] == B and s[1] == 5]  # (B, T, k) @ (B, k, T): Gram matrices
    # q and k: two output-gradient Grams plus ONE shared input Gram; out: two
    assert len(grams) == 3 + 2, calls


def test_gram_cache_knows_which_factors_serve_several_layers():
    """A factor read by two layers is "shared" (its Gram matrix is worth
    building once, so the fused single-layer kernel must not be used for it)
    until its last use has taken the stored Gram matrix; a factor of one
    layer never is."""
    x, y1, y2 = torch.randn(2, 5, 1, 3), torch.randn(2, 5, 1, 4), torch.randn(2, 5, 1, 4)
    cache = dpft.clip.norms.GramCache(
        [Factored(left=x, right=y1, shape=torch.Size((3, 4))), Factored(left=x, right=y2, shape=torch.Size((3, 4)))]
    )
    assert cache.shared(x) and not cache.shared(y1) and not cache.shared(y2)
    first = cache.gram(x, torch.float32)
    assert cache.shared(x)  # stored for the second layer
    assert cache.gram(x, torch.float32) is first
    assert not cache.shared(x)


def test_fused_ghost_kernel_cost_rule_and_cpu_fallback():
    """Where the fused ghost-norm kernel is expected to pay (the H100
    measurements its constants come from), and that CPU factors never take
    it: their norms come from the Gram matrices, as before."""
    from dpft.clip import ghost_kernel as gk

    assert gk.pays(32, 197, 768 + 2304)  # ViT-base qkv: 320 programs
    assert gk.pays(32, 64, 768 + 3072)  # 32 programs
    assert not gk.pays(8, 100, 768 + 3072)  # 24 programs over 3840 columns each: cuBLAS was faster
    assert gk.pays(8, 64, 768 + 768)  # few programs, but short passes
    a, g = torch.randn(32, 197, 1, 16), torch.randn(32, 197, 1, 8)
    assert not gk.usable(a[:, :, 0], g[:, :, 0], torch.float32)
    c = Factored(left=a, right=g, shape=torch.Size((16, 8)))
    assert dpft.clip.norms._fused(c, torch.float32, None) is None
    want = torch.einsum("ntd,ntp->ndp", a[:, :, 0].double(), g[:, :, 0].double()).flatten(1).pow(2).sum(1)
    got, _ = dpft.clip.norms.sq_norm([c], "ghost", torch.float32)
    assert torch.allclose(got.double(), want, rtol=1e-5)


def test_fused_ghost_kernel_that_cannot_run_falls_back_once(monkeypatch):
    """A GPU or Triton build that cannot compile or launch the fused kernel:
    the first failure warns, returns None (the caller takes the cuBLAS path)
    and switches the kernel off; a failure after the kernel has run is an
    error, never a silent fallback."""
    from dpft.clip import ghost_kernel as gk

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no TF32 here")

            return launch

    monkeypatch.setattr(gk, "_kernel", lambda: Broken())
    monkeypatch.setattr(gk, "_WORKS", None)
    a, g = torch.randn(4, 70, 8), torch.randn(4, 70, 6)
    with pytest.warns(RuntimeWarning, match="fused ghost-norm kernel could not run"):
        assert gk.ghost_sq_norm(a, g) is None
    assert gk._WORKS is False
    monkeypatch.setattr(gk, "_WORKS", True)
    with pytest.raises(RuntimeError, match="no TF32"):
        gk.ghost_sq_norm(a, g)


def test_layers_reading_one_input_share_one_half_precision_copy(monkeypatch):
    """Under autocast the float32 input of query/key/value-style layers is kept
    as ONE bfloat16 copy (not one per layer), so its Gram matrix is shared too;
    the copy is dropped at the end of the backward pass."""
    import dpft.rules.base as base

    model, calls = _shared_input_model(monkeypatch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = dpft.PrivacyEngine(
        model, batch_size=B, sample_size=100, steps=1, noise_multiplier=0.0, max_grad_norm=1.0, clipping_mode="ghost"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.attach(opt)
    x = torch.randn(B, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().pow(2).sum().backward()
    assert not base._HALF_COPIES
    grams = [s for s in calls if s[0] == B and s[1] == 5]
    assert len(grams) == 3 + 2, calls
    opt.step()


@pytest.mark.parametrize("style", ["all-layer", "layer-wise", "param-wise"])
@pytest.mark.parametrize("mode", ["ghost", "mixed", "auto"])
def test_same_shaped_layers_are_batched_and_exact(monkeypatch, mode, style):
    """Same-shaped layers get their ghost norms and clipped sums from stacked
    factors (one kernel per step for all of them), in chunks, exactly; with
    gradient accumulation over two backward passes."""
    import dpft.clip.stacked
    from layer_zoo import SameShapes

    seen = []
    orig = dpft.clip.stacked.norms
    monkeypatch.setattr(dpft.clip.stacked, "norms", lambda c, names, d: seen.append(list(names)) or orig(c, names, d))
    # tiny chunks: 5 same-shaped layers in chunks of 2, 2 and 1
    monkeypatch.setattr(
        dpft.clip.tuning,
        "CHUNK_BYTES",
        2
        * dpft.clip.stacked._bytes(
            dpft.clip.norms.Factored(
                left=torch.zeros(4, 3, 1, 5, dtype=torch.float64),
                right=torch.zeros(4, 3, 1, 5, dtype=torch.float64),
                shape=torch.Size([5, 5]),
            )
        ),
    )
    examples = [torch.randn(3, 3) for _ in range(B)]  # T = 3: 2 T^2 < 5 * 5, mixed picks ghost
    check_model(SameShapes(), examples, collate, loss_fn, mode=mode, style=style, splits=[4, 2])
    weights = [f"blocks.{i}.weight" for i in range(5)]
    assert seen and all(sorted(names) == sorted(weights) for names in seen), seen


def test_large_layers_are_not_batched(monkeypatch):
    """Layers whose own work keeps the GPU busy are processed one by one (no
    stacking copy); the update is exact either way."""
    import dpft.clip.stacked
    from layer_zoo import SameShapes

    seen = []
    orig = dpft.clip.stacked.norms
    monkeypatch.setattr(dpft.clip.stacked, "norms", lambda c, names, d: seen.append(list(names)) or orig(c, names, d))
    monkeypatch.setattr(dpft.clip.tuning, "BATCH_MACS", 0)
    examples = [torch.randn(3, 3) for _ in range(B)]
    check_model(SameShapes(), examples, collate, loss_fn, mode="ghost")
    assert not seen


def _update_seeing_kinds(model, batches, loss, **kw):
    """``dpft_update``, plus the kinds of contribution (``Factored``,
    ``Instantiated``, ...) the clipped sum received per parameter."""
    seen: dict[str, set[str]] = {}
    real_add = dpft.clip.clipped_sum.ClippedSum.add

    def spy(self, contributions, *args):
        for k, cs in contributions.items():
            seen.setdefault(k, set()).update(type(c).__name__ for c in cs)
        return real_add(self, contributions, *args)

    dpft.clip.clipped_sum.ClippedSum.add = spy
    try:
        got, _ = dpft_update(model, batches, loss, **kw)
    finally:
        dpft.clip.clipped_sum.ClippedSum.add = real_add
    return got, seen


def _exact_over_positions(model, positions, width, mode):
    """One dpft step of ``model`` on 3 random examples of ``positions`` x
    ``width`` equals the float64 brute-force clipped mean; returns the kinds
    of contribution each parameter's clipped sum received."""
    from reference import clipped_mean, per_example_grads, pick_threshold

    x = torch.randn(3, positions, width, dtype=torch.float64)
    loss = lambda m, b: m(b).pow(2).sum(2).mean(1).mean()  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    grads = per_example_grads(model, names, [x[i : i + 1] for i in range(3)], loss)
    R = pick_threshold(grads)
    want = clipped_mean(grads, [names], R, "abadi", 3)
    got, seen = _update_seeing_kinds(copy.deepcopy(model), [x], loss, batch_size=3, R=R, mode=mode)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-9, atol=1e-12), k
    return seen


@pytest.mark.parametrize("mode", ["auto", "mixed", "instantiate", "ghost"])
def test_long_sequence_weights_are_instantiated_during_backward(mode):
    """Where the mixed rule instantiates (2 T^2 >= p d), the per-example
    gradient is built in the layer's backward hook and its input and output
    gradient are dropped there (B*p*d values kept instead of B*T*(p+d));
    ghost mode never instantiates; a weight shared by two modules waits for
    both; a module called twice instantiates per call.  The update is exact
    either way."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 4)  # 2 * 12^2 >= 24: instantiated
            self.twice = nn.Linear(4, 4)  # one module, called twice
            self.t1, self.t2 = nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
            self.t2.weight = self.t1.weight  # one weight, two modules
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.twice(torch.tanh(self.twice(torch.tanh(self.a(x))))))
            return self.head(self.t2(torch.tanh(self.t1(h))))

    model = M().double()
    x = torch.randn(B, 12, 6, dtype=torch.float64)
    loss = lambda m, b: m(b).pow(2).sum(2).mean(1).mean()  # noqa: E731
    got, seen = _update_seeing_kinds(copy.deepcopy(model), [x[:3], x[3:]], loss, batch_size=B, R=0.05, mode=mode)
    want, _ = dpft_update(copy.deepcopy(model), [x], loss, batch_size=B, R=0.05, mode="ghost")
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-9, atol=1e-12), k
    early = {"Instantiated"} if mode != "ghost" else {"Factored"}
    assert seen["a.weight"] == seen["head.weight"] == seen["twice.weight"] == early
    assert seen["t1.weight"] == {"Factored"}  # two modules: decided at the end, as before


@pytest.mark.parametrize("mode", ["auto", "mixed"])
def test_book_keeping_instantiates_where_the_gram_matrices_cost_more(mode):
    """Book-keeping (``auto``) also instantiates a single-use weight that the
    mixed rule leaves to the ghost norm when the Gram matrices cost more
    (``2 T^2 (p + d)`` flops against writing and reading ``p d`` values) and
    the per-example gradient is at most 2x the input and output gradient
    it frees (``p d <= 2 T (p + d)``): Linear(256, 256) over 140 positions
    (``2 * 140^2 < 256^2``).  ``mixed`` keeps the ghost norm.  The update is
    the brute-force clipped mean either way."""
    torch.manual_seed(0)
    width, positions = 256, 140
    c = Factored(
        right=torch.empty(1, positions, 1, width),
        shape=torch.Size([width, width]),
        left=torch.empty(1, positions, 1, width),
    )
    assert dpft.clip.norms.prefer_ghost([c]) and dpft.clip.norms.instantiation_pays(c)
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2)).double()
    seen = _exact_over_positions(model, positions, width, mode)
    assert seen["0.weight"] == ({"Instantiated"} if mode == "auto" else {"Factored"})


def test_book_keeping_keeps_the_ghost_norm_where_other_layers_keep_the_input():
    """Query/key/value-style layers read one input: instantiating one of them
    frees only its output gradient (the others keep the input), so the
    memory bound counts the output gradient alone.  Linear(256, 256) over 100
    positions: instantiated where it reads its own input (``p d <= 2 T (p + d)``),
    not where three layers share it (``p d > 2 T d``).  Exact either way."""
    torch.manual_seed(0)
    width, positions = 256, 100

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
            self.o = nn.Linear(width, width)
            self.head = nn.Linear(width, 2)

        def forward(self, x):
            h = torch.tanh(self.q(x) * self.k(x) + self.v(x))
            return self.head(torch.tanh(self.o(h)))

    seen = _exact_over_positions(QKV().double(), positions, width, "auto")
    assert seen["o.weight"] == {"Instantiated"}
    # the choice is kept in later steps (the readers are counted only until it is made)
    model = QKV()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpft.PrivacyEngine(model, batch_size=3, sample_size=100, steps=5, noise_multiplier=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.attach(opt)
    kinds = []
    real = dpft.clip.clipped_sum.ClippedSum.add
    try:
        dpft.clip.clipped_sum.ClippedSum.add = lambda self, cs, *a: (
            kinds.append({k: type(c[0]).__name__ for k, c in cs.items() if k.endswith("weight")}) or real(self, cs, *a)
        )
        for _ in range(4):
            model(torch.randn(3, positions, width)).sum().backward()
            opt.step()
            opt.zero_grad()
    finally:
        dpft.clip.clipped_sum.ClippedSum.add = real
    assert [k["o.weight"] for k in kinds] == ["Instantiated"] * 4, kinds
    assert all(k["q.weight"] == "Factored" for k in kinds), kinds
    assert seen["q.weight"] == seen["k.weight"] == seen["v.weight"] == {"Factored"}


def test_book_keeping_instantiation_rule_bounds_memory_and_follows_the_cost():
    """The rule weighs the Gram matrices' flops against the per-example
    gradient's memory traffic, and never builds a per-example gradient much
    larger than the factors it frees, however much time that would save."""

    def pays(p, d, t, dtype=torch.float32):
        c = Factored(
            right=torch.empty(1, t, 1, d, dtype=dtype),
            shape=torch.Size([p, d]),
            left=torch.empty(1, t, 1, p, dtype=dtype),
        )
        return dpft.clip.norms.instantiation_pays(c)

    # ViT-base at 224 px (197 positions, Gram tiles of 256): the 768 x 768
    # projection is instantiated, the wider layers keep the ghost norm
    assert pays(768, 768, 197)
    assert not pays(768, 2304, 197) and not pays(768, 3072, 197) and not pays(3072, 768, 197)
    assert not pays(768, 768, 128)  # one tile of 128 positions: the Gram matrices are cheap
    assert pays(768, 768, 577) and pays(3072, 768, 577)  # ViT-base at 384 px
    # 4096 x 4096 over 1000 positions: 16.8M values per example against 8.2M in
    # the factors; the Gram matrices would cost more time, but memory decides
    assert 4096 * 4096 > 2 * 1000 * 8192 and 2 * 1000**2 * 8192 > 240 * 4096 * 4096
    assert not pays(4096, 4096, 1000)
    assert pays(4096, 4096, 1100)
    # tensor cores make the Gram matrices cheaper: half precision keeps them longer
    assert pays(768, 768, 577) and not pays(768, 768, 577, torch.bfloat16)

    # convolutions hold their input and output gradient as they are (not
    # unfolded): ResNet50's 1x1 1024 -> 256 convolution at 14 x 14 frees about
    # as much as its per-example gradient takes and is instantiated; its 3x3
    # 256 -> 256 convolution there would take 5.9x the memory and is not
    from dpft.rules.conv import ConvFactored

    def conv_pays(cin, cout, k, hw):
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        c = ConvFactored(conv, torch.empty(1, cin, hw, hw), torch.empty(1, cout, hw, hw), 1)
        return dpft.clip.norms.instantiation_pays(c)

    assert conv_pays(1024, 256, 1, 14)
    assert not conv_pays(256, 256, 3, 14)


def test_early_instantiation_is_decided_once_per_shape(monkeypatch):
    """The backward hook asks the mixed rule once per layer and output shape,
    not at every step (most layers of short sequences stay with the ghost norm)."""
    import dpft.capture.hooks

    calls = []
    real = dpft.capture.hooks.prefer_ghost
    monkeypatch.setattr(dpft.capture.hooks, "prefer_ghost", lambda cs: calls.append(1) or real(cs))
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))  # 2 * 4^2 < 64^2: ghost
    engine = dpft.PrivacyEngine(
        model, batch_size=B, sample_size=100, steps=5, noise_multiplier=1.0, clipping_mode="auto"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(opt)
    for _ in range(3):
        model(torch.randn(B, 4, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    n_early = sum(1 for b in engine._capture.bindings if b.early)
    assert n_early == 2 and len(calls) == n_early


class _AtenLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten operators run inside the context that compute a weight
    gradient: embedding_dense_backward, and convolution_backward asked for
    the weight's (its output mask; a bias-only call is no weight gradient)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name == "embedding_dense_backward" or (name == "convolution_backward" and args[-1][1]):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "first, op, x",
    [
        # instantiated norms (2 T^2 >= p d): dpft itself runs no convolution_backward
        (lambda: nn.Conv2d(3, 4, 3, padding=1), "convolution_backward", lambda: torch.randn(B, 3, 8, 8)),
        (lambda: nn.Embedding(20, 4), "embedding_dense_backward", lambda: torch.randint(0, 20, (B, 8))),
    ],
    ids=["conv-stem", "embedding"],
)
@pytest.mark.parametrize("mode", ["auto", "instantiate"])
def test_book_keeping_first_layer_gets_no_autograd_weight_gradient(first, op, x, mode):
    """A layer whose input needs no gradient (the model's first) trains its
    weight under book-keeping without autograd computing that weight's
    gradient (an RGB stem's cuDNN weight-gradient kernel, an embedding's dense
    table); without book-keeping (``instantiate``) autograd computes it, which
    shows the test can see it.  The update stays exact.  (The first two
    backward passes check every per-example sum against autograd's gradient,
    so they do compute it: the third is logged.)"""
    torch.manual_seed(0)
    layer = first()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    batch = x()
    model(batch)  # materialize the lazy head
    model = model.double()
    batch = batch.double() if batch.is_floating_point() else batch
    loss = lambda m, b: m(b).pow(2).sum(1).mean()  # noqa: E731
    log = _AtenLog()
    real_backward = torch.Tensor.backward

    calls = []

    def logged_backward(self, *a, **k):
        calls.append(1)
        if len(calls) < 3:
            return real_backward(self, *a, **k)
        with log:
            return real_backward(self, *a, **k)

    torch.Tensor.backward = logged_backward
    try:
        got, _ = dpft_update(copy.deepcopy(model), [batch] * 3, loss, batch_size=3 * B, R=0.05, mode=mode)
    finally:
        torch.Tensor.backward = real_backward
    assert len(calls) == 3
    assert (op in log.names) == (mode == "instantiate")
    want, _ = dpft_update(copy.deepcopy(model), [batch] * 3, loss, batch_size=3 * B, R=0.05, mode="ghost")
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-9, atol=1e-12), k


@pytest.mark.parametrize("mode", ["auto", "bk", "ghost"])
def test_book_keeping_first_layer_output_modified_in_place(mode):
    """The first layer's output, tied to the graph without its weight under
    book-keeping, may be changed in place right after (ReLU(inplace=True));
    a 3-D Linear with a frozen bias returns a view, which is tied as a copy.
    Both exact against brute force.  Without book-keeping the view changed in
    place is a known limit (the hook on the view never fires): it must fail
    loudly, never with a wrong gradient."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 6)
            self.lin.bias.requires_grad_(False)
            self.conv = nn.Conv1d(6, 3, 3, padding=1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):  # x: (B, T, 5)
            h = self.lin(x)
            h.tanh_()
            return self.act(self.conv(h.transpose(1, 2))).sum(2)

    examples = [torch.randn(7, 5) for _ in range(B)]
    args = (M(), examples, lambda exs: torch.stack(exs), lambda m, b: m(b).pow(2).sum(1).mean())
    if mode == "ghost":
        with pytest.raises(dpft.UnsupportedModuleError, match="changed in place"):
            check_model(*args, mode=mode)
    else:
        check_model(*args, mode=mode)


@pytest.mark.parametrize("mode", ["auto", "ghost"])
@pytest.mark.parametrize("subset", ["bitfit", "full"])
def test_lane_parameters_skip_autograd_after_the_check_passes(mode, subset):
    """Under book-keeping, once the first backward passes have cross-checked
    the sums against autograd's, biases and normalization weights are switched
    off for autograd during the forward (their per-example gradients come
    from the output gradients in the hooks), and the first layer's output is
    tied to the graph without them; the weights, switched off module by
    module before, are switched off with them (no per-module hook left).  Every step stays exact against brute
    force (float64, several steps, the weights moving in between); without
    book-keeping (ghost) autograd keeps computing them, which shows that the
    parameter hooks of this test see autograd's gradients.  In the first
    passes autograd computes every gradient, the weights' too: they are the
    reference that every per-example sum is checked against."""
    from reference import steps_exact, tensor_batches

    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(5)  # first layer: its input needs no gradient
            self.lin = nn.Linear(5, 6)
            self.gn = nn.GroupNorm(2, 6)
            self.conv = nn.Conv1d(6, 3, 3, padding=1)
            self.head = nn.Linear(3, 2)

        def forward(self, x):  # (B, T, 5)
            h = torch.tanh(self.lin(self.ln(x))).transpose(1, 2)
            h = torch.tanh(self.conv(torch.relu(self.gn(h))))
            return self.head(h.mean(2))

    model = M().double()
    if subset == "bitfit":
        dpft.bitfit(model)
    autograd_calls = []
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = copy.deepcopy(model)  # the brute force runs on a copy without the engine's hooks
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, n=n: autograd_calls.append(n))

    def after_step(step):
        if mode == "ghost":
            assert set(autograd_calls) == set(names), step
        elif step >= 2:
            assert autograd_calls == [], step
            # the weights' per-module switches are gone: one switch per forward does it
            assert not model.lin._forward_pre_hooks and not model.conv._forward_pre_hooks
        else:  # the check passes: autograd's gradients are the self-check's reference
            assert set(autograd_calls) == set(names), step
        autograd_calls.clear()

    batches = tensor_batches(lambda: torch.randn(B, 7, 5, dtype=torch.float64), 4)
    steps_exact(
        model,
        ref,
        batches,
        lambda m, b: m(b).pow(2).sum(1).mean(),
        batch_size=B,
        R=0.05,
        mode=mode,
        tol=1e-9,
        after_step=after_step,
    )


class _Checkpointed(nn.Module):
    """``inp``, then two ``block()``s (checkpointed if ``ckpt``), then a head
    on the mean over ``pool`` dims."""

    def __init__(self, inp, block, width, pool, ckpt, reentrant):
        super().__init__()
        self.ckpt, self.reentrant, self.pool = ckpt, reentrant, pool
        self.inp = inp
        self.blocks = nn.ModuleList([block(), block()])
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = self.inp(x)
        for blk in self.blocks:
            h = checkpoint(blk, h, use_reentrant=self.reentrant) if self.ckpt else blk(h)
        return self.head(h.mean(self.pool))


def _checkpointing_exact(make, example_shape, subset="full", shift=0.0):
    """Several DP steps of ``make(ckpt=True)`` equal those of the same model
    without checkpointing (float64, brute-force clipped means); inputs are
    standard normal plus ``shift``."""
    from reference import steps_exact, tensor_batches

    model = make(ckpt=True).double()
    if subset == "bitfit":
        dpft.bitfit(model)
    ref = make(ckpt=False).double()
    ref.load_state_dict(model.state_dict())
    for p, q in zip(model.parameters(), ref.parameters()):
        q.requires_grad_(p.requires_grad)
    batches = tensor_batches(lambda: torch.randn(B, *example_shape, dtype=torch.float64) + shift, 4)
    steps_exact(model, ref, batches, lambda m, b: m(b).pow(2).sum(1).mean(), batch_size=B, R=0.05, tol=1e-9)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("subset", ["bitfit", "full"])
def test_activation_checkpointing_several_steps_exact(subset, reentrant):
    """Activation checkpointing recomputes a block during the backward pass,
    outside the model's forward; checkpoint requires the recomputation to
    save what the forward saved.  dpft then keeps its parameter switches per
    module (the recomputation sees the parameters as the forward did) rather
    than one switch per forward: several steps run and each is exact."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(6)
            self.fc = nn.Linear(6, 6)
            self.ln = nn.LayerNorm(6)

        def forward(self, h):
            return self.ln(h + torch.tanh(self.fc(self.norm(h))))

    def make(ckpt):
        return _Checkpointed(nn.Linear(5, 6), Block, 6, (1,), ckpt, reentrant)

    _checkpointing_exact(make, (4, 5), subset)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_group_norm_weight_on_channels_last_and_strided_inputs(layout):
    """The GroupNorm weight's normalized input is recomputed by the ATen
    operator, which takes a contiguous or channels-last input as it is and
    anything else as a copy: the update is exact for both kinds of input."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.gn = nn.GroupNorm(2, 4)
            self.head = nn.Linear(4 * 5 * 5, 2)

        def forward(self, x):
            h = self.conv(x)
            if layout == "channels_last":
                h = h[:, :4].contiguous(memory_format=torch.channels_last)
            else:
                h = h[:, ::2]  # every other channel: neither layout
            return self.head(torch.tanh(self.gn(h)).flatten(1))

    examples = [torch.randn(3, 7, 7) for _ in range(B)]
    collate = lambda exs: torch.stack(exs)  # noqa: E731
    loss = lambda m, x: m(x).pow(2).sum(1).mean()  # noqa: E731
    check_model(M(), examples, collate, loss)


class _ConvGN(nn.Module):
    """Conv -> GroupNorm -> ReLU(inplace) -> Conv -> GroupNorm: the
    ResNet pattern (the GroupNorm's input is a convolution's output)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.g1 = nn.GroupNorm(2, 8)
        self.act = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.g2 = nn.GroupNorm(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.g2(self.c2(self.act(self.g1(self.c1(x)))))
        return self.head(h.mean((2, 3)))


def _convgn_check(mode, layout="contiguous", steps=2):
    from reference import clipped_mean, per_example_grads, pick_threshold

    torch.manual_seed(0)
    model = _ConvGN().double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64) * 2 + 1.5  # a non-zero mean per group
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (4,))
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    grads = per_example_grads(model, names, [(x[i : i + 1], y[i : i + 1]) for i in range(4)], loss)
    R = pick_threshold(grads)
    want = clipped_mean(grads, [names], R, "abadi", 4)
    for _ in range(steps):  # the first passes cross-check against autograd; later ones switch it off
        got, seen = _update_seeing_kinds(copy.deepcopy(model), [(x, y)], loss, batch_size=4, R=R, mode=mode)
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-9, atol=1e-12), k
    return seen


@pytest.mark.parametrize("mode", ["auto", "ghost", "instantiate"])
def test_groupnorm_weight_from_the_forward_moments(monkeypatch, mode):
    """GroupNorm's per-example weight and bias gradients come from one call
    of PyTorch's GroupNorm backward with the batch folded into the channels,
    using the group statistics autograd saved in the forward pass, never
    from a recomputed normalized input.  Exact against the float64 brute
    force (inputs with a non-zero mean, so that the mean term counts)."""
    import dpft.rules.norm as norm

    used = []
    real = norm.GroupNormRule.pair
    monkeypatch.setattr(norm.GroupNormRule, "normalized", lambda self, call: pytest.fail("recomputed"))
    monkeypatch.setattr(norm.GroupNormRule, "pair", lambda self, *a: used.append(1) or real(self, *a))
    _convgn_check(mode)
    assert used


def test_groupnorm_weight_in_other_layouts():
    """Channels-last activations and a GroupNorm on ``(N, C)`` inputs
    recompute the normalized input.  Exact either way."""
    _convgn_check("auto", layout="channels_last")
    from reference import check_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.GroupNorm(3, 6), nn.Tanh(), nn.Linear(6, 2))
    examples = [torch.randn(5) * 2 + 1 for _ in range(B)]
    check_model(model, examples, lambda exs: torch.stack(exs), lambda m, b: m(b).pow(2).sum(1).mean())


def test_groupnorm_moments_rule_level_matches_recomputation():
    """The two ways of forming the per-example weight gradient agree, on the
    rule's eager path (the lane), in either order of weight and bias, and on
    its per-call path, in float64."""
    from dpft.rules.norm import GroupNormRule

    torch.manual_seed(1)
    gn = nn.GroupNorm(3, 6).double()
    x = (torch.randn(5, 6, 4, 3, dtype=torch.float64) * 3 + 2).requires_grad_()
    out = gn(x)
    dy = torch.randn_like(out)
    rule = GroupNormRule()
    torch.set_grad_enabled(False)  # as in a backward hook
    try:
        _gn_rule_paths(gn, rule, x, out, dy)
    finally:
        torch.set_grad_enabled(True)


def _gn_rule_paths(gn, rule, x, out, dy):
    from dpft.rules.base import Call

    call = Call(gn, rule, 5)
    rule.save(call, gn, (x,), out, frozenset({"weight", "bias"}))
    assert "moments" in call.saved
    xhat = x.detach().view(5, 3, -1) - x.detach().view(5, 3, -1).mean(2, keepdim=True)
    xhat = (xhat / (xhat.pow(2).mean(2, keepdim=True) + gn.eps).sqrt()).view_as(x)
    want_w = (dy * xhat).sum((2, 3))
    want_b = dy.sum((2, 3))
    for order in (("weight", "bias"), ("bias", "weight")):  # one kernel call serves both, either order
        call = Call(gn, rule, 5)
        rule.save(call, gn, (x,), out, frozenset({"weight", "bias"}))
        lane = torch.zeros(5, 12, dtype=torch.float64)
        for name in order:
            rule.eager_into(call, dy, name, lane[:, :6] if name == "weight" else lane[:, 6:], False)
        assert torch.allclose(lane[:, :6], want_w, rtol=1e-12, atol=1e-12), order
        assert torch.allclose(lane[:, 6:], want_b, rtol=1e-12, atol=1e-12), order
        rule.eager_into(call, dy, "weight", lane[:, :6], True)  # a second use of the same weight adds
        assert torch.allclose(lane[:, :6], 2 * want_w, rtol=1e-12, atol=1e-12), order
    call2 = Call(gn, rule, 5)
    rule.save(call2, gn, (x,), out, frozenset({"weight", "bias"}))
    rule.on_grad(call2, dy, frozenset({"weight", "bias"}))
    assert torch.allclose(call2.results["weight"], want_w, rtol=1e-12, atol=1e-12)
    assert torch.allclose(call2.results["bias"], want_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["auto", "mixed", "ghost"])
def test_convolution_weights_are_instantiated_during_backward(mode):
    """A convolution whose norm the mixed rule instantiates (many positions,
    few weights: ``2 T^2 >= P D``) gets its per-example gradient built in its
    backward hook, like a Linear layer's: its input and output gradient are
    freed there and the clipped sum is a weighted sum of that gradient.
    Ghost mode never instantiates.  Exact against the float64 brute force."""
    seen = _convgn_check(mode)
    kind = {"ConvFactored"} if mode == "ghost" else {"Instantiated"}
    assert seen["c1.weight"] == seen["c2.weight"] == kind


@pytest.mark.parametrize("reentrant", [False, True])
def test_groupnorm_statistics_under_activation_checkpointing(reentrant):
    """GroupNorm layers inside checkpointed blocks (their statistics are read
    from the autograd node of the forward pass, which checkpointing packs
    and recomputes): DP full fine-tuning is exact against the same model
    without checkpointing, over several steps."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.gn = nn.GroupNorm(2, 4)

        def forward(self, h):
            return h + torch.tanh(self.gn(self.conv(h)))

    def make(ckpt):
        return _Checkpointed(nn.Conv2d(3, 4, 1), Block, 4, (2, 3), ckpt, reentrant)

    _checkpointing_exact(make, (3, 5, 5), shift=1.0)  # a non-zero mean per group
