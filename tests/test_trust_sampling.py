"""The loader/accounting check (dpft.sampling_check): a loader that does not
sample as the accountant assumes is caught (warning, or an error under
strict=True); the Poisson loader never sets it off, with physical batches,
empty batches and data parallelism; fixed-size batches are accepted only
with poisson=False, and ε is then labelled."""

from __future__ import annotations

import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpft
from dpft.sampling_check import (
    MISMATCH_CAVEAT,
    NON_POISSON_CAVEAT,
    SamplingCheck,
    SamplingMismatch,
    SamplingMismatchWarning,
    _central_mass,
    _upper_tail,
)


# --------------------------------------------------------------------------
# the statistics


def test_tails_match_scipy():
    from scipy import stats

    for n, p in ((10, 0.3), (1000, 0.01), (5000, 0.25), (7, 1.0)):
        for k in (0, 1, int(n * p), int(n * p) + 3, n, n + 1):
            assert _upper_tail(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)
        mean = n * p
        ks = np.arange(n + 1)
        want = stats.binom.pmf(ks[np.abs(ks - mean) < 1], n, p).sum()
        assert _central_mass(n, p) == pytest.approx(want, rel=1e-9)


def test_false_alarm_bound_is_summable():
    """Σ_t α / (t (t+1)) = α: per test, the probability of ever firing under
    the assumption is at most α (union bound over steps)."""
    check = SamplingCheck(100, 0.1, 10)
    total = sum(check.alpha / (t * (t + 1)) for t in range(1, 10**6))
    assert total <= check.alpha


