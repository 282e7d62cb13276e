"""dpft.clip.tuning: one table of tuning values, one switch to change them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dpft.clip import noise, norms, stacked, tuning
from dpft.rules.base import Factored

SRC = Path(__file__).resolve().parents[1] / "src" / "dpft"


def test_every_value_says_where_it_comes_from():
    assert tuning.MEASURED and set(tuning.DEFAULTS) == set(tuning.MEASURED)
    for name, where in tuning.MEASURED.items():
        assert name.isupper() and hasattr(tuning, name), name
        assert len(where) > 20, f"{name}: say where it was measured, or that it is no timing"


def test_override_reaches_the_clipping_code_and_restores():
    """The clipping code reads the table when it runs: a value set through
    the switch changes what it does, and the old value is back afterwards."""
    g = torch.Generator().manual_seed(0)
    c = Factored(
        left=torch.randn(3, 40, 1, 5, generator=g, dtype=torch.float64),
        right=torch.randn(3, 40, 1, 4, generator=g, dtype=torch.float64),
        shape=torch.Size([5, 4]),
    )
    want = norms.instantiate(c, torch.float64).flatten(1).pow(2).sum(1)
    calls = []
    real = norms._rows

    def spy(*a):
        calls.append(1)
        return real(*a)

    norms._rows = spy
    try:
        norms._ghost_pair(c, c, torch.float64)
        assert not calls  # one block at the shipped GHOST_BLOCK
        with tuning.override(GHOST_BLOCK=7) as now:
            assert now["GHOST_BLOCK"] == 7 and tuning.GHOST_BLOCK == 7
            got = norms._ghost_pair(c, c, torch.float64)
        assert calls  # row chunks under the small block
    finally:
        norms._rows = real
    assert torch.allclose(got, want, rtol=1e-10)
    assert tuning.GHOST_BLOCK == tuning.DEFAULTS["GHOST_BLOCK"]

    t = torch.zeros(10)
    seen = []
    real_noise = noise.GaussianNoise._noise

    def count(self, n, *a):
        seen.append(n)
        return real_noise(self, n, *a)

    noise.GaussianNoise._noise = count
    try:
        with tuning.override(NOISE_CHUNK=4):
            noise.GaussianNoise(seed=0).add_([t], 1.0)
    finally:
        noise.GaussianNoise._noise = real_noise
    assert max(seen) <= 4 and sum(seen) == 10
    assert tuning.NOISE_CHUNK == tuning.DEFAULTS["NOISE_CHUNK"]


def test_override_restores_after_an_error_and_refuses_unknown_names():
    with pytest.raises(RuntimeError):
        with tuning.override(CHUNK_BYTES=1, FUSED_KERNEL=False):
            assert stacked.tuning.CHUNK_BYTES == 1
            raise RuntimeError("inside")
    assert tuning.values() == tuning.DEFAULTS
    with pytest.raises(KeyError, match="no value 'CHUNK'"):
        with tuning.override(CHUNK=1):
            pass


def test_no_copies_and_no_timings_in_code_comments():
    """The clipping modules read ``tuning.X`` (never ``from .tuning import X``,
    a copy the switch would not reach); and hardware timings live in the
    table, not in the clipping stage's or the capture's code comments."""
    timing = re.compile(r"\b(H100|H200|A100)\b[^\n]*\b\d+(\.\d+)?\s*(us|µs|ms)\b|\b\d+\s*us against")
    for path in sorted((SRC / "clip").glob("*.py")) + sorted((SRC / "capture").glob("*.py")):
        text = path.read_text()
        assert "from .tuning import" not in text, path
        if path.name != "tuning.py":
            assert not timing.search(text), f"{path.name}: a hardware timing belongs in dpft/clip/tuning.py"


def test_grouped_conv_switch_reaches_the_convolution_rule():
    """``GROUPED_CONV`` is read by the clipping stage and handed to the
    convolution rule: both kernels give the brute-force per-example gradient,
    and the switch picks which one runs."""
    from dpft.rules.conv import ConvFactored

    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(3, 3, 6, 6, generator=g, dtype=torch.float64)
    out_grad = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    want = torch.stack([torch.autograd.grad(conv(x[i : i + 1]), conv.weight, out_grad[i : i + 1])[0] for i in range(3)])
    seen = []
    real = ConvFactored._wgrad

    def spy(self, *a):
        seen.append(1)
        return real(self, *a)

    ConvFactored._wgrad = spy
    try:
        plain = norms.instantiate(ConvFactored(conv, x, out_grad, 3), torch.float64)
        assert not seen  # shipped: the unfolded input, no weight-gradient kernel
        with tuning.override(GROUPED_CONV=True):
            grouped = norms.instantiate(ConvFactored(conv, x, out_grad, 3), torch.float64)
        assert seen
    finally:
        ConvFactored._wgrad = real
    for got in (plain, grouped):
        assert float((got - want).norm() / want.norm()) < 1e-10
