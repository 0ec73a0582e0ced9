"""Why a wrapped model has nothing scheduled, said once and the same way by every entry point."""

from __future__ import annotations

from typing import Any

NO_GRAPH = (
    "torch.compile handed graphsched no graph although the model ran {calls} time(s): Dynamo does "
    "not trace the forward of torch.nn's own modules (nn.Sequential, nn.Linear, ...) when they are "
    "the wrapped module, so the model runs eagerly, unchanged. Wrap a module of your own whose "
    "forward calls them. There is nothing to schedule either way unless the forward runs "
    "collectives (e.g. expert-parallel all-to-alls)."
)
NO_COLLECTIVE = (
    "{graphs} graph(s) captured and none holds a collective (all-to-all, all-reduce, ...): there "
    "is no communication to overlap, so every graph runs as captured (same results as eager). "
    "graphsched schedules models whose forward runs torch.distributed functional collectives, such "
    "as expert-parallel MoE layers."
)


def nothing_to_schedule(state: Any) -> str | None:
    """Why ``state`` (a GraphschedState) has no scheduled graph after running, or None."""
    graphs = state.capture.graphs
    calls = getattr(state, "calls", 0)
    if not graphs and calls and state.capture.dynamo_graphs == 0:
        return "graphsched: nothing to schedule: " + NO_GRAPH.format(calls=calls)
    if graphs and all(g.fallback_reason == "no collectives" for g in graphs):
        return "graphsched: nothing to schedule: " + NO_COLLECTIVE.format(graphs=len(graphs))
    return None


def describe_solve(options: dict[str, Any]) -> str | None:
    """One line on how an ILP plan was chosen: the solver, and whether it proved optimality."""
    if options.get("schedule") != "ilp" or "status" not in options:
        return None
    status = options["status"]
    proof = {
        "optimal": "proved optimal (solver proof or the lower bound met)",
        "feasible": "not proved optimal (best found within solver_time_limit_s)",
        "incumbent": "not proved optimal (no solver result beat the list schedule)",
    }.get(status, f"status {status}")
    return (f"ILP plan by {options.get('method', '?')}, solver {options.get('solver', 'CBC')}, {proof}, "
            f"{options.get('solve_time_s', 0):g} s")
