"""The generic path's vectorized computation (issue 22, Measure): after the
first passes have checked it against the reference pull-back, a module's
per-example gradients come from one ``torch.func.vmap`` pass instead of one
backward per example.  Exact against the brute force over several steps,
taken only where it agreed, and never where a reading of the inputs could be
wrong (a random operation, a batch-size dependent forward, a shared argument
that looks batched)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import per_example_grads, pick_threshold, steps_exact

import dpft
from dpft.rules import fallback
from dpft.rules.fallback import FallbackRule

T, D = 5, 6


class Counter:
    """Counts the reference pull-backs and the vectorized passes."""

    def __init__(self, monkeypatch):
        self.reference = self.vectorized = self.looped = 0
        pulled, vec, loop = FallbackRule._pulled_back, fallback._vectorized, fallback._looped

        def counted_pull(rule, *a, **k):
            self.reference += 1
            return pulled(rule, *a, **k)

        def counted_vec(*a, **k):
            self.vectorized += 1
            return vec(*a, **k)

        def counted_loop(*a, **k):
            self.looped += 1
            return loop(*a, **k)

        monkeypatch.setattr(fallback, "SUBSTITUTE", False)  # (substitution: tests/test_generic_substitute.py)
        monkeypatch.setattr(FallbackRule, "_pulled_back", counted_pull)
        monkeypatch.setattr(fallback, "_vectorized", counted_vec)
        monkeypatch.setattr(fallback, "_looped", counted_loop)


class LayerScale(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.gamma = nn.Parameter(torch.rand(D) + 0.5)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(self.gamma * torch.tanh(self.fc(x)))


class Windows(nn.Module):
    """Swin-style: examples' windows flattened into the batch dimension
    ``(B * W, T, D)``, a relative position table held by the module, and a
    mask shared by every example (one per window)."""

    def __init__(self, windows: int = 2):
        super().__init__()
        self.qk = nn.Linear(D, 2 * D)
        self.table = nn.Parameter(torch.randn(2 * T - 1) * 0.5)
        pos = torch.arange(T)
        self.register_buffer("index", pos[:, None] - pos[None, :] + T - 1)
        self.windows = windows

    def forward(self, x, mask):
        q, k = self.qk(x).chunk(2, dim=-1)
        scores = q @ k.transpose(1, 2) + self.table[self.index]
        scores = (scores.view(-1, self.windows, T, T) + mask).view(-1, T, T)
        return scores.softmax(-1) @ x


class WindowModel(nn.Module):
    def __init__(self, windows: int = 2):
        super().__init__()
        self.body = Windows(windows)
        self.register_buffer("mask", torch.randn(windows, T, T))
        self.head = nn.Linear(D, 3)
        self.windows = windows

    def forward(self, x):  # (B, W*T, D)
        b = x.shape[0]
        h = self.body(x.reshape(b * self.windows, T, D), self.mask)
        return self.head(h.reshape(b, -1, D).mean(1))


class SharedArgument(nn.Module):
    """A container called with a shared index tensor (S,) beside the batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.gamma = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x, shared):
        return self.fc(x) + self.gamma * x[:, shared].sum(1, keepdim=True)


class SharedModel(nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.body = SharedArgument()
        self.register_buffer("shared", torch.arange(rows) % T)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.body(x, self.shared).mean(1))


class Routed(nn.Module):
    """Tokens routed to fused experts held by the block (data-dependent
    shapes: no batching rule for ``nonzero``), weighted by the router."""

    def __init__(self, experts: int = 3):
        super().__init__()
        self.router = nn.Linear(D, experts)
        self.w = nn.Parameter(torch.randn(experts, D, D) * 0.4)

    def forward(self, x):
        flat = x.reshape(-1, D)
        probs = self.router(flat).softmax(-1)
        choice = probs.argmax(-1)
        out = torch.zeros_like(flat)
        for e in range(self.w.shape[0]):
            idx = torch.nonzero(choice == e).squeeze(1)
            if idx.numel():
                out = out.index_add(0, idx, (flat[idx] @ self.w[e]) * probs[idx, e : e + 1])
        return out.view_as(x)


