"""Data-parallel DP on CPU with gloo, 2 processes: the update equals the
single-process update on the union of the batches, and the total noise has
std sigma R / B (not sqrt(W) too large or too small)."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dpft

W = 2
B = 8  # global logical batch


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_fn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 4, generator=g, dtype=torch.float64)


def loss_fn(m, x):
    return m(x).pow(2).sum(1).mean()


def _worker(rank, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    torch.set_num_threads(1)
    try:
        warnings.simplefilter("ignore")
        model = model_fn()
        if mode == "exact":
            engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=5, noise_multiplier=0.0, max_grad_norm=0.5)
            opt = torch.optim.SGD(model.parameters(), lr=1.0)
            engine.attach(opt)
            x = data()[rank::W]  # each rank its own examples
            loss_fn(model, x).backward()
            opt.step()
            torch.save({n: p.detach() for n, p in model.named_parameters()}, f"{out}/rank{rank}.pt")
        else:
            lin = nn.Linear(2, 300).double()
            dpft.bitfit(lin)
            engine = dpft.PrivacyEngine(lin, batch_size=B, sample_size=100, steps=100, noise_multiplier=2.0,
                                        max_grad_norm=1.0, noise_seed=5)
            opt = torch.optim.SGD([lin.bias], lr=1.0)
            engine.attach(opt)
            deltas = []
            for _ in range(30):
                before = lin.bias.detach().clone()
                (0 * lin(torch.randn(B // W, 2, dtype=torch.float64))).sum().backward()
                opt.step()
                opt.zero_grad()
                deltas.append(lin.bias.detach() - before)
            torch.save(torch.stack(deltas), f"{out}/noise{rank}.pt")
        dist.barrier()  # nobody tears the group down while a peer is still using it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["exact", "noise"])
def test_data_parallel(tmp_path, mode):
    try:
        mp.start_processes(_worker, args=(_port(), mode, str(tmp_path)), nprocs=W, join=True, start_method="spawn")
    except mp.ProcessExitedException:
        # gloo can abort a process at interpreter exit ("terminate called without an
        # active exception") after all work is done; what is tested is the results
        # both ranks wrote -- if one is missing, the run really failed.
        names = [f"rank{r}.pt" if mode == "exact" else f"noise{r}.pt" for r in range(W)]
        if not all((tmp_path / n).exists() for n in names):
            raise
    if mode == "exact":
        r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(W))
        model = model_fn()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=5, noise_multiplier=0.0,
                                        max_grad_norm=0.5, distributed=False)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        engine.attach(opt)
        x = data()
        loss_fn(model, x[0::W]).backward()  # the union, as two physical batches
        loss_fn(model, x[1::W]).backward()
        opt.step()
        for n, p in model.named_parameters():
            assert torch.equal(r0[n], r1[n]), "ranks diverged"
            assert torch.allclose(r0[n], p.detach(), rtol=1e-9, atol=1e-12), n
    else:
        d0, d1 = (torch.load(tmp_path / f"noise{r}.pt") for r in range(W))
        assert torch.equal(d0, d1), "ranks applied different updates"
        assert abs(d0.std().item() / (2.0 * 1.0 / B) - 1) < 0.05


def test_poisson_shards_compose():
    s0 = dpft.data.PoissonBatchSampler(1000, batch_size=50, seed=3, rank=0, world_size=2)
    s1 = dpft.data.PoissonBatchSampler(1000, batch_size=50, seed=3, rank=1, world_size=2)
    full = dpft.data.PoissonBatchSampler(1000, batch_size=50, seed=3)
    for i in range(5):
        a, b, f = s0.batch(0, i), s1.batch(0, i), full.batch(0, i)
        assert sorted(a + b) == f and not set(a) & set(b)
