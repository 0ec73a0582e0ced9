"""The figures of a timeline: step time, communication total, exposed and hidden, compute gaps.

Definitions (per rank):
- step time: last end minus first start of the rank's intervals;
- compute busy: the union of the compute lane's intervals, waits left out (a wait is the compute
  stream stalled on a collective);
- communication total: the sum of the collectives' durations; communication busy: their union;
- exposed communication: the part of that union during which the compute lane is not busy;
  hidden = busy - exposed; overlap ratio = hidden / busy (1.0 when there is no communication;
  busy equals total unless two collectives are in flight at once);
- compute gaps: stretches of a graph's span where the compute lane is not busy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graphsched.plan import COMM_STREAM
from graphsched.timelines.model import WAIT, Interval, Timeline

Segment = tuple[float, float]

#: Stretches shorter than this (seconds) are rounding noise (a trace stores nanoseconds), not gaps.
EPS = 2e-9


def union(segments: list[Segment]) -> list[Segment]:
    """Sorted, disjoint segments covering the same time (empty segments dropped)."""
    out: list[Segment] = []
    for s, e in sorted(seg for seg in segments if seg[1] > seg[0]):
        if out and s <= out[-1][1] + EPS:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def subtract(a: list[Segment], b: list[Segment]) -> list[Segment]:
    """Parts of the disjoint sorted segments ``a`` not covered by the disjoint sorted ``b``."""
    out: list[Segment] = []
    j = 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur + EPS:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur + EPS < e:
            out.append((cur, e))
    return out


def length(segments: list[Segment]) -> float:
    return sum(e - s for s, e in segments)


@dataclass
class Gap:
    """Idle compute time inside one graph."""

    graph: str
    start: float
    end: float
    #: The compute-lane task before the gap and the one after it (None at the graph's edges).
    after: str | None
    before: str | None
    #: Collectives the compute lane waits for during the gap.
    waiting_on: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class GraphStats:
    graph: str
    span: float
    compute_busy: float
    comm_total: float
    exposed_comm: float


@dataclass
class RankStats:
    rank: int
    step_time: float
    compute_busy: float
    comm_total: float
    comm_busy: float
    exposed_comm: float
    graphs: list[GraphStats]
    #: Every idle compute stretch, largest first.
    gaps: list[Gap]
    #: Where communication is exposed, sorted by time.
    exposed_segments: list[Segment]

    @property
    def hidden_comm(self) -> float:
        return self.comm_busy - self.exposed_comm

    @property
    def overlap_ratio(self) -> float:
        return self.hidden_comm / self.comm_busy if self.comm_busy > 0 else 1.0


def _busy(ivs: list[Interval]) -> list[Segment]:
    return union([(iv.start, iv.end) for iv in ivs if iv.stream != COMM_STREAM and iv.kind != WAIT])


def _comm(ivs: list[Interval]) -> list[Segment]:
    return union([(iv.start, iv.end) for iv in ivs if iv.stream == COMM_STREAM])


def _gaps(graph: str, ivs: list[Interval]) -> list[Gap]:
    if not ivs:
        return []
    span = [(min(iv.start for iv in ivs), max(iv.end for iv in ivs))]
    compute = [iv for iv in ivs if iv.stream != COMM_STREAM and iv.kind != WAIT and iv.end > iv.start]
    gaps = []
    for s, e in subtract(span, _busy(ivs)):
        after = max((iv for iv in compute if iv.end <= s), key=lambda iv: iv.end, default=None)
        before = min((iv for iv in compute if iv.start >= e), key=lambda iv: iv.start, default=None)
        waiting = [
            iv.name for iv in ivs if iv.stream == COMM_STREAM and iv.start < e and iv.end > s
        ]
        gaps.append(Gap(graph, s, e, after and after.name, before and before.name, waiting))
    return gaps


def rank_stats(timeline: Timeline, rank: int) -> RankStats:
    graphs = timeline.ranks.get(rank, {})
    every = [iv for ivs in graphs.values() for iv in ivs]
    busy, comm = _busy(every), _comm(every)
    exposed = subtract(comm, busy)
    per_graph = []
    gaps: list[Gap] = []
    for g, ivs in graphs.items():
        if not ivs:
            continue
        g_busy, g_comm = _busy(ivs), _comm(ivs)
        per_graph.append(
            GraphStats(
                g,
                max(iv.end for iv in ivs) - min(iv.start for iv in ivs),
                length(g_busy),
                sum(iv.duration for iv in ivs if iv.stream == COMM_STREAM),
                length(subtract(g_comm, g_busy)),
            )
        )
        gaps += _gaps(g, ivs)
    gaps.sort(key=lambda gap: -gap.duration)
    step = (max(iv.end for iv in every) - min(iv.start for iv in every)) if every else 0.0
    return RankStats(
        rank=rank,
        step_time=step,
        compute_busy=length(busy),
        comm_total=sum(iv.duration for iv in every if iv.stream == COMM_STREAM),
        comm_busy=length(comm),
        exposed_comm=length(exposed),
        graphs=per_graph,
        gaps=gaps,
        exposed_segments=exposed,
    )


def timeline_stats(timeline: Timeline) -> dict[int, RankStats]:
    return {rank: rank_stats(timeline, rank) for rank in sorted(timeline.ranks)}
