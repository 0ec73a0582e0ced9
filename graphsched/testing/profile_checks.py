"""Distributed bodies for the profile-guided planning tests (2 gloo ranks, aten executor).

One spawn runs three trainings side by side with eager twins: the ILP planner re-planning from
profiled costs; a planner whose plan is sure to change once costs are measured (so the rebuild
path runs); and the first configuration again with the cost cache warm.
"""

from __future__ import annotations

from typing import Any, Callable

import graphsched
from graphsched.analysis.provenance import CostSource
from graphsched.testing.twins import train_side_by_side, twin_models


def train_against_eager(
    rank: int, options: dict[str, Any], steps: int, cost_fn: Any = None, planner: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Train eager and wrapped twins ``steps`` steps; per step the comparison (``twins.compare_step``),
    and, per graph, what profile-guided planning did."""
    from graphsched.models import get_preset, make_batch

    config = get_preset("tiny").replace(n_layers=1)
    eager, model = twin_models(config)
    graphsched.wrap(model, cost_fn=cost_fn, planner=planner, **options)
    batches = (make_batch(config, 2, seed=100 * step + rank) for step in range(steps))
    out: dict[str, Any] = {"steps": train_side_by_side(eager, eager, model, batches)}
    graphs = {}
    for g in graphsched.api.state_of(model).capture.graphs:
        if g.plan is None:
            continue
        runner = g.runner
        graphs[g.name] = {
            "plan_hash": g.plan.content_hash(),
            "schedule": g.plan.options.get("schedule"),
            "costs": g.plan.options.get("costs"),
            "profiled_plan_hash": g.profiled_plan.content_hash() if g.profiled_plan is not None else None,
            "profiled": runner is not None and runner.profiled_calls > 0,
            "decided": runner is not None and runner.decided,
            "measured_in_step": sum(1 for s in g.analysis.cost_sources().values()
                                    if s == CostSource.MEASURED_IN_STEP) if g.analysis else 0,
            "executor_plan_hash": g.executor.plan.content_hash() if g.executor is not None else None,
        }
    out["graphs"] = graphs
    out["explain"] = graphsched.explain(model, file=None)
    return out


def _switching_planner(analysis: Any, gm: Any) -> Any:
    """The captured order until costs were measured in the step, then another valid order: the
    re-plan is sure to change the plan (and the rebuilt executor must still match eager)."""
    from graphsched.schedule.plans import simple_plan

    measured = any(s == CostSource.MEASURED_IN_STEP for s in analysis.cost_sources().values())
    return simple_plan(analysis, gm, "reverse_independent" if measured else "identity")


def profile_guided_checks(rank: int, world_size: int, cache_dir: str) -> dict[str, Any]:
    from graphsched.testing.scheduling import CommHeavyCosts

    ilp = {"schedule": "ilp", "codegen": "aten", "cost_model": "analytic", "profile_steps": 2,
           "cache_dir": cache_dir, "solver_time_limit_s": 5.0}
    return {
        "ilp": train_against_eager(rank, ilp, steps=5, cost_fn=CommHeavyCosts()),
        "switch": train_against_eager(
            rank, {"codegen": "aten", "cost_model": "analytic", "profile_steps": 2,
                   "cache_dir": cache_dir + "-switch"},
            steps=5, cost_fn=CommHeavyCosts(), planner=_switching_planner),
        "cached": train_against_eager(rank, ilp, steps=3, cost_fn=CommHeavyCosts()),
    }
