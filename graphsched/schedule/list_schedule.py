"""Fast heuristic orders: critical-path list scheduling, and the order as captured.

These give the solver its incumbent and are what runs when no solver is wanted.
"""

from __future__ import annotations

import time

from graphsched.schedule.problem import COMM, COMPUTE, RESOURCES, Schedule, ScheduleProblem
from graphsched.schedule.simulate import lower_bound, simulate


def _time_tolerance(problem: ScheduleProblem) -> float:
    # Times are sums of durations along different paths; equal times can differ in the last bits.
    return 1e-12 * max(1.0, lower_bound(problem))


def critical_path_order(problem: ScheduleProblem, *, non_delay: bool = True) -> list[str]:
    """An order built by list scheduling with priority = longest path to the end (task included).

    ``non_delay``: a resource never idles while a task for it is ready; among the tasks that can
    start earliest, the one with the longest tail goes first. Without it, the ready task with the
    longest tail is always issued next, even when another could start sooner.

    Under ``problem.issues_follow_compute`` a collective cannot start before the compute listed
    ahead of it, so among tasks that can start together a collective goes first: issuing it
    costs the compute stream nothing, while a compute task listed first would hold it back.
    """
    tol = _time_tolerance(problem)
    missing = {t.id: len(t.deps) for t in problem.tasks}
    ready_at: dict[str, float] = {t.id: 0.0 for t in problem.tasks if not t.deps}
    free = {r: 0.0 for r in RESOURCES}
    end: dict[str, float] = {}
    order: list[str] = []

    follow = problem.issues_follow_compute

    def priority(tid: str) -> tuple[bool, float, int]:
        comm_first = follow and problem.task(tid).resource == COMM
        return (comm_first, problem.tail(tid), -problem.topo_position(tid))

    def earliest_start(tid: str, ready: float) -> float:
        resource = problem.task(tid).resource
        s = max(free[resource], ready)
        return max(s, free[COMPUTE]) if follow and resource == COMM else s

    while ready_at:
        if non_delay:
            est = {tid: earliest_start(tid, r) for tid, r in ready_at.items()}
            earliest = min(est.values())
            pick = max((tid for tid, s in est.items() if s <= earliest + tol), key=priority)
        else:
            pick = max(ready_at, key=priority)
        task = problem.task(pick)
        start = earliest_start(pick, ready_at.pop(pick))
        end[pick] = start + task.duration
        free[task.resource] = end[pick]
        order.append(pick)
        for c in problem.children(pick):
            missing[c] -= 1
            if missing[c] == 0:
                ready_at[c] = max(end[d] for d in problem.task(c).deps)
    return order


def list_schedule(problem: ScheduleProblem) -> Schedule:
    """The best of the critical-path list schedules and the order as captured."""
    t0 = time.perf_counter()
    candidates = [
        simulate(problem, critical_path_order(problem), method="list:critical_path"),
        simulate(
            problem,
            critical_path_order(problem, non_delay=False),
            method="list:critical_path_priority",
        ),
        simulate(problem, problem.topological_order(), method="list:as_captured"),
    ]
    best = min(candidates, key=lambda s: s.makespan)  # first wins ties
    tol = _time_tolerance(problem)
    best.status = "optimal" if best.makespan <= lower_bound(problem) + tol else "heuristic"
    best.solve_time_s = time.perf_counter() - t0
    return best
