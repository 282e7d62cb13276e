"""Randomized exactness (hypothesis): random small architectures built from the
supported layers (including stacks of same-shaped layers, batched by dpft), random trainable subsets, clipping styles, modes and
accumulation splits, each against the brute-force per-example clipped mean
(float64, relative error <= 1e-6).

CI runs a bounded number of cases; ``DPFT_LONG_RANDOMIZED=1`` runs 500."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from reference import Degenerate, check_model

LONG = os.environ.get("DPFT_LONG_RANDOMIZED") == "1"
SETTINGS = settings(
    max_examples=500 if LONG else 25,
    deadline=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ACTS = [nn.Tanh, nn.GELU, nn.Sigmoid]


def loss_fn(model, x):
    out = model(x)
    flat = out.reshape(out.shape[0], -1)
    return (flat.sin() + 0.5 * flat.pow(2)).sum(1).mean()


def collate(examples):
    return torch.stack(examples)


@st.composite
def mlp(draw):
    t = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 7), min_size=2, max_size=4))
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers.append(nn.Linear(a, b, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.LayerNorm(b, elementwise_affine=True))
        layers.append(draw(st.sampled_from(ACTS))())
    return nn.Sequential(*layers), (lambda: torch.randn(t, widths[0]))


@st.composite
def cnn(draw):
    c0 = draw(st.integers(1, 4))
    layers: list[nn.Module] = []
    c, size = c0, 8
    for _ in range(draw(st.integers(1, 2))):
        g = draw(st.sampled_from([d for d in (1, 2) if c % d == 0]))
        out = g * draw(st.integers(1, 3))
        k, stride, pad, dil = (
            draw(st.integers(1, 3)),
            draw(st.integers(1, 2)),
            draw(st.integers(0, 1)),
            draw(st.integers(1, 2)),
        )
        if size + 2 * pad < dil * (k - 1) + 1:  # keep at least one output pixel
            k, dil = 1, 1
        size = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
        layers.append(
            nn.Conv2d(c, out, k, stride=stride, padding=pad, dilation=dil, groups=g, bias=draw(st.booleans()))
        )
        if draw(st.booleans()):
            layers.append(nn.GroupNorm(draw(st.sampled_from([d for d in (1, 2) if out % d == 0])), out))
        layers.append(draw(st.sampled_from(ACTS))())
        c = out
    layers += [nn.Flatten(), nn.LazyLinear(2)]
    return nn.Sequential(*layers), (lambda: torch.randn(c0, 8, 8))


@st.composite
def seq(draw):
    vocab = draw(st.integers(3, 9))
    d = draw(st.integers(2, 5))
    t = draw(st.integers(1, 5))
    layers: list[nn.Module] = [nn.Embedding(vocab, d, padding_idx=draw(st.sampled_from([None, 0])))]
    layers += [nn.Linear(d, d), draw(st.sampled_from(ACTS))()]
    head = nn.Linear(d, vocab)
    model = nn.Sequential(*layers, head)
    if draw(st.booleans()):
        head.weight = layers[0].weight  # tied
    return model, (lambda: torch.randint(0, vocab, (t,)))


@st.composite
def stack(draw):
    """Several Linear layers of one shape (transformer-like): stacked and
    processed together by ``dpft.clip.stacked``; some read one shared input."""
    d = draw(st.integers(2, 6))
    t = draw(st.integers(1, 4))
    n = draw(st.integers(2, 5))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, d)
            self.layers = nn.ModuleList(nn.Linear(d, d, bias=draw(st.booleans())) for _ in range(n))
            self.shared = draw(st.booleans())  # every layer reads h (q/k/v-like) or each the previous output

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            if self.shared:
                return sum(torch.sin(layer(h)) for layer in self.layers)
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return h

    return Stack(), (lambda: torch.randn(t, 3))


@given(
    arch=st.one_of(mlp(), cnn(), seq(), stack()),
    subset_seed=st.integers(0, 10**6),
    style=st.sampled_from(["all-layer", "param-wise", "layer-wise"]),
    mode=st.sampled_from(["auto", "ghost", "instantiate", "mixed"]),
    fn=st.sampled_from(["abadi", "automatic"]),
    split=st.sampled_from([[5], [2, 3], [1, 1, 3]]),
    data_seed=st.integers(0, 10**6),
)
@SETTINGS
def test_random_architectures(arch, subset_seed, style, mode, fn, split, data_seed):
    model, make = arch
    torch.manual_seed(data_seed)
    examples = [make() for _ in range(5)]
    model(collate(examples[:1]))  # materialize lazy layers
    g = torch.Generator().manual_seed(subset_seed)
    params = list(model.named_parameters())
    keep = torch.rand(len(params), generator=g) < 0.6
    if not keep.any():
        keep[int(torch.randint(len(params), (1,), generator=g))] = True
    for (n, p), k in zip(params, keep):
        p.requires_grad_(bool(k))
    try:
        check_model(model, examples, collate, loss_fn, fn=fn, style=style, mode=mode, splits=split)
    except Degenerate:
        assume(False)
