"""Data loading for DP-SGD: Poisson sampling, empty batches, physical chunks.

The accountant (:mod:`dpft.accounting`) assumes *Poisson subsampling*: at
every step each of the N examples joins the logical batch independently with
probability ``q = batch_size / N``.  Batch sizes are therefore random
(Binomial(N, q)) and can be zero.  This module provides:

- :class:`PoissonBatchSampler`: a batch sampler drawing exactly that, seeded,
  with a resumable ``state_dict``;
- :func:`poisson_loader`: a ``DataLoader`` over it whose ``collate_fn`` turns
  an empty batch into zero-length tensors instead of crashing;
- :func:`split_physical`: cut a logical batch into physical chunks of at most
  ``max_physical_batch_size`` examples (virtual steps: call ``backward()`` on
  each chunk, ``step()`` once; the engine adds noise once per logical step and
  divides by the *expected* batch size, DESIGN.md §1);
- :func:`shuffled_loader`: the usual fixed-size shuffled batches, which do
  *not* match the accountant's assumption (see its docstring).

Randomness and secrecy: the privacy amplification of subsampling holds only
if the batch composition stays secret.  The default seed comes from the OS
(``secrets``); a seed passed for reproducibility, and any sampler
``state_dict`` (which contains the seed), reveal every batch: keep them, and
checkpoints holding them, as private as the data.
"""

from __future__ import annotations

import copy
import numbers
import secrets
from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data import default_collate

__all__ = [
    "PoissonBatchSampler",
    "PoissonLoader",
    "poisson_loader",
    "shuffled_loader",
    "split_physical",
    "UserPoissonBatchSampler",
    "UserPoissonLoader",
    "user_poisson_loader",
]

_FORBIDDEN_LOADER_KWARGS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


def _check_positive_int(x: Any, name: str) -> int:
    if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {x!r}")
    return int(x)


def _mt_state(seed: int, key: tuple[int, ...] = ()) -> torch.Tensor:
    """A full MT19937 state (624 words) for a CPU ``torch.Generator``, expanded
    from ``seed`` and ``key`` by ``numpy.random.SeedSequence`` (256-bit pool).
    ``manual_seed`` would keep only 32 bits on the CPU: every batch would then be
    one of 2^32 possible batches, which a strong adversary could enumerate."""
    from .clip.noise import mt19937_state

    words = np.random.SeedSequence(seed, spawn_key=key, pool_size=8).generate_state(624, np.uint32)
    return mt19937_state(words)


def _check_seed(x: Any) -> int:
    if x is None:
        return secrets.randbits(256)
    if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {x!r}")
    return int(x)


