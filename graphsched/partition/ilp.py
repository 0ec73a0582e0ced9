"""Solver-backed schedules: an exact disjunctive ILP for small problems, and for large ones an
ILP that assigns weight-gradient tasks to the windows where a collective is in flight (after
Lancet, which solves the same assignment greedily).

Every solver result is re-simulated (the simulated makespan is the truth) and compared with the
incumbent; no function here returns a schedule worse than the incumbent it started from.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import pulp

from graphsched.partition.list_schedule import list_schedule
from graphsched.partition.problem import (
    COMM,
    COMPUTE,
    RESOURCES,
    WEIGHT_GRAD,
    Schedule,
    ScheduleProblem,
)
from graphsched.partition.simulate import lower_bound, simulate

log = logging.getLogger("graphsched.partition")

#: Above this many ordering binaries the exact model rarely closes its gap within seconds.
DEFAULT_MAX_EXACT_PAIRS = 1500
#: Time limit of the window assignment ILP. After the local search the assignment is typically
#: within 0.5% of the LP bound; CBC rarely closes that quickly and gains little by trying.
DEFAULT_WINDOW_TIME_LIMIT_S = 3.0
#: Solver models are scaled so the incumbent's makespan is this many units: CBC's absolute
#: tolerances (about 1e-6) would otherwise swamp durations measured in seconds.
_HORIZON = 1000.0
#: The window assignment stops once it is proven within this fraction of the core's makespan of
#: the best assignment: closing the last 0.1% can take CBC minutes, and measured costs are
#: several percent less precise than that.
_WINDOW_GAP = 1e-3
#: Grid of the subset sums that cover a window, in parts of the window's capacity.
_SUBSET_RESOLUTION = 512
#: Start times closer than this (in scaled units) count as equal when turning starts into an order.
_START_TOL = 1e-5


def _tolerance(problem: ScheduleProblem) -> float:
    return 1e-9 * max(1.0, lower_bound(problem))


def _resimulated(problem: ScheduleProblem, schedule: Schedule) -> Schedule:
    """The incumbent's times recomputed here, so a stale or hand-edited Schedule cannot mislead."""
    again = simulate(problem, schedule.order, method=schedule.method, status=schedule.status)
    again.solve_time_s = schedule.solve_time_s
    return again


def _finish(schedule: Schedule, status: str, t0: float) -> Schedule:
    return replace(schedule, status=status, solve_time_s=time.perf_counter() - t0)


def _var(
    prob: pulp.LpProblem,
    name: str,
    low: float | None = None,
    up: float | None = None,
    cat: str = pulp.LpContinuous,
) -> pulp.LpVariable:
    # PuLP 3.3 deprecates free-standing variables in favour of prob.add_variable (PuLP 4.0).
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, lowBound=low, upBound=up, cat=cat)
    return pulp.LpVariable(name, lowBound=low, upBound=up, cat=cat)


def _cbc(**options) -> pulp.LpSolver:
    """The CBC that ships inside the pulp wheel; a CBC installed on its own if there is none.

    PuLP 3.3 marks the bundled solver deprecated (it goes in PuLP 4.0, where COIN_CMD finds a
    separately installed CBC); the warning says nothing actionable to our users, so it is muted.
    """
    bundled = getattr(pulp, "PULP_CBC_CMD", None)
    if bundled is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = bundled(**options)
        if solver.available():
            return solver
    return pulp.COIN_CMD(**options)


def solver_name() -> str:
    """Which MILP solver the ILP steps run, e.g. ``"CBC (PULP_CBC_CMD, pulp 3.3.2)"``."""
    return f"CBC ({type(_cbc()).__name__}, pulp {pulp.__version__})"


def _run_cbc(
    prob: pulp.LpProblem,
    time_limit_s: float,
    msg: bool,
    warm: bool,
    gap_abs: float | None = None,
) -> int | None:
    solver = _cbc(timeLimit=max(0.1, time_limit_s), msg=msg, warmStart=warm, gapAbs=gap_abs)
    try:
        prob.solve(solver)
    except pulp.PulpSolverError as exc:  # a broken CBC must not break training
        log.warning("CBC failed (%s); keeping the incumbent schedule", exc)
        return None
    log.debug("CBC: %s", pulp.LpSolution[prob.sol_status])
    # CBC's LpStatus still says "Optimal" after a time limit; sol_status tells the truth.
    return prob.sol_status


