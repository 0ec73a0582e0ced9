"""Every rank must run the same plan: agree on its inputs, share it, check it before running.

Gloo and NCCL match collectives by issue order, so two ranks with different plans would exchange
the wrong tensors or hang. Plans are made identical by construction (agreed costs, rank 0 solves,
the others receive its plan); ``verify_same_plan`` turns any remaining difference into a clear
error within seconds.

These exchanges happen while graphs are being compiled, so they go through the process group's
key-value store rather than through collectives: nothing can interleave with a collective still
queued on the group, and a rank that never arrives shows up as a store timeout naming the key.
Each exchange gets a fresh key from a per-process sequence number: every rank makes the same
exchanges in the same order (they compile the same graphs), so the n-th exchange of one rank is
the n-th of every rank.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Sequence

import torch.distributed as dist

from graphsched.errors import PlanMismatchError
from graphsched.plan import Plan

_KEY_PREFIX = "graphsched/agreement"
_sequence = itertools.count()


#: Backends whose whole group lives in this one process (nothing to agree with).
_SINGLE_PROCESS_BACKENDS = ("graphsched_emulated",)


def world_is_distributed() -> bool:
    """Whether other processes run this program beside this one."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return str(dist.get_backend()).lower() not in _SINGLE_PROCESS_BACKENDS


def exchange(payload: Any, purpose: str) -> list[Any]:
    """Every rank's JSON-serialisable ``payload``, ordered by rank (through the store)."""
    if not world_is_distributed():
        return [payload]
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    base = f"{_KEY_PREFIX}/{next(_sequence)}/{purpose}"
    store.set(f"{base}/{rank}", json.dumps(payload))
    return [json.loads(store.get(f"{base}/{r}")) for r in range(world)]


def agree_on_costs(costs: dict[str, float]) -> dict[str, float]:
    """Each cost replaced by its maximum over ranks (the step waits for the slowest rank)."""
    gathered = exchange(costs, "costs")
    keys = sorted(costs)
    for r, other in enumerate(gathered):
        if sorted(other) != keys:
            missing = sorted(set(keys) ^ set(other))[:5]
            raise PlanMismatchError(
                f"graphsched: rank {r} measured other graph nodes than this rank (e.g. {missing}); "
                "every rank must run the same model with the same input shapes."
            )
    return {k: max(float(o[k]) for o in gathered) for k in keys}


def share_from_rank0(payload: Any, purpose: str) -> Any:
    """Rank 0's payload on every rank (others pass None)."""
    if not world_is_distributed():
        return payload
    store = dist.distributed_c10d._get_default_store()
    key = f"{_KEY_PREFIX}/{next(_sequence)}/{purpose}"
    if dist.get_rank() == 0:
        store.set(key, json.dumps(payload))
    return json.loads(store.get(key))


def broadcast_plan(plan_json: str | None) -> str:
    """Rank 0's plan JSON, on every rank."""
    text = share_from_rank0(plan_json, "plan")
    assert text is not None
    return text


def verify_same_plan(plan: Plan) -> None:
    """Raise PlanMismatchError on every rank unless all ranks hold ``plan``."""
    mine = [plan.graph_name, plan.graph_hash, plan.content_hash()]
    gathered: Sequence[list[str]] = exchange(mine, "verify")
    if all(g == mine for g in gathered):
        return
    lines = [f"  rank {r}: graph {g[0]} graph-hash {g[1][:12]} plan-hash {g[2][:12]}" for r, g in enumerate(gathered)]
    raise PlanMismatchError(
        f"graphsched: ranks hold different plans for graph {plan.graph_name!r}; running them would "
        "mismatch the collectives and hang.\n" + "\n".join(lines) + "\nFix: give every rank the "
        "same plan file (or none), the same model and input shapes; if you planned on each rank "
        "separately, let graphsched plan (rank 0 decides and shares the plan)."
    )
