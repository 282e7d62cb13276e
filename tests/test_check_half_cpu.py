"""The first-pass check on a CPU in half precision: PyTorch's CPU LayerNorm
backward sums its weight and bias gradients in bfloat16, so where the output
gradient cancels over positions autograd's own gradient is far from the exact
sum.  dpft's check compares against autograd and refuses; the refusal says
why and what to do (float32 trains: the same model passes)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dpft
from dpft.rules.base import UnsupportedModuleError


class _AlternatingNorm(nn.Module):
    """A LayerNorm whose output gradient alternates in sign over 784 positions."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 192)
        self.norm = nn.LayerNorm(192)
        self.register_buffer("sign", (torch.arange(784) % 2 * 2 - 1).float().view(1, 784, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.inp(x))
        return (y.float() * self.sign).mean((1, 2)) + (y.float() ** 2).mean((1, 2)) * 1e-3


def _two_steps(half: bool) -> None:
    torch.manual_seed(0)
    net = _AlternatingNorm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(net, batch_size=4, sample_size=400, steps=10, noise_multiplier=1.0)
        opt = engine.attach(torch.optim.SGD(net.parameters(), lr=0.1))
    x = torch.randn(4, 784, 8)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            out = net(x)
        out.mean().backward()
        opt.step()
        opt.zero_grad()


def test_pytorch_cpu_bf16_layer_norm_backward_is_inexact():
    """The premise: autograd's bf16 bias gradient is off the exact sum of the
    output gradient it was given (float32 is not)."""
    torch.manual_seed(0)
    g = (torch.randn(2, 784, 192) * 0.01 + 3e-4).bfloat16()
    exact = g.double().sum((0, 1))
    errs = {}
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 784, 192).to(dtype)
        b = torch.zeros(192, dtype=dtype, requires_grad=True)
        torch.nn.functional.layer_norm(x, (192,), None, b).backward(g.to(dtype))
        errs[dtype] = float((b.grad.double() - exact).norm() / exact.norm())
    assert errs[torch.float32] < 1e-6
    assert errs[torch.bfloat16] > 1e-3, errs


def test_refusal_under_cpu_bf16_says_why_and_float32_trains():
    with pytest.raises(UnsupportedModuleError, match="norm.bias") as info:
        _two_steps(half=True)
    assert "LayerNorm backward sums" in str(info.value) and "float32 on a CPU" in str(info.value)
    _two_steps(half=False)  # the same model in float32: no refusal
