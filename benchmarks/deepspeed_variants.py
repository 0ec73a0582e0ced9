"""The DeepSpeed variants: the GPT whose MoE layers are DeepSpeed's (``deepspeed.moe.layer.MoE``),
eager, made capturable for graphsched, or on the compute-only twin; skipped where deepspeed does
not import."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from benchmarks.context import Skip
from benchmarks.presets import BenchPreset
from graphsched.testing.emulated.group import EmulatedProcessGroup


def deepspeed_ready(device: torch.device, world: dist.ProcessGroup) -> Any:
    """Import DeepSpeed and initialise its communication on ``world``; Skip if not installed."""
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed not installed (pip install deepspeed)")
    if device.type == "cpu" and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed import comm as ds_comm
    except ImportError as exc:  # installed but not importable (a missing dependency)
        raise Skip(f"deepspeed not installed: import failed ({exc})") from None

    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=str(dist.get_backend(world)))
    _forget_stale_deepspeed_groups()
    return deepspeed


def _forget_stale_deepspeed_groups() -> None:
    """Drop DeepSpeed's cached expert groups of an earlier, destroyed world (a second run in one
    process would otherwise hand the new model a dead group)."""
    from deepspeed.utils import groups as ds_groups

    alive = set(dist.distributed_c10d._world.pg_names)
    for table in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP"):
        cache = getattr(ds_groups, table, None)
        if isinstance(cache, dict):
            for key in [k for k, g in cache.items() if g not in alive]:
                del cache[key]


def deepspeed_model(
    preset: BenchPreset, group: EmulatedProcessGroup, seed: int, compute_only: EmulatedProcessGroup | None = None
) -> tuple[nn.Module, list[EmulatedProcessGroup]]:
    """The GPT with DeepSpeed's MoE layers over ``group`` (expert groups on ``compute_only`` when
    given); returns (model on CPU, the emulated groups its all-to-alls use)."""
    deepspeed_ready(torch.device(preset.device), group)
    from graphsched.integrations.deepspeed_gpt import build_deepspeed_moe_gpt

    model = build_deepspeed_moe_gpt(preset.model, ep_size=group.size(), seed=seed)
    groups: list[EmulatedProcessGroup] = []
    for block in model.blocks:
        if not block.is_moe:
            continue
        moe = block.ffn.moe
        moe.set_deepspeed_parallelism()
        layer = moe.deepspeed_moe
        if compute_only is not None:
            # The same layer on the twin group that moves no bytes.
            layer.ep_group = compute_only
            layer.gate.ep_group = compute_only
        if isinstance(layer.ep_group, EmulatedProcessGroup) and layer.ep_group not in groups:
            groups.append(layer.ep_group)
    return model, groups

