"""Scheduling core: tasks on a compute and a comm resource, simulated, list-scheduled, solved."""

from graphsched.partition.ilp import (
    DEFAULT_MAX_EXACT_PAIRS,
    count_disjunctive_pairs,
    deferrable_tasks,
    disjunctive_pairs,
    solve,
    solve_ilp,
    solve_windows,
)
from graphsched.partition.list_schedule import critical_path_order, list_schedule
from graphsched.partition.problem import (
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
from graphsched.partition.simulate import check_order, lower_bound, simulate

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
