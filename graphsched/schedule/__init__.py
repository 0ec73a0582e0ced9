"""Scheduling: tasks on a compute and a comm resource, simulated, list-scheduled, solved, planned.

``planner.IlpPlanner`` turns a captured graph's analysis into a ``Plan`` (coarsen -> solve ->
plan); ``plans.simple_plan`` builds the identity and reverse-independent plans.
"""

from graphsched.schedule.ilp import (
    DEFAULT_MAX_EXACT_PAIRS,
    count_disjunctive_pairs,
    disjunctive_pairs,
    solve,
    solve_ilp,
)
from graphsched.schedule.list_schedule import critical_path_order, list_schedule
from graphsched.schedule.problem import (
    COLLECTIVE,
    COMM,
    COMPUTE,
    RESOURCES,
    WEIGHT_GRAD,
    OrderError,
    ProblemError,
    SchedTask,
    Schedule,
    ScheduleProblem,
)
from graphsched.schedule.simulate import check_order, lower_bound, simulate
from graphsched.schedule.windows import deferrable_tasks, solve_windows

__all__ = [
    "COLLECTIVE",
    "COMM",
    "COMPUTE",
    "DEFAULT_MAX_EXACT_PAIRS",
    "RESOURCES",
    "WEIGHT_GRAD",
    "OrderError",
    "ProblemError",
    "SchedTask",
    "Schedule",
    "ScheduleProblem",
    "check_order",
    "count_disjunctive_pairs",
    "critical_path_order",
    "deferrable_tasks",
    "disjunctive_pairs",
    "list_schedule",
    "lower_bound",
    "simulate",
    "solve",
    "solve_ilp",
    "solve_windows",
]