class BatchScaled(nn.Module):
    """Keeps examples apart but reads the batch size: a one-example call
    computes something else than the batch call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.gamma = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x):
        return self.fc(x) + self.gamma * x * (4.0 / x.shape[0])


class Model(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(1))


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _run(model, sizes, width=T, batch_size=4):
    """dpft steps on batches of the given sizes, each checked against the brute force."""
    model = model.double()
    ref = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)

    def make(n):
        x = torch.randn(n, width, D, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
        return (x, y), [(x[i : i + 1], y[i : i + 1]) for i in range(n)]

    batches = [make(n) for n in sizes]
    R = pick_threshold(per_example_grads(ref, names, batches[0][1], _loss))
    return steps_exact(model, ref, batches, _loss, batch_size=batch_size, R=R)


def _attached(model, R):
    """An engine (noise 0, batches of 4) attached to SGD on ``model``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model, batch_size=4, sample_size=100, steps=10, noise_multiplier=0.0, max_grad_norm=R
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(opt)
    return engine, opt


def _memo(module):
    return next(iter(fallback._MEMOS[module].values()))


@pytest.mark.parametrize("case", ["layer-scale", "windows"])
def test_vectorized_after_the_first_passes(monkeypatch, case):
    count = Counter(monkeypatch)
    torch.manual_seed(0)
    model = Model(LayerScale()) if case == "layer-scale" else WindowModel()
    width = T if case == "layer-scale" else 2 * T
    _run(model, [4, 3, 4, 5, 4], width=width).detach()
    # the first two passes run both and compare; the three after run the vectorized pass alone
    assert (count.reference, count.vectorized) == (2, 5)
    assert _memo(model.body).fast is True


def test_routed_tokens_loop_over_examples(monkeypatch):
    """A forward that ``vmap`` cannot batch (tokens routed by ``nonzero``)
    runs one example at a time once the first passes have checked it."""
    count = Counter(monkeypatch)
    torch.manual_seed(0)
    model = Model(Routed())
    _run(model, [4, 3, 4, 5, 4]).detach()
    memo = _memo(model.body)
    assert (memo.fast, memo.kind) == (True, "loop")
    assert (count.reference, count.vectorized, count.looped) == (2, 1, 5)


def test_random_operation_keeps_the_reference(monkeypatch):
    """A dropout inside the module: the reference replays the forward's
    masks, a vectorized forward would draw others, so it is never used."""
    count = Counter(monkeypatch)
    torch.manual_seed(0)
    model = Model(LayerScale(p=0.3)).double()
    x, y = torch.randn(4, T, D, dtype=torch.float64), torch.randint(0, 3, (4,))
    engine, opt = _attached(model, 1.0)
    for _ in range(4):
        _loss(model, (x, y)).backward()
        opt.step()
        opt.zero_grad()
    engine.detach()
    assert _memo(model.body).fast is False
    # tried once each (a random op: refused by vmap, seen moving the RNG by the loop), never again
    assert (count.reference, count.vectorized, count.looped) == (4, 1, 1)


def test_batch_size_dependent_forward_keeps_the_reference(monkeypatch):
    """The vectorized pass computes a one-example call; a forward that reads
    the batch size disagrees with the reference, so the reference stays."""
    count = Counter(monkeypatch)
    torch.manual_seed(0)
    model = Model(BatchScaled())
    got = _vectorized_off_vs_on(model, [4, 4, 4, 4])
    assert _memo(model.body).fast is False
    assert count.reference == 8  # (both runs: 4 steps each, all on the reference)
    assert got


def _vectorized_off_vs_on(model, sizes):
    """The updates with the vectorized pass allowed equal those with it off."""
    model = model.double()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(n, T, D, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)) for n in sizes
    ]
    results = []
    for m, allow in ((model, True), (twin, False)):
        engine, opt = _attached(m, 0.05)
        if not allow:
            fallback._memo(m.body, ["gamma"]).fast = False
        for b in batches:
            _loss(m, b).backward()
            opt.step()
            opt.zero_grad()
        engine.detach()
        results.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    return all(torch.allclose(results[0][k], results[1][k], rtol=1e-12, atol=1e-14) for k in results[0])


@pytest.mark.parametrize(
    "sizes", [[4, 4, 6, 4, 6], [6, 6, 4, 6, 4]], ids=["looks-batched-later", "looks-batched-first"]
)
def test_shared_argument_that_looks_batched(monkeypatch, sizes):
    """A shared index argument of 6 entries: in a batch of 6 it looks batched.  Met in the
    first passes, the vectorized pass disagrees and is never used; met
    later, the call's layout differs from the verified one and takes the
    reference.  Exact at every step either way."""
    count = Counter(monkeypatch)
    torch.manual_seed(0)
    model = SharedModel(rows=6)
    _run(model, sizes).detach()
    memo = _memo(model.body)
    if sizes[0] == 6:
        assert memo.fast is False and count.reference == len(sizes)
    else:
        assert memo.fast is True
        assert count.reference == 2 + sizes[2:].count(6)  # the batches of 6 after the first passes
