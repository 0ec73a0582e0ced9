"""Distributed bodies for the bad-input tests (spawned processes need importable functions)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import graphsched
from graphsched.errors import ProcessGroupMismatchError


def changed_process_group(rank: int, world_size: int) -> dict[str, str]:
    """Wrap, train a step, then call under another group: must raise, naming the fix."""
    from graphsched.models import MoEGPT, get_preset, make_batch

    config = get_preset("tiny")
    torch.manual_seed(0)
    model = graphsched.wrap(MoEGPT(config, process_group=dist.group.WORLD))
    idx, targets = make_batch(config, 2, seed=rank)
    model(idx, targets).backward()
    other = dist.new_group(list(range(world_size)))
    model.process_group = other
    outcome: dict[str, str] = {}
    try:
        model(idx, targets)
        outcome["error"] = ""
    except ProcessGroupMismatchError as exc:
        outcome["error"] = str(exc)
    dist.barrier()
    return outcome
