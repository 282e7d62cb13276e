"""Save and resume a private training run: model, optimizer, engine (privacy
ledger, noise generator) and sampler together, so that a resumed run spends
exactly the epsilon of an uninterrupted one.

Every file is written atomically (:func:`atomic_write`): to a temporary file
in the same directory, flushed to disk, then renamed over the old one; a
failed write (a full disk, a read-only folder) removes the temporary file,
leaves the previous file as it was and raises :class:`CheckpointError` naming
the cause.  :func:`read_checkpoint` turns an empty, truncated or foreign file
into one clear :class:`CheckpointError` too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch
from torch import nn

__all__ = ["CheckpointError", "atomic_write", "read_checkpoint", "save_checkpoint", "load_checkpoint"]


class CheckpointError(OSError):
    """A checkpoint (or another run file) could not be written or read; the
    message is one line naming the file and the cause."""


def _open_temp(path: Path) -> tuple[IO[bytes], str]:
    """A new temporary file next to ``path`` (same filesystem, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return os.fdopen(fd, "wb"), tmp


def describe_os_error(e: BaseException) -> str:
    """A short cause for a failed write: ``no space left on device``, ``permission denied``, ..."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno is not None:
            text = err.strerror or os.strerror(err.errno)
            return text[0].lower() + text[1:] if text else errno.errorcode.get(err.errno, str(err.errno))
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text


def default_mode(kind: str = "file") -> int:
    """The permissions a new file (or folder) gets under the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if kind == "dir" else 0o666) & ~mask


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, what: str = "file", private: bool = False
) -> None:
    """Write ``path`` through ``write(f)`` so that it is either the old file or the new one.

    The bytes go to a temporary file in the same directory, which is flushed
    and fsync'ed, then renamed over ``path``.  If anything fails the temporary
    file is removed, ``path`` is untouched, and :class:`CheckpointError` says
    which file and why (``no space left on device``, ``permission denied``).
    A ``KeyboardInterrupt`` during the write also removes the temporary file.
    ``private``: the file is readable by its owner only (0600); otherwise it gets
    the usual permissions under the umask.
    """
    path = Path(path)
    tmp = None
    try:
        f, tmp = _open_temp(path)
        if not private:
            os.chmod(tmp, default_mode())
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot write the {what} {path}: {describe_os_error(e)}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_save(obj: Any, path: str | os.PathLike, *, what: str = "checkpoint", private: bool = True) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`; owner-only by default
    (a checkpoint holds the secret seeds of the sampling and the noise)."""
    atomic_write(path, lambda f: torch.save(obj, f), what=what, private=private)


def read_checkpoint(
    path: str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool = False, what: str = "checkpoint"
) -> Any:
    """``torch.load(path)``, with one clear :class:`CheckpointError` for a missing,
    empty, truncated or foreign file instead of the loader's internal error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"the {what} {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"the {what} {path} is empty (0 bytes): it was not written completely")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - torn zip, bad pickle, EOF: many types, one meaning
        cause = describe_os_error(e) if isinstance(e, OSError) else "truncated or corrupted"
        raise CheckpointError(
            f"the {what} {path} cannot be read ({size:,} bytes, {cause}); it is not a complete PyTorch checkpoint"
        ) from e


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    engine: Any = None,
    sampler: Any = None,
    **extra: Any,
) -> None:
    """Write everything needed to resume to ``path`` (``torch.save``; written
    to a temporary file first, then renamed, so a crash never leaves a torn
    checkpoint, and a failed write removes the temporary file and raises
    :class:`CheckpointError` naming the cause).  ``sampler`` is anything with
    ``state_dict()`` (e.g. a :class:`dpft.data.PoissonBatchSampler` or
    :class:`dpft.data.PoissonLoader`).

    The checkpoint holds the noise and sampler seeds: keep it as private as
    the training data."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "engine": engine.state_dict() if engine is not None else None,
        "sampler": sampler.state_dict() if sampler is not None else None,
        "extra": extra,
    }
    atomic_save(state, path)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    engine: Any = None,
    sampler: Any = None,
    map_location: Any = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the given objects;
    returns the ``extra`` entries.  The engine must be configured like the
    saved one (same noise multiplier, sample rate, delta): otherwise
    ``ValueError``.  A missing, empty or corrupted file raises
    :class:`CheckpointError`."""
    state = read_checkpoint(path, map_location=map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"the checkpoint {os.fspath(path)} was not written by dpft.save_checkpoint")
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
