"""The scheduling core: problem validation, simulation, list schedule, exact ILP, window ILP."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphsched.errors import GraphschedError
from graphsched.schedule import (
    COMM,
    COMPUTE,
    RESOURCES,
    WEIGHT_GRAD,
    OrderError,
    ProblemError,
    SchedTask,
    ScheduleProblem,
    count_disjunctive_pairs,
    list_schedule,
    lower_bound,
    simulate,
    solve,
    solve_ilp,
)

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TOL = 1e-9


# -- helpers ---------------------------------------------------------------------------------


def brute_force_makespan(problem: ScheduleProblem) -> float:
    """The best makespan over every topological order, simulated independently of the package."""
    tasks = {t.id: t for t in problem.tasks}
    best = float("inf")

    def visit(done: list[str], free: dict[str, float], end: dict[str, float]) -> None:
        nonlocal best
        if len(done) == len(tasks):
            best = min(best, max(end.values(), default=0.0))
            return
        for tid, task in tasks.items():
            if tid in end or any(d not in end for d in task.deps):
                continue
            start = max([free[task.resource]] + [end[d] for d in task.deps])
            end[tid] = start + task.duration
            before = free[task.resource]
            free[task.resource] = end[tid]
            visit(done + [tid], free, end)
            free[task.resource] = before
            del end[tid]

    visit([], {r: 0.0 for r in RESOURCES}, {})
    return best


@st.composite
def dags(draw, min_tasks: int = 1, max_tasks: int = 7, weight_grads: bool = False):
    """Random DAGs shaped like captured graphs: a chain of tasks on either resource, and side
    tasks hanging off it (some feeding a later chain task, some depending on another side task).
    Integer durations, zeros included; tasks listed in a random, possibly non-topological order.
    """
    n = draw(st.integers(min_tasks, max_tasks))
    durations = st.integers(0, 9).map(float)
    n_chain = draw(st.integers(1, max(1, (n + 1) // 2)))
    chain = [f"c{i}" for i in range(n_chain)]
    deps: dict[str, list[str]] = {c: ([chain[i - 1]] if i else []) for i, c in enumerate(chain)}
    resource = {c: draw(st.sampled_from(RESOURCES)) for c in chain}
    tags: dict[str, frozenset] = {c: frozenset() for c in chain}
    level: dict[str, int] = {}  # side task -> highest chain index it depends on (-1: none)
    for j in range(n - n_chain):
        sid = f"s{j}"
        anchor = draw(st.integers(-1, n_chain - 1))
        deps[sid] = [chain[anchor]] if anchor >= 0 else []
        level[sid] = anchor
        if j and draw(st.booleans()):
            other = f"s{draw(st.integers(0, j - 1))}"
            deps[sid].append(other)
            level[sid] = max(level[sid], level[other])
        resource[sid] = draw(st.sampled_from(RESOURCES))
        tags[sid] = frozenset()
        if weight_grads and resource[sid] == COMPUTE and draw(st.booleans()):
            tags[sid] = frozenset({WEIGHT_GRAD})
        if level[sid] + 2 < n_chain and draw(st.booleans()):
            deps[chain[draw(st.integers(level[sid] + 2, n_chain - 1))]].append(sid)
    ids = list(deps)
    order = draw(st.permutations(ids))
    return ScheduleProblem(
        [SchedTask(t, resource[t], draw(durations), tuple(deps[t]), tags[t]) for t in order]
    )


def moe_backward(layers: int, a2a: float = 4.0) -> ScheduleProblem:
    """Per layer: dX_a -> a2a_1 -> dX_b -> a2a_2 -> next layer, and dW tasks of 3, 2, 2 and 1
    hanging off dX_a. Compute work equals the critical path (10 per layer): only a schedule that
    fills every a2a window exactly ({3, 1} and {2, 2}) reaches the lower bound. The captured
    order puts every dW task last, as an eager backward that defers weight gradients would."""
    chain: list[SchedTask] = []
    dws: list[SchedTask] = []
    prev: tuple[str, ...] = ()
    for l in range(layers):
        chain += [
            SchedTask(f"L{l}.dx_a", COMPUTE, 1.0, prev),
            SchedTask(f"L{l}.a2a_1", COMM, a2a, (f"L{l}.dx_a",), frozenset({"collective"})),
            SchedTask(f"L{l}.dx_b", COMPUTE, 1.0, (f"L{l}.a2a_1",)),
            SchedTask(f"L{l}.a2a_2", COMM, a2a, (f"L{l}.dx_b",), frozenset({"collective"})),
        ]
        prev = (f"L{l}.a2a_2",)
        for i, d in enumerate((3.0, 2.0, 2.0, 1.0)):
            dws.append(
                SchedTask(f"L{l}.dw{i}", COMPUTE, d, (f"L{l}.dx_a",), frozenset({WEIGHT_GRAD}))
            )
    return ScheduleProblem(chain + dws)


def synthetic_backward(layers: int = 24, seed: int = 0) -> ScheduleProblem:
    """A 24-layer MoE-like backward: per layer 2 all-to-alls with their waits, 6 input-gradient
    compute tasks and 8 weight-gradient tasks, durations drawn so that weight-gradient work is
    close to the communication time (the hard case for packing)."""
    rng = random.Random(seed)
    tasks: list[SchedTask] = []
    prev: tuple[str, ...] = ()
    for l in range(layers):
        def add(name, resource, duration, deps, tags=()):
            tasks.append(
                SchedTask(f"L{l}.{name}", resource, duration, deps, frozenset(tags))
            )
        p = f"L{l}."
        add("c0", COMPUTE, rng.uniform(0.5, 1.5), prev)
        add("a2a1", COMM, 3 * rng.uniform(0.8, 1.2), (p + "c0",), {"collective"})
        add("wait1", COMPUTE, 0.0, (p + "a2a1",))
        add("c1", COMPUTE, rng.uniform(1, 2), (p + "wait1",))
        add("c2", COMPUTE, rng.uniform(1, 2), (p + "c1",))
        add("a2a2", COMM, 3 * rng.uniform(0.8, 1.2), (p + "c2",), {"collective"})
        add("wait2", COMPUTE, 0.0, (p + "a2a2",))
        add("c3", COMPUTE, rng.uniform(0.5, 1), (p + "wait2",))
        add("c4", COMPUTE, rng.uniform(0.5, 1.5), (p + "c3",))
        add("c5", COMPUTE, rng.uniform(0.3, 0.7), (p + "c4",))
        for i, dep in enumerate(["c0", "wait1", "wait1", "c1", "c2", "c3", "c4", "c5"]):
            add(f"w{i}", COMPUTE, 0.7 * rng.uniform(0.3, 1.8), (p + dep,), {WEIGHT_GRAD})
        prev = (p + "c5",)
    return ScheduleProblem(tasks)


def in_some_window(schedule, problem: ScheduleProblem, tid: str) -> bool:
    """Issued after an all-to-all and started while that all-to-all is in flight."""
    pos = {t: i for i, t in enumerate(schedule.order)}
    return any(
        pos[c.id] < pos[tid] and schedule.start[c.id] <= schedule.start[tid] < schedule.end[c.id]
        for c in problem.tasks
        if c.resource == COMM
    )


# -- the problem -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tasks, fragment",
    [
        ([SchedTask("a", COMPUTE, 1.0), SchedTask("a", COMM, 1.0)], "appears twice"),
        ([SchedTask("a", COMPUTE, 1.0, ("ghost",))], "unknown task 'ghost'"),
        (
            [SchedTask("a", COMPUTE, 1.0, ("b",)), SchedTask("b", COMM, 1.0, ("a",))],
            "cycle",
        ),
        ([SchedTask("a", COMPUTE, -1.0)], ">= 0"),
        ([SchedTask("a", COMPUTE, float("nan"))], ">= 0"),
        ([SchedTask("a", "gpu", 1.0)], "not one of"),
        ([SchedTask("a", COMPUTE, 1.0, ("a",))], "itself"),
    ],
)
def test_problem_rejects_malformed_tasks_with_a_clear_error(tasks, fragment):
    with pytest.raises(ProblemError, match=fragment) as info:
        ScheduleProblem(tasks)
    assert isinstance(info.value, GraphschedError)


def test_problem_keeps_a_topological_captured_order_and_repairs_one_that_is_not():
    tasks = [
        SchedTask("b", COMPUTE, 1.0, ("a",)),
        SchedTask("c", COMM, 1.0),
        SchedTask("a", COMM, 1.0),
    ]
    assert ScheduleProblem(tasks).topological_order() == ["c", "a", "b"]
    assert ScheduleProblem(tasks[::-1]).topological_order() == ["a", "c", "b"]


# -- simulation ------------------------------------------------------------------------------


def test_simulate_runs_each_resource_in_order_and_waits_for_dependencies():
    problem = ScheduleProblem(
        [
            SchedTask("x", COMPUTE, 2.0),
            SchedTask("send", COMM, 5.0, ("x",)),
            SchedTask("dw", COMPUTE, 3.0, ("x",)),
            SchedTask("wait", COMPUTE, 0.0, ("send",)),
            SchedTask("y", COMPUTE, 1.0, ("wait",)),
        ]
    )
    overlapped = simulate(problem, ["x", "send", "dw", "wait", "y"])
    assert overlapped.start == {"x": 0.0, "send": 2.0, "dw": 2.0, "wait": 7.0, "y": 7.0}
    assert overlapped.makespan == 8.0
    # Issued after the wait, dw queues behind y on the compute stream.
    serial = simulate(problem, ["x", "send", "wait", "y", "dw"])
    assert serial.start["dw"] == 8.0 and serial.makespan == 11.0
    assert lower_bound(problem) == 8.0  # critical path x, send, wait, y


def two_micro_batches(issues_follow_compute: bool) -> ScheduleProblem:
    """Two independent micro-batches: attention a_i, then its all-to-all c_i, then experts e_i."""
    tasks = []
    for i in (0, 1):
        tasks += [
            SchedTask(f"a{i}", COMPUTE, 1.0),
            SchedTask(f"c{i}", COMM, 5.0, (f"a{i}",)),
            SchedTask(f"w{i}", COMPUTE, 0.0, (f"c{i}",)),
            SchedTask(f"e{i}", COMPUTE, 1.0, (f"w{i}",)),
        ]
    return ScheduleProblem(tasks, issues_follow_compute=issues_follow_compute)


def test_under_inductor_streams_a_collective_starts_behind_the_compute_listed_before_it():
    # Inductor calls a collective on the compute stream: the transfer waits for a1 too.
    order = ["a0", "a1", "c0", "c1", "w0", "e0", "w1", "e1"]
    assert simulate(two_micro_batches(False), order).start["c0"] == 1.0
    assert simulate(two_micro_batches(True), order).start["c0"] == 2.0
    issued_first = ["a0", "c0", "a1", "c1", "w0", "e0", "w1", "e1"]
    assert simulate(two_micro_batches(True), issued_first).start["c0"] == 1.0
    # The event simulation used under contention keeps the same rule.
    contended = ScheduleProblem(two_micro_batches(True).tasks, issues_follow_compute=True, contention=1.5)
    assert simulate(contended, order).start["c0"] == 2.0
    assert simulate(contended, issued_first).start["c0"] == 1.0


def test_list_schedule_issues_a_ready_collective_before_compute_that_could_start_with_it():
    schedule = list_schedule(two_micro_batches(True))
    assert schedule.order.index("c0") < schedule.order.index("a1")
    assert schedule.makespan == 12.0  # a0, then both transfers back to back, then e1
    assert solve(two_micro_batches(True), time_limit_s=5.0).makespan == 12.0


@SETTINGS
@given(dags(min_tasks=2, max_tasks=7))
def test_solve_under_inductor_streams_is_never_worse_than_its_list_schedule(problem):
    flagged = ScheduleProblem(problem.tasks, issues_follow_compute=True)
    listed = list_schedule(flagged)
    solved = solve(flagged, time_limit_s=5.0)
    assert solved.makespan <= listed.makespan + TOL
    assert simulate(flagged, solved.order).makespan == pytest.approx(solved.makespan, abs=TOL)
    # The stream model only adds waits: never faster than the dependency-only model.
    assert solved.makespan >= simulate(problem, solved.order).makespan - TOL


@SETTINGS
@given(dags(min_tasks=2, max_tasks=8), st.randoms(use_true_random=False))
def test_simulate_rejects_orders_that_are_not_topological_permutations(problem, rnd):
    order = problem.topological_order()
    simulate(problem, order)  # a topological order is accepted
    edges = [(d, t.id) for t in problem.tasks for d in t.deps]
    if edges:
        dep, tid = rnd.choice(edges)
        bad = list(order)
        bad.remove(tid)
        bad.insert(bad.index(dep), tid)  # tid now comes right before its dependency
        with pytest.raises(OrderError, match="before its dependency"):
            simulate(problem, bad)
    with pytest.raises(OrderError, match="permutation"):
        simulate(problem, order[:-1])
    with pytest.raises(OrderError, match="permutation"):
        simulate(problem, order[:-1] + [order[0]])
    with pytest.raises(OrderError, match="permutation"):
        simulate(problem, order + ["ghost"])


# -- contention: compute beside a collective in flight runs slower --------------------------


def uncontended_times(problem: ScheduleProblem, order: list[str]) -> tuple[dict, dict]:
    """The two-resource times as simulate computed them before contention existed."""
    free = {r: 0.0 for r in RESOURCES}
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    for tid in order:
        task = problem.task(tid)
        s = max([free[task.resource]] + [end[d] for d in task.deps])
        start[tid] = s
        end[tid] = s + task.duration
        free[task.resource] = end[tid]
    return start, end


@SETTINGS
@given(dags(min_tasks=1, max_tasks=12))
def test_contention_one_gives_exactly_the_uncontended_times(problem):
    same = ScheduleProblem(problem.tasks, contention=1.0)
    for order in (problem.topological_order(), list_schedule(problem).order):
        start, end = uncontended_times(problem, order)
        result = simulate(same, order)
        assert result.start == start and result.end == end  # bitwise
        assert result.makespan == max(end.values(), default=0.0)


@SETTINGS
@given(dags(min_tasks=1, max_tasks=12), st.floats(1.0, 2.0))
def test_contended_times_lie_between_the_plain_ones_and_all_compute_stretched(problem, factor):
    order = list_schedule(problem).order
    plain = simulate(problem, order)
    contended = simulate(ScheduleProblem(problem.tasks, contention=factor), order)
    for tid in order:
        assert contended.end[tid] >= plain.end[tid] - TOL
        if problem.task(tid).resource == COMM:
            duration = problem.task(tid).duration
            assert contended.end[tid] - contended.start[tid] == pytest.approx(duration, abs=TOL)
    assert contended.makespan <= factor * plain.makespan + TOL
    # A factor a hair above 1 runs the event simulation: it must agree with the plain model.
    near = simulate(ScheduleProblem(problem.tasks, contention=1.0 + 1e-12), order)
    assert near.end == pytest.approx(plain.end, abs=1e-9)


@pytest.mark.parametrize("comm_s, deps, stretch", [
    (10.0, (), 1.2),       # the whole task runs while the collective is in flight
    (1.2, (), 1.1),        # half its work inside (1.2 s at 1/1.2 speed), half after alone
    (1.2, ("send",), 1.0),  # it waits for the collective: nothing in flight beside it
])
def test_a_compute_task_is_stretched_for_the_part_of_it_beside_a_collective(comm_s, deps, stretch):
    tasks = [SchedTask("send", COMM, comm_s), SchedTask("mm", COMPUTE, 2.0, deps)]
    schedule = simulate(ScheduleProblem(tasks, contention=1.2), ["send", "mm"])
    took = schedule.end["mm"] - schedule.start["mm"]
    assert took == pytest.approx(2.0 * stretch)
    assert schedule.end["send"] == pytest.approx(comm_s)  # the transfer itself is not slowed


@pytest.mark.parametrize("bad", [0.9, float("nan"), float("inf"), "1.2"])
def test_a_contention_factor_below_one_or_not_a_number_is_refused(bad):
    with pytest.raises(ProblemError, match="contention"):
        ScheduleProblem([SchedTask("a", COMPUTE, 1.0)], contention=bad)


@pytest.mark.parametrize("max_exact_pairs", [0, 1500], ids=["window_ilp", "exact_ilp"])
def test_solvers_rank_their_candidates_by_the_contended_simulation(max_exact_pairs, caplog):
    plain = moe_backward(layers=2)
    problem = ScheduleProblem(plain.tasks, contention=1.3)
    with caplog.at_level(logging.WARNING, logger="graphsched.schedule"):
        result = solve(problem, time_limit_s=5.0, max_exact_pairs=max_exact_pairs)
    # The ILPs leave contention out; what they return is timed with it, never worse than the
    # list schedule, never under the plain problem's optimum.
    assert simulate(problem, result.order).makespan == pytest.approx(result.makespan, abs=TOL)
    assert lower_bound(plain) <= result.makespan <= list_schedule(problem).makespan + TOL
    assert result.makespan > solve(plain, time_limit_s=5.0).makespan
    assert not [r for r in caplog.records if "keeping it unproven" in r.getMessage()]


# -- exact solver ----------------------------------------------------------------------------


@SETTINGS
@given(dags(max_tasks=7))
def test_solve_ilp_finds_the_brute_force_optimum(problem):
    best = brute_force_makespan(problem)
    # From the list schedule, and from the order as captured (a poor start the solver must leave).
    captured = simulate(problem, problem.topological_order())
    for incumbent in (None, captured):
        result = solve_ilp(problem, time_limit_s=10.0, incumbent=incumbent)
        assert result.makespan == pytest.approx(best, abs=TOL)
        assert result.status == "optimal"
        again = simulate(problem, result.order)
        assert again.makespan == pytest.approx(result.makespan, abs=TOL)
        assert result.start == again.start


def test_solve_ilp_beats_the_list_schedule_where_greedy_overfills_a_window():
    # One layer of the MoE pattern: the list schedule runs dw 3 then 2 in the first window.
    problem = moe_backward(layers=1)
    listed = list_schedule(problem)
    result = solve_ilp(problem, time_limit_s=10.0)
    assert listed.makespan > lower_bound(problem) == 10.0
    assert result.makespan == 10.0 and result.status == "optimal" and result.method == "ilp"


def test_solve_ilp_never_returns_worse_than_its_incumbent():
    problem = moe_backward(layers=2)
    eager = simulate(problem, problem.topological_order(), method="eager")  # dW all at the end
    result = solve_ilp(problem, time_limit_s=0.2, incumbent=eager)
    assert result.makespan <= eager.makespan
    assert result.status in ("optimal", "feasible", "incumbent")
    if result.status == "incumbent":
        assert result.order == eager.order


# -- the entry point -------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dags(min_tasks=20, max_tasks=40, weight_grads=True))
def test_solve_is_never_worse_than_the_list_schedule_exact_path(problem):
    listed = list_schedule(problem)
    result = solve(problem, time_limit_s=0.5)
    assert lower_bound(problem) - TOL <= result.makespan <= listed.makespan + TOL
    assert simulate(problem, result.order).makespan == pytest.approx(result.makespan, abs=TOL)


@SETTINGS
@given(dags(min_tasks=20, max_tasks=40, weight_grads=True))
def test_solve_is_never_worse_than_the_list_schedule_window_path(problem):
    listed = list_schedule(problem)
    result = solve(problem, time_limit_s=1.0, max_exact_pairs=0)
    assert lower_bound(problem) - TOL <= result.makespan <= listed.makespan + TOL
    assert simulate(problem, result.order).makespan == pytest.approx(result.makespan, abs=TOL)
    assert result.status in ("optimal", "feasible", "incumbent")


@pytest.mark.parametrize("max_exact_pairs", [0, 1500], ids=["window_ilp", "exact_ilp"])
def test_moe_backward_places_weight_gradients_inside_all_to_all_windows(max_exact_pairs):
    problem = moe_backward(layers=4)
    eager = simulate(problem, problem.topological_order())
    result = solve(problem, time_limit_s=10.0, max_exact_pairs=max_exact_pairs)
    assert result.makespan == pytest.approx(lower_bound(problem)) == 40.0
    assert result.status == "optimal"
    # Captured order: every dW after the whole chain, so only the last all-to-all overlaps one.
    assert eager.makespan == 40.0 + 4 * 8.0 - 4.0
    dw = [t.id for t in problem.tasks if WEIGHT_GRAD in t.tags]
    assert all(in_some_window(result, problem, t) for t in dw)


def test_synthetic_24_layer_backward_solves_within_its_limit(caplog):
    problem = synthetic_backward(layers=24)
    assert len(problem) == 24 * 18
    assert count_disjunctive_pairs(problem) > 1500  # too big for the exact model
    listed = list_schedule(problem)
    with caplog.at_level(logging.INFO, logger="graphsched.schedule"):
        result = solve(problem, time_limit_s=10.0)
    assert result.method.startswith("window_")
    assert result.status in ("feasible", "optimal")
    assert lower_bound(problem) <= result.makespan < listed.makespan
    # Closes a large part of the gap the list schedule leaves to the lower bound (about 55%).
    assert result.makespan - lower_bound(problem) < 0.6 * (listed.makespan - lower_bound(problem))
    # Not a speed test: only that the time limit is honoured, with room for a loaded machine.
    assert result.solve_time_s < 10.0 + 20.0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "432 tasks" in messages and "window assignment" in messages
    assert f"list schedule {listed.makespan:.6g}" in messages
    dw = [t.id for t in problem.tasks if WEIGHT_GRAD in t.tags]
    inside = sum(in_some_window(result, problem, t) for t in dw)
    assert inside > 0.8 * len(dw)


def test_solve_returns_the_list_schedule_when_it_meets_the_lower_bound():
    problem = ScheduleProblem(
        [
            SchedTask("a", COMPUTE, 2.0),
            SchedTask("b", COMM, 1.0, ("a",)),
            SchedTask("c", COMPUTE, 3.0),
        ]
    )
    result = solve(problem, time_limit_s=5.0)
    assert result.makespan == lower_bound(problem) == 5.0
    assert result.status == "optimal" and result.method.startswith("list:")


def test_empty_problem_has_an_empty_optimal_schedule():
    result = solve(ScheduleProblem([]))
    assert result.order == [] and result.makespan == 0.0 and result.status == "optimal"


def test_an_incumbent_that_is_already_optimal_is_proven_optimal():
    # Found by the brute-force property test: with the horizon exactly at the incumbent, CBC's
    # preprocessing called this model infeasible and the optimum went unproven.
    problem = ScheduleProblem(
        [
            SchedTask("s2", COMM, 0.0, ("c0", "s0")),
            SchedTask("c0", COMPUTE, 4.0),
            SchedTask("c2", COMPUTE, 0.0, ("c1",)),
            SchedTask("s3", COMPUTE, 2.0, ("c0", "s2")),
            SchedTask("s0", COMPUTE, 3.0, ("c0",)),
            SchedTask("c1", COMM, 9.0, ("c0",)),
            SchedTask("s1", COMPUTE, 0.0, ("c0",)),
        ]
    )
    result = solve_ilp(problem, time_limit_s=10.0)
    assert result.makespan == pytest.approx(brute_force_makespan(problem), abs=TOL) == 15.0
    assert result.status == "optimal"
