"""The noise generators: full-entropy seeding, explicit seeds that use all
their bits, exact state round trips, and secure mode (CPU; the CUDA versions
are in test_cuda.py)."""

from __future__ import annotations

import secrets
import struct
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dpft
import dpft.clip.noise
import dpft.clip.tuning
from dpft.clip.noise import SECURE_DRAWS, GaussianNoise, mt19937_state, philox_state


def _noise(seed, n=64, **kw):
    t = torch.zeros(n, dtype=torch.float64)
    GaussianNoise(seed, **kw).add_([t], 1.0)
    return t


def test_torch_manual_seed_keeps_32_bits_on_the_cpu():
    """The flaw this module avoids: manual_seed(s) and manual_seed(s + 2**32) agree."""
    a, b = torch.Generator(), torch.Generator()
    a.manual_seed(12345)
    b.manual_seed(12345 + 2**32)
    assert torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))


@pytest.mark.parametrize("bit", [32, 40, 63, 64, 100, 127, 200, 255])
def test_seeds_differing_only_in_high_bits_give_different_noise(bit):
    s = 0x1234_5678
    assert not torch.equal(_noise(s), _noise(s + 2**bit))
    assert torch.equal(_noise(s + 2**bit), _noise(s + 2**bit))  # and each is reproducible


def test_engine_noise_seed_uses_high_bits():
    def update(seed):
        model = nn.Linear(3, 16)
        dpft.bitfit(model)
        with torch.no_grad():
            model.bias.zero_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = dpft.PrivacyEngine(
                model, batch_size=4, sample_size=40, steps=3, noise_multiplier=1.0, noise_seed=seed
            )
        opt = torch.optim.SGD([model.bias], lr=1.0)
        engine.attach(opt)
        model(torch.ones(4, 3)).sum().mul(0).backward()
        opt.step()
        return model.bias.detach().clone()

    assert torch.equal(update(7), update(7))
    assert not torch.equal(update(7), update(7 + 2**32))
    assert not torch.equal(update(7), update(7 + 2**64))


def test_default_state_is_624_words_of_os_entropy(monkeypatch):
    """Without a seed the CPU generator's whole MT19937 key (624 words) comes
    from ``secrets``, and the generator then produces exactly MT19937 with
    that key (checked against numpy's MT19937)."""
    taken = []
    real = secrets.token_bytes

    def spy(n):
        b = real(n)
        taken.append(b)
        return b

    monkeypatch.setattr(dpft.clip.noise.secrets, "token_bytes", spy)
    g = GaussianNoise().generator(torch.device("cpu"))
    assert len(taken) == 1 and len(taken[0]) == 4 * 624  # 19 968 bits
    words = np.frombuffer(taken[0], dtype=np.uint32)
    state = bytes(g.get_state().numpy())
    assert list(struct.unpack_from("<624Q", state, 24)) == [int(w) for w in words]
    bg = np.random.MT19937()
    bg.state = {"bit_generator": "MT19937", "state": {"key": words.copy(), "pos": 624}}
    ref = bg.random_raw(16)
    # torch's randint over [0, 2^32) takes one 64-bit draw (two words) per value; its value is the second word
    got = torch.randint(0, 2**32, (8,), generator=g, dtype=torch.int64)
    assert got.tolist() == [int(x) for x in ref[1::2]]


def test_two_unseeded_generators_differ():
    assert not torch.equal(_noise(None), _noise(None))


def test_mt19937_state_is_torch_layout():
    words = np.arange(1, 625, dtype=np.uint32) * np.uint32(2654435761)
    g = torch.Generator()
    g.set_state(mt19937_state(words))
    bg = np.random.MT19937()
    bg.state = {"bit_generator": "MT19937", "state": {"key": words, "pos": 624}}
    assert torch.randint(0, 2**32, (4,), generator=g, dtype=torch.int64).tolist() == [
        int(x) for x in bg.random_raw(8)[1::2]
    ]
    with pytest.raises(ValueError, match="624 words"):
        mt19937_state(np.zeros(624, dtype=np.uint32))


