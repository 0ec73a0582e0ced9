"""Read timelines from any JSON graphsched writes: plans, a timeline file or a trace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graphsched.errors import ConfigError
from graphsched.plan import ModelPlan, Plan
from graphsched.timelines.model import TIMELINE_FORMAT, Timeline, Timelines
from graphsched.timelines.trace import timelines_from_trace


def _is_plan(data: Any) -> bool:
    return isinstance(data, dict) and "tasks" in data and "graph_name" in data


def timelines_from_json(data: Any) -> Timelines:
    """Accepts a timeline file (``Timelines.save``), a trace (``write_chrome_trace``), a ModelPlan,
    one Plan, or a dict graph name -> Plan (the ``plan.json`` of ``graphsched demo``)."""
    if isinstance(data, dict) and data.get("format") == TIMELINE_FORMAT:
        return Timelines.from_dict(data)
    if isinstance(data, dict) and "traceEvents" in data:
        return timelines_from_trace(data)
    if isinstance(data, dict) and isinstance(data.get("plans"), dict) and "version" in data:
        return Timelines(predicted=Timeline.from_plans(ModelPlan.from_json(json.dumps(data)).plans))
    if _is_plan(data):
        plan = Plan.from_dict(data)
        return Timelines(predicted=Timeline.from_plans({plan.graph_name: plan}))
    if isinstance(data, dict) and data and all(_is_plan(v) for v in data.values()):
        return Timelines(predicted=Timeline.from_plans({k: Plan.from_dict(v) for k, v in data.items()}))
    raise ConfigError(
        "this JSON is neither a graphsched plan (a Plan, a ModelPlan, or graph name -> Plan as "
        "graphsched demo writes), nor a timeline file, nor a trace written by graphsched; pass one "
        "of those."
    )


def load_timelines(path: str | Path) -> Timelines:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as JSON ({exc}); pass a plan, timeline or trace JSON file.") from exc
    return timelines_from_json(data)
