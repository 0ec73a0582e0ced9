"""The predicted time of any plan of an analysed graph, from the analysis' current costs.

A plan's tasks on the two in-order resources (collectives on ``comm``, everything else on
``compute``), each task waiting for the tasks its nodes read from (the analysis' dependency DAG),
in the plan's order, under the planner's contention factor and, where the plan says so,
``issues_follow_compute``: the timing the planner gives its own plans, for any plan, e.g. a plan
made from other costs scored with the profiled ones.
"""

from __future__ import annotations

from graphsched.analysis.graph import GraphAnalysis
from graphsched.plan import Plan, TaskKind
from graphsched.schedule.problem import COMM, COMPUTE, Schedule, SchedTask, ScheduleProblem
from graphsched.schedule.simulate import simulate


def plan_problem(plan: Plan, analysis: GraphAnalysis) -> ScheduleProblem:
    """``plan``'s tasks as a two-resource problem (task ids are the plan positions, as strings)."""
    task_of = {n: i for i, t in enumerate(plan.tasks) for n in t.nodes}
    tasks = []
    for i, t in enumerate(plan.tasks):
        deps = {
            task_of[p]
            for n in t.nodes if n in analysis.dag
            for p in analysis.dag.predecessors(n)
            if p in task_of and task_of[p] != i
        }
        resource = COMM if t.kind == TaskKind.COLLECTIVE_ISSUE else COMPUTE
        duration = sum(float(analysis.node(n).cost) for n in t.nodes if n in analysis.dag)
        tasks.append(SchedTask(str(i), resource, duration, tuple(str(d) for d in sorted(deps))))
    # The planner's own model: compute slowed beside a transfer, and, for a plan made for
    # inductor's code, collectives behind the compute listed before them. Without them a plan
    # re-predicted here was scored by another model than the new plan it is compared with.
    return ScheduleProblem(tasks, issues_follow_compute=bool(plan.options.get("issues_follow_compute")),
                           contention=analysis.contention)


def predict_plan(plan: Plan, analysis: GraphAnalysis) -> Schedule:
    """The simulated timing of ``plan`` under the analysis' costs (makespan: the graph's time)."""
    problem = plan_problem(plan, analysis)
    return simulate(problem, [str(i) for i in range(len(plan.tasks))], method="as_planned")


def with_predictions(plan: Plan, analysis: GraphAnalysis) -> Plan:
    """A copy of ``plan`` carrying the analysis' costs and the times they predict (same tasks,
    same content hash: what runs is unchanged)."""
    import copy

    schedule = predict_plan(plan, analysis)
    out = copy.deepcopy(plan)
    out.costs = analysis.node_costs()
    out.predicted_time = schedule.makespan
    for i, t in enumerate(out.tasks):
        t.start, t.end = schedule.start[str(i)], schedule.end[str(i)]
    return out
