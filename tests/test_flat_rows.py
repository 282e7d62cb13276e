"""Layers that see examples' rows flattened into the leading dimension
(OPT's MLP on ``(B*T, d)``, Swin's windows ``(B*nW, N, d)``): the rows are
mapped back to their examples, and the first passes verify that each
example's rows form one block (a time-major flattening is refused)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from reference import check_steps

import dpft

B = 4
T = 5
D = 6
V = 13


class Flat(nn.Module):
    """Token embeddings looked up flat, then an MLP and a norm on (B*T, d)."""

    def __init__(self, ckpt: bool = False):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.inp = nn.Linear(D, D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.norm = nn.LayerNorm(2 * D)
        self.fc2 = nn.Linear(2 * D, D)
        self.head = nn.Linear(D, 3)
        self.ckpt = ckpt

    def forward(self, ids):
        n, t = ids.shape
        h = self.emb(ids.reshape(-1))  # (B*T, d): ids flattened
        h = torch.tanh(self.inp(h.view(n, t, -1))).reshape(-1, h.shape[-1])  # batch-first, then flattened
        # (inside a checkpointed region only a flat view of a batch-first
        # tensor can be verified: the first layer after the reshape)
        u = checkpoint(self.fc1, h, use_reentrant=False) if self.ckpt else self.fc1(h)
        h = h + self.fc2(torch.tanh(self.norm(u)))
        return self.head(h.view(n, t, -1).mean(1))


def _loss(model, batch):
    ids, y = batch
    return F.cross_entropy(model(ids), y)


def _collate(examples):
    return tuple(torch.stack(v) for v in zip(*examples))


def _example():
    return torch.randint(0, V, (T,)), torch.randint(0, 3, ())


@pytest.mark.parametrize("mode", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_flattened_rows_exact(mode, ckpt):
    torch.manual_seed(0)
    check_steps(Flat(ckpt), _example, _collate, _loss, steps=3, batch_size=B, mode=mode)


def test_flattened_rows_bias_only_exact():
    torch.manual_seed(0)
    model = Flat()
    dpft.bitfit(model)
    check_steps(model, _example, _collate, _loss, steps=3, batch_size=B)


def test_time_major_flattening_is_refused():
    """Rows flattened position by position ((T*B, d)): a block of rows holds
    several examples' positions; the first pass sees it and refuses."""

    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, D)
            self.fc = nn.Linear(D, D)

        def forward(self, x):  # (B, T, 3)
            h = self.inp(x)
            flat = h.transpose(0, 1).reshape(-1, D)  # (T*B, d)
            return self.fc(flat).sum()

    model = TimeMajor().double()
    engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=10, noise_multiplier=1.0, max_grad_norm=1.0)
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(dpft.UnsupportedModuleError, match="'fc' .*not flattened example by example"):
        model(torch.randn(B, T, 3, dtype=torch.float64))


class NoAnchor(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.fc = nn.Linear(D, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids.reshape(-1))).view(*ids.shape, 3).mean(1)


def test_flattened_rows_without_anything_to_check_against_take_the_enclosing_module():
    """Bias-only training where nothing before the flattened layer requires
    a gradient: no tensor to verify its rows against, so dpft does not
    assume the layout: the enclosing module, whose output is batch-first,
    is recomputed for the layer's parameters (exact)."""
    torch.manual_seed(0)
    model = NoAnchor()
    dpft.bitfit(model)
    check_steps(model, _example, _collate, _loss, steps=3, batch_size=B)


def test_unverifiable_rows_inside_a_checkpointed_region_are_refused():
    """Inside a non-reentrant checkpointed region a pull-back would make
    checkpoint recompute mid-forward: rows that only a pull-back could verify
    are refused there, with the reason."""

    class Inside(Flat):
        def forward(self, ids):
            n, t = ids.shape
            h = self.inp(self.emb(ids)).reshape(-1, D)
            u = checkpoint(lambda z: self.fc2(torch.tanh(self.norm(self.fc1(z)))), h, use_reentrant=False)
            return self.head((h + u).view(n, t, -1).mean(1))

    model = Inside().double()
    engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=10, noise_multiplier=1.0, max_grad_norm=1.0)
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(dpft.UnsupportedModuleError, match="'norm' .*inside an activation-checkpointed region"):
        model(torch.randint(0, V, (B, T)))