def test_poisson_counts_never_fire():
    """Binomial(N, q) counts, as the assumption says: 400 runs x 300 steps
    over a range of N, q (including q = 1 and tiny expected batches) never
    fire (the bound says P <= 2e-6 per run)."""
    rng = np.random.default_rng(0)
    for n, q in ((100, 0.08), (20, 0.05), (1000, 0.3), (60_000, 256 / 60_000), (5, 1.0), (3, 0.5)):
        for _ in range(400 // 6 + 1):
            check = SamplingCheck(n, q, max(1, round(n * q)))
            for c in rng.binomial(n, q, size=300):
                assert check.observe(int(c)) is None


def test_full_batch_against_q_quarter_fires_at_step_three():
    for n in (4, 40, 4000):
        check = SamplingCheck(n, 0.25, n // 4)
        fired = [check.observe(n) for _ in range(3)]
        assert fired[:2] == [None, None] and fired[2] is not None
        assert "poisson_loader" in fired[2] and "under-counted" in fired[2]


@pytest.mark.parametrize("n,b", [(100, 10), (10_000, 100), (60_000, 256)])
def test_fixed_size_batches_fire_within_a_few_dozen_steps(n, b):
    check = SamplingCheck(n, b / n, b)
    for t in range(1, 40):
        msg = check.observe(b)
        if msg is not None:
            break
    assert msg is not None and "fixed-size" in msg and "poisson=False" in msg
    assert t <= 25


def test_fewer_examples_never_fire():
    """A smaller sampling rate, or a data set smaller than sample_size, only over-counts ε."""
    check = SamplingCheck(1000, 0.1, 100)
    for _ in range(200):
        assert check.observe(40) is None
    assert check.observe(0) is None


def test_fixed_size_mode():
    check = SamplingCheck(100, 0.1, 10, poisson=False)
    assert all(check.observe(10) is None for _ in range(100))  # fixed size accepted
    assert all(check.observe(4) is None for _ in range(5))  # a short last batch too
    msgs = [check.observe(12) for _ in range(3)]
    assert msgs[:2] == [None, None] and "more than batch_size=10" in msgs[2]


# --------------------------------------------------------------------------
# through the engine


N, B = 40, 10  # q = 0.25


def _task(n=N):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = torch.randn(n, 2, generator=g)
    return TensorDataset(x, y)


def _engine(strict=False, poisson=True, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    args = dict(
        batch_size=B, sample_size=N, steps=200, noise_multiplier=1.0, max_grad_norm=1.0, strict=strict, poisson=poisson
    )
    args.update(kw)
    engine = dpft.PrivacyEngine(model, **args)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine.attach(opt)
    return model, engine, opt


def _step(model, engine, opt, batch, physical=None):
    x, y = batch
    if len(x) == 0:
        engine.record_empty_batch()
    else:
        chunks = dpft.data.split_physical((x, y), physical) if physical else [(x, y)]
        for cx, cy in chunks:
            (model(cx) - cy).pow(2).sum(1).mean().backward()
    opt.step()
    opt.zero_grad()


def test_full_batch_loader_warns():
    """The issue's case: an ordinary loader giving all N examples each step to
    an engine told q = 0.25 is caught at step 3, and ε is labelled."""
    model, engine, opt = _engine()
    loader = DataLoader(_task(), batch_size=N)
    with pytest.warns(SamplingMismatchWarning, match="poisson_loader"):
        for _ in range(3):
            for batch in loader:
                _step(model, engine, opt, batch)
    assert engine.epsilon_caveat == MISMATCH_CAVEAT
    assert MISMATCH_CAVEAT in engine.ledger.state_dict()["caveats"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplingMismatchWarning)  # warned once, not at every step
        for batch in loader:
            _step(model, engine, opt, batch)


def test_full_batch_loader_raises_under_strict_before_the_step():
    model, engine, opt = _engine(strict=True)
    loader = DataLoader(_task(), batch_size=N)
    batch = next(iter(loader))
    _step(model, engine, opt, batch)
    _step(model, engine, opt, batch)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(SamplingMismatch, match=r"dpft\.data\.poisson_loader.*Nothing was changed"):
        _step(model, engine, opt, batch)
    assert engine.steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert engine.epsilon_caveat == MISMATCH_CAVEAT  # the two steps taken were accounted for the wrong sampling


def test_batch_size_larger_than_told_warns():
    """A Poisson loader at twice the engine's rate (batch_size mismatch)."""
    model, engine, opt = _engine()
    loader = dpft.data.poisson_loader(_task(), 2 * B, steps=50, seed=1)
    with pytest.warns(SamplingMismatchWarning, match="under-counted"):
        for batch in loader:
            _step(model, engine, opt, batch)


@pytest.mark.parametrize("physical", [None, 3])
def test_poisson_loader_never_warns(physical):
    """dpft.data.poisson_loader at the engine's rate: 300 steps, with physical
    chunks (several backward passes per step) and the empty batches Poisson
    sampling produces (record_empty_batch): no warning, no caveat, and the
    engine counted exactly the examples it was given."""
    n, b = 60, 3  # q = 0.05: about 5% of the batches are empty
    model, engine, opt = _engine(batch_size=b, sample_size=n, steps=300)
    loader = dpft.data.poisson_loader(_task(n), b, steps=300, seed=2)
    sizes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplingMismatchWarning)
        for batch in loader:
            sizes.append(len(batch[0]))
            _step(model, engine, opt, batch, physical)
    assert 0 in sizes and max(sizes) > 3
    assert engine.sampling_check.steps == 300 and engine.sampling_check.total == sum(sizes)
    assert engine.epsilon_caveat is None


def test_shuffled_loader_warns_without_the_flag():
    model, engine, opt = _engine(sample_size=400, batch_size=40, steps=100)
    loader = dpft.data.shuffled_loader(_task(400), 40, seed=0)
    with pytest.warns(SamplingMismatchWarning, match="fixed-size"):
        for _ in range(3):
            for batch in loader:
                _step(model, engine, opt, batch)


def test_shuffled_loader_accepted_with_poisson_false_and_labelled():
    model, engine, opt = _engine(sample_size=400, batch_size=40, steps=100, poisson=False)
    assert engine.epsilon_caveat == NON_POISSON_CAVEAT and "assumes Poisson" in engine.epsilon_caveat
    loader = DataLoader(_task(400), batch_size=40, shuffle=True)  # the short last batch is fine too
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplingMismatchWarning)
        for _ in range(3):
            for batch in loader:
                _step(model, engine, opt, batch)
    # the label is part of the ledger: it survives a checkpoint and a shared ledger
    state = engine.state_dict()
    restored = dpft.accounting.Ledger.from_state_dict(state["ledger"])
    assert restored.caveats == (NON_POISSON_CAVEAT,)
    _, later, _ = _engine(ledger=restored)
    assert later.epsilon_caveat == NON_POISSON_CAVEAT


def test_bad_flags():
    with pytest.raises(ValueError, match="strict"):
        _engine(strict="yes")
    with pytest.raises(ValueError, match="poisson"):
        _engine(poisson=None)


# --------------------------------------------------------------------------
# data parallel: each rank sees its share; the check uses the global count

W = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank, mode):
    n, b = 60, 6
    strict = mode == "full-strict"
    model, engine, opt = _engine(batch_size=b, sample_size=n, steps=100, strict=strict)
    data = _task(n)
    result = {"warned": False, "raised_at": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode == "poisson":
            loader = dpft.data.poisson_loader(data, b, steps=80, seed=3)  # shards the global batch
            for batch in loader:
                _step(model, engine, opt, batch, physical=2)
            engine.detach()
        else:  # every rank: all its share of the data at every step (q = 1, told 0.1)
            x, y = data.tensors
            mine = (x[rank::W], y[rank::W])
            for t in range(10):
                try:
                    _step(model, engine, opt, mine)
                except SamplingMismatch:
                    result["raised_at"] = t
                    break
    result["warned"] = any(issubclass(w.category, SamplingMismatchWarning) for w in caught)
    result["steps"] = engine.sampling_check.steps
    result["total"] = engine.sampling_check.total
    return result


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    torch.set_num_threads(1)
    try:
        results = {mode: _run_rank(rank, mode) for mode in ("poisson", "full-strict")}
        torch.save(results, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_distributed(tmp_path):
    """Data parallel (gloo, 2 ranks, one launch for both cases): the Poisson
    loader (each rank its share of the global batch, physical chunks) never
    warns and both ranks check the same global counts; a full-batch loader
    raises on both ranks at the same step."""
    mp.start_processes(_worker, args=(_port(), str(tmp_path)), nprocs=W, join=True, start_method="spawn")
    r0, r1 = [torch.load(f"{tmp_path}/rank{r}.pt") for r in range(W)]
    p0, p1 = r0["poisson"], r1["poisson"]
    assert not p0["warned"] and not p1["warned"]
    assert p0["steps"] == p1["steps"] == 80 and p0["total"] == p1["total"]  # the last one at detach
    f0, f1 = r0["full-strict"], r1["full-strict"]
    assert f0["raised_at"] is not None and f0["raised_at"] == f1["raised_at"]
    assert f0["total"] == f1["total"] == 60 * f0["raised_at"]  # the global count, read a step late


def test_the_documented_under_count_example():
    """README / dpft.sampling_check: σ = 2.5, 20 steps, δ = 1e-5 reports ε ≈ 2.1
    at q = 0.25 where a full-batch loader (q = 1) runs a mechanism with ε ≈ 8.7
    (checked with dp_accounting directly)."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    def eps(q):
        acc = PLDAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
        )
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(2.5)), 20)
        return acc.get_epsilon(1e-5)

    assert round(eps(0.25), 1) == 2.1 and round(eps(1.0), 1) == 8.7
