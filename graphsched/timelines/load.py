"""Read timelines from any JSON graphsched writes: plans, a timeline file or a trace.

Several files combine into one Timelines: the plans of a run (its predicted timeline) and a
timeline or trace saved from a recorded step (its measured one) can be inspected together offline
(``graphsched inspect plan.json timeline.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graphsched.errors import ConfigError
from graphsched.plan import ModelPlan, Plan
from graphsched.timelines.model import MEASURED, PREDICTED, TIMELINE_FORMAT, Timeline, Timelines
from graphsched.timelines.trace import timelines_from_trace


def _is_plan(data: Any) -> bool:
    return isinstance(data, dict) and "tasks" in data and "graph_name" in data


def plans_from_json(data: Any) -> dict[str, Plan] | None:
    """graph name -> Plan of a ModelPlan, one Plan, or a dict graph name -> Plan (the
    ``plan.json`` of ``graphsched demo``); None when ``data`` holds no plans."""
    if isinstance(data, dict) and isinstance(data.get("plans"), dict) and "version" in data:
        return ModelPlan.from_json(json.dumps(data)).plans
    if _is_plan(data):
        plan = Plan.from_dict(data)
        return {plan.graph_name: plan}
    if isinstance(data, dict) and data and all(_is_plan(v) for v in data.values()):
        return {k: Plan.from_dict(v) for k, v in data.items()}
    return None


def timelines_from_json(data: Any, measured_graphs: list[str] | None = None) -> Timelines:
    """Accepts a timeline file (``Timelines.save``), a trace (``write_chrome_trace``), a ModelPlan,
    one Plan, or a dict graph name -> Plan (the ``plan.json`` of ``graphsched demo``).

    Plans give the predicted timeline of the graphs in ``measured_graphs`` where it names any of
    them (a measured step to compare with), else of a whole training step."""
    if isinstance(data, dict) and data.get("format") == TIMELINE_FORMAT:
        return Timelines.from_dict(data)
    if isinstance(data, dict) and "traceEvents" in data:
        return timelines_from_trace(data)
    plans = plans_from_json(data)
    if plans is not None:
        ran = [g for g in dict.fromkeys(measured_graphs or []) if g in plans]
        return Timelines(predicted=Timeline.from_plans(plans, graphs=ran or None))
    raise ConfigError(
        "this JSON is neither a graphsched plan (a Plan, a ModelPlan, or graph name -> Plan as "
        "graphsched demo writes), nor a timeline file, nor a trace written by graphsched; pass one "
        "of those."
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as JSON ({exc}); pass a plan, timeline or trace JSON file.") from exc


def load_timelines(*paths: str | Path) -> Timelines:
    """The timelines of one file, or of several combined (each source from one file only).

    Timeline and trace files are read first, so that plans among the files predict the graphs
    their measured step ran.
    """
    if not paths:
        raise ConfigError("load_timelines needs at least one file.")
    data = {Path(p): _read_json(Path(p)) for p in paths}
    plan_files = [p for p, d in data.items() if plans_from_json(d) is not None]
    found: dict[str, tuple[Path, Timeline]] = {}

    def add(path: Path, tls: Timelines) -> None:
        for tl in tls:
            if tl.source in found:
                raise ConfigError(
                    f"{found[tl.source][0]} and {path} both hold a {tl.source} timeline; pass one "
                    f"file per source (plans or a predicted timeline, and a measured one)."
                )
            found[tl.source] = (path, tl)

    for path, d in data.items():
        if path not in plan_files:
            add(path, timelines_from_json(d))
    measured = found.get(MEASURED)
    graphs = [g for ranks in measured[1].ranks.values() for g in ranks] if measured else None
    for path in plan_files:
        add(path, timelines_from_json(data[path], measured_graphs=graphs))
    return Timelines(
        predicted=found[PREDICTED][1] if PREDICTED in found else None,
        measured=found[MEASURED][1] if MEASURED in found else None,
    )
