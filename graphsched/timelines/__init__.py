"""Timelines of a step: predicted from the plans, measured with ``graphsched.record``.

``timeline(model, step_fn)`` gives both for a wrapped model; ``Timelines`` writes a Perfetto/Chrome
trace (``write_trace``), a Gantt chart PNG (``write_png``), a text summary (``summary``), the error
report of predicted against measured per graph and task class (``errors``, ``error_report``) and its
own JSON (``save``); ``load_timelines`` reads any of plan, timeline or trace JSON back, and
combines several files (plans plus a measured timeline) into one Timelines.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from graphsched.timelines.load import load_timelines, timelines_from_json
from graphsched.timelines.model import (
    MEASURED,
    PREDICTED,
    Interval,
    Timeline,
    Timelines,
    match_collectives,
    simulate_plan,
    step_graph_order,
)
from graphsched.timelines.report import TASK_CLASSES, ErrorRow, error_report, error_rows, format_error_rows
from graphsched.timelines.stats import Gap, RankStats, rank_stats, timeline_stats
from graphsched.timelines.summary import summarize
from graphsched.timelines.trace import timelines_from_trace, to_chrome_trace, write_chrome_trace


def timeline(model: nn.Module, step_fn: Callable[[], Any] | None = None, rank: int | None = None) -> Timelines:
    """The predicted timeline of a wrapped model's captured plans and, with ``step_fn``, the
    measured one of running ``step_fn()`` once under ``graphsched.record(model)``.

    Run a step before (or pass ``step_fn``) so that graphs are captured; time a warmed-up step:
    ``graphsched.timeline(model, lambda: model(x).sum().backward())``. Plans without predicted
    times (``identity``) are simulated from the cost numbers of the captured graphs. Each rank
    gets its own rank's timelines; gather them and ``Timeline.merge`` for all ranks. With both,
    ``summary()`` (and ``error_report()``) compares them per graph and task class.
    """
    from graphsched import api  # api orchestrates; importing it lazily keeps this package below it

    measured = None
    if step_fn is not None:
        with api.record(model, rank=rank) as rec:
            step_fn()
        rank = rec.rank
        measured = Timeline.from_timings(rec.timings, rank, plans=rec.plans)
    elif rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    plans = api.captured_plans(model)
    if not plans:
        from graphsched.errors import GraphschedError
        from graphsched.reasons import nothing_to_schedule

        reason = nothing_to_schedule(api.state_of(model))
        if reason:
            raise GraphschedError(f"no timeline to show. {reason}")
        if measured is not None:
            return Timelines(measured=measured)

        raise GraphschedError(
            "graphsched has no scheduled graph for this model yet (nothing captured, or no graph "
            "holds a collective): run one training step of the wrapped model first, or pass "
            "step_fn=..., then call graphsched.timeline(model) again."
        )
    analyses = {a.name: a for a in api.captured_analyses(model)}
    costs = {
        name: {n: float(a.node(n).cost) for n in a.order} for name, a in analyses.items()
    }
    graphs = step_graph_order(plans)
    if measured is not None:
        # Predict the graphs the step ran (e.g. no inference graph for a training step).
        ran = [g for g in graphs if g in measured.ranks.get(rank, {})]
        graphs = ran or graphs
    predicted = Timeline.from_plans(plans, rank, costs=costs, graphs=graphs)
    return Timelines(predicted=predicted, measured=measured)


__all__ = [
    "ErrorRow",
    "Gap",
    "Interval",
    "MEASURED",
    "PREDICTED",
    "RankStats",
    "TASK_CLASSES",
    "Timeline",
    "Timelines",
    "error_report",
    "error_rows",
    "format_error_rows",
    "load_timelines",
    "match_collectives",
    "rank_stats",
    "simulate_plan",
    "step_graph_order",
    "summarize",
    "timeline",
    "timeline_stats",
    "timelines_from_json",
    "timelines_from_trace",
    "to_chrome_trace",
    "write_chrome_trace",
]