def _order_from_starts(
    problem: ScheduleProblem, starts: Mapping[str, float], tol: float
) -> list[str]:
    """A topological order that issues tasks by start time.

    Among tasks starting together, zero-duration ones go first: on one resource a zero-duration
    task and a real task may share a start only if the zero-duration one runs first. Remaining
    ties follow the captured topological order. Picking only among ready tasks keeps the order
    topological whatever noise the solver's values carry.
    """
    missing = {t.id: len(t.deps) for t in problem.tasks}
    ready = [t.id for t in problem.tasks if not t.deps]
    order: list[str] = []
    while ready:
        earliest = min(starts[t] for t in ready)
        pick = min(
            (t for t in ready if starts[t] <= earliest + tol),
            key=lambda t: (problem.task(t).duration > 0, problem.topo_position(t)),
        )
        ready.remove(pick)
        order.append(pick)
        for c in problem.children(pick):
            missing[c] -= 1
            if missing[c] == 0:
                ready.append(c)
    return order


def _order_from_keys(problem: ScheduleProblem, key: Mapping[str, tuple]) -> list[str]:
    """The topological order that always issues the ready task with the smallest key."""
    missing = {t.id: len(t.deps) for t in problem.tasks}
    ready = [t.id for t in problem.tasks if not t.deps]
    order: list[str] = []
    while ready:
        pick = min(ready, key=lambda t: key[t])
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
    inc = list_schedule(problem) if incumbent is None else _resimulated(problem, incumbent)
    lb = lower_bound(problem)
    tol = _tolerance(problem)
    if inc.makespan <= lb + tol:
        return _finish(inc, "optimal", t0)
    pairs = disjunctive_pairs(problem)
    if not pairs:
        # Every topological order gives each resource the same sequence: all orders are equal.
        return _finish(inc, "optimal", t0)

    ub = inc.makespan
    scale = _HORIZON / ub
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
            _HORIZON
            - scale
            * max(
                [problem.tail(t)]
                + [problem.task(t).duration + after[t][r] for r in RESOURCES]
            ),
        )
        for t in ids
    }

    prob = pulp.LpProblem("graphsched_order", pulp.LpMinimize)
    s = {t: _var(prob, f"s{i}", lo[t], hi[t]) for i, t in enumerate(ids)}
    cmax = _var(prob, "makespan", scale * lb, _HORIZON)
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
        v = _var(prob, f"y{k}", cat=pulp.LpBinary)
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
    cmax.setInitialValue(_HORIZON)

    log.info(
        "exact ILP: %d tasks, %d ordering pairs, time limit %.1f s, incumbent %.6g (%s), "
        "lower bound %.6g",
        len(ids), len(pairs), time_limit_s, inc.makespan, inc.method, lb,
    )
    sol = _run_cbc(prob, time_limit_s - (time.perf_counter() - t0), msg, warm=True)
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
    result = _finish(best, status, t0)
    log.info(
        "exact ILP done in %.2f s: %s, status %s, makespan %.6g vs incumbent %.6g",
        result.solve_time_s, pulp.LpSolution.get(sol, "no solver result"), status,
        result.makespan, inc.makespan,
    )
    return result


# -- the window decomposition (large problems) -----------------------------------------------


def deferrable_tasks(problem: ScheduleProblem) -> set[str]:
    """Compute tasks tagged weight_grad that only other such tasks depend on (transitively)."""
    keep = {t.id for t in problem.tasks if WEIGHT_GRAD in t.tags and t.resource == COMPUTE}
    for tid in reversed(problem.topological_order()):
        if tid in keep and any(c not in keep for c in problem.children(tid)):
            keep.discard(tid)
    return keep


@dataclass
class _Window:
    comm: str
    open: float
    capacity: float


