"""Distributed training: which ranks share a step, and the sum of their clipped sums.

Two layouts are supported.  Replicated parameters (``DistributedDataParallel``,
or an engine given ``distributed=True`` in an initialized process group): each
rank clips its own examples, adds independent noise of std ``sigma R / sqrt(W)``
and one all-reduce per dtype bucket sums the ranks' noisy clipped sums (``W``
independent draws add up to std ``sigma R``).  Sharded parameters (FSDP2's
``fully_shard``: DTensors with ``Shard`` placements): a reduce-scatter of the
full-size clipped sums, then the one rank that owns each shard adds noise of
std ``sigma R`` to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped in ``DistributedDataParallel``."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def is_dtensor(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor (an FSDP2-sharded parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(p, DTensor)


@dataclass
class Topology:
    """The ranks that share each step: the process group (``None``: the
    default one), how many ranks, this rank, and the sharded parameters."""

    group: Any = None
    world_size: int = 1
    rank: int = 0
    sharded: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """Whether the clipped sums must be combined across ranks."""
        return self.world_size > 1 or bool(self.sharded)


def topology(params: Mapping[str, nn.Parameter], group: Any, distributed: bool | None, restricted: bool) -> Topology:
    """Check the layout and find the ranks: ``group`` is DDP's process group
    (or ``None``), ``distributed`` the engine's argument, ``restricted``
    whether some parameters are row-restricted (SPARTA)."""
    dist = torch.distributed
    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise ValueError("distributed=True needs an initialized torch.distributed process group")
    world = dist.get_world_size(group) if ready and distributed is not False else 1
    rank = dist.get_rank(group) if world > 1 else 0
    sharded = sorted(k for k, p in params.items() if is_dtensor(p))
    if sharded:
        if not ready:
            raise ValueError("sharded (DTensor) parameters need an initialized torch.distributed process group")
        if distributed is False:
            raise ValueError("distributed=False with sharded (FSDP2/DTensor) parameters")
        bad = [k for k in sharded if not all(pl.is_shard() for pl in params[k].placements)]  # type: ignore[attr-defined]
        if bad:
            raise NotImplementedError(
                f"dpft: DTensor parameters with replicated or partial placements are not supported "
                f"(e.g. HSDP): {bad[:3]}; use fully_shard on a 1-D device mesh"
            )
        if restricted:
            raise NotImplementedError("dpft: SPARTA row restriction of FSDP2-sharded models is not supported")
        if group is None:
            group = params[sharded[0]].device_mesh.get_group()  # type: ignore[attr-defined]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
    return Topology(group, world, rank, sharded)


def any_rank(flag: Tensor | None, device: torch.device, group: Any) -> Tensor:
    """``flag`` (a device-side 0/1, or ``None`` for 0) as the maximum over the
    ranks: every rank refuses a step together (one rank raising while the
    others enter the all-reduce of the clipped sums would hang)."""
    t = torch.zeros(1, device=device) if flag is None else flag.to(device, torch.float32).reshape(1)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return t


def reduce_noisy_sums(
    totals: Mapping[str, Tensor],
    params: Mapping[str, nn.Parameter],
    topo: Topology,
    noise: Any,
    sigma_r: float,
    batch_size: int,
) -> None:
    """Write ``(sum over ranks of the clipped sums + sigma R z) / B`` into
    ``p.grad`` of every parameter (this rank's shard of it where sharded)."""
    sharded = set(topo.sharded)
    for k in topo.sharded:
        _shard_grad(params[k], totals.get(k), noise, sigma_r, batch_size)
    buckets: dict[tuple, list[str]] = {}
    for k in params:
        if k not in sharded:
            p = params[k]
            buckets.setdefault((p.device, p.dtype), []).append(k)
    for ks in buckets.values():
        parts = []
        for k in ks:
            p = params[k]
            t = totals.get(k)
            parts.append((t.to(p.dtype) if t is not None else torch.zeros_like(p)).reshape(-1))
        flat = torch.cat(parts)
        if sigma_r > 0:
            # in bounded chunks; rows a row mask leaves out are zeroed by the caller
            noise.add_([flat], sigma_r / math.sqrt(topo.world_size))
        torch.distributed.all_reduce(flat, group=topo.group)
        flat.div_(batch_size)
        offset = 0
        for k in ks:
            p = params[k]
            p.grad = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()


def _shard_grad(p: nn.Parameter, total: Tensor | None, noise: Any, sigma_r: float, batch_size: int) -> None:
    """``p.grad`` of an FSDP2-sharded parameter: this rank's shard of
    ``(sum over ranks of the clipped sums + sigma R z) / B``."""
    from torch.distributed.tensor import DTensor, Partial

    mesh = p.device_mesh  # type: ignore[attr-defined]
    t = total.to(p.dtype) if total is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device)
    # every rank holds a full-size partial sum (its own examples); reduce-scatter to the shards
    local = DTensor.from_local(t, mesh, [Partial()] * mesh.ndim).redistribute(mesh, p.placements).to_local()  # type: ignore[attr-defined]
    if sigma_r > 0 and local.numel():
        noise.add_([local], sigma_r)  # each shard has one owner
    local.div_(batch_size)
    p.grad = DTensor.from_local(local, mesh, p.placements, shape=p.shape, stride=p.stride())  # type: ignore[attr-defined]
