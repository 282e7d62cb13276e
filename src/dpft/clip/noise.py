"""Gaussian noise for the privatized gradient, from one place.

Whoever recovers the noise of a release subtracts it and the guarantee is
gone, so the generators' secrets must be out of reach of enumeration:

* **Seeding.**  Every generator gets its whole state from the operating
  system's entropy (``secrets``), never from ``torch.Generator.manual_seed``
  (which on the CPU keeps only the low 32 bits of its argument: seeds ``s``
  and ``s + 2**32`` give the same stream).  CPU generators (MT19937) get all
  624 state words (19 968 random bits); CUDA generators (Philox4x32-10) get
  a random 64-bit key and, independently, a random counter offset (62 random
  bits: torch keeps the offset in 64 bits and requires a multiple of 4), so
  126 random bits, the most torch's Philox state holds.  Each device (and
  each rank of a distributed run, and each draw of secure mode) has its own
  independently keyed generator.  On other device types (e.g. MPS) the noise
  is drawn by a CPU generator and copied to the device.
* **An explicit seed** (``GaussianNoise(seed)``, ``PrivacyEngine(noise_seed=)``)
  makes runs reproducible: every generator's state is then expanded from the
  seed by ``numpy.random.SeedSequence`` (a 256-bit pool; all bits of the seed
  are used, however large).  The noise is then exactly as secret as the
  seed: **for experiments, never for a release** — unless the seed itself is
  a secret of at least 128 bits drawn from OS entropy and kept as private as
  the data (e.g. ``secrets.randbits(256)``).
* **State.**  :meth:`GaussianNoise.state_dict` holds the generators' full
  states (and the seed): resuming from it continues the very same noise
  stream, and it reveals all future noise, so a checkpoint holding it must be
  kept as private as the data.  A state saved by another stream (another
  rank) is not continued: the generators are then keyed afresh from OS
  entropy, so that no two ranks share noise and no rank repeats its own.
* **Secure mode** (``secure=True``, ``PrivacyEngine(secure_mode=True)``): a
  mitigation of floating-point attacks on Gaussian sampling (Mironov 2012
  for the Laplace mechanism; for Gaussian samplers and DP-SGD, Holohan &
  Braghin 2021, arXiv:2107.10138, and Jin et al. 2022, arXiv:2112.05307):
  the low-order bits of a floating-point noisy value can tell which sampler
  inputs produced the noise, and with them the noise.  In secure mode the
  noise of each coordinate is the sum of :data:`SECURE_DRAWS` = 4 independent
  float64 draws of standard deviation ``std / 2`` (so the total is exactly
  ``N(0, std^2)`` in real arithmetic and the accountant's assumption is
  unchanged), each draw from its own independently keyed generator, and the
  noisy value ``(t + noise) / divide`` is computed in float64 and rounded to
  the tensor's dtype once.  Inverting a sum of ``2n`` draws of ``p``-bit
  precision costs about ``2^(p(2n-1))`` work (Holohan & Braghin, Section
  5.1): ``2^159`` for 4 float64 draws; the construction is the one Opacus'
  secure mode uses.  It is a mitigation, not a proof: no floating-point
  implementation of the Gaussian mechanism has a proof of differential
  privacy, and MT19937 and Philox are not cryptographically secure
  generators.

Noise is drawn on the parameter's device in one call per (device, dtype)
and split into the parameters' shapes (:meth:`GaussianNoise.standard_normal`),
or added in place in bounded chunks (:meth:`GaussianNoise.add_`).
"""

from __future__ import annotations

import numbers
import secrets
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import tuning

__all__ = ["SECURE_DRAWS", "GaussianNoise"]

#: independent draws summed for one noise value in secure mode (``2n`` with ``n = 2``)
SECURE_DRAWS = 4