def test_philox_state_bytes():
    s = philox_state(2**64 - 1, 2**64 - 4)
    assert s.dtype == torch.uint8 and s.numel() == 16
    assert struct.unpack("<QQ", bytes(s.numpy())) == (2**64 - 1, 2**64 - 4)
    with pytest.raises(ValueError):
        philox_state(1, 6)  # torch requires offsets that are multiples of 4


def test_streams_are_independent():
    assert not torch.equal(_noise(5, stream=0), _noise(5, stream=1))


def test_bad_seed():
    for bad in (-1, 1.5, "7", True):
        with pytest.raises(ValueError, match="noise_seed"):
            GaussianNoise(bad)


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("seed", [None, 3])
def test_state_round_trip_continues_the_same_noise(secure, seed):
    a = GaussianNoise(seed, secure=secure)
    x = torch.zeros(1000)
    a.add_([x], 1.0, divide=3)  # advance the generators
    state = a.state_dict()
    b = GaussianNoise(None if seed is None else seed + 1, secure=secure)
    b.load_state_dict(state)
    ta, tb = torch.zeros(5000), torch.zeros(5000)
    a.add_([ta], 2.0, divide=4)
    b.add_([tb], 2.0, divide=4)
    assert torch.equal(ta, tb)
    za, zb = a.standard_normal([torch.zeros(7, 3)]), b.standard_normal([torch.zeros(7, 3)])
    assert torch.equal(za[0], zb[0])


def test_old_state_format_loads():
    g = torch.Generator()
    g.manual_seed(11)
    old = {"seed": 11, "states": {"cpu": g.get_state()}}  # earlier dpft: one state per device
    n = GaussianNoise()
    n.load_state_dict(old)
    assert torch.equal(n.generator(torch.device("cpu")).get_state(), g.get_state())


def test_engine_state_dict_resume_gives_the_same_noise():
    """An engine restored from ``state_dict`` draws exactly the noise the
    original would have drawn next (unseeded, i.e. OS-entropy generators)."""

    def make():
        torch.manual_seed(0)
        model = nn.Linear(3, 50)
        dpft.bitfit(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = dpft.PrivacyEngine(model, batch_size=4, sample_size=40, steps=10, noise_multiplier=1.0)
        opt = torch.optim.SGD([model.bias], lr=1.0)
        engine.attach(opt)
        return model, engine, opt

    def step(model, opt):
        model(torch.ones(4, 3)).sum().mul(0).backward()
        opt.step()
        opt.zero_grad()

    m1, e1, o1 = make()
    step(m1, o1)
    state = e1.state_dict()
    m2, e2, o2 = make()
    e2.load_state_dict(state)
    with torch.no_grad():
        m2.bias.copy_(m1.bias)
    step(m1, o1)
    step(m2, o2)
    assert torch.equal(m1.bias, m2.bias)


def test_secure_mode_sums_four_float64_draws_and_rounds_once():
    """Secure mode: ``(t + alpha z) / divide`` with ``z`` the float64 sum of
    four draws of std ``alpha / 2`` from four generators, rounded to float32
    once; the draws are exactly those of the four generators."""
    alpha, divide = 0.7, 8
    t = torch.linspace(-3.0, 3.0, 20_000)
    out = t.clone()
    GaussianNoise(9, secure=True).add_([out], alpha, divide=divide)
    ref = GaussianNoise(9, secure=True)
    gens = ref.generators(torch.device("cpu"))
    assert len(gens) == SECURE_DRAWS
    z = sum(torch.empty(t.numel(), dtype=torch.float64).normal_(0.0, alpha / 2, generator=g) for g in gens)
    expected = ((t.double() + z) / divide).float()
    assert torch.equal(out, expected)
    # not the one-draw noise of the same seed
    plain = t.clone()
    GaussianNoise(9).add_([plain], alpha, divide=divide)
    assert not torch.equal(plain, out)


def test_secure_mode_noise_is_gaussian_with_the_right_std():
    from scipy import stats

    t = torch.zeros(200_000)
    GaussianNoise(4, secure=True).add_([t], 1.3, divide=2)
    z = (t.double() * 2 / 1.3).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # the four draws are independent: the sum's variance is exactly 4 * (1/2)^2 = 1
    assert abs(z.var() - 1.0) < 0.02


def test_secure_mode_standard_normal_is_float64():
    n = GaussianNoise(1, secure=True)
    (z,) = n.standard_normal([torch.zeros(50_000)])
    assert z.dtype == torch.float64 and abs(float(z.std()) - 1.0) < 0.02


def test_engine_secure_mode_update_std():
    torch.manual_seed(0)
    model = nn.Linear(3, 2000)
    dpft.bitfit(model)
    sigma, R, B = 1.5, 0.5, 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model,
            batch_size=B,
            sample_size=40,
            steps=10,
            noise_multiplier=sigma,
            max_grad_norm=R,
            secure_mode=True,
            poisson=False,
        )
    assert engine.secure_mode and engine.noise.secure
    opt = torch.optim.SGD([model.bias], lr=1.0)
    engine.attach(opt)
    before = model.bias.detach().clone()
    model(torch.ones(B, 3)).sum().mul(0).backward()
    opt.step()
    d = (model.bias.detach() - before).double()
    assert abs(float(d.std()) / (sigma * R / B) - 1) < 0.05
    with pytest.raises(ValueError, match="secure_mode"):
        dpft.PrivacyEngine(model, batch_size=B, sample_size=40, steps=10, noise_multiplier=sigma, secure_mode=1)