def _windows(core: ScheduleProblem, timeline: Schedule, tol: float) -> list[_Window]:
    """Comm tasks of the core timeline with the compute idle time while each is in flight."""
    busy = [
        (timeline.start[t.id], timeline.end[t.id])
        for t in core.tasks
        if t.resource == COMPUTE and t.duration > 0
    ]
    out = []
    for t in core.tasks:
        if t.resource != COMM or t.duration <= 0:
            continue
        a, b = timeline.start[t.id], timeline.end[t.id]
        idle = (b - a) - sum(max(0.0, min(b, e) - max(a, s)) for s, e in busy)
        if idle > tol:
            out.append(_Window(t.id, a, idle))
    out.sort(key=lambda w: w.open)
    return out


def _greedy_assignment(
    problem: ScheduleProblem,
    windows: list[_Window],
    eligible: Mapping[str, list[int]],
    deferred_parents: Mapping[str, list[str]],
    tol: float,
) -> dict[str, int]:
    """Lancet's closest fit: fill each window in time order with the largest task that fits."""
    assigned: dict[str, int] = {}
    allowed = {t: set(ks) for t, ks in eligible.items()}
    for k, w in enumerate(windows):
        room = w.capacity
        while room > tol:
            cands = [
                t
                for t in eligible
                if t not in assigned
                and k in allowed[t]
                and all(p in assigned and assigned[p] <= k for p in deferred_parents[t])
            ]
            if not cands:
                break
            dur = {t: problem.task(t).duration for t in cands}
            fits = [t for t in cands if dur[t] <= room + tol]
            if fits:
                pick = max(fits, key=lambda t: (dur[t], -problem.topo_position(t)))
            else:  # nothing fits: the shortest task still fills the rest of the window
                pick = min(cands, key=lambda t: (dur[t], problem.topo_position(t)))
            assigned[pick] = k
            room -= dur[pick]
    return assigned


def _subset_closest_above(durations: list[float], target: float, grid: float) -> list[int]:
    """Indices of a subset whose sum is the smallest one >= target, else the largest one.

    Exact on durations rounded to ``grid``: a subset-sum over bit sets (bit s of layer i is set
    when the first i items can sum to s grid units), walked back to recover the subset. Items
    longer than the target are left out of the bit sets (they would make them huge): one of them
    alone beats any subset that contains it.
    """
    units = [max(0, round(d / grid)) for d in durations]
    goal = max(0, round(target / grid))
    small = [i for i, u in enumerate(units) if u <= goal]
    big = [i for i, u in enumerate(units) if u > goal]
    mask = (1 << (2 * goal + 1)) - 1
    layers = [1]
    for i in small:
        layers.append((layers[-1] | (layers[-1] << units[i])) & mask)
    reach = layers[-1]
    above = reach >> goal
    shortest_big = min(big, key=lambda i: units[i], default=None)
    if above:
        total = goal + (above & -above).bit_length() - 1
        if shortest_big is not None and units[shortest_big] < total:
            return [shortest_big]
    elif shortest_big is not None:
        return [shortest_big]
    else:
        total = reach.bit_length() - 1
    chosen = []
    for pos in range(len(small) - 1, -1, -1):
        if not (layers[pos] >> total) & 1:
            chosen.append(small[pos])
            total -= units[small[pos]]
    return chosen


def _sequential_assignment(
    problem: ScheduleProblem,
    windows: list[_Window],
    eligible: Mapping[str, list[int]],
    deferred_parents: Mapping[str, list[str]],
) -> dict[str, int]:
    """Fill windows in time order, each with the available subset that just covers it.

    Covering a window with the least excess keeps the most work for the windows after it.
    """
    assigned: dict[str, int] = {}
    allowed = {t: set(ks) for t, ks in eligible.items()}
    by_position = sorted(eligible, key=problem.topo_position)
    for k, w in enumerate(windows):
        avail = [
            t
            for t in by_position
            if t not in assigned
            and k in allowed[t]
            and all(p in assigned and assigned[p] <= k for p in deferred_parents[t])
        ]
        durations = [problem.task(t).duration for t in avail]
        for i in _subset_closest_above(durations, w.capacity, w.capacity / _SUBSET_RESOLUTION):
            assigned[avail[i]] = k
    return assigned