# -- generator states --------------------------------------------------------
#
# CPU (MT19937): torch's CPUGeneratorImplState, 5056 bytes, little-endian:
#   u64 the_initial_seed @0, i32 left @8, i32 seeded @12, u64 next @16,
#   u64 state[624] @24 (each holding one 32-bit word), f64 normal_x/y/rho @5016,
#   i32 normal_is_valid @5040, f32 next_float_normal_sample @5048,
#   bool is_next_float_normal_sample_valid @5052.
# ``left = 1, next = 0`` makes the next draw regenerate ("twist") the 624
# words first, exactly as numpy's MT19937 does with ``pos = 624``.
# CUDA (Philox4x32-10): u64 seed (the key) @0, i64 counter offset @8.

_MT_WORDS = 624
_CPU_STATE_BYTES = 5056
_MT_STATE_OFFSET = 24
_CUDA_STATE_BYTES = 16


def _check_cpu_layout() -> None:
    """Confirm the CPU state layout above on this torch (raises if it changed)."""
    g = torch.Generator()
    g.manual_seed(12345)
    raw = bytes(g.get_state().numpy())
    x, words = 12345, [12345]
    for i in range(1, 4):  # MT19937's seeding recurrence
        x = (1812433253 * (x ^ (x >> 30)) + i) & 0xFFFFFFFF
        words.append(x)
    ok = (
        len(raw) == _CPU_STATE_BYTES
        and struct.unpack_from("<QiiQ", raw, 0) == (12345, 1, 1, 0)
        and list(struct.unpack_from("<4Q", raw, _MT_STATE_OFFSET)) == words
    )
    if not ok:
        raise RuntimeError(
            f"dpft: torch {torch.__version__} stores the CPU generator state in a layout dpft does not know; "
            "it cannot seed the noise generator with full entropy. Please report this (with the torch version)."
        )


_LAYOUT_CHECKED = False


def mt19937_state(words: np.ndarray) -> Tensor:
    """A CPU ``torch.Generator`` state whose MT19937 key is the 624 32-bit ``words``
    (the first draw regenerates the words, as numpy's ``MT19937`` with ``pos=624`` does)."""
    global _LAYOUT_CHECKED
    if not _LAYOUT_CHECKED:
        _check_cpu_layout()
        _LAYOUT_CHECKED = True
    words = np.asarray(words, dtype=np.uint32).reshape(-1)
    if words.shape[0] != _MT_WORDS or not words.any():
        raise ValueError("an MT19937 state needs 624 words, not all zero")
    buf = bytearray(_CPU_STATE_BYTES)
    struct.pack_into("<QiiQ", buf, 0, 0, 1, 1, 0)
    buf[_MT_STATE_OFFSET : _MT_STATE_OFFSET + 8 * _MT_WORDS] = words.astype("<u8").tobytes()
    return torch.frombuffer(buf, dtype=torch.uint8).clone()


def philox_state(key: int, offset: int) -> Tensor:
    """A CUDA ``torch.Generator`` state: Philox key ``key`` (64 bits) and counter
    ``offset`` (64 bits, a multiple of 4, as torch requires)."""
    if not 0 <= key < 2**64 or not 0 <= offset < 2**64 or offset % 4:
        raise ValueError(f"bad Philox key/offset {key!r}/{offset!r}")
    return torch.frombuffer(bytearray(struct.pack("<QQ", key, offset)), dtype=torch.uint8).clone()


def _device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"noise_seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


