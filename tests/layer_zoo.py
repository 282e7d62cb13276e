"""Small models, one per supported layer type, for exactness tests."""

from __future__ import annotations

import torch
from torch import nn


class Head(nn.Module):
    """Nonlinear per-example loss on any output: sum(out*w + out^2/2)."""


def loss_fn(model, batch):
    x = batch
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    flat = out.reshape(out.shape[0], -1)
    g = torch.Generator().manual_seed(123)
    w = torch.randn(flat.shape[1], generator=g, dtype=flat.dtype).to(flat.device)
    per = (flat * w + 0.5 * flat.pow(2)).sum(1)
    return per.mean()


def collate(examples):
    return torch.stack(examples)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class Tied(nn.Module):
    """Embedding tied with the output projection (like GPT-2's wte / lm_head)."""

    def __init__(self, vocab=11, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(6, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=True)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # (1, T): broadcast over the batch
        h = self.emb(ids) + self.pos(pos)
        return self.head(torch.tanh(self.mix(h)))


class Scale(nn.Module):
    """A leaf module of unknown type: handled by the exact fallback."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.sin(x * self.weight) + self.bias


class WithTokens(nn.Module):
    """Container holding ViT-style cls token and position embedding."""

    def __init__(self, d=4, t=3):
        super().__init__()
        self.proj = nn.Linear(2, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, t + 1, d))
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        h = self.proj(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        return self.out(torch.tanh(h))


class ResBlock(nn.Module):
    """In-place residual add and in-place ReLU after hooked modules."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.gn1 = nn.GroupNorm(2, c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.gn2 = nn.GroupNorm(2, c)

    def forward(self, x):
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        out += x
        return self.relu(out)


class MHA(nn.Module):
    def __init__(self, e=6, heads=2):
        super().__init__()
        self.inp = nn.Linear(3, e)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True, bias=True)
        self.out = nn.Linear(e, 2)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a)


class RMS(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.norm = nn.RMSNorm(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.norm(self.inp(x)))


class SharedInput(nn.Module):
    """Several Linear layers reading one tensor (BERT's query/key/value,
    Llama's gate/up): their input Gram matrix is shared by dpft."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 5)
        # q and k of different shapes: not batched together (see dpft.clip.stacked)
        self.q, self.k, self.v = nn.Linear(5, 4), nn.Linear(5, 3), nn.Linear(5, 4, bias=False)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x)).to(x.dtype)  # float32 under autocast, as after a LayerNorm
        k = self.k(h).sum(-1, keepdim=True)
        return self.out(torch.tanh(self.q(h)) * k + self.v(torch.sin(h)) + self.v(h))


class SameShapes(nn.Module):
    """Many Linear layers of one shape (as in a transformer): batched by dpft."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.blocks = nn.ModuleList(nn.Linear(5, 5) for _ in range(5))
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = self.inp(x)
        for i, b in enumerate(self.blocks):
            h = h + torch.tanh(b(h)) if i % 2 else torch.sin(b(h))
        return self.out(h)


def _ids(vocab, t):
    def make():
        x = torch.randint(0, vocab, (t,))
        x[0] = 0  # the padding index appears
        return x

    return make


def _hf_conv1d():
    from transformers.pytorch_utils import Conv1D

    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Conv1D(5, 4), nn.Tanh(), Conv1D(2, 5))


# name -> (model factory, example factory)
ZOO = {
    "linear-2d": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), lambda: torch.randn(6)),
    "linear-3d": (lambda: nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 4)), lambda: torch.randn(7, 3)),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2), nn.Tanh(), nn.Conv1d(4, 3, 2)
        ),
        lambda: torch.randn(2, 11),
    ),
    "conv2d": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=(2, 1), padding=1),
            nn.Tanh(),
            nn.Conv2d(4, 4, 3, padding="same", dilation=2, padding_mode="reflect", groups=2),
            nn.Tanh(),
            nn.Conv2d(4, 2, (2, 3), stride=2, padding=(0, 1), padding_mode="circular"),
        ),
        lambda: torch.randn(3, 7, 6),
    ),
    "conv3d": (
        lambda: nn.Sequential(
            nn.Conv3d(2, 4, 2, groups=2), nn.Tanh(), nn.Conv3d(4, 2, (1, 2, 2), stride=(1, 2, 1), padding=1)
        ),
        lambda: torch.randn(2, 3, 4, 4),
    ),
    "conv-transpose": (
        lambda: nn.Sequential(
            nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
            nn.Tanh(),
            nn.ConvTranspose1d(4, 3, 2, stride=1, dilation=2) if False else nn.Conv2d(4, 2, 1),
        ),
        lambda: torch.randn(2, 3, 4),
    ),
    "conv-transpose-1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 1), nn.Tanh(), nn.ConvTranspose1d(4, 3, 3, stride=2, dilation=2, padding=1)
        ),
        lambda: torch.randn(2, 5),
    ),
    "layernorm": (
        lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 2)),
        lambda: torch.randn(5, 3),
    ),
    "layernorm-2d-shape": (
        lambda: nn.Sequential(nn.Linear(3, 6), nn.LayerNorm((4, 6)), nn.Linear(6, 2)),
        lambda: torch.randn(4, 3),
    ),
    "groupnorm": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Conv2d(4, 2, 1)),
        lambda: torch.randn(2, 5, 5),
    ),
    "instancenorm": (
        lambda: nn.Sequential(nn.Conv1d(2, 4, 2), nn.InstanceNorm1d(4, affine=True), nn.Tanh(), nn.Conv1d(4, 2, 1)),
        lambda: torch.randn(2, 6),
    ),
    "rmsnorm": (RMS, lambda: torch.randn(4, 3)),
    "mha": (MHA, lambda: torch.randn(4, 3)),
    "hf-conv1d": (_hf_conv1d, lambda: torch.randn(4, 3)),
    "embedding-tied": (Tied, _ids(11, 5)),
    "module-twice": (Twice, lambda: torch.randn(4)),
    "shared-input": (SharedInput, lambda: torch.randn(5, 3)),
    "same-shapes": (SameShapes, lambda: torch.randn(3, 3)),  # T = 3: ghost norms (batched) in mixed mode too
    "fallback-leaf": (lambda: nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Linear(4, 2)), lambda: torch.randn(5, 3)),
    "container-tokens": (WithTokens, lambda: torch.randn(3, 2)),
    "resnet-inplace": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 1), ResBlock(4), nn.Conv2d(4, 2, 1)),
        lambda: torch.randn(2, 5, 5),
    ),
}
