"""Gaussian noise for the privatized gradient, from one place.

Generators are seeded from the operating system's entropy (``secrets``) by
default, or from ``seed`` for reproducible runs; one generator per device.
Noise is drawn on the parameter's device in one call per (device, dtype)
and split into the parameters' shapes (:meth:`GaussianNoise.standard_normal`),
or added in place in bounded chunks (:meth:`GaussianNoise.add_`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch
from torch import Tensor


#: largest number of noise values :meth:`GaussianNoise.add_` draws at once (64 MiB of float32)
CHUNK = 1 << 24


def _draw(n: int, std: float, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``n`` values of ``N(0, std^2)``, drawn scaled in one kernel."""
    return torch.empty(n, device=device, dtype=dtype).normal_(0.0, std, generator=generator)


class GaussianNoise:
    """Standard normal draws for a list of tensors, one generator per device."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self._gens: dict[str, torch.Generator] = {}
        self._pending_states: dict[str, Tensor] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._gens:
            g = torch.Generator(device=device)
            # distinct streams per device, fixed by the seed
            g.manual_seed((self.seed + 1_000_003 * len(self._gens)) % (2**63))
            if key in self._pending_states:
                g.set_state(self._pending_states.pop(key))
            self._gens[key] = g
        return self._gens[key]

    def standard_normal(self, like: Sequence[Tensor]) -> list[Tensor]:
        """Fresh ``N(0, I)`` tensors shaped like ``like`` (same device and dtype)."""
        out: list[Tensor | None] = [None] * len(like)
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(like):
            buckets.setdefault((t.device, t.dtype), []).append(i)
        for (device, dtype), idx in buckets.items():
            total = sum(like[i].numel() for i in idx)
            flat = torch.randn(total, generator=self.generator(device), device=device, dtype=dtype)
            offset = 0
            for i in idx:
                k = like[i].numel()
                out[i] = flat[offset : offset + k].view(like[i].shape)
                offset += k
        return out  # type: ignore[return-value]

    def add_(self, tensors: Sequence[Tensor], alpha: float, divide: int = 1) -> None:
        """``t = (t + alpha * z) / divide`` with fresh ``z ~ N(0, I)`` for every
        tensor, drawn in chunks of at most :data:`CHUNK` values: never one
        buffer as large as all the tensors together (for a fully trained model
        that would be one more copy of the model at every step).  Contiguous
        tensors larger than a chunk are filled piece by piece.  With
        ``divide > 1`` the noise and the division are one pass over the
        tensors: ``lerp(t, z', 1 - 1/divide) = t/divide + (1 - 1/divide) z'``
        with ``z'`` drawn with standard deviation ``alpha / (divide - 1)``."""
        if divide < 1:
            raise ValueError(f"divide must be a positive integer, got {divide}")
        pieces: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in tensors:
            parts = t.view(-1).split(CHUNK) if t.numel() > CHUNK and t.is_contiguous() else (t,)
            pieces.setdefault((t.device, t.dtype), []).extend(parts)
        for (device, dtype), ts in pieces.items():
            start = 0
            while start < len(ts):
                stop, total = start, 0
                while stop < len(ts) and (stop == start or total + ts[stop].numel() <= CHUNK):
                    total += ts[stop].numel()
                    stop += 1
                chunk = ts[start:stop]
                flat = _draw(total, alpha / (divide - 1) if divide > 1 else 1.0, self.generator(device), device, dtype)
                draws = [z.view(t.shape) for z, t in zip(flat.split([t.numel() for t in chunk]), chunk)]
                if divide > 1:
                    torch._foreach_lerp_(chunk, draws, 1.0 - 1.0 / divide)
                else:
                    torch._foreach_add_(chunk, draws, alpha=alpha)
                start = stop

    def state_dict(self) -> dict:
        return {"seed": self.seed, "states": {k: g.get_state() for k, g in self._gens.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._gens = {}
        self._pending_states = dict(state.get("states", {}))