def _draw(n: int, std: float, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``n`` values of ``N(0, std^2)``, drawn scaled in one kernel (on ``generator``'s
    device; moved to ``device`` if that differs, e.g. MPS)."""
    out = torch.empty(n, device=generator.device, dtype=dtype).normal_(0.0, std, generator=generator)
    return out if out.device == torch.device(device) else out.to(device)


class GaussianNoise:
    """Gaussian draws for a list of tensors, one independently keyed generator
    per device (and per draw in secure mode).

    Args:
        seed: ``None`` (default): every generator's full state from OS
            entropy.  A non-negative integer of any size: reproducible noise,
            as secret as the seed (see the module docstring: for
            experiments, never for a release).
        stream: distinguishes the generators of several holders of the same
            seed (the engine passes its rank, so that ranks draw independent
            noise).
        secure: secure mode (module docstring): each value is the sum of
            :data:`SECURE_DRAWS` independent float64 draws, added in float64
            and rounded once.
    """

    def __init__(self, seed: int | None = None, *, stream: int = 0, secure: bool = False) -> None:
        self.seed = _check_seed(seed)
        if not isinstance(stream, numbers.Integral) or isinstance(stream, bool) or stream < 0:
            raise ValueError(f"stream must be a non-negative integer, got {stream!r}")
        self.stream = int(stream)
        self.secure = bool(secure)
        self._gens: dict[str, list[torch.Generator]] = {}
        self._pending_states: dict[str, list[Tensor]] = {}
        self._entropy_only = False  # set when a loaded state belonged to another stream

    # -- generators ----------------------------------------------------------
    @property
    def draws(self) -> int:
        """Independent draws per noise value (1, or :data:`SECURE_DRAWS` in secure mode)."""
        return SECURE_DRAWS if self.secure else 1

    def _words(self, name: str, j: int, n: int) -> np.ndarray:
        """``n`` random 32-bit words for generator ``j`` of device ``name``."""
        if self.seed is None or self._entropy_only:
            return np.frombuffer(secrets.token_bytes(4 * n), dtype=np.uint32).copy()
        code = int.from_bytes(name.encode(), "little")
        ss = np.random.SeedSequence(self.seed, spawn_key=(self.stream, code, j), pool_size=8)
        return ss.generate_state(n, np.uint32)

    def _fresh(self, name: str, j: int) -> torch.Generator:
        device = torch.device(name)
        if device.type == "cuda":
            g = torch.Generator(device=device)
            w = [int(x) for x in self._words(name, j, 4)]
            key = w[0] | w[1] << 32
            offset = 4 * ((w[2] | w[3] << 32) >> 2)  # 62 random bits, a multiple of 4
            g.set_state(philox_state(key, offset))
            return g
        # CPU, and any other device type: a CPU MT19937 generator (its noise is copied over)
        g = torch.Generator()
        words = self._words(name, j, _MT_WORDS)
        while not words.any():  # probability 2^-19968; the all-zero state is degenerate
            words = self._words(name, j + 1_000_000, _MT_WORDS)
        g.set_state(mt19937_state(words))
        return g

    def generators(self, device: torch.device) -> list[torch.Generator]:
        """The generators of ``device`` (one, or :data:`SECURE_DRAWS` in secure mode)."""
        name = _device_name(device)
        gens = self._gens.get(name)
        if gens is None or len(gens) < self.draws:
            gens = list(gens or [])
            pending = self._pending_states.pop(name, [])
            for j in range(len(gens), self.draws):
                g = self._fresh(name, j)
                if j < len(pending):
                    g.set_state(pending[j])
                gens.append(g)
            self._gens[name] = gens
        return gens

    def generator(self, device: torch.device) -> torch.Generator:
        """The (first) generator of ``device``."""
        return self.generators(device)[0]

    def _noise(self, n: int, std: float, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``n`` values of ``N(0, std^2)``: one draw, or in secure mode the float64 sum
        of :data:`SECURE_DRAWS` draws of std ``std / sqrt(SECURE_DRAWS)``."""
        gens = self.generators(device)
        if not self.secure:
            return _draw(n, std, gens[0], device, dtype)
        part = std / SECURE_DRAWS**0.5
        total = _draw(n, part, gens[0], device, torch.float64)
        for g in gens[1:]:
            total.add_(_draw(n, part, g, device, torch.float64))
        return total

    # -- drawing -------------------------------------------------------------
    def standard_normal(self, like: Sequence[Tensor]) -> list[Tensor]:
        """Fresh ``N(0, I)`` tensors shaped like ``like`` (same device and dtype;
        float64 in secure mode, so that the caller's one addition rounds once)."""
        out: list[Tensor | None] = [None] * len(like)
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(like):
            buckets.setdefault((t.device, t.dtype), []).append(i)
        for (device, dtype), idx in buckets.items():
            total = sum(like[i].numel() for i in idx)
            flat = self._noise(total, 1.0, device, dtype)
            offset = 0
            for i in idx:
                k = like[i].numel()
                out[i] = flat[offset : offset + k].view(like[i].shape)
                offset += k
        return out  # type: ignore[return-value]

    def add_(self, tensors: Sequence[Tensor], alpha: float, divide: int = 1) -> None:
        """``t = (t + alpha * z) / divide`` with fresh ``z ~ N(0, I)`` for every
        tensor, drawn in chunks of at most :data:`~dpft.clip.tuning.NOISE_CHUNK` values: never one
        buffer as large as all the tensors together (for a fully trained model
        that would be one more copy of the model at every step).  Contiguous
        tensors larger than a chunk are filled piece by piece.  With
        ``divide > 1`` the noise and the division are one pass over the
        tensors: ``lerp(t, z', 1 - 1/divide) = t/divide + (1 - 1/divide) z'``
        with ``z'`` drawn with standard deviation ``alpha / (divide - 1)``.
        In secure mode ``(t + alpha z) / divide`` is computed in float64 and
        rounded to ``t``'s dtype once."""
        if divide < 1:
            raise ValueError(f"divide must be a positive integer, got {divide}")
        pieces: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        most = tuning.NOISE_CHUNK
        for t in tensors:
            parts = t.view(-1).split(most) if t.numel() > most and t.is_contiguous() else (t,)
            pieces.setdefault((t.device, t.dtype), []).extend(parts)
        for (device, dtype), ts in pieces.items():
            start = 0
            while start < len(ts):
                stop, total = start, 0
                while stop < len(ts) and (stop == start or total + ts[stop].numel() <= most):
                    total += ts[stop].numel()
                    stop += 1
                chunk = ts[start:stop]
                if self.secure:
                    flat = self._noise(total, alpha, device, dtype)
                    zs = [z.view(t.shape) for z, t in zip(flat.split([t.numel() for t in chunk]), chunk)]
                    torch._foreach_add_(zs, chunk)  # float64: t + alpha z
                    if divide > 1:
                        torch._foreach_div_(zs, float(divide))
                    torch._foreach_copy_(chunk, zs)  # one rounding
                else:
                    flat = self._noise(total, alpha / (divide - 1) if divide > 1 else 1.0, device, dtype)
                    draws = [z.view(t.shape) for z, t in zip(flat.split([t.numel() for t in chunk]), chunk)]
                    if divide > 1:
                        torch._foreach_lerp_(chunk, draws, 1.0 - 1.0 / divide)
                    else:
                        torch._foreach_add_(chunk, draws, alpha=alpha)
                start = stop

    # -- state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """The seed and every generator's full state (as secret as the noise itself)."""
        return {
            "version": 2,
            "seed": self.seed,
            "stream": self.stream,
            "states": {k: [g.get_state() for g in gens] for k, gens in self._gens.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the noise streams of :meth:`state_dict` (also accepts the
        one-generator-per-device states of earlier dpft versions).

        A state saved by another stream (e.g. rank 0's engine state loaded on
        every rank of a resumed distributed run) is not continued: that would
        give this rank the same noise as the other one, and restarting this
        rank's own seeded stream would repeat noise it already used.  The
        generators are then keyed afresh from OS entropy (independent noise;
        this rank's noise after the resume is not reproducible)."""
        saved = state.get("stream")
        self._gens = {}
        if saved is not None and int(saved) != self.stream:
            self._pending_states = {}
            self._entropy_only = True
            return
        self.seed = _check_seed(state.get("seed"))
        self._entropy_only = False
        self._pending_states = {
            k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in state.get("states", {}).items()
        }
