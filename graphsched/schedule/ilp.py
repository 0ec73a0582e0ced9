"""Solver-backed schedules: an exact disjunctive ILP for small problems, and the entry point
``solve``, which for large ones falls back to the weight-gradient window assignment
(``windows.py``, after Lancet, which solves the same assignment greedily).

Every solver result is re-simulated (the simulated makespan is the truth) and compared with the
incumbent; no function here returns a schedule worse than the incumbent it started from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace

import pulp

from graphsched.schedule.cbc import HORIZON, add_var, finish, resimulated, run_cbc, tolerance
from graphsched.schedule.list_schedule import list_schedule
from graphsched.schedule.problem import COMM, COMPUTE, RESOURCES, Schedule, ScheduleProblem
from graphsched.schedule.simulate import lower_bound, simulate
from graphsched.schedule.windows import DEFAULT_WINDOW_TIME_LIMIT_S, solve_windows

log = logging.getLogger(__name__)

#: Above this many ordering binaries the exact model rarely closes its gap within seconds.
DEFAULT_MAX_EXACT_PAIRS = 1500
#: Start times closer than this (in scaled units) count as equal when turning starts into an order.
_START_TOL = 1e-5
#: Relative room above the incumbent's makespan in the exact model's horizon.
_HORIZON_SLACK = 1e-4


def _order_from_starts(
    problem: ScheduleProblem, starts: Mapping[str, float], tol: float
) -> list[str]:
    """A topological order that issues tasks by start time.

    Among tasks starting together, zero-duration ones go first: on one resource a zero-duration
    task and a real task may share a start only if the zero-duration one runs first. Remaining
    ties follow the captured topological order (collectives first under
    ``problem.issues_follow_compute``: listed after a compute task, a transfer would wait for it).
    Picking only among ready tasks keeps the order topological whatever noise the solver's values
    carry.
    """
    follow = problem.issues_follow_compute
    missing = {t.id: len(t.deps) for t in problem.tasks}
    ready = [t.id for t in problem.tasks if not t.deps]
    order: list[str] = []
    while ready:
        earliest = min(starts[t] for t in ready)
        pick = min(
            (t for t in ready if starts[t] <= earliest + tol),
            key=lambda t: (
                not (follow and problem.task(t).resource == COMM),
                problem.task(t).duration > 0,
                problem.topo_position(t),
            ),
        )
        ready.remove(pick)
        order.append(pick)
        for c in problem.children(pick):
            missing[c] -= 1
            if missing[c] == 0:
                ready.append(c)
    return order


# -- the exact disjunctive model ---------------------------------------------------------------


def _pair_candidates(problem: ScheduleProblem) -> Iterable[tuple[str, int]]:
    """For each task, the bit set of earlier same-resource tasks it needs an ordering binary with.

    Pairs ordered by a dependency path need none (the path already orders them), nor do two
    zero-duration tasks (either order satisfies both disjuncts at any start times).
    """
    topo = problem.topological_order()
    anc = problem.ancestor_bits()
    on: dict[str, int] = {r: 0 for r in RESOURCES}
    positive = 0
    for p, tid in enumerate(topo):
        task = problem.task(tid)
        cand = on[task.resource] & ~anc[tid]
        if task.duration == 0:
            cand &= positive
        yield tid, cand
        on[task.resource] |= 1 << p
        if task.duration > 0:
            positive |= 1 << p


def count_disjunctive_pairs(problem: ScheduleProblem) -> int:
    """How many ordering binaries the exact model needs."""
    return sum(bin(cand).count("1") for _, cand in _pair_candidates(problem))


def disjunctive_pairs(problem: ScheduleProblem) -> list[tuple[str, str]]:
    """Same-resource pairs (a, b), a earlier in topological order, that no path orders."""
    topo = problem.topological_order()
    pairs = []
    for tid, cand in _pair_candidates(problem):
        while cand:
            low = cand & -cand
            pairs.append((topo[low.bit_length() - 1], tid))
            cand ^= low
    return pairs


def _resource_work_bits(
    problem: ScheduleProblem, bits: Mapping[str, int]
) -> dict[str, dict[str, float]]:
    """For each task and resource, the total duration on that resource of the tasks in its set."""
    topo = problem.topological_order()
    out: dict[str, dict[str, float]] = {}
    for tid in topo:
        b = bits[tid]
        work = {r: 0.0 for r in RESOURCES}
        while b:
            low = b & -b
            t = problem.task(topo[low.bit_length() - 1])
            work[t.resource] += t.duration
            b ^= low
        out[tid] = work
    return out


def solve_ilp(
    problem: ScheduleProblem,
    time_limit_s: float = 20.0,
    incumbent: Schedule | None = None,
    msg: bool = False,
) -> Schedule:
    """The optimal order (within ``time_limit_s``) from a disjunctive ILP solved by CBC.

    Continuous start times; precedence constraints; one binary per same-resource pair that no
    dependency path orders (big-M disjunction); cuts: makespan >= each resource's total work,
    >= start + longest tail, >= end + the work on each resource that must follow. The incumbent
    (default: the list schedule) is CBC's warm start and the fallback.
    """
    t0 = time.perf_counter()
    inc = list_schedule(problem) if incumbent is None else resimulated(problem, incumbent)
    lb = lower_bound(problem)
    tol = tolerance(problem)
    if inc.makespan <= lb + tol:
        return finish(inc, "optimal", t0)
    pairs = disjunctive_pairs(problem)
    if not pairs:
        # Every topological order gives each resource the same sequence: all orders are equal.
        return finish(inc, "optimal", t0)

    # The horizon sits a hair above the incumbent: with the incumbent exactly at it, an optimal
    # incumbent leaves a feasible set so tight that CBC's preprocessing can call it infeasible
    # (seen on a 7-task problem), and the optimum goes unproven.
    ub = inc.makespan * (1 + _HORIZON_SLACK)
    scale = HORIZON / ub
    ids = problem.topological_order()
    dur = {t: problem.task(t).duration * scale for t in ids}
    before = _resource_work_bits(problem, problem.ancestor_bits())
    after = _resource_work_bits(problem, problem.descendant_bits())
    # Earliest and latest starts: dependencies and same-resource ancestors must run first,
    # the tail must still fit under the incumbent's makespan.
    lo = {t: scale * max([problem.head(t)] + list(before[t].values())) for t in ids}
    hi = {
        t: max(
            lo[t],
            HORIZON
            - scale
            * max(
                [problem.tail(t)]
                + [problem.task(t).duration + after[t][r] for r in RESOURCES]
            ),
        )
        for t in ids
    }

    prob = pulp.LpProblem("graphsched_order", pulp.LpMinimize)
    s = {t: add_var(prob, f"s{i}", lo[t], hi[t]) for i, t in enumerate(ids)}
    cmax = add_var(prob, "makespan", scale * lb, HORIZON)
    prob += cmax
    for t in ids:
        for d in problem.task(t).deps:
            prob += s[t] >= s[d] + dur[d]
        prob += cmax >= s[t] + scale * problem.tail(t)
        for r in RESOURCES:
            if after[t][r] > 0:
                prob += cmax >= s[t] + dur[t] + scale * after[t][r]
    y: dict[tuple[str, str], pulp.LpVariable] = {}
    for k, (a, b) in enumerate(pairs):
        v = add_var(prob, f"y{k}", cat=pulp.LpBinary)
        y[(a, b)] = v
        m_ab = max(0.0, hi[a] + dur[a] - lo[b])  # a before b when v = 1
        m_ba = max(0.0, hi[b] + dur[b] - lo[a])
        prob += s[b] >= s[a] + dur[a] - m_ab * (1 - v)
        prob += s[a] >= s[b] + dur[b] - m_ba * v

    # Warm start from the incumbent (CBC checks it and ignores it if it does not fit).
    pos = {t: i for i, t in enumerate(inc.order)}
    for t in ids:
        s[t].setInitialValue(min(hi[t], max(lo[t], inc.start[t] * scale)))
    for (a, b), v in y.items():
        v.setInitialValue(1 if pos[a] < pos[b] else 0)
    cmax.setInitialValue(HORIZON)

    log.info(
        "exact ILP: %d tasks, %d ordering pairs, time limit %.1f s, incumbent %.6g (%s), "
        "lower bound %.6g",
        len(ids), len(pairs), time_limit_s, inc.makespan, inc.method, lb,
    )
    sol = run_cbc(prob, time_limit_s - (time.perf_counter() - t0), msg, warm=True)
    found = None
    if sol in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        starts = {t: s[t].value() for t in ids}
        if all(v is not None for v in starts.values()):
            order = _order_from_starts(problem, starts, _START_TOL)
            found = simulate(problem, order, method="ilp")
    best = inc
    if found is not None and found.makespan < inc.makespan - tol:
        best = found
    if sol == pulp.LpSolutionOptimal and cmax.value() is not None:
        proven = cmax.value() / scale
        if best.makespan > proven * (1 + 1e-6) + tol:
            # The model leaves contention out, so its optimum only bounds the simulated makespan
            # from below there; without contention a gap means a modelling error.
            if problem.contention == 1.0:
                log.warning(
                    "ILP optimum %.6g but the best simulated order takes %.6g; keeping it unproven",
                    proven, best.makespan,
                )
            status = "feasible" if best is found else "incumbent"
        else:
            status = "optimal"
    elif best.makespan <= lb + tol:
        status = "optimal"
    else:
        status = "feasible" if best is found else "incumbent"
    result = finish(best, status, t0)
    log.info(
        "exact ILP done in %.2f s: %s, status %s, makespan %.6g vs incumbent %.6g",
        result.solve_time_s, pulp.LpSolution.get(sol, "no solver result"), status,
        result.makespan, inc.makespan,
    )
    return result


# -- the entry point -----------------------------------------------------------------------------


def solve(
    problem: ScheduleProblem,
    time_limit_s: float = 20.0,
    incumbent: Schedule | None = None,
    msg: bool = False,
    max_exact_pairs: int = DEFAULT_MAX_EXACT_PAIRS,
    window_time_limit_s: float = DEFAULT_WINDOW_TIME_LIMIT_S,
) -> Schedule:
    """The best order this package can find within ``time_limit_s``.

    Always computes the list schedule; if weight-gradient tasks exist, the window assignment
    (its ILP limited to ``window_time_limit_s``); then, when the exact model is small enough (at
    most ``max_exact_pairs`` ordering binaries), the exact ILP warm-started from the best so far.
    Never worse than the list schedule or the given incumbent.
    """
    t0 = time.perf_counter()
    tol = tolerance(problem)
    lb = lower_bound(problem)
    listed = list_schedule(problem)
    best = listed
    improved = False  # whether a solver beat the list schedule and the given incumbent
    if incumbent is not None:
        given = resimulated(problem, incumbent)
        if given.makespan < best.makespan - tol:
            best = given
    n_pairs = count_disjunctive_pairs(problem)
    exact = n_pairs <= max_exact_pairs
    log.info(
        "scheduling %d tasks (%d compute, %d comm), %d ordering pairs: %s; list schedule %.6g, "
        "lower bound %.6g",
        len(problem),
        sum(t.resource == COMPUTE for t in problem.tasks),
        sum(t.resource == COMM for t in problem.tasks),
        n_pairs,
        "exact ILP" if exact else "window assignment",
        listed.makespan,
        lb,
    )
    if best.makespan > lb + tol:
        budget = min(window_time_limit_s, time_limit_s * (0.25 if exact else 1.0))
        windowed = solve_windows(problem, budget, msg)
        if windowed is not None and windowed.makespan < best.makespan - tol:
            best = windowed
            improved = True
    if exact and best.makespan > lb + tol:
        result = solve_ilp(
            problem, time_limit_s - (time.perf_counter() - t0), incumbent=best, msg=msg
        )
    else:
        result = replace(best, status="optimal" if best.makespan <= lb + tol else "incumbent")
    if result.status == "incumbent" and improved:
        # The exact ILP found nothing better, but the window assignment beat the list schedule.
        result = replace(result, status="feasible")
    result = finish(result, result.status, t0)
    log.info(
        "schedule: %s, status %s, makespan %.6g vs list schedule %.6g (lower bound %.6g), "
        "%.2f s",
        result.method, result.status, result.makespan, listed.makespan, lb, result.solve_time_s,
    )
    return result
