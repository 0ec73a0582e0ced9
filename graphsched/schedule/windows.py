"""The weight-gradient window assignment, for problems too large for the exact ILP.

Weight-gradient tasks that nothing but other weight-gradient work waits on are taken out; the rest
(the core) is list-scheduled, and the deferrable tasks are assigned, by a small ILP after Lancet's
greedy closest fit, to the windows where a collective is in flight. ``solve`` in ``ilp.py`` calls
``solve_windows`` before (or instead of) the exact model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import pulp

from graphsched.analysis.graph import ordered_topological_sort
from graphsched.schedule.cbc import HORIZON, add_var, finish, run_cbc, tolerance
from graphsched.schedule.list_schedule import list_schedule
from graphsched.schedule.problem import COMM, COMPUTE, WEIGHT_GRAD, Schedule, ScheduleProblem
from graphsched.schedule.simulate import simulate

log = logging.getLogger(__name__)

#: Time limit of the window assignment ILP. After the local search the assignment is typically
#: within 0.5% of the LP bound; CBC rarely closes that quickly and gains little by trying.
DEFAULT_WINDOW_TIME_LIMIT_S = 3.0
#: The window assignment stops once it is proven within this fraction of the core's makespan of
#: the best assignment: closing the last 0.1% can take CBC minutes, and measured costs are
#: several percent less precise than that.
_WINDOW_GAP = 1e-3
#: Grid of the subset sums that cover a window, in parts of the window's capacity.
_SUBSET_RESOLUTION = 512


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
    # Keys are distinct (core positions, then topological positions), so the order is unique.
    return ordered_topological_sort((t.id for t in problem.tasks), problem.children, key.__getitem__)


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
    core = ScheduleProblem(
        [t for t in problem.tasks if t.id not in deferred],
        issues_follow_compute=problem.issues_follow_compute,
        contention=problem.contention,
    )
    timeline = list_schedule(core)
    tol = tolerance(problem)
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
        scale = HORIZON / max(timeline.makespan, tol)
        # Minimise the idle time rather than maximise the filled time: CBC mis-signs a warm
        # start's objective in maximisation problems and then ignores it.
        prob = pulp.LpProblem("graphsched_windows", pulp.LpMinimize)
        x = {
            (t, k): add_var(prob, f"x{i}_{k}", cat=pulp.LpBinary)
            for i, t in enumerate(by_position)
            for k in eligible[t]
        }
        filled = {
            k: add_var(prob, f"f{k}", 0.0, w.capacity * scale)
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
        sol = run_cbc(
            prob,
            time_limit_s - (time.perf_counter() - t0),
            msg,
            warm=True,
            gap_abs=_WINDOW_GAP * HORIZON,
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
    return finish(best, "heuristic", t0)