def _improve_assignment(
    problem: ScheduleProblem,
    windows: list[_Window],
    eligible: Mapping[str, list[int]],
    deferred_parents: Mapping[str, list[str]],
    assigned: Mapping[str, int],
    tol: float,
    deadline: float,
) -> dict[str, int]:
    """Local search on the window assignment: moves and swaps that add to the filled time.

    Only a window that is not full can gain, so every move involves one: a task moved into it
    (from another window or from the end), or swapped with a longer one. Stops at a local optimum
    or at ``deadline`` (a time.perf_counter() value).
    """
    end = len(windows)  # "window" index of the tasks issued at the end
    cap = [w.capacity for w in windows] + [0.0]
    dur = {t: problem.task(t).duration for t in eligible}
    where = {t: assigned.get(t, end) for t in eligible}
    load = [0.0] * (end + 1)
    for t, k in where.items():
        load[k] += dur[t]
    allowed = {t: set(ks) | {end} for t, ks in eligible.items()}
    children: dict[str, list[str]] = {t: [] for t in eligible}
    for t, ps in deferred_parents.items():
        for p in ps:
            children[p].append(t)

    def fill(k: int, amount: float) -> float:
        return min(cap[k], amount)

    def placeable(t: str, k: int, ignore: str | None = None) -> bool:
        # Deferrable parents sit no later, deferrable children no earlier, than the task.
        return (
            k in allowed[t]
            and all(where[p] <= k for p in deferred_parents[t] if p != ignore)
            and all(where[c] >= k for c in children[t] if c != ignore)
        )

    def move(t: str, k: int) -> None:
        load[where[t]] -= dur[t]
        load[k] += dur[t]
        where[t] = k

    ordered = sorted(eligible, key=lambda t: (-dur[t], problem.topo_position(t)))
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for k in range(end):
            if load[k] >= cap[k] - tol:
                continue
            for t in ordered:
                a = where[t]
                if a == k or not placeable(t, k):
                    continue
                gain = fill(k, load[k] + dur[t]) - fill(k, load[k])
                gain -= fill(a, load[a]) - fill(a, load[a] - dur[t])
                if gain > tol:
                    move(t, k)
                    improved = True
                    if load[k] >= cap[k] - tol:
                        break
            if load[k] >= cap[k] - tol:
                continue
            inside = [t for t in ordered if where[t] == k]
            for t in inside:
                for u in ordered:
                    b = where[u]
                    if b == k or dur[u] <= dur[t] or where[t] != k:
                        continue
                    if u in deferred_parents[t] or t in deferred_parents[u]:
                        continue
                    if not (placeable(u, k, ignore=t) and placeable(t, b, ignore=u)):
                        continue
                    diff = dur[u] - dur[t]
                    gain = fill(k, load[k] + diff) - fill(k, load[k])
                    gain += fill(b, load[b] - diff) - fill(b, load[b])
                    if gain > tol:
                        move(t, b)
                        move(u, k)
                        improved = True
                        break
                if load[k] >= cap[k] - tol:
                    break
    return {t: k for t, k in where.items() if k != end}


def _order_with_assignment(
    problem: ScheduleProblem,
    core_order: list[str],
    windows: list[_Window],
    assigned: Mapping[str, int],
    deferred: set[str],
) -> list[str]:
    """Core tasks in their order; each window's tasks right after its collective; the rest last."""
    core_pos = {t: i for i, t in enumerate(core_order)}
    key: dict[str, tuple] = {t: (core_pos[t], 0, 0) for t in core_order}
    for t in deferred:
        anchor = core_pos[windows[assigned[t]].comm] if t in assigned else len(core_order)
        key[t] = (anchor, 1, problem.topo_position(t))
    return _order_from_keys(problem, key)


def _fill(
    problem: ScheduleProblem, windows: list[_Window], assigned: Mapping[str, int]
) -> float:
    """The model's objective: sum over windows of min(capacity, assigned work)."""
    load = [0.0] * len(windows)
    for t, k in assigned.items():
        load[k] += problem.task(t).duration
    return sum(min(w.capacity, l) for w, l in zip(windows, load))


