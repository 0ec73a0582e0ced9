"""Running one collective for timing: which device its buffers live on, the call, its median time.

Shared by the size sweep (``commmodel.benchmark_collectives``), the timing of a graph's own
collectives (``graph_collectives``) and the contention check (``contention``), so that all three
time a group the same way: on the device the group's collectives really use, through the group.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch
import torch.distributed as dist

from graphsched.analysis.device_timer import time_once
from graphsched.errors import ConfigError

#: Collective kinds the model and the benchmark know.
COLLECTIVE_KINDS = ("all_to_all", "all_reduce", "all_gather", "reduce_scatter", "broadcast")


def group_backend(group: dist.ProcessGroup | None) -> str:
    """The group's backend name, lower case (``"gloo"``, ``"nccl"``, ``"graphsched_emulated"``)."""
    return str(dist.get_backend(group)).lower()


def _backend_devices(backend: str) -> list[str]:
    """Device types the backend was registered for (empty when torch does not say)."""
    capability = getattr(dist.Backend, "backend_capability", None) or {}
    return [str(d) for d in capability.get(backend, [])]


def _cuda_device(preferred: torch.device | None) -> torch.device:
    if preferred is not None and preferred.type == "cuda" and preferred.index is not None:
        return preferred
    return torch.device("cuda", torch.cuda.current_device())


def group_device(
    group: dist.ProcessGroup | None, preferred: torch.device | None = None
) -> torch.device:
    """Where the buffers of this group's collectives live.

    gloo: host memory (its CUDA support does not cover all-to-all, and graphsched runs gloo on
    CPU). Any other backend (NCCL, or a custom one such as the emulated link): ``preferred`` (the
    device of the model or of the graph's collective) when the backend was registered for that
    device type or does not say which it supports; else CUDA when the backend may run there and a
    GPU is present; else the host.
    """
    backend = group_backend(group)
    if backend == "gloo":
        return torch.device("cpu")
    known = _backend_devices(backend)
    if preferred is not None and (not known or preferred.type in known):
        return _cuda_device(preferred) if preferred.type == "cuda" else preferred
    if ("cuda" in known or not known) and torch.cuda.is_available():
        return _cuda_device(preferred)
    return torch.device("cpu")


def times_collectives(group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether the group's collectives on ``device`` take the time of the link they stand for.

    A group may say it does not: ``times_collectives(device)`` on the group object. The emulated
    link (``graphsched.testing.emulated``) spends its time on CUDA only; on the host it copies the
    data and counts the bytes, so timing it there would time a memcpy, not the link.
    """
    pg = group if group is not None else dist.group.WORLD
    probe = getattr(pg, "times_collectives", None)
    return True if probe is None else bool(probe(device))


def barrier(group: dist.ProcessGroup | None, device: torch.device) -> None:
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index or 0])
    else:
        dist.barrier(group=group)


def global_rank0(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


def collective_call(
    kind: str,
    numel: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    async_op: bool = False,
) -> tuple[Callable[[], Any], int]:
    """Buffers for one collective of ``kind`` and a closure that runs it; also its input bytes.

    ``numel`` elements of ``dtype`` per rank (the shard for an all-gather); it is rounded up to a
    multiple of the group size so every rank gets an even split. With ``async_op`` the closure
    returns the collective's ``dist.Work``.
    """
    world_size = dist.get_world_size(group)
    numel = max(world_size, -(-numel // world_size) * world_size)
    if dtype == torch.bool:
        dtype = torch.uint8  # same bytes; not every backend reduces booleans
    inp = torch.ones(numel, dtype=dtype, device=device)
    nbytes = inp.numel() * inp.element_size()
    if kind == "all_to_all":
        out = torch.empty_like(inp)
        return (lambda: dist.all_to_all_single(out, inp, group=group, async_op=async_op)), nbytes
    if kind == "all_reduce":
        return (lambda: dist.all_reduce(inp, group=group, async_op=async_op)), nbytes
    if kind == "all_gather":
        gathered = torch.empty(numel * world_size, dtype=dtype, device=device)
        return (
            lambda: dist.all_gather_into_tensor(gathered, inp, group=group, async_op=async_op)
        ), nbytes
    if kind == "reduce_scatter":
        shard = torch.empty(numel // world_size, dtype=dtype, device=device)
        return (
            lambda: dist.reduce_scatter_tensor(shard, inp, group=group, async_op=async_op)
        ), nbytes
    if kind == "broadcast":
        src = global_rank0(group)
        return (lambda: dist.broadcast(inp, src=src, group=group, async_op=async_op)), nbytes
    raise ConfigError(f"cannot benchmark collective kind {kind!r}; use some of {COLLECTIVE_KINDS}.")


def median_time(
    fn: Callable[[], Any],
    group: dist.ProcessGroup | None,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, each after a barrier (ranks start together)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        barrier(group, device)
        samples.append(time_once(fn, device))
    return float(statistics.median(samples))
