"""graphsched: whole-graph communication/computation overlap for Mixture-of-Experts training."""

from graphsched.api import captured_analyses, captured_graphs, captured_plans, explain, record, save_plans, unwrap, wrap
from graphsched.config import GraphschedConfig
from graphsched.errors import (
    AgreementTimeoutError,
    ConfigError,
    GraphschedError,
    GraphschedFallbackWarning,
    PlanError,
    PlanMismatchError,
    ProcessGroupMismatchError,
)
from graphsched.plan import ModelPlan, Plan, Task
from graphsched.timelines import Timeline, Timelines, timeline

__version__ = "0.1.0"

__all__ = [
    "AgreementTimeoutError",
    "ConfigError",
    "GraphschedConfig",
    "GraphschedError",
    "GraphschedFallbackWarning",
    "ModelPlan",
    "Plan",
    "PlanError",
    "PlanMismatchError",
    "ProcessGroupMismatchError",
    "Task",
    "Timeline",
    "Timelines",
    "captured_analyses",
    "captured_graphs",
    "captured_plans",
    "explain",
    "record",
    "save_plans",
    "timeline",
    "unwrap",
    "wrap",
]
