"""The ILP planner: from an analysed graph to the Plan every rank runs.

Steps: agree on the cost numbers across ranks, coarsen the graph into tasks, solve the
two-resource ordering (list schedule as incumbent, ILP within a time limit), and turn the solved
order into a Plan. In a distributed run rank 0 solves (or finds the plan in its cache) and shares
the plan's JSON with the others, so plans are identical by construction; the runtime checks the
hash again before the first step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import torch.distributed as dist
import torch.fx as fx

from graphsched.agreement import agree_on_costs as agree_costs_across_ranks
from graphsched.agreement import broadcast_plan, world_is_distributed
from graphsched.analysis.costmodel import device_of
from graphsched.analysis.graph import GraphAnalysis
from graphsched.codegen.settings import resolve_codegen
from graphsched.config import GraphschedConfig, default_cache_dir
from graphsched.errors import ConfigError
from graphsched.plan import PLAN_FORMAT_VERSION, ModelPlan, Phase, Plan, Task
from graphsched.schedule.cbc import solver_name
from graphsched.schedule.coarsen import CoarseGraph, coarsen
from graphsched.schedule.ilp import solve
from graphsched.schedule.plans import finish_tasks, stream_of, task_label
from graphsched.schedule.problem import COMM, Schedule
from graphsched.schedule.simulate import lower_bound, simulate

log = logging.getLogger(__name__)

#: The solver's time for a re-plan from profiled costs (``for_replanning``). The first plan has
#: the whole ``solver_time_limit_s``; a re-plan runs inside a training step and only corrects
#: costs (measured on an H200: a micro-batched forward searched 14.6 s of its 15 s limit to return
#: the plan it had, 22% of the first step, against the 10% profile-guided planning may add).
REPLAN_SOLVE_LIMIT_S = 2.0


def agree_on_costs(analysis: GraphAnalysis) -> None:
    """Replace each node's cost by the maximum over ranks, so every rank plans from equal numbers."""
    if not world_is_distributed():
        return
    agreed = agree_costs_across_ranks(analysis.node_costs())
    for name, cost in agreed.items():
        analysis.node(name).cost = cost


