"""What the two ILPs share: CBC, how variables are made, scaling, and re-checking a result.

The exact ILP (``ilp.py``) and the window assignment (``windows.py``) both build a pulp model,
hand it to CBC, and re-simulate what comes back; the helpers for that live here so neither
solver module imports the other's internals.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace

import pulp

from graphsched.schedule.problem import Schedule, ScheduleProblem
from graphsched.schedule.simulate import lower_bound, simulate

log = logging.getLogger(__name__)

#: Solver models are scaled so the incumbent's makespan is this many units: CBC's absolute
#: tolerances (about 1e-6) would otherwise swamp durations measured in seconds.
HORIZON = 1000.0


def tolerance(problem: ScheduleProblem) -> float:
    return 1e-9 * max(1.0, lower_bound(problem))


def resimulated(problem: ScheduleProblem, schedule: Schedule) -> Schedule:
    """The incumbent's times recomputed here, so a stale or hand-edited Schedule cannot mislead."""
    again = simulate(problem, schedule.order, method=schedule.method, status=schedule.status)
    again.solve_time_s = schedule.solve_time_s
    return again


def finish(schedule: Schedule, status: str, t0: float) -> Schedule:
    return replace(schedule, status=status, solve_time_s=time.perf_counter() - t0)


def add_var(
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


def run_cbc(
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