def _trim_overload(
    problem: ScheduleProblem,
    windows: list[_Window],
    assigned: dict[str, int],
    deferred_parents: Mapping[str, list[str]],
    tol: float,
) -> dict[str, int]:
    """Move tasks out of overloaded windows (to the end) while the window stays full.

    Excess work in a window delays the chain as much as running it at the end does, so the
    objective cannot tell the two apart; the end is safer when the timing estimates are off.
    """
    assigned = dict(assigned)
    load = [0.0] * len(windows)
    for t, k in assigned.items():
        load[k] += problem.task(t).duration
    has_assigned_child: set[str] = set()
    for t in assigned:
        has_assigned_child.update(deferred_parents[t])
    for k, w in enumerate(windows):
        movable = sorted(
            (t for t, kk in assigned.items() if kk == k and t not in has_assigned_child),
            key=lambda t: (-problem.task(t).duration, -problem.topo_position(t)),
        )
        for t in movable:
            d = problem.task(t).duration
            if d > 0 and load[k] - d >= w.capacity - tol:
                del assigned[t]
                load[k] -= d
    return assigned


def solve_windows(
    problem: ScheduleProblem, time_limit_s: float = 20.0, msg: bool = False
) -> Schedule | None:
    """Place weight-gradient tasks into the windows where a collective is in flight.

    The core (everything but deferrable weight-gradient tasks) is list-scheduled; each comm task
    of that timeline opens a window whose capacity is the compute idle time while it runs. A
    deferrable task may go into a window if its core dependencies are issued before the collective
    and finished when the window opens, and its deferrable dependencies sit in the same or an
    earlier window. The ILP maximises sum over windows of min(capacity, assigned work), each task
    in at most one window (a generalised assignment problem): with an input-gradient chain, work
    that fills a window is hidden and all other work adds to the makespan, so this is the exact
    objective. Each window's tasks are issued right after its collective, the rest at the end.

    Lancet's greedy closest fit and a sequential subset-sum cover, both improved by local search,
    give the ILP its warm start; the ILP stops within ``_WINDOW_GAP`` of optimal or at the time
    limit. Returns the best simulated schedule of these (method ``window_greedy``,
    ``window_local`` or ``window_ilp``), or None when nothing is deferrable.
    """
    t0 = time.perf_counter()
    deferred = deferrable_tasks(problem)
    if not deferred:
        return None
    core = ScheduleProblem([t for t in problem.tasks if t.id not in deferred])
    timeline = list_schedule(core)
    tol = _tolerance(problem)
    windows = _windows(core, timeline, tol)
    core_pos = {t: i for i, t in enumerate(timeline.order)}
    by_position = sorted(deferred, key=problem.topo_position)
    deferred_parents = {t: [d for d in problem.task(t).deps if d in deferred] for t in deferred}
    eligible: dict[str, list[int]] = {}
    for t in by_position:
        core_deps = [d for d in problem.task(t).deps if d not in deferred]
        eligible[t] = [
            k
            for k, w in enumerate(windows)
            if all(
                core_pos[d] < core_pos[w.comm] and timeline.end[d] <= w.open + tol
                for d in core_deps
            )
        ]
        # A deferrable parent must sit in the same or an earlier window.
        for p in deferred_parents[t]:
            first = min(eligible[p], default=len(windows))
            eligible[t] = [k for k in eligible[t] if k >= first]

    def scheduled(assigned: Mapping[str, int], method: str) -> Schedule:
        trimmed = _trim_overload(problem, windows, dict(assigned), deferred_parents, tol)
        order = _order_with_assignment(problem, timeline.order, windows, trimmed, deferred)
        return simulate(problem, order, method=method)

    # Heuristic starts: Lancet's closest fit, and the sequential cover, each locally improved.
    closest = _greedy_assignment(problem, windows, eligible, deferred_parents, tol)
    candidates = [scheduled(closest, "window_greedy")]
    starts = [closest, _sequential_assignment(problem, windows, eligible, deferred_parents)]
    improved = [
        _improve_assignment(
            problem, windows, eligible, deferred_parents, a, tol, t0 + time_limit_s / 4
        )
        for a in starts
    ]
    greedy = max(improved, key=lambda a: _fill(problem, windows, a))
    candidates.append(scheduled(greedy, "window_local"))
    # Each window can hold at most its capacity and at most the work eligible for it.
    supply = [0.0] * len(windows)
    for t, ks in eligible.items():
        for k in ks:
            supply[k] += problem.task(t).duration
    bound = sum(min(w.capacity, s) for w, s in zip(windows, supply))
    n_vars = sum(len(ks) for ks in eligible.values())
    assignment_status = "optimal (greedy meets the bound)"
    if n_vars and _fill(problem, windows, greedy) < bound - tol:
        scale = _HORIZON / max(timeline.makespan, tol)
        # Minimise the idle time rather than maximise the filled time: CBC mis-signs a warm
        # start's objective in maximisation problems and then ignores it.
        prob = pulp.LpProblem("graphsched_windows", pulp.LpMinimize)
        x = {
            (t, k): _var(prob, f"x{i}_{k}", cat=pulp.LpBinary)
            for i, t in enumerate(by_position)
            for k in eligible[t]
        }
        filled = {
            k: _var(prob, f"f{k}", 0.0, w.capacity * scale)
            for k, w in enumerate(windows)
        }
        prob += pulp.lpSum(w.capacity * scale - filled[k] for k, w in enumerate(windows))
        into: dict[int, list[tuple[str, pulp.LpVariable]]] = {k: [] for k in filled}
        for (t, k), v in x.items():
            into[k].append((t, v))
        for k in filled:
            prob += filled[k] <= pulp.lpSum(
                problem.task(t).duration * scale * v for t, v in into[k]
            )
        for t in by_position:
            if eligible[t]:
                prob += pulp.lpSum(x[(t, k)] for k in eligible[t]) <= 1
            for p in deferred_parents[t]:
                for k in eligible[t]:
                    prob += x[(t, k)] <= pulp.lpSum(x[(p, kk)] for kk in eligible[p] if kk <= k)
        for (t, k), v in x.items():
            v.setInitialValue(1 if greedy.get(t) == k else 0)
        g_load = [0.0] * len(windows)
        for t, k in greedy.items():
            g_load[k] += problem.task(t).duration
        for k, w in enumerate(windows):
            filled[k].setInitialValue(min(w.capacity, g_load[k]) * scale)
        log.info(
            "window assignment ILP: %d deferrable tasks, %d windows, %d binaries, "
            "time limit %.1f s",
            len(deferred), len(windows), len(x), time_limit_s,
        )
        sol = _run_cbc(
            prob,
            time_limit_s - (time.perf_counter() - t0),
            msg,
            warm=True,
            gap_abs=_WINDOW_GAP * _HORIZON,
        )
        assignment_status = pulp.LpSolution.get(sol, "no solver result")
        if sol in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            chosen = {t: k for (t, k), v in x.items() if (v.value() or 0) > 0.5}
            candidates.append(scheduled(chosen, "window_ilp"))
    best = min(candidates, key=lambda c: c.makespan)
    log.info(
        "window assignment done in %.2f s (%s; %d deferrable tasks, %d windows): "
        "makespan %.6g, core alone %.6g",
        time.perf_counter() - t0, assignment_status, len(deferred), len(windows),
        best.makespan, timeline.makespan,
    )
    return _finish(best, "heuristic", t0)


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
    tol = _tolerance(problem)
    lb = lower_bound(problem)
    listed = list_schedule(problem)
    best = listed
    improved = False  # whether a solver beat the list schedule and the given incumbent
    if incumbent is not None:
        given = _resimulated(problem, incumbent)
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
    result = _finish(result, result.status, t0)
    log.info(
        "schedule: %s, status %s, makespan %.6g vs list schedule %.6g (lower bound %.6g), "
        "%.2f s",
        result.method, result.status, result.makespan, listed.makespan, lb, result.solve_time_s,
    )
    return result
