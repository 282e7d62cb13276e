"""Save and resume a private training run: model, optimizer, engine (privacy
ledger, noise generator) and sampler together, so that a resumed run spends
exactly the epsilon of an uninterrupted one."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .engine import PrivacyEngine


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    engine: PrivacyEngine | None = None,
    sampler: Any = None,
    **extra: Any,
) -> None:
    """Write everything needed to resume to ``path`` (``torch.save``; written
    to a temporary file first, then renamed, so a crash never leaves a torn
    checkpoint).  ``sampler`` is anything with ``state_dict()`` (e.g. a
    :class:`dpft.data.PoissonBatchSampler` or :class:`dpft.data.PoissonLoader`).

    The checkpoint holds the noise and sampler seeds: keep it as private as
    the training data."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "engine": engine.state_dict() if engine is not None else None,
        "sampler": sampler.state_dict() if sampler is not None else None,
        "extra": extra,
    }
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    engine: PrivacyEngine | None = None,
    sampler: Any = None,
    map_location: Any = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the given objects;
    returns the ``extra`` entries.  The engine must be configured like the
    saved one (same noise multiplier, sample rate, delta): otherwise
    ``ValueError``."""
    state = torch.load(path, map_location=map_location, weights_only=False)
    model.load_state_dict(state["model"])
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if engine is not None:
        if state["engine"] is None:
            raise ValueError(f"checkpoint {os.fspath(path)!r} holds no engine state")
        engine.load_state_dict(state["engine"])
    if sampler is not None and state["sampler"] is not None:
        sampler.load_state_dict(state["sampler"])
    return state["extra"]