# --------------------------------------------------------------------------
# Poisson sampling


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else those of an initialized ``torch.distributed`` group, else (0, 1)."""
    if rank is None and world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError(f"give both rank and world_size or neither, got rank={rank!r}, world_size={world_size!r}")
    world_size = _check_positive_int(world_size, "world_size")
    if not isinstance(rank, numbers.Integral) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got {rank!r}")
    return int(rank), world_size


def _shared_seed() -> int:
    """A secret seed drawn on rank 0 and broadcast, so all ranks draw the same global batches."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("with world_size > 1 and no initialized process group, pass the same seed on every rank")
    box = [secrets.randbits(256) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])  # type: ignore[arg-type]


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson-subsampled batches of indices: each index joins each batch
    independently with probability ``sample_rate``.

    Args:
        data_source: the data set (anything with ``len``) or its size N.
        sample_rate: q in (0, 1].  Give this or ``batch_size``.
        batch_size: expected batch size B; then ``q = B / N`` (needs B <= N).
        steps: batches per iteration (one "epoch" of the sampler); default
            ``round(1 / q)``, i.e. one expected pass over the data.
        seed: non-negative integer for reproducible batches (all its bits
            are used); default: 256 bits from the OS (``secrets``).

    Each iteration yields ``steps`` lists of indices (sorted, possibly
    empty); ``len(sampler) == steps``.  Batch ``i`` of iteration ``e`` is drawn
    with a CPU ``torch.Generator`` whose whole MT19937 state (624 words) comes
    from ``numpy.random.SeedSequence(seed, spawn_key=(e, i), pool_size=8)``
    (not ``manual_seed``, which keeps 32 bits on the CPU and would make each
    batch one of only 2^32 possible ones), so every batch is a pure function of
    ``(seed, e, i)``: the state is just ``(seed, epoch, position)``, resuming
    is O(1) (no replay), and it does not depend on how far a ``DataLoader``
    prefetched.  Inclusion is ``torch.rand(N, dtype=float64) < q``: O(N) per
    batch (≈ 5 ms for N = 10⁶ on one CPU core).

    ``state_dict()`` / ``load_state_dict()``: the next iteration after
    ``load_state_dict(s)`` continues iteration ``s["epoch"]`` at batch
    ``s["position"]``, yielding exactly the batches the saved run had not yet
    used.  When iterated by a :class:`PoissonLoader` the position is the
    number of batches the *training loop has received* (not the number the
    loader prefetched); iterated directly, it is the number yielded.  A new
    ``iter()`` after an unfinished iteration starts the next epoch.
    """

    def __init__(
        self,
        data_source: Sized | int,
        sample_rate: float | None = None,
        *,
        batch_size: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        if seed is None and self.world_size > 1:
            seed = _shared_seed()
        if isinstance(data_source, numbers.Integral) and not isinstance(data_source, bool):
            num_samples = int(data_source)
        else:
            num_samples = len(data_source)  # type: ignore[arg-type]
        self.num_samples = _check_positive_int(num_samples, "len(data_source)")
        if (sample_rate is None) == (batch_size is None):
            raise ValueError(
                f"give exactly one of sample_rate and batch_size, got sample_rate={sample_rate!r}, "
                f"batch_size={batch_size!r}"
            )
        if batch_size is not None:
            b = _check_positive_int(batch_size, "batch_size")
            if b > self.num_samples:
                raise ValueError(f"batch_size must be <= len(data_source) = {self.num_samples}, got {batch_size!r}")
            sample_rate = b / self.num_samples
        if not isinstance(sample_rate, numbers.Real) or isinstance(sample_rate, bool) or not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.sample_rate = float(sample_rate)
        if steps is None:
            steps = max(1, round(1.0 / self.sample_rate))
        self.steps = _check_positive_int(steps, "steps")
        self.seed = _check_seed(seed)
        self._generator = torch.Generator()
        # (epoch, position) where the next iter() starts, if set explicitly
        # (construction, load_state_dict); otherwise iter() starts epoch + 1.
        self._next: tuple[int, int] | None = (0, 0)
        self._epoch = 0  # epoch of the current (or last) iteration
        self._drawn = 0  # batches yielded in it
        self._consumed = 0  # batches received by the training loop (PoissonLoader)
        self._track_consumed = False

    def __len__(self) -> int:
        return self.steps

    def batch(self, epoch: int, index: int) -> list[int]:
        """Batch ``index`` of iteration ``epoch`` (a pure function of the seed)."""
        self._generator.set_state(_mt_state(self.seed, (int(epoch), int(index))))
        u = torch.rand(self.num_samples, generator=self._generator, dtype=torch.float64)
        idx = torch.nonzero(u < self.sample_rate).flatten()
        if self.world_size > 1:
            # every rank draws the same global Poisson batch and keeps its share
            idx = idx[idx % self.world_size == self.rank]
        return idx.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        if self._next is not None:
            epoch, start = self._next
            self._next = None
        else:  # after a finished or abandoned iteration: the next epoch
            epoch, start = self._epoch + 1, 0
        self._epoch, self._drawn, self._consumed = epoch, start, start
        for i in range(start, self.steps):
            batch = self.batch(epoch, i)
            self._drawn = i + 1
            yield batch

    def _note_consumed(self) -> None:
        self._consumed += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain-python state: seed, epoch, position and the sampling setup."""
        if self._next is not None:
            epoch, position = self._next
        else:
            epoch = self._epoch
            position = self._consumed if self._track_consumed else self._drawn
            if position >= self.steps:
                epoch, position = epoch + 1, 0
        return {
            "version": 1,
            "seed": self.seed,
            "epoch": epoch,
            "position": position,
            "num_samples": self.num_samples,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the sampling setup must match."""
        for key in ("num_samples", "sample_rate", "steps"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"state {key}={state[key]!r} does not match this sampler's {key}={getattr(self, key)!r}"
                )
        self.seed = _check_seed(state["seed"])
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.steps:
            raise ValueError(f"state has a bad epoch/position: {epoch!r}/{position!r}")
        if position == self.steps:
            epoch, position = epoch + 1, 0
        self._next = (epoch, position)


# --------------------------------------------------------------------------
# loaders


class _EmptySafeCollate:
    """Wraps a collate function so that an empty batch gives zero-length output.

    For ``[]`` it collates ``[dataset[0]]`` with the wrapped function and
    shrinks the result to zero examples: each tensor becomes an empty tensor
    of shape ``(0, *rest)`` with the same dtype and device; each list of
    per-example scalars/strings (e.g. from collating strings) becomes an
    empty list; containers (dict, tuple, namedtuple, list of tensors) keep
    their structure.  Picklable, so it works with ``num_workers > 0``.
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn

    def __call__(self, batch: list[Any]) -> Any:
        if len(batch) == 0:
            return _zero_length(self.collate_fn([self.dataset[0]]))
        return self.collate_fn(batch)


class PoissonLoader(DataLoader):
    """A ``DataLoader`` over a :class:`PoissonBatchSampler` (see :func:`poisson_loader`).

    Adds ``sample_rate`` and ``expected_batch_size`` attributes, and
    ``state_dict()`` / ``load_state_dict()`` save and restore the sampler at
    the number of batches the loop has *received*, so prefetching workers do
    not make a resumed run skip batches.
    """

    def __init__(self, *args: Any, expected_batch_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected_batch_size = expected_batch_size
        self.batch_sampler._track_consumed = True  # type: ignore[union-attr]

    @property
    def sample_rate(self) -> float:
        """The Poisson sampling rate q."""
        return self.batch_sampler.sample_rate  # type: ignore[union-attr]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.batch_sampler
        for batch in super().__iter__():
            sampler._note_consumed()  # type: ignore[union-attr]
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state (seed, epoch, batches received)."""
        return self.batch_sampler.state_dict()  # type: ignore[union-attr]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the sampler; the next ``iter()`` continues the saved epoch."""
        self.batch_sampler.load_state_dict(state)  # type: ignore[union-attr]


def poisson_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    sample_rate: float | None = None,
    steps: int | None = None,
    seed: int | None = None,
    **dataloader_kwargs: Any,
) -> PoissonLoader:
    """A ``DataLoader`` with Poisson-subsampled logical batches.

    Args:
        dataset: a map-style data set (``len`` and ``__getitem__``).
        batch_size: expected batch size B; ``q = B / len(dataset)`` unless
            ``sample_rate`` is given.  Pass the same B to ``PrivacyEngine``.
        sample_rate: q in (0, 1]; overrides ``batch_size / len(dataset)``
            (``batch_size`` is then only recorded as ``expected_batch_size``).
        steps: batches per iteration; default ``round(1 / q)`` (one epoch).
        seed: for reproducible batches; default from OS entropy.
        **dataloader_kwargs: passed to ``DataLoader`` (``num_workers``,
            ``pin_memory``, ``collate_fn``, ...).  ``batch_size``, ``shuffle``,
            ``sampler``, ``batch_sampler`` and ``drop_last`` are not allowed.

    Empty batches: the ``collate_fn`` (yours or ``default_collate``) is
    wrapped so that a batch with no examples yields the structure of a
    collated ``dataset[0]`` with zero examples, e.g. ``(x, y)`` of shapes
    ``(0, 3, 28, 28)`` and ``(0,)`` with the dtypes a real batch would have.
    The training step must still run on it (the engine then adds pure noise):
    skipping empty batches would change the privacy analysis.
    """
    for key in _FORBIDDEN_LOADER_KWARGS:
        if key in dataloader_kwargs:
            raise ValueError(f"poisson_loader does not accept {key}=; got {key}={dataloader_kwargs[key]!r}")
    b = _check_positive_int(batch_size, "batch_size")
    n = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError(f"dataset must not be empty, got len(dataset)={n!r}")
    if sample_rate is None:
        if b > n:
            raise ValueError(f"batch_size must be <= len(dataset) = {n}, got {batch_size!r}")
        sampler = PoissonBatchSampler(n, batch_size=b, steps=steps, seed=seed)
    else:
        sampler = PoissonBatchSampler(n, sample_rate, steps=steps, seed=seed)
    collate_fn = dataloader_kwargs.pop("collate_fn", None) or default_collate
    return PoissonLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_EmptySafeCollate(dataset, collate_fn),
        expected_batch_size=b,
        **dataloader_kwargs,
    )


