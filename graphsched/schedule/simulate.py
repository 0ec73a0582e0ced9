"""The timing of an order: two in-order resources, each running one task at a time."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from graphsched.schedule.problem import COMM, COMPUTE, RESOURCES, OrderError, Schedule, ScheduleProblem


def check_order(problem: ScheduleProblem, order: Sequence[str]) -> None:
    """Raise OrderError unless ``order`` lists every task once, each after its dependencies."""
    if len(order) != len(problem) or set(order) != set(problem.ids):
        known = set(problem.ids)
        unknown = sorted(set(order) - known)
        missing = sorted(known - set(order))
        dup = sorted(t for t, n in Counter(order).items() if n > 1)
        raise OrderError(
            f"the order is not a permutation of the problem's {len(problem)} tasks "
            f"(unknown: {unknown[:5]}, missing: {missing[:5]}, repeated: {dup[:5]}); "
            "list every task exactly once."
        )
    seen: set[str] = set()
    for tid in order:
        for d in problem.task(tid).deps:
            if d not in seen:
                raise OrderError(
                    f"task {tid!r} comes before its dependency {d!r}; the order must be "
                    "topological (every task after all of its dependencies)."
                )
        seen.add(tid)


def simulate(
    problem: ScheduleProblem,
    order: Sequence[str],
    *,
    method: str = "given",
    status: str = "heuristic",
) -> Schedule:
    """Times of ``order``: each task starts when its resource is free and its deps have ended
    (a collective, under ``problem.issues_follow_compute``, also when the compute before it has)."""
    t0 = time.perf_counter()
    check_order(problem, order)
    free = {r: 0.0 for r in RESOURCES}
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    for tid in order:
        task = problem.task(tid)
        s = max([free[task.resource]] + [end[d] for d in task.deps])
        if problem.issues_follow_compute and task.resource == COMM:
            s = max(s, free[COMPUTE])
        start[tid] = s
        end[tid] = s + task.duration
        free[task.resource] = end[tid]
    makespan = max(end.values(), default=0.0)
    return Schedule(
        order=list(order),
        start=start,
        end=end,
        makespan=makespan,
        method=method,
        status=status,
        solve_time_s=time.perf_counter() - t0,
    )


def lower_bound(problem: ScheduleProblem) -> float:
    """No order beats the busier resource's total work, nor the longest dependency path."""
    return max([problem.work(r) for r in RESOURCES] + [problem.critical_path()])
