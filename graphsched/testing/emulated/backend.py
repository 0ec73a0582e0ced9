"""The ``"graphsched_emulated"`` backend registered with torch.distributed, and the set-up calls."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from graphsched.compat import default_group
from graphsched.errors import ConfigError, GraphschedError
from graphsched.testing.emulated.group import BACKEND_NAME, EmulatedProcessGroup
from graphsched.testing.emulated.link import EmulatedLink, EmulationOptions


def _create_group(common: Any, backend_options: Any) -> EmulatedProcessGroup:
    """The backend's creator (torch's extended API): called by init_process_group and new_group."""
    parent: EmulatedProcessGroup | None = None
    if dist.is_initialized():
        default = default_group()
        if isinstance(default, EmulatedProcessGroup):
            parent = default
    if backend_options is None:
        if parent is None:
            options = EmulationOptions()
        else:
            options = parent.options
    elif isinstance(backend_options, EmulationOptions):
        options = backend_options
    else:
        raise ConfigError(
            f"the {BACKEND_NAME} backend takes pg_options=EmulationOptions(...), got "
            f"{type(backend_options).__name__}."
        )
    if parent is not None and options.staging_mib == parent.options.staging_mib and (
        options.copy_bandwidth_gbps in (None, parent.options.copy_bandwidth_gbps)
    ):
        link = parent.link  # one rank, one link: subgroups queue on the same copy stream
    else:
        link = EmulatedLink(options.staging_mib, options.copy_bandwidth_gbps)
    name = str(getattr(common, "group_id", "") or "")
    return EmulatedProcessGroup(common.group_rank, common.group_size, options, link, name)


def register_backend() -> None:
    """Register ``"graphsched_emulated"`` with torch.distributed (once per process; idempotent)."""
    if BACKEND_NAME.upper() in getattr(dist.Backend, "_plugins", {}) or hasattr(
        dist.Backend, BACKEND_NAME.upper()
    ):
        return
    dist.Backend.register_backend(
        BACKEND_NAME, _create_group, extended_api=True, devices=["cuda", "cpu"]
    )


def init_emulated_process_group(
    virtual_size: int,
    bandwidth_gbps: float = 25.0,
    *,
    latency_us: float = 0.0,
    copy_bandwidth_gbps: float | None = None,
    staging_mib: int = 64,
    device: torch.device | str | None = None,
    timeout: timedelta | None = None,
) -> EmulatedProcessGroup:
    """Initialise torch.distributed as rank 0 of an emulated group of ``virtual_size`` ranks.

    Returns the world group. With a CUDA ``device`` the copy bandwidth is measured now (not inside
    the first timed step). Call ``dist.destroy_process_group()`` to tear it down.
    """
    if not isinstance(virtual_size, int) or isinstance(virtual_size, bool) or virtual_size < 1:
        raise ConfigError(
            f"virtual_size={virtual_size!r} must be an integer >= 1 (the expert-parallel group size "
            "to emulate, e.g. 8)."
        )
    if dist.is_initialized():
        raise GraphschedError(
            "torch.distributed is already initialised; call dist.destroy_process_group() before "
            "init_emulated_process_group (the emulated group must be the world group)."
        )
    options = EmulationOptions(bandwidth_gbps, latency_us, copy_bandwidth_gbps, staging_mib)
    register_backend()
    kwargs: dict[str, Any] = {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    dist.init_process_group(
        backend=BACKEND_NAME,
        store=dist.HashStore(),
        rank=0,
        world_size=virtual_size,
        pg_options=options,
        **kwargs,
    )
    group = default_group()
    if not isinstance(group, EmulatedProcessGroup):
        raise GraphschedError(
            f"torch.distributed made a {type(group).__name__} instead of an EmulatedProcessGroup; "
            "this torch version does not hand Python process groups through; use torch 2.11+."
        )
    if device is not None and torch.device(device).type == "cuda":
        group.link.copy_bandwidth_gbps(torch.device(device))
    return group


def new_emulated_group(
    bandwidth_gbps: float | None = None, **changes: Any
) -> EmulatedProcessGroup:
    """A second group over all ranks of the emulated world with other options (same link).

    ``new_emulated_group(math.inf)`` is the compute-only twin of the world group: same size, same
    data movement, no time on the wire.
    """
    world = default_group()
    if not isinstance(world, EmulatedProcessGroup):
        raise GraphschedError(
            "new_emulated_group needs the emulated world group; call init_emulated_process_group "
            "first."
        )
    if bandwidth_gbps is not None:
        changes["bandwidth_gbps"] = bandwidth_gbps
    options = dataclasses.replace(world.options, **changes)
    group = dist.new_group(list(range(world.size())), pg_options=options)
    if not isinstance(group, EmulatedProcessGroup):
        raise GraphschedError(f"dist.new_group made a {type(group).__name__}, not an emulated group.")
    return group