# --------------------------------------------------------------------------
# user-level sampling (PrivacyEngine(privacy_unit="user"))


def _dense_units(user_ids: Any, n: int) -> tuple[torch.Tensor, list[Any]]:
    """``(unit of each example as 0..U-1, the distinct user ids in that order)``;
    ids are numbered in order of first appearance."""
    if isinstance(user_ids, torch.Tensor):
        if user_ids.dim() != 1 or user_ids.is_floating_point():
            raise ValueError("user_ids must be a 1-D integer tensor or a sequence of ints / strings")
        user_ids = user_ids.tolist()
    elif isinstance(user_ids, np.ndarray):
        user_ids = user_ids.tolist()
    ids = list(user_ids)
    if len(ids) != n:
        raise ValueError(f"user_ids must have one id per example: got {len(ids)} ids for {n} examples")
    index: dict[Any, int] = {}
    out = []
    for i, u in enumerate(ids):
        if u is None or (isinstance(u, float) and (u != u)):
            raise ValueError(f"user_ids[{i}] is missing ({u!r}): every example needs a user id")
        out.append(index.setdefault(u, len(index)))
    return torch.tensor(out, dtype=torch.long), list(index)


class UserPoissonBatchSampler(PoissonBatchSampler):
    """Poisson sampling of *users*: each of the U users joins each batch
    independently with probability ``sample_rate``, bringing all of their
    examples, or, with ``max_per_user=k``, a uniformly random subset of at
    most ``k`` of them (drawn afresh at every step; fewer examples per user
    cost less memory and time, never privacy: a user's examples are clipped
    together).  Batch ``i`` of iteration ``e`` is a pure function of
    ``(seed, e, i)`` as in :class:`PoissonBatchSampler`; a batch lists each
    sampled user's examples together, users in increasing order.

    Args:
        user_ids: one user id per example (ints or strings).
        sample_rate / batch_size: the user sampling rate q, or the expected
            number of users per batch (``q = batch_size / U``).
        max_per_user: ``None`` (default: all of a sampled user's examples) or ``k >= 1``.
        steps, seed: as in :class:`PoissonBatchSampler` (``steps`` default ``round(1/q)``).
    """

    def __init__(
        self,
        user_ids: Any,
        sample_rate: float | None = None,
        *,
        batch_size: int | None = None,
        max_per_user: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(user_ids, torch.Tensor) and not user_ids.is_floating_point() and user_ids.dim() == 1:
            units, users = _dense_units(user_ids, user_ids.shape[0])
        else:
            ids = list(user_ids)
            units, users = _dense_units(ids, len(ids))
        super().__init__(len(users), sample_rate, batch_size=batch_size, steps=steps, seed=seed)
        if max_per_user is not None:
            max_per_user = _check_positive_int(max_per_user, "max_per_user")
        self.max_per_user = max_per_user
        self.units = units  # (N,) dense user index of every example
        self.users = users  # the distinct ids, index -> id
        order = torch.argsort(units, stable=True)
        counts = torch.bincount(units, minlength=len(users))
        self._members = list(order.split(counts.tolist()))  # per user, its example indices

    @property
    def num_users(self) -> int:
        return self.num_samples

    def batch(self, epoch: int, index: int) -> list[int]:
        """Batch ``index`` of iteration ``epoch``: the examples of the sampled users."""
        self._generator.set_state(_mt_state(self.seed, (int(epoch), int(index))))
        u = torch.rand(self.num_samples, generator=self._generator, dtype=torch.float64)
        chosen = torch.nonzero(u < self.sample_rate).flatten().tolist()
        out: list[int] = []
        k = self.max_per_user
        for user in chosen:
            members = self._members[user]
            if k is not None and len(members) > k:
                pick = torch.randperm(len(members), generator=self._generator)[:k].sort().values
                members = members[pick]
            out.extend(members.tolist())
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["max_per_user"] = self.max_per_user
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("max_per_user") != self.max_per_user:
            raise ValueError(
                f"state max_per_user={state.get('max_per_user')!r} does not match this sampler's {self.max_per_user!r}"
            )
        super().load_state_dict(state)


class _WithUnit:
    """``dataset[i] -> (dataset[i], unit of i)`` (picklable, for workers)."""

    def __init__(self, dataset: Dataset, units: torch.Tensor) -> None:
        self.dataset = dataset
        self.units = units

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset[i], int(self.units[i])


class _UnitCollate:
    """Collates ``(item, unit)`` pairs into ``(batch, units)``, units a
    LongTensor, or with ``key`` into the (mapping) batch with ``batch[key] = units``."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], key: str | None = None) -> None:
        self.collate_fn = collate_fn
        self.key = key

    def __call__(self, pairs: list[tuple[Any, int]]) -> Any:
        batch = self.collate_fn([p[0] for p in pairs])
        units = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        if self.key is None:
            return batch, units
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"user_poisson_loader(units_key=...) needs batches that are mappings, got {type(batch).__name__}"
            )
        batch[self.key] = units
        return batch


class UserPoissonLoader(PoissonLoader):
    """A :class:`PoissonLoader` over a :class:`UserPoissonBatchSampler`
    (see :func:`user_poisson_loader`): yields ``(batch, units)``."""

    @property
    def users(self) -> list[Any]:
        """The distinct user ids; ``units`` index into this list."""
        return self.batch_sampler.users  # type: ignore[union-attr]

    @property
    def num_users(self) -> int:
        return self.batch_sampler.num_users  # type: ignore[union-attr]


def user_poisson_loader(
    dataset: Dataset,
    user_ids: Any,
    batch_size: int | None = None,
    *,
    sample_rate: float | None = None,
    max_per_user: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    units_key: str | None = None,
    **dataloader_kwargs: Any,
) -> UserPoissonLoader:
    """A ``DataLoader`` for user-level DP: Poisson sampling of users.

    Each user joins each logical batch independently with probability
    ``q = batch_size / U`` (U = number of distinct ``user_ids``) or
    ``sample_rate``, with all of their examples (``max_per_user=None``) or a
    random subset of at most ``max_per_user``.  Yields ``(batch, units)``:
    the collated examples and a LongTensor with each example's user (an
    index into ``loader.users``).  Pass ``units`` to
    :meth:`dpft.PrivacyEngine.set_units` before each backward pass, and
    ``batch_size=<expected users per step>``, ``sample_size=loader.num_users``
    to ``PrivacyEngine(..., privacy_unit="user")``::

        for batch, units in loader:
            for chunk, u in dpft.data.split_physical((batch, units), 32):
                engine.set_units(u)
                loss_fn(model, chunk).backward()
            optimizer.step(); optimizer.zero_grad()

    An empty batch (no user drawn) yields zero-length tensors, as
    :func:`poisson_loader` does; call ``engine.record_empty_batch()``.
    ``units_key``: for batches that are mappings (dicts), put ``units`` into
    each batch under this key instead of yielding ``(batch, units)``.
    Other arguments as in :func:`poisson_loader`.
    """
    for key in _FORBIDDEN_LOADER_KWARGS:
        if key in dataloader_kwargs:
            raise ValueError(f"user_poisson_loader does not accept {key}=; got {key}={dataloader_kwargs[key]!r}")
    n = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError(f"dataset must not be empty, got len(dataset)={n!r}")
    sampler = UserPoissonBatchSampler(
        user_ids, sample_rate, batch_size=batch_size, max_per_user=max_per_user, steps=steps, seed=seed
    )
    if len(sampler.units) != n:
        raise ValueError(f"user_ids must have one id per example: got {len(sampler.units)} ids for {n} examples")
    expected = batch_size if batch_size is not None else max(1, round(sampler.sample_rate * sampler.num_users))
    collate_fn = dataloader_kwargs.pop("collate_fn", None) or default_collate
    wrapped = _WithUnit(dataset, sampler.units)
    return UserPoissonLoader(
        wrapped,
        batch_sampler=sampler,
        collate_fn=_EmptySafeCollate(wrapped, _UnitCollate(collate_fn, units_key)),
        expected_batch_size=expected,
        **dataloader_kwargs,
    )


def shuffled_loader(dataset: Dataset, batch_size: int, seed: int | None = None, **kw: Any) -> DataLoader:
    """Fixed-size shuffled batches (``shuffle=True, drop_last=True``).

    This is what most DP training code does, but it is **not** the sampling
    the accountant analyses.  :mod:`dpft.accounting` assumes Poisson
    subsampling with ``q = batch_size / len(dataset)`` (add/remove
    adjacency); with this loader each example appears in exactly one batch
    per epoch, batches have a fixed size (a replace-one setting), and the
    amplification-by-subsampling argument does not apply.  Reporting the
    Poisson ε for shuffled batches, as most papers and libraries do, is a
    convention, not a guarantee: Chua et al. ("How Private are DP-SGD
    Implementations?", ICML 2024) show that the true ε of shuffled batches
    can be much larger than the Poisson ε at the same σ, q and steps.  Use
    :func:`poisson_loader` when the reported ε must hold.

    ``seed``: for the shuffling generator; default from OS entropy.  Other
    keyword arguments go to ``DataLoader`` (``shuffle``, ``sampler``,
    ``batch_sampler``, ``drop_last``, ``generator`` are not allowed).
    """
    for key in (*_FORBIDDEN_LOADER_KWARGS[1:], "generator"):
        if key in kw:
            raise ValueError(f"shuffled_loader does not accept {key}=; got {key}={kw[key]!r}")
    b = _check_positive_int(batch_size, "batch_size")
    generator = torch.Generator()
    generator.set_state(_mt_state(_check_seed(seed)))
    return DataLoader(dataset, batch_size=b, shuffle=True, drop_last=True, generator=generator, **kw)


# --------------------------------------------------------------------------
# batch structure helpers

_SCALAR_TYPES = (str, bytes, numbers.Number, type(None))


def _is_per_example_list(x: Any) -> bool:
    """A list/tuple of plain scalars (as ``default_collate`` makes of strings)."""
    return isinstance(x, (list, tuple)) and not hasattr(x, "_fields") and all(isinstance(v, _SCALAR_TYPES) for v in x)


def _rebuild(container: Any, items: Any) -> Any:
    """A container of the same kind as ``container`` holding ``items``."""
    if isinstance(container, Mapping):
        try:
            if hasattr(container, "update"):
                clone = copy.copy(container)
                clone.update(items)
                return clone
            return type(container)(items)
        except TypeError:
            return dict(items)
    if isinstance(container, tuple) and hasattr(container, "_fields"):
        return type(container)(*items)
    if isinstance(container, tuple):
        return tuple(items)
    return list(items)


def _zero_length(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            return x.new_empty((0,))
        return x.new_empty((0, *x.shape[1:]))
    if isinstance(x, np.ndarray):
        return x[:0].copy()
    if _is_per_example_list(x):
        return type(x)() if type(x) in (list, tuple) else []
    if isinstance(x, Mapping):
        return _rebuild(x, {k: _zero_length(v) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        return _rebuild(x, [_zero_length(v) for v in x])
    return x


def _batch_len(x: Any, lengths: set[int]) -> None:
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise ValueError("split_physical: a 0-dim tensor has no batch dimension")
        lengths.add(x.shape[0])
    elif isinstance(x, np.ndarray):
        lengths.add(x.shape[0])
    elif _is_per_example_list(x):
        lengths.add(len(x))
    elif isinstance(x, Mapping):
        for v in x.values():
            _batch_len(v, lengths)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _batch_len(v, lengths)


def _slice(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x[start:stop]
    if _is_per_example_list(x):
        return x[start:stop]
    if isinstance(x, Mapping):
        return _rebuild(x, {k: _slice(v, start, stop) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        return _rebuild(x, [_slice(v, start, stop) for v in x])
    return x  # a non-batched leaf (e.g. a task name) goes to every chunk


def split_physical(batch: Any, max_physical_batch_size: int) -> Iterator[Any]:
    """Yield physical chunks of at most ``max_physical_batch_size`` examples.

    ``batch`` is a tensor, or a (nested) tuple / list / namedtuple / dict of
    tensors, split along dim 0; lists of plain scalars or strings (as
    ``default_collate`` makes from strings) are split too, and other leaves
    are passed to every chunk unchanged.  All batched leaves must have the
    same length.  Chunks are views (no copy) in order, all of size
    ``max_physical_batch_size`` but the last; concatenating them gives back
    ``batch``.  An empty batch yields nothing.

    Raises:
        ValueError: bad ``max_physical_batch_size``, no batched leaf, or
            leaves of different lengths.
    """
    size = _check_positive_int(max_physical_batch_size, "max_physical_batch_size")
    lengths: set[int] = set()
    _batch_len(batch, lengths)
    if not lengths:
        raise ValueError(f"split_physical: found no tensor in the batch (type {type(batch).__name__})")
    if len(lengths) > 1:
        raise ValueError(f"split_physical: batch leaves have different lengths {sorted(lengths)}")
    (n,) = lengths
    for start in range(0, n, size):
        yield _slice(batch, start, min(n, start + size))
