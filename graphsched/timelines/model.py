"""Timelines: when each task of a step ran (measured) or should run (predicted), per rank and graph.

A :class:`Timeline` holds one source of times, ``predicted`` (from a Plan) or ``measured`` (from
``graphsched.record``). Per rank it maps each graph (``g0.forward``, ``g0.backward``, ...) to its
intervals, in seconds on the rank's step axis: graphs follow each other in the order a training step
runs them, so the step starts at 0 and ends at the last interval's end.

Lanes: every collective's transfer is on the ``comm`` lane, from its issue to its completion; every
other task (compute, views and the waits where the compute stream blocks on a collective) is on the
``compute`` lane.

Predicted times of a plan that carries none (``identity`` plans) are simulated from cost numbers by
:func:`simulate_plan`; its rule is documented there.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from graphsched.errors import ConfigError, GraphschedError
from graphsched.plan import COMM_STREAM, COMPUTE_STREAM, Plan, TaskKind
from graphsched.schedule.problem import COMM, COMPUTE, SchedTask, ScheduleProblem
from graphsched.schedule.simulate import simulate

if TYPE_CHECKING:
    from graphsched.timelines.report import ErrorRow

PREDICTED = "predicted"
MEASURED = "measured"
SOURCES = (PREDICTED, MEASURED)

ISSUE = TaskKind.COLLECTIVE_ISSUE
WAIT = TaskKind.COLLECTIVE_WAIT

#: The ``format`` field of a timeline JSON file.
TIMELINE_FORMAT = "graphsched-timeline"
TIMELINE_FORMAT_VERSION = 1

_GRAPH_NAME = re.compile(r"^g(\d+)\.(forward|backward|inference)$")


@dataclass
class Interval:
    """One task of one graph on one lane."""

    name: str
    #: The lane: ``comm`` for a collective's transfer, ``compute`` for everything else.
    stream: str
    kind: str
    phase: str
    start: float
    end: float
    #: A collective: the name of the wait task (same graph) that completes it.
    wait: str | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    """Intervals of one source (``predicted`` or ``measured``) per rank and graph."""

    source: str
    #: rank -> graph name -> intervals (seconds from the rank's step start), graphs in run order.
    ranks: dict[int, dict[str, list[Interval]]] = field(default_factory=dict)
    #: graph name -> the options of its plan (schedule, solver status, chunks, ...).
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"timeline source {self.source!r} is not one of {SOURCES}.")

    # -- reading ---------------------------------------------------------------------------------

    def intervals(self, rank: int) -> list[tuple[str, Interval]]:
        """(graph, interval) pairs of ``rank``, in graph order then task order."""
        return [(g, iv) for g, ivs in self.ranks.get(rank, {}).items() for iv in ivs]

    def graph_spans(self, rank: int) -> dict[str, tuple[float, float]]:
        """graph -> (first start, last end) on ``rank``'s axis."""
        return {
            g: (min(iv.start for iv in ivs), max(iv.end for iv in ivs))
            for g, ivs in self.ranks.get(rank, {}).items()
            if ivs
        }

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def from_plans(
        cls,
        plans: Mapping[str, Plan],
        rank: int = 0,
        *,
        costs: Mapping[str, Mapping[str, float]] | None = None,
        graphs: Sequence[str] | None = None,
    ) -> "Timeline":
        """The predicted timeline of one step: each plan's graph after the previous one.

        A plan's own ``start``/``end`` times are used when every task has them; otherwise its
        order is simulated (:func:`simulate_plan`) from ``plan.costs`` or, when the plan carries no
        cost numbers, ``costs[graph]`` (node name -> seconds). Each collective is paired with the
        wait its plan names (``Task.collective``). ``graphs`` picks and orders the graphs; by default a
        training step's graphs (forwards, then backwards in reverse), or the inference graphs when
        there is nothing else.
        """
        order = list(graphs) if graphs is not None else step_graph_order(plans)
        unknown = [g for g in order if g not in plans]
        if unknown:
            raise ConfigError(f"graphs {unknown} have no plan; the plans are {sorted(plans)}.")
        per_graph: dict[str, list[Interval]] = {}
        offset = 0.0
        for g in order:
            plan = plans[g]
            ivs = plan_intervals(plan, costs=(costs or {}).get(g))
            for iv in ivs:
                iv.start += offset
                iv.end += offset
            per_graph[g] = ivs
            offset = max([offset] + [iv.end for iv in ivs])
        return cls(PREDICTED, {rank: per_graph}, {g: dict(plans[g].options) for g in order})

    @classmethod
    def from_timings(
        cls, timings: Iterable[Any], rank: int = 0, *, plans: Mapping[str, Plan] | None = None
    ) -> "Timeline":
        """The measured timeline from ``StepRecorder.timings`` (TaskTiming objects or their dicts).

        Times are shifted so that the first recorded task starts at 0. Each collective is paired
        with the wait that its graph's plan names (``plans``: graph name -> Plan, the plans the
        step ran, e.g. ``StepRecorder.plans``); the timings alone do not say which wait completes
        which collective. A recorded collective whose graph has no plan, or whose plan pairs it with
        no wait, is an error naming the fix: nothing is guessed.
        """
        per_graph: dict[str, list[Interval]] = {}
        for t in timings:
            d = t if isinstance(t, Mapping) else dataclasses.asdict(t)
            lane = COMM_STREAM if d["kind"] == ISSUE else COMPUTE_STREAM
            per_graph.setdefault(d["graph"], []).append(
                Interval(d["task"], lane, d["kind"], d["phase"], float(d["start_s"]), float(d["end_s"]))
            )
        origin = min((iv.start for ivs in per_graph.values() for iv in ivs), default=0.0)
        for graph, ivs in per_graph.items():
            for iv in ivs:
                iv.start -= origin
                iv.end -= origin
            ivs.sort(key=lambda iv: (iv.start, iv.end))
            _pair_measured(graph, ivs, (plans or {}).get(graph), sorted(plans or {}))
        return cls(MEASURED, {rank: per_graph})

    @classmethod
    def merge(cls, parts: Sequence["Timeline"]) -> "Timeline":
        """One timeline holding the ranks of several (of the same source, no rank twice)."""
        if not parts:
            raise ConfigError("Timeline.merge needs at least one timeline.")
        sources = {p.source for p in parts}
        if len(sources) != 1:
            raise ConfigError(
                f"cannot merge timelines of different sources {sorted(sources)}; merge the "
                "predicted and the measured ones separately."
            )
        merged = cls(parts[0].source)
        for p in parts:
            for rank, graphs in p.ranks.items():
                if rank in merged.ranks:
                    raise ConfigError(f"rank {rank} appears in two of the timelines to merge; give each rank once.")
                merged.ranks[rank] = graphs
            merged.options.update(p.options)
        merged.ranks = dict(sorted(merged.ranks.items()))
        return merged

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "ranks": {
                str(rank): {g: [dataclasses.asdict(iv) for iv in ivs] for g, ivs in graphs.items()}
                for rank, graphs in self.ranks.items()
            },
            "options": self.options,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Timeline":
        return cls(
            data["source"],
            {
                int(rank): {g: [Interval(**iv) for iv in ivs] for g, ivs in graphs.items()}
                for rank, graphs in data["ranks"].items()
            },
            dict(data.get("options", {})),
        )