def plan_key(analysis: GraphAnalysis, world_size: int, issues_follow_compute: bool = False) -> str:
    """Cache key: the graph, its dependencies as analysed (order-only edges included: a change to
    the analysis must not reuse a plan made under other constraints), the cost numbers and the
    world it was planned for, and the plan format (a cached plan of another format is not reused)."""
    key: dict[str, object] = {
        "format": PLAN_FORMAT_VERSION, "graph": analysis.graph_hash, "edges": sorted(analysis.dag.edges()),
        "costs": sorted(analysis.node_costs().items()), "world": world_size,
        "issues_follow_compute": issues_follow_compute,
    }
    if analysis.contention != 1.0:  # keys of plans made without contention stay as they were
        key["contention"] = analysis.contention
    blob = json.dumps(key, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def plan_from_schedule(
    analysis: GraphAnalysis, gm: fx.GraphModule, coarse: CoarseGraph, schedule: Schedule
) -> Plan:
    by_name = {n.name: n for n in gm.graph.nodes}
    tasks: list[Task] = []
    for tid in schedule.order:
        nodes = coarse.nodes[tid]
        kind, phase = coarse.kind[tid]
        tasks.append(
            Task(
                name=task_label(analysis, by_name[nodes[0]], kind, phase),
                nodes=list(nodes),
                stream=stream_of(kind),
                kind=kind,
                phase=phase,
                start=schedule.start[tid],
                end=schedule.end[tid],
            )
        )
    finish_tasks(tasks, analysis)
    return Plan(
        graph_name=analysis.name,
        graph_hash=analysis.graph_hash,
        tasks=tasks,
        costs=analysis.node_costs(),
        predicted_time=schedule.makespan,
    )


@dataclass
class IlpPlanner:
    """Callable ``(analysis, gm) -> Plan`` used by the capture backend for ``schedule="ilp"``."""

    config: GraphschedConfig
    plan_file: ModelPlan | None = None

    @classmethod
    def from_config(cls, config: GraphschedConfig) -> "IlpPlanner":
        plan_file = None
        if config.plan_file is not None:
            try:
                with open(config.plan_file) as f:
                    plan_file = ModelPlan.from_json(f.read())
            except (OSError, ValueError, KeyError) as exc:
                raise ConfigError(
                    f"plan_file={config.plan_file!r} cannot be read as a graphsched plan file "
                    f"({exc}); pass a file written by graphsched (ModelPlan JSON) or drop plan_file."
                ) from exc
        return cls(config, plan_file)

    def _from_plan_file(self, analysis: GraphAnalysis) -> Plan:
        assert self.plan_file is not None
        plan = self.plan_file.plans.get(analysis.name)
        if plan is None or plan.graph_hash != analysis.graph_hash:
            found = "no plan for it" if plan is None else "a plan made for another graph (hash differs)"
            raise ConfigError(
                f"plan_file {self.config.plan_file!r} holds {found} for graph {analysis.name!r}; "
                "the model, its input shapes or the world size changed since the file was written. "
                "Re-plan without plan_file (and save the new plans) or pass the matching file."
            )
        return plan

    def _cache_path(self, key: str) -> str:
        return os.path.join(self.config.cache_dir or default_cache_dir(), "plans", f"{key}.json")

    def _issues_follow_compute(self, gm: fx.GraphModule) -> bool:
        """Whether the graph will run as inductor's code, whose collectives start behind the
        compute listed before them (the aten executor's wait only for their inputs)."""
        values = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        return resolve_codegen(self.config.codegen, device_of(values)) == "inductor"

    def _solve(self, analysis: GraphAnalysis, gm: fx.GraphModule, follow: bool) -> Plan:
        coarse = coarsen(analysis, issues_follow_compute=follow)
        problem = coarse.problem
        captured = simulate(problem, problem.topological_order(), method="as_captured")
        schedule = solve(problem, time_limit_s=self.config.solver_time_limit_s)
        plan = plan_from_schedule(analysis, gm, coarse, schedule)
        moved = sum(1 for t in tasks_inside_windows(plan) if t.phase == Phase.WEIGHT_GRAD)
        plan.options = {
            "schedule": "ilp",
            "method": schedule.method,
            "status": schedule.status,
            "solver": solver_name(),
            "solve_time_s": round(schedule.solve_time_s, 3),
            "tasks": len(problem),
            "comm_tasks": sum(1 for t in problem.tasks if t.resource == COMM),
            "captured_time": captured.makespan,
            "lower_bound": lower_bound(problem),
            "weight_grad_tasks_in_windows": moved,
            "issues_follow_compute": follow,
        }
        if problem.contention != 1.0:
            plan.options["contention"] = problem.contention
        saving = captured.makespan - schedule.makespan
        log.info(
            "%s: %d tasks, %s (%s) in %.2f s; predicted %.3f ms vs %.3f ms as captured "
            "(saves %.3f ms, bound %.3f ms); %d weight-gradient tasks moved into communication windows",
            analysis.name, len(problem), schedule.method, schedule.status, schedule.solve_time_s,
            schedule.makespan * 1e3, captured.makespan * 1e3, saving * 1e3,
            plan.options["lower_bound"] * 1e3, moved,
        )
        return plan

    def for_replanning(self) -> "IlpPlanner":
        """This planner with the solver's time capped at ``REPLAN_SOLVE_LIMIT_S`` (the re-plan keeps
        the profiled plan unless the new one is predicted faster, so a shorter search risks no
        slower plan, only a smaller gain)."""
        limit = min(self.config.solver_time_limit_s, REPLAN_SOLVE_LIMIT_S)
        return dataclasses.replace(self, config=self.config.replace(solver_time_limit_s=limit))

    def remember(self, analysis: GraphAnalysis, plan: Plan) -> None:
        """Make ``plan`` the saved plan for the analysis' current costs (rank 0 writes): a graph
        that keeps its profiled plan over a barely faster new one keeps it in the next run too."""
        if self.plan_file is not None or (world_is_distributed() and dist.get_rank() != 0):
            return
        world = dist.get_world_size() if world_is_distributed() else 1
        _write(self._cache_path(plan_key(analysis, world)), plan.to_json())

    def __call__(self, analysis: GraphAnalysis, gm: fx.GraphModule) -> Plan:
        if self.plan_file is not None:
            return self._from_plan_file(analysis)
        agree_on_costs(analysis)
        world = dist.get_world_size() if world_is_distributed() else 1
        follow = self._issues_follow_compute(gm)
        key = plan_key(analysis, world, follow)
        path = self._cache_path(key)
        text: str | None = None
        if not world_is_distributed() or dist.get_rank() == 0:
            if os.path.exists(path):
                with open(path) as f:
                    text = f.read()
                log.info("%s: reusing the saved plan %s", analysis.name, path)
            else:
                text = self._solve(analysis, gm, follow).to_json()
                _write(path, text)
        # Rank 0 decides; everyone runs its plan.
        text = broadcast_plan(text)
        return Plan.from_json(text)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def collective_windows(plan: Plan) -> list[tuple[int, int]]:
    """(issue task position, wait task position) of every waited collective in ``plan``, in issue
    order (the plan's own pairs)."""
    return sorted((issue, wait) for wait, issue in plan.collective_pairs().items())


def tasks_inside_windows(plan: Plan) -> list[Task]:
    """The tasks issued after some collective's issue and before its wait."""
    windows = collective_windows(plan)
    return [t for i, t in enumerate(plan.tasks) if any(a < i < b for a, b in windows)]