def test_other_device_types_draw_on_the_cpu(monkeypatch):
    """A device type without a known generator layout gets a CPU MT19937
    generator (full entropy) whose draws are copied to the device."""
    n = GaussianNoise(2)
    g = n._fresh("meta", 0)
    assert g.device.type == "cpu"


def test_secure_mode_in_chunks_and_non_contiguous(monkeypatch):
    """Secure mode fills every entry of float32 / float64, contiguous or not,
    tensors larger than a chunk piece by piece, with the right std, and is
    reproducible from the seed."""
    monkeypatch.setattr(dpft.clip.tuning, "NOISE_CHUNK", 1000)

    def draw(seed):
        ts = [torch.zeros(3, 5), torch.zeros(2500, dtype=torch.float64), torch.zeros(40, 30).t(), torch.zeros(600)]
        GaussianNoise(seed, secure=True).add_(ts, 2.0, divide=2)
        return ts

    ts = draw(1)
    flat = torch.cat([t.reshape(-1).double() for t in ts])
    assert bool((flat != 0).all()) and len(torch.unique(flat)) == flat.numel()
    assert abs(float(flat.std()) - 1.0) < 0.05  # (0 + 2 z) / 2
    assert all(torch.equal(a, b) for a, b in zip(ts, draw(1)))
    assert ts[1].dtype == torch.float64 and not ts[2].is_contiguous()


def test_state_of_another_stream_is_not_continued():
    """Rank 0's state loaded by rank 1 (a resumed distributed run): rank 1 neither
    copies rank 0's noise nor restarts its own seeded stream (which would repeat
    noise it already used); it draws fresh noise from OS entropy."""
    rank0, rank1 = GaussianNoise(5, stream=0), GaussianNoise(5, stream=1)
    rank0.add_([torch.zeros(100)], 1.0)
    state = rank0.state_dict()
    rank1.load_state_dict(state)
    t1 = torch.zeros(1000)
    rank1.add_([t1], 1.0)
    cont0 = GaussianNoise(5, stream=0)
    cont0.load_state_dict(state)
    t0 = torch.zeros(1000)
    cont0.add_([t0], 1.0)
    assert not torch.equal(t1, t0)  # not rank 0's continuation
    ref = torch.zeros(1000)
    GaussianNoise(5, stream=1).add_([ref], 1.0)
    assert not torch.equal(t1, ref)  # not rank 1's seeded start again
    same = GaussianNoise(5, stream=1)  # while its own state is continued exactly
    same.load_state_dict(GaussianNoise(5, stream=1).state_dict())
    again = torch.zeros(1000)
    same.add_([again], 1.0)
    assert torch.equal(again, ref)