@dataclass
class Timelines:
    """The predicted and/or measured timeline of a step, with its outputs."""

    predicted: Timeline | None = None
    measured: Timeline | None = None

    def __post_init__(self) -> None:
        for want, tl in ((PREDICTED, self.predicted), (MEASURED, self.measured)):
            if tl is not None and tl.source != want:
                raise ConfigError(f"Timelines.{want} holds a {tl.source!r} timeline.")

    def __iter__(self):  # predicted first: it is drawn above the measured one
        return iter([t for t in (self.predicted, self.measured) if t is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @classmethod
    def of(cls, timelines: "TimelinesLike") -> "Timelines":
        """Accept a Timelines, one Timeline or a sequence of them (one per source at most)."""
        if isinstance(timelines, Timelines):
            return timelines
        items = [timelines] if isinstance(timelines, Timeline) else list(timelines)
        found: dict[str, Timeline] = {}
        for tl in items:
            if tl.source in found:
                raise ConfigError(
                    f"two {tl.source} timelines given; merge ranks first with Timeline.merge."
                )
            found[tl.source] = tl
        return cls(found.get(PREDICTED), found.get(MEASURED))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TIMELINE_FORMAT,
            "version": TIMELINE_FORMAT_VERSION,
            "timelines": [tl.to_dict() for tl in self],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Timelines":
        if data.get("format") != TIMELINE_FORMAT or data.get("version") != TIMELINE_FORMAT_VERSION:
            raise ConfigError(
                f"not a graphsched timeline file of version {TIMELINE_FORMAT_VERSION} (format "
                f"{data.get('format')!r}, version {data.get('version')!r}); write it again with "
                "this graphsched (Timelines.save)."
            )
        return cls.of([Timeline.from_dict(d) for d in data["timelines"]])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Timelines":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # Outputs (imported here so that reading a timeline needs no matplotlib).
    def summary(self) -> str:
        from graphsched.timelines.summary import summarize

        return summarize(self)

    def errors(self, rank: int | None = None) -> list["ErrorRow"]:
        """Predicted against measured per graph and task class (``timelines/report.py``'s
        ErrorRow list); needs both timelines. ``rank`` defaults to the slowest measured rank."""
        from graphsched.timelines.report import error_rows

        return error_rows(self, rank)

    def error_report(self, rank: int | None = None) -> str:
        """The text table of :meth:`errors` (also part of :meth:`summary` when both exist)."""
        from graphsched.timelines.report import error_report

        return error_report(self, rank)

    def write_trace(self, path: str | Path) -> Path:
        from graphsched.timelines.trace import write_chrome_trace

        return write_chrome_trace(path, self)

    def write_png(self, path: str | Path) -> Path:
        from graphsched.timelines.gantt import write_gantt_png

        return write_gantt_png(path, self)


TimelinesLike = Timelines | Timeline | Sequence[Timeline]


def step_graph_order(graphs: Iterable[str]) -> list[str]:
    """The order a training step runs graphs ``g<i>.<kind>`` in.

    Forwards by capture index, then backwards in reverse (autograd unwinds the forwards), then
    graphs with other names as given; inference graphs only when there is no training graph.
    """
    names = list(graphs)
    parsed = {n: _GRAPH_NAME.match(n) for n in names}
    fwd = sorted((n for n in names if parsed[n] and parsed[n].group(2) == "forward"), key=lambda n: int(parsed[n].group(1)))
    bwd = sorted((n for n in names if parsed[n] and parsed[n].group(2) == "backward"), key=lambda n: -int(parsed[n].group(1)))
    inf = sorted((n for n in names if parsed[n] and parsed[n].group(2) == "inference"), key=lambda n: int(parsed[n].group(1)))
    other = [n for n in names if not parsed[n]]
    training = fwd + bwd + other
    return training if training else inf


def _pair_measured(graph: str, ivs: list[Interval], plan: Plan | None, known: list[str]) -> None:
    """Set ``wait`` on every recorded collective of ``graph`` from the wait its plan names."""
    issues = [iv for iv in ivs if iv.kind == ISSUE]
    if not issues:
        return
    if plan is None:
        raise GraphschedError(
            f"the measured timings of graph {graph!r} hold collectives ({issues[0].name!r}, ...) "
            f"but no plan of that graph was given (plans given: {known or 'none'}), so which wait "
            "completes each collective is unknown; pass plans= the plans the step ran: "
            "Timeline.from_timings(rec.timings, rec.rank, plans=rec.plans) after "
            "graphsched.record, or graphsched.captured_plans(model)."
        )
    wait_of = {plan.tasks[issue].name: plan.tasks[wait].name for wait, issue in plan.collective_pairs().items()}
    for iv in issues:
        wait = wait_of.get(iv.name)
        if wait is None:
            raise GraphschedError(
                f"the measured collective {iv.name!r} of graph {graph!r} is paired with no wait in "
                f"the plan given for that graph (its collectives: {sorted(wait_of) or 'none'}); the "
                "timings were recorded under other plans: pass the plans the step ran "
                "(StepRecorder.plans, or graphsched.captured_plans(model) right after the step)."
            )
        iv.wait = wait


def match_collectives(plan: Plan) -> dict[int, int]:
    """wait task index -> issue task index, for every wait of ``plan`` (the plan's own pairs,
    ``Task.collective``)."""
    return plan.collective_pairs()


def simulate_plan(
    plan: Plan, costs: Mapping[str, float], waits: Mapping[int, int]
) -> list[tuple[float, float]]:
    """Predicted (start, end) of every task of ``plan``, from node costs in seconds.

    The plan's order on the scheduler's two in-order resources (``graphsched.schedule.simulate``),
    as the runtime runs them. A compute-stream task starts when the previous one ends. A wait ends
    when its collective (``waits``: wait index -> issue index) has ended; it is shown from the end
    of the compute before it, where the compute stream stalls. A collective starts when the comm
    stream is free and every compute-stream task listed before it has ended (its input comes from
    one of them: a conservative stand-in for the exact dependency, which the plan file does not
    carry).
    """
    tasks: list[SchedTask] = []
    before: list[str | None] = []  # the compute-stream task listed last before each task
    last_compute: str | None = None
    for i, t in enumerate(plan.tasks):
        tid = str(i)
        duration = sum(float(costs.get(n, 0.0)) for n in t.nodes)
        before.append(last_compute)
        if t.kind == ISSUE or t.stream == COMM_STREAM:
            deps = () if last_compute is None else (last_compute,)
            tasks.append(SchedTask(tid, COMM, duration, deps))
            continue
        src = waits.get(i) if t.kind == WAIT else None
        deps = (str(src),) if src is not None and src < i else ()
        tasks.append(SchedTask(tid, COMPUTE, duration, deps))
        last_compute = tid
    schedule = simulate(ScheduleProblem(tasks), [t.id for t in tasks], method="as_planned")
    times: list[tuple[float, float]] = []
    for i, t in enumerate(plan.tasks):
        start, end = schedule.start[str(i)], schedule.end[str(i)]
        if t.kind == WAIT and t.stream != COMM_STREAM:
            prev = before[i]
            start = schedule.end[prev] if prev is not None else 0.0
        times.append((start, end))
    return times


def plan_intervals(
    plan: Plan,
    *,
    costs: Mapping[str, float] | None = None,
) -> list[Interval]:
    """The intervals of one plan's graph, from time 0 (see ``Timeline.from_plans``)."""
    waits = match_collectives(plan)
    if plan.tasks and all(t.start is not None and t.end is not None for t in plan.tasks):
        times = [(float(t.start), float(t.end)) for t in plan.tasks]  # type: ignore[arg-type]
    else:
        numbers = plan.costs or costs
        if not numbers:
            raise GraphschedError(
                f"plan {plan.graph_name!r} ({plan.options.get('schedule', '?')} schedule) carries "
                "neither predicted times nor cost numbers, so no predicted timeline can be drawn; "
                "plan with schedule='ilp', pass costs= (node name -> seconds), or use "
                "graphsched.timeline(model), which takes the costs from the captured graphs."
            )
        times = simulate_plan(plan, numbers, waits)
    wait_name = {src: plan.tasks[w].name for w, src in waits.items()}
    return [
        Interval(
            t.name,
            COMM_STREAM if t.kind == ISSUE else COMPUTE_STREAM,
            t.kind,
            t.phase,
            start,
            end,
            wait_name.get(i),
        )
        for i, (t, (start, end)) in enumerate(zip(plan.tasks, times))
    ]
