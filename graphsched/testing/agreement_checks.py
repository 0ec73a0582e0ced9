"""Distributed bodies for the agreement tests: ranks that differ, die, or are slow."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

import graphsched
from graphsched.compat import dynamo_reset
from graphsched.errors import GraphschedError
from graphsched.schedule.plans import simple_plan


def _step(options: dict[str, Any], batch: int, rank: int, planner: Any = None) -> dict[str, Any]:
    """Wrap the tiny MoE model with ``options``, run one training step; the error, if any."""
    from graphsched.models import MoEGPT, get_preset, make_batch

    config = get_preset("tiny")
    dynamo_reset()
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        model = graphsched.wrap(MoEGPT(config, process_group=dist.group.WORLD), planner=planner, **options)
        idx, targets = make_batch(config, batch, seed=rank)
        model(idx, targets).backward()
        return {"type": None, "error": "", "seconds": time.perf_counter() - start}
    except GraphschedError as exc:
        return {"type": type(exc).__name__, "error": str(exc), "seconds": time.perf_counter() - start}


class _SlowPlanner:
    """The identity plan, after ``delay_s`` on the first graph (a long solve or profiling)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def __call__(self, analysis: Any, gm: Any) -> Any:
        time.sleep(self.delay_s)
        self.delay_s = 0.0
        return simple_plan(analysis, gm, "identity")


def options_mismatch_cases(rank: int, world_size: int, plan_path: str, timeout_s: float) -> dict[str, Any]:
    """Each case: rank 0 and rank 1 differ in one way; every rank must raise, none may hang."""
    base = {"agreement_timeout_s": timeout_s}
    out: dict[str, Any] = {}
    out["schedule"] = _step({**base, "schedule": "ilp" if rank == 0 else "identity",
                             "cost_model": "analytic"}, 2, rank)
    out["chunks"] = _step({**base, "chunks": 2 if rank == 0 else 1, "cost_model": "analytic"}, 2, rank)
    if rank == 0:
        with open(plan_path, "w") as f:
            f.write(graphsched.ModelPlan().to_json())
    out["plan_file"] = _step({**base, "schedule": "ilp", "cost_model": "analytic",
                              "plan_file": plan_path if rank == 0 else None}, 2, rank)
    out["shapes"] = _step(base, 2 + rank, rank)
    # A rank slower than the timeout, but working inside graphsched: the other waits, no error.
    out["slow"] = _step(base, 2, rank, planner=_SlowPlanner(1.5 * timeout_s if rank == 1 else 0.0))
    # Rank 1 never reaches graphsched (it leaves): rank 0 must raise, not wait forever.
    out["absent"] = _step(base, 2, rank) if rank == 0 else None
    return out


class _DyingPlanner:
    def __call__(self, analysis: Any, gm: Any) -> Any:
        os._exit(3)


def rank_dies_while_compiling(rank: int, world_size: int, result_dir: str, timeout_s: float) -> None:
    """The last rank exits inside its planner; every other rank must raise a graphsched error."""
    planner = _DyingPlanner() if rank == world_size - 1 else None
    outcome = _step({"agreement_timeout_s": timeout_s}, 2, rank, planner=planner)
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{outcome['type']}\n{outcome['seconds']:.2f}\n{outcome['error']}")
