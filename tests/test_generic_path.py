"""The exact generic path for parameters no fast rule covers (issue 22,
"every parameter, anywhere"): parameters held directly by a container
module (layer scale, class embedding, relative position tables) and
parametrized weights (weight norm) train exactly against the brute force,
over several steps; a container that mixes examples is refused."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from reference import check_steps

import dpft

B = 4
T = 5
D = 6


class LayerScale(nn.Module):
    """A ConvNeXt/BEiT-style block: a scale held by the block, applied in its forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.gamma = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x):
        return x + self.gamma * torch.tanh(self.fc(x))


class ClassToken(nn.Module):
    """CLIP vision's embeddings: a 1-d class embedding concatenated before the patches."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(3, D)
        self.class_embedding = nn.Parameter(torch.randn(D))

    def forward(self, x):  # (B, T, 3)
        h = self.patch(x)
        cls = self.class_embedding.expand(h.shape[0], 1, -1)
        return torch.cat([cls, h], dim=1)


class RelativeBias(nn.Module):
    """Swin/T5-style attention: a table of relative position biases, indexed
    and added to every example's scores (batch-independent)."""

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(D, 2 * D)
        self.table = nn.Parameter(torch.randn(2 * T - 1) * 0.5)
        pos = torch.arange(T)
        self.register_buffer("index", pos[:, None] - pos[None, :] + T - 1)

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        scores = q @ k.transpose(1, 2) + self.table[self.index]
        return scores.softmax(-1) @ x


class Model(nn.Module):
    def __init__(self, body: nn.Module, width: int = D):
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(1))


def _weight_norm_conv():
    conv = parametrizations.weight_norm(nn.Conv1d(D, D, 3, padding=1, groups=2), dim=2)

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):  # (B, T, D)
            return F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)

    return Conv()


CASES = {
    "layer-scale": (lambda: Model(LayerScale()), D),
    "class-token": (lambda: Model(ClassToken()), 3),
    "relative-bias": (lambda: Model(RelativeBias()), D),
    "weight-norm": (lambda: Model(_weight_norm_conv()), D),
}


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _collate(examples):
    return tuple(torch.stack(v) for v in zip(*examples))


@pytest.mark.parametrize("mode", ["auto", "ghost"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_generic_path_exact(name, mode):
    torch.manual_seed(0)
    build, width = CASES[name]
    check_steps(
        build(),
        lambda: (torch.randn(T, width), torch.randint(0, 3, ())),
        _collate,
        _loss,
        steps=3,
        batch_size=B,
        mode=mode,
    )


def test_generic_path_bias_only_with_container_parameter():
    """DP-BiTFiT plus a container parameter trained by name."""
    torch.manual_seed(0)
    model = Model(LayerScale())
    dpft.bitfit(model, extra=["body.gamma"])
    check_steps(model, lambda: (torch.randn(T, D), torch.randint(0, 3, ())), _collate, _loss, steps=3, batch_size=B)


def test_container_that_mixes_examples_is_refused():
    class Centered(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)
            self.shift = nn.Parameter(torch.zeros(D))

        def forward(self, x):
            h = self.fc(x)
            return h - h.mean(0, keepdim=True) + self.shift  # a mean over the batch

    model = Model(Centered()).double()
    engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=10, noise_multiplier=1.0, max_grad_norm=1.0)
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(dpft.UnsupportedModuleError, match="'body' .*mixes examples"):
        model(torch.randn(B, T, D, dtype=torch.float64)).sum().backward()


class BiasTable(nn.Module):
    """Swin/BEiT's relative position bias: a module whose output is the same
    for every example (heads x positions x positions), added to each
    example's scores by its caller."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * T - 1, 2) * 0.5)
        pos = torch.arange(T)
        self.register_buffer("index", pos[:, None] - pos[None, :] + T - 1)

    def forward(self):
        return self.table[self.index].permute(2, 0, 1)  # (heads, T, T)


class BucketAttention(nn.Module):
    """Attention with a batch-independent bias from a child: either a table
    module (Swin/BEiT) or an embedding of relative buckets (T5)."""

    def __init__(self, embedding: bool):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.embedding = embedding
        if embedding:
            self.bias = nn.Embedding(2 * T - 1, 2)
        else:
            self.bias = BiasTable()

    def forward(self, x):  # (B, T, D), 2 heads
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        if self.embedding:
            pos = torch.arange(T)
            bias = self.bias(pos[:, None] - pos[None, :] + T - 1).permute(2, 0, 1)  # (T, T) ids -> (heads, T, T)
        else:
            bias = self.bias()
        scores = q @ k.transpose(-1, -2) + bias
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, T, D)


@pytest.mark.parametrize("mode", ["auto", "ghost"])
@pytest.mark.parametrize("embedding", [False, True], ids=["table-module", "bucket-embedding"])
def test_batch_independent_outputs_exact(embedding, mode):
    """The bias module's output carries no examples: its parameters are
    handed to the enclosing attention module, recomputed by the generic path."""
    torch.manual_seed(0)
    check_steps(
        Model(BucketAttention(embedding)),
        lambda: (torch.randn(T, D), torch.randint(0, 3, ())),
        _collate,
        _loss,
        steps=3,
        batch_size=B,
        mode=mode,
    )


def test_generic_path_state_is_taken_on_the_device_of_keyword_arguments(monkeypatch):
    """A generic-path module called with keyword arguments only (Hugging
    Face's stacks): the RNG and autocast state its recomputation replays are
    those of its inputs' device (on a GPU: the CUDA generator), not the CPU's
    for want of a positional tensor.  tests/test_cuda.py runs it on a GPU."""
    import dpft.capture.hooks as hooks

    seen = []
    real = hooks.rng_state

    def spy(device):
        seen.append(device)
        return real(device)

    monkeypatch.setattr(hooks, "rng_state", spy)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.gamma = nn.Parameter(torch.ones(4))

        def forward(self, *, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) @ torch.diag(self.gamma)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Scaled()
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(x=x))

    torch.manual_seed(0)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(model, batch_size=3, sample_size=30, steps=5, noise_multiplier=1.0)
        opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.randn(3, 4)).pow(2).mean().backward()
    opt.step()
    assert seen and all(d == torch.device("cpu") for d in seen), seen
