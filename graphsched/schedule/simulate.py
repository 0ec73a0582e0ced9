"""The timing of an order: two in-order resources, each running one task at a time.

With ``problem.contention`` above 1.0 a compute task progresses ``1 / contention`` as fast while
a comm task is in flight: a task wholly inside a transfer takes ``contention`` times its duration,
one half inside (half of its work done while the transfer runs) ``(1 + contention) / 2`` times.
Comm tasks keep their durations. At 1.0 the times are those of the plain two-resource model,
computed by the same arithmetic as always.

With ``problem.issues_follow_compute`` (inductor's code) a comm task also waits for every compute
task listed before it: the collective is launched from the compute stream.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from graphsched.errors import GraphschedError
from graphsched.schedule.problem import COMM, COMPUTE, RESOURCES, OrderError, Schedule, ScheduleProblem

Times = tuple[dict[str, float], dict[str, float]]


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
    (compute stretched by ``problem.contention`` while a comm task is in flight; a collective,
    under ``problem.issues_follow_compute``, also waits for the compute listed before it)."""
    t0 = time.perf_counter()
    check_order(problem, order)
    if problem.contention == 1.0:
        start, end = _independent_times(problem, order)
    else:
        start, end = _contended_times(problem, order, problem.contention)
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


def _independent_times(problem: ScheduleProblem, order: Sequence[str]) -> Times:
    """The resources never slow each other: one pass in issue order."""
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
    return start, end


class _Lanes:
    """Each resource's tasks in issue order, and the one each is running (event simulation)."""

    def __init__(self, problem: ScheduleProblem, order: Sequence[str]) -> None:
        self.problem = problem
        self.queue = {r: [t for t in order if problem.task(t).resource == r] for r in RESOURCES}
        self.next = {r: 0 for r in RESOURCES}
        self.running: dict[str, str | None] = {r: None for r in RESOURCES}
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        # Under issues_follow_compute a collective also waits for the compute listed before it.
        self.after: dict[str, str] = {}
        if problem.issues_follow_compute:
            last: str | None = None
            for t in order:
                if problem.task(t).resource == COMPUTE:
                    last = t
                elif last is not None:
                    self.after[t] = last

    def start_ready(self, now: float) -> None:
        """Start every head task whose resource is free and whose dependencies have ended; a
        zero-length task ends at once and may free the next."""
        moved = True
        while moved:
            moved = False
            for r in RESOURCES:
                if self.running[r] is not None or self.next[r] == len(self.queue[r]):
                    continue
                tid = self.queue[r][self.next[r]]
                if not all(d in self.end for d in self.problem.task(tid).deps):
                    continue
                if tid in self.after and self.after[tid] not in self.end:
                    continue
                self.next[r] += 1
                self.start[tid] = now
                moved = True
                if self.problem.task(tid).duration == 0:
                    self.end[tid] = now
                else:
                    self.running[r] = tid


def _contended_times(problem: ScheduleProblem, order: Sequence[str], factor: float) -> Times:
    """Events in time order: a task starts when its resource frees and its deps end; the running
    compute task's remaining work drains ``factor`` times slower while a comm task runs."""
    lanes = _Lanes(problem, order)
    now = 0.0
    loaded: str | None = None  # the compute task whose remaining work ``left`` holds
    left = 0.0
    lanes.start_ready(now)
    while len(lanes.end) < len(order):
        comm, compute = lanes.running[COMM], lanes.running[COMPUTE]
        if comm is None and compute is None:
            raise GraphschedError("simulate: no task can start; the order is not topological")
        if compute is not None and compute != loaded:
            loaded, left = compute, problem.task(compute).duration
        rate = factor if comm is not None else 1.0
        events = []
        if comm is not None:
            events.append(lanes.start[comm] + problem.task(comm).duration)
        if compute is not None:
            events.append(now + left * rate)
        nxt = min(events)
        if comm is not None and events[0] <= nxt:
            lanes.end[comm], lanes.running[COMM] = nxt, None
        if compute is not None and events[-1] <= nxt:
            lanes.end[compute], lanes.running[COMPUTE] = nxt, None
        elif compute is not None:
            left -= (nxt - now) / rate
        now = nxt
        lanes.start_ready(now)
    return lanes.start, lanes.end


def lower_bound(problem: ScheduleProblem) -> float:
    """No order beats the busier resource's total work, nor the longest dependency path."""
    return max([problem.work(r) for r in RESOURCES] + [problem.critical_path()])
