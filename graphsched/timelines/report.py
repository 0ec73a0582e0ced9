"""The error report: predicted against measured time, per graph and per task class.

Rows compare the predicted timeline (the plans' times, or their simulation) with the measured one
(``graphsched.record``) of one rank. Task classes, on a graph's intervals:

- ``compute``: time the compute stream runs forward or input-gradient work (waits left out);
- ``dW``: time it runs weight-gradient work;
- ``collective``: the summed durations of the collectives (issue to completion);
- ``exposed wait``: time a collective is in flight while the compute stream does no work, i.e.
  waits for it (the ``exposed`` figure of the summary).

The ``step`` rows sum every graph, so they equal the rank's figures in the summary: compute + dW
is its compute busy time, collective its communication total, exposed wait its exposed time.
``error_pct`` is ``100 * (measured - predicted) / predicted``: positive where the step ran slower
than predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graphsched.errors import ConfigError
from graphsched.plan import COMM_STREAM, Phase
from graphsched.timelines.model import WAIT, Interval, Timeline, Timelines, TimelinesLike
from graphsched.timelines.stats import length, rank_stats, subtract, union

COMPUTE = "compute"
WEIGHT_GRAD = "dW"
COLLECTIVE = "collective"
EXPOSED_WAIT = "exposed wait"
TASK_CLASSES = (COMPUTE, WEIGHT_GRAD, COLLECTIVE, EXPOSED_WAIT)

#: The ``graph`` of the rows that sum every graph of the step.
STEP = "step"


@dataclass(frozen=True)
class ErrorRow:
    """Predicted and measured milliseconds of one task class in one graph (or the whole step)."""

    graph: str
    task_class: str
    #: None where that side has no such graph.
    predicted_ms: float | None
    measured_ms: float | None
    #: 100 * (measured - predicted) / predicted; None without both sides or with 0 predicted.
    error_pct: float | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "error_pct", error_pct(self.predicted_ms, self.measured_ms))


def error_pct(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or predicted == 0:
        return None
    return 100.0 * (measured - predicted) / predicted


def class_times(ivs: list[Interval]) -> dict[str, float]:
    """Seconds of each task class in one graph's intervals (definitions in the module doc)."""
    compute = [iv for iv in ivs if iv.stream != COMM_STREAM and iv.kind != WAIT]
    comm = [iv for iv in ivs if iv.stream == COMM_STREAM]
    busy = union([(iv.start, iv.end) for iv in compute])
    return {
        COMPUTE: length(union([(iv.start, iv.end) for iv in compute if iv.phase != Phase.WEIGHT_GRAD])),
        WEIGHT_GRAD: length(union([(iv.start, iv.end) for iv in compute if iv.phase == Phase.WEIGHT_GRAD])),
        COLLECTIVE: sum(iv.duration for iv in comm),
        EXPOSED_WAIT: length(subtract(union([(iv.start, iv.end) for iv in comm]), busy)),
    }


def _both(timelines: TimelinesLike) -> tuple[Timeline, Timeline]:
    """(predicted, measured), refusing timelines that lack either."""
    tls = Timelines.of(timelines)
    if tls.predicted is None or tls.measured is None:
        have = "only a measured" if tls.predicted is None else "only a predicted"
        raise ConfigError(
            f"the error report compares a predicted with a measured timeline, and this holds {have} "
            "one; record a step (graphsched.timeline(model, step_fn)) or pass the plans and a "
            "measured timeline together (graphsched inspect plan.json timeline.json)."
        )
    return tls.predicted, tls.measured


def _pick_ranks(predicted: Timeline, measured: Timeline, rank: int | None) -> tuple[int, int]:
    """(predicted rank, measured rank): ``rank`` on both where present; by default the slowest
    measured rank, against the predicted rank of that number or else the one predicted (every
    rank runs the same plans)."""
    m_ranks, p_ranks = sorted(measured.ranks), sorted(predicted.ranks)
    if not m_ranks or not p_ranks:
        raise ConfigError("the error report needs a predicted and a measured timeline with at least one rank each.")
    if rank is None:
        rank = max(m_ranks, key=lambda r: rank_stats(measured, r).step_time)
    elif rank not in m_ranks:
        raise ConfigError(f"rank {rank} was not measured; the measured ranks are {m_ranks}.")
    return (rank if rank in p_ranks else p_ranks[0]), rank


def error_rows(timelines: TimelinesLike, rank: int | None = None) -> list[ErrorRow]:
    """One row per graph and task class, then one ``step`` row per class (sums over the graphs).

    Graphs are the measured ones in run order, then any only predicted. ``rank`` defaults to the
    slowest measured rank.
    """
    predicted_tl, measured_tl = _both(timelines)
    p_rank, m_rank = _pick_ranks(predicted_tl, measured_tl, rank)
    predicted = _per_graph(predicted_tl, p_rank)
    measured = _per_graph(measured_tl, m_rank)
    graphs = list(measured) + [g for g in predicted if g not in measured]
    rows = [
        ErrorRow(g, c, _ms(predicted.get(g, {}).get(c)), _ms(measured.get(g, {}).get(c)))
        for g in graphs
        for c in TASK_CLASSES
    ]
    for c in TASK_CLASSES:
        rows.append(ErrorRow(STEP, c, _sum(predicted, c), _sum(measured, c)))
    return rows


def _per_graph(timeline: Timeline, rank: int) -> dict[str, dict[str, float]]:
    return {g: class_times(ivs) for g, ivs in timeline.ranks.get(rank, {}).items() if ivs}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _sum(per_graph: dict[str, dict[str, float]], task_class: str) -> float | None:
    return _ms(sum(times[task_class] for times in per_graph.values())) if per_graph else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def format_error_rows(rows: list[ErrorRow], title: str = "predicted vs measured") -> str:
    """The rows as a text table (milliseconds; ``-`` where a side or the error is missing)."""
    lines = [
        f"{title}, in ms (error = (measured - predicted) / predicted)",
        f"  {'graph':<16} {'class':<13} {'predicted':>10} {'measured':>10} {'error':>10}",
    ]
    for row in rows:
        if row.graph == STEP and row.task_class == TASK_CLASSES[0]:
            lines.append("  " + "-" * 63)
        lines.append(
            f"  {row.graph:<16} {row.task_class:<13} {_cell(row.predicted_ms):>10} "
            f"{_cell(row.measured_ms):>10} {_pct(row.error_pct):>10}"
        )
    return "\n".join(lines)


def error_report(timelines: TimelinesLike, rank: int | None = None) -> str:
    """The text of :func:`error_rows` for ``rank`` (default: the slowest measured rank)."""
    predicted, measured = _both(timelines)
    _, m_rank = _pick_ranks(predicted, measured, rank)
    which = " (the slowest)" if rank is None and len(measured.ranks) > 1 else ""
    rows = error_rows(Timelines(predicted, measured), m_rank)
    return format_error_rows(rows, f"predicted vs measured, rank {m_rank}{which}")
