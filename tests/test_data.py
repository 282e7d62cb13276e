"""Tests for dpft.data: Poisson sampling, empty batches, resume, physical chunks."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dpft.data import PoissonBatchSampler, PoissonLoader, poisson_loader, shuffled_loader, split_physical


def xy_dataset(n: int = 50) -> TensorDataset:
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    y = torch.arange(n, dtype=torch.int64) % 2
    return TensorDataset(x, y)


class DictDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {
            "input_ids": torch.full((7,), i, dtype=torch.int32),
            "label": i % 3,
            "weight": 0.5,
            "text": f"example {i}",
        }


# --------------------------------------------------------------------------
# the sampling distribution


def test_batch_sizes_follow_binomial():
    n, q, steps = 1000, 0.05, 3000
    sampler = PoissonBatchSampler(n, q, steps=steps, seed=1234)
    sizes = np.array([len(b) for b in sampler])
    assert len(sizes) == steps
    # chi-square goodness of fit against Binomial(n, q), bins pooled to expected >= 5
    binom = stats.binom(n, q)
    lo, hi = int(binom.ppf(0.001)), int(binom.ppf(0.999))
    edges = list(range(lo, hi + 1))
    observed = [np.sum(sizes < lo)] + [np.sum(sizes == k) for k in edges] + [np.sum(sizes > hi)]
    expected = [binom.cdf(lo - 1)] + [binom.pmf(k) for k in edges] + [binom.sf(hi)]
    expected = np.array(expected) * steps
    obs_p, exp_p, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed, expected):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            obs_p.append(acc_o)
            exp_p.append(acc_e)
            acc_o = acc_e = 0.0
    obs_p[-1] += acc_o
    exp_p[-1] += acc_e
    exp_p = np.array(exp_p) * (sum(obs_p) / sum(exp_p))
    p_value = stats.chisquare(obs_p, exp_p).pvalue
    assert p_value > 1e-3, p_value
    assert sizes.mean() == pytest.approx(n * q, rel=0.02)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.1)


def test_inclusion_rate_per_example_is_q():
    n, q, steps = 200, 0.1, 4000
    counts = np.zeros(n)
    for batch in PoissonBatchSampler(n, q, steps=steps, seed=7):
        assert batch == sorted(set(batch))  # distinct indices
        assert all(0 <= i < n for i in batch)
        counts[batch] += 1
    sd = np.sqrt(steps * q * (1 - q))
    assert np.all(np.abs(counts - steps * q) < 5 * sd)
    assert counts.sum() / (n * steps) == pytest.approx(q, rel=0.01)
    # each example's count is Binomial(steps, q): KS test of the standardized counts
    z = (counts - steps * q) / sd
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_pairwise_independence_of_inclusions():
    n, q, steps = 20, 0.3, 4000
    m = np.zeros((steps, n))
    for t, batch in enumerate(PoissonBatchSampler(n, q, steps=steps, seed=3)):
        m[t, batch] = 1
    corr = np.corrcoef(m.T)[np.triu_indices(n, 1)]
    assert np.max(np.abs(corr)) < 5 / np.sqrt(steps)


def test_sampler_arguments():
    s = PoissonBatchSampler(list(range(200)), batch_size=20, seed=0)
    assert s.sample_rate == pytest.approx(0.1)
    assert len(s) == s.steps == 10 == len(list(s))
    assert len(PoissonBatchSampler(1000, 0.003, seed=0)) == 333
    assert len(PoissonBatchSampler(1000, 0.003, steps=5, seed=0)) == 5
    full = list(PoissonBatchSampler(10, 1.0, steps=3, seed=0))
    assert full == [list(range(10))] * 3
    for kwargs, name in [
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=101), "batch_size"),
        (dict(sample_rate=0.1, batch_size=10), "sample_rate"),
        (dict(), "sample_rate"),
        (dict(sample_rate=0.1, steps=0), "steps"),
        (dict(sample_rate=0.1, seed=-1), "seed"),
    ]:
        with pytest.raises(ValueError, match=name):
            PoissonBatchSampler(100, **kwargs)


def test_seeds():
    a = list(PoissonBatchSampler(100, 0.1, steps=20, seed=5))
    b = list(PoissonBatchSampler(100, 0.1, steps=20, seed=5))
    c = list(PoissonBatchSampler(100, 0.1, steps=20, seed=6))
    assert a == b and a != c
    # default: OS entropy, different every time
    s1, s2 = PoissonBatchSampler(100, 0.1), PoissonBatchSampler(100, 0.1)
    assert s1.seed != s2.seed and list(s1) != list(s2)
    # successive iterations are different epochs
    s = PoissonBatchSampler(100, 0.1, steps=20, seed=5)
    assert list(s) == a and list(s) != a


# --------------------------------------------------------------------------
# resume


def test_sampler_resume_reproduces_future_batches():
    ref = PoissonBatchSampler(300, 0.05, steps=20, seed=11)
    epoch0, epoch1 = list(ref), list(ref)

    run = PoissonBatchSampler(300, 0.05, steps=20, seed=11)
    it = iter(run)
    seen = [next(it) for _ in range(7)]
    assert seen == epoch0[:7]
    state = run.state_dict()
    assert state["epoch"] == 0 and state["position"] == 7

    resumed = PoissonBatchSampler(300, 0.05, steps=20, seed=999)  # seed comes from the state
    resumed.load_state_dict(state)
    assert list(resumed) == epoch0[7:]
    assert list(resumed) == epoch1

    # state at an epoch boundary
    run_rest = list(it)
    assert run_rest == epoch0[7:]
    boundary = run.state_dict()
    assert boundary["epoch"] == 1 and boundary["position"] == 0
    resumed3 = PoissonBatchSampler(300, 0.05, steps=20)
    resumed3.load_state_dict(boundary)
    assert list(resumed3) == epoch1


def test_sampler_state_is_plain_and_checked():
    s = PoissonBatchSampler(300, 0.05, steps=20, seed=11)
    state = s.state_dict()
    assert all(type(v) in (int, float) for v in state.values())
    with pytest.raises(ValueError, match="num_samples"):
        PoissonBatchSampler(301, 0.05, steps=20).load_state_dict(state)
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonBatchSampler(300, 0.06, steps=20).load_state_dict(state)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_counts_received_batches(num_workers):
    ds = xy_dataset(60)
    kw = dict(sample_rate=0.1, steps=12, seed=21, num_workers=num_workers)
    full = [x for x, _ in poisson_loader(ds, 6, **kw)]

    loader = poisson_loader(ds, 6, **kw)
    it = iter(loader)
    got = [next(it)[0] for _ in range(5)]  # workers may have prefetched more
    state = loader.state_dict()
    assert state["position"] == 5
    del it

    fresh = poisson_loader(ds, 6, sample_rate=0.1, steps=12, num_workers=num_workers)
    fresh.load_state_dict(state)
    rest = [x for x, _ in fresh]
    assert len(got) + len(rest) == len(full)
    for a, b in zip(got + rest, full):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------
# loaders and empty batches


def test_loader_yields_zero_length_tensors_for_empty_batches():
    ds = xy_dataset(10)
    loader = poisson_loader(ds, 1, sample_rate=0.001, steps=50, seed=0)
    assert isinstance(loader, PoissonLoader)
    assert loader.sample_rate == 0.001 and loader.expected_batch_size == 1
    assert len(loader) == 50
    batches = list(loader)
    assert len(batches) == 50
    empties = [b for b in batches if b[1].shape[0] == 0]
    assert len(empties) >= 45
    x, y = empties[0]
    assert x.shape == (0, 3) and x.dtype == torch.float32
    assert y.shape == (0,) and y.dtype == torch.int64
    # a zero-length batch goes through a model without crashing
    out = torch.nn.Linear(3, 2)(x)
    assert out.shape == (0, 2)


def test_loader_empty_batch_with_dict_examples():
    ds = DictDataset(5)
    batches = list(poisson_loader(ds, 1, sample_rate=1e-6, steps=3, seed=0))
    full = next(iter(DataLoader(ds, batch_size=2)))
    for b in batches:
        assert set(b) == set(full)
        assert b["input_ids"].shape == (0, 7) and b["input_ids"].dtype == torch.int32
        assert b["label"].shape == (0,) and b["label"].dtype == full["label"].dtype
        assert b["weight"].shape == (0,) and b["weight"].dtype == full["weight"].dtype
        assert b["text"] == []


def test_loader_custom_collate_and_expected_batch_size():
    ds = xy_dataset(40)

    def collate(items):
        xs, ys = zip(*items)
        return {"x": torch.stack(xs), "y": torch.stack(ys)}

    loader = poisson_loader(ds, 8, collate_fn=collate, steps=200, seed=4)
    assert loader.sample_rate == pytest.approx(0.2)
    sizes = []
    for b in loader:
        assert b["x"].shape[1:] == (3,) and b["x"].shape[0] == b["y"].shape[0]
        sizes.append(b["x"].shape[0])
    assert np.mean(sizes) == pytest.approx(8, rel=0.1)

    empty = list(poisson_loader(ds, 8, sample_rate=1e-9, collate_fn=collate, steps=2, seed=0))
    assert empty[0]["x"].shape == (0, 3)


@pytest.mark.parametrize("bad", ["shuffle", "sampler", "batch_sampler", "drop_last"])
def test_poisson_loader_rejects_conflicting_kwargs(bad):
    with pytest.raises(ValueError, match=bad):
        poisson_loader(xy_dataset(10), 2, **{bad: None})


def test_poisson_loader_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        poisson_loader(xy_dataset(10), 11)
    with pytest.raises(ValueError, match="batch_size"):
        poisson_loader(xy_dataset(10), 0)


def test_shuffled_loader():
    ds = xy_dataset(50)
    a = [y for _, y in shuffled_loader(ds, 8, seed=3)]
    b = [y for _, y in shuffled_loader(ds, 8, seed=3)]
    assert len(a) == 6 and all(len(y) == 8 for y in a)  # drop_last
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    xs = torch.cat([x for x, _ in shuffled_loader(ds, 10, seed=1)])
    assert sorted(xs[:, 0].tolist()) == sorted(ds.tensors[0][:, 0].tolist())  # a permutation
    with pytest.raises(ValueError, match="shuffle"):
        shuffled_loader(ds, 8, shuffle=False)


# --------------------------------------------------------------------------
# physical chunks


def _cat(chunks, like):
    if isinstance(like, torch.Tensor):
        return torch.cat(chunks)
    if isinstance(like, dict):
        return {k: _cat([c[k] for c in chunks], v) for k, v in like.items()}
    if isinstance(like, list) and all(isinstance(v, str) for v in like):
        return [s for c in chunks for s in c]
    return (
        type(like)(*[_cat([c[i] for c in chunks], v) for i, v in enumerate(like)])
        if hasattr(like, "_fields")
        else type(like)(_cat([c[i] for c in chunks], v) for i, v in enumerate(like))
    )


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))
    return a == b


Pair = collections.namedtuple("Pair", "x y")


@pytest.mark.parametrize(
    "batch",
    [
        torch.randn(23, 4),
        (torch.randn(23, 4), torch.arange(23)),
        [torch.randn(23, 2, 2), torch.arange(23)],
        {"input_ids": torch.randint(0, 9, (23, 5)), "labels": torch.arange(23)},
        Pair(torch.randn(23, 1), torch.arange(23)),
        {"x": torch.randn(23, 3), "text": [f"s{i}" for i in range(23)]},
    ],
)
@pytest.mark.parametrize("size", [1, 5, 23, 100])
def test_split_physical_concatenates_back(batch, size):
    chunks = list(split_physical(batch, size))
    assert len(chunks) == -(-23 // size)
    for c in chunks:
        assert type(c) is type(batch)
    lengths = []
    for c in chunks:
        leaf = (
            c
            if isinstance(c, torch.Tensor)
            else (c["x"] if isinstance(c, dict) and "x" in c else c["input_ids"] if isinstance(c, dict) else c[0])
        )
        lengths.append(leaf.shape[0])
    assert all(n == size for n in lengths[:-1]) and 0 < lengths[-1] <= size
    assert _equal(_cat(chunks, batch), batch)


def test_split_physical_empty_and_errors():
    assert list(split_physical(torch.empty(0, 3), 4)) == []
    assert list(split_physical((torch.empty(0, 3), torch.empty(0, dtype=torch.long)), 4)) == []
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        list(split_physical(torch.randn(4, 2), 0))
    with pytest.raises(ValueError, match="different lengths"):
        list(split_physical((torch.randn(4, 2), torch.randn(5)), 2))
    with pytest.raises(ValueError, match="no tensor"):
        list(split_physical({"a": object()}, 2))


def test_split_physical_of_empty_loader_batch_yields_nothing():
    ds = xy_dataset(10)
    (batch,) = list(poisson_loader(ds, 1, sample_rate=1e-9, steps=1, seed=0))
    assert list(split_physical(batch, 4)) == []


@pytest.mark.parametrize("bit", [32, 64, 128, 255])
def test_seeds_differing_only_in_high_bits_give_different_batches(bit):
    """Batches come from full MT19937 states, not from ``manual_seed`` (which
    keeps 32 bits on the CPU): seeds differing only in a high bit differ, and
    the shuffled loader's order too."""
    s = 987_654_321
    a = PoissonBatchSampler(1000, batch_size=100, seed=s)
    b = PoissonBatchSampler(1000, batch_size=100, seed=s + 2**bit)
    assert a.batch(0, 0) != b.batch(0, 0)
    assert a.batch(0, 0) == PoissonBatchSampler(1000, batch_size=100, seed=s).batch(0, 0)
    ds = TensorDataset(torch.arange(64))
    first = [next(iter(shuffled_loader(ds, 8, seed=x)))[0].tolist() for x in (s, s + 2**bit)]
    assert first[0] != first[1]
