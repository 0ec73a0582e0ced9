"""Every rank must run the same plan: check it before the first step, fail fast if not.

Gloo and NCCL match collectives by issue order, so two ranks with different plans would exchange
the wrong tensors or hang. Plans are made identical by construction (agreed costs, one rank
solves, the others receive its plan); this check turns any remaining difference into a clear
error within seconds instead of a hang.
"""

from __future__ import annotations


import torch.distributed as dist

from graphsched.errors import PlanMismatchError
from graphsched.plan import Plan


def world_is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def verify_same_plan(plan: Plan, group: "dist.ProcessGroup | None" = None) -> None:
    """Raise PlanMismatchError on every rank unless all ranks of ``group`` hold ``plan``."""
    if not world_is_distributed():
        return
    mine = (plan.graph_name, plan.graph_hash, plan.content_hash())
    gathered: list[tuple[str, str, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    if all(g == mine for g in gathered):
        return
    lines = [f"  rank {r}: graph {g[0]} graph-hash {g[1][:12]} plan-hash {g[2][:12]}" for r, g in enumerate(gathered) if g]
    raise PlanMismatchError(
        f"graphsched: ranks hold different plans for graph {plan.graph_name!r}; running them would "
        "mismatch the collectives and hang.\n" + "\n".join(lines) + "\nFix: give every rank the "
        "same plan file (or none), the same model and input shapes; if you planned on each rank "
        "separately, let graphsched plan (rank 0 decides and shares the plan)."
    )


def broadcast_plan(plan_json: str | None, src: int = 0, group: "dist.ProcessGroup | None" = None) -> str:
    """Rank ``src``'s plan JSON, on every rank."""
    if not world_is_distributed():
        assert plan_json is not None
        return plan_json
    box = [plan_json if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    assert box[0] is not None
    return box[0]


