"""A Gantt chart of timelines as PNG (matplotlib's Agg canvas: no display, no global backend).

One panel per source, predicted above measured (each with its own time axis: predicted and measured
times may differ a lot). Per rank a compute lane (coloured by phase: forward, dX, dW; waits grey)
and a comm lane. Exposed communication (comm time while the compute lane is idle) is shaded red
across the rank's lanes. Each panel's title gives step time, communication total and exposed.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from graphsched.plan import COMM_STREAM, Phase
from graphsched.timelines.model import WAIT, Timelines, TimelinesLike
from graphsched.timelines.stats import timeline_stats

PHASE_COLOURS = {Phase.FORWARD: "#4c72b0", Phase.INPUT_GRAD: "#dd8452", Phase.WEIGHT_GRAD: "#55a868"}
WAIT_COLOUR = "#b0b0b0"
COMM_COLOUR = "#8172b3"
EXPOSED_COLOUR = "#d62728"
_LABELS = {Phase.FORWARD: "forward", Phase.INPUT_GRAD: "dX (input grad)", Phase.WEIGHT_GRAD: "dW (weight grad)"}


def _colour(stream: str, kind: str, phase: str) -> str:
    if stream == COMM_STREAM:
        return COMM_COLOUR
    if kind == WAIT:
        return WAIT_COLOUR
    return PHASE_COLOURS.get(phase, "#937860")


def write_gantt_png(path: str | Path, timelines: TimelinesLike, dpi: int = 100, width_in: float = 14.0) -> Path:
    tls = list(Timelines.of(timelines))
    if not tls:
        raise ValueError("write_gantt_png needs at least one timeline.")
    heights = [1.2 + 0.7 * 2 * max(1, len(tl.ranks)) for tl in tls]
    fig = Figure(figsize=(width_in, sum(heights) + 0.8), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(tls), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, tl in zip(axes, tls):
        stats = timeline_stats(tl)
        ticks, labels = [], []
        for k, rank in enumerate(sorted(tl.ranks)):
            y_compute, y_comm = 2 * k, 2 * k + 1
            ticks += [y_compute, y_comm]
            labels += [f"rank {rank} compute", f"rank {rank} comm"]
            bars: dict[tuple[float, str], list[tuple[float, float]]] = {}
            for _graph, iv in tl.intervals(rank):
                if iv.end <= iv.start:
                    continue
                y = y_comm if iv.stream == COMM_STREAM else y_compute
                bars.setdefault((y, _colour(iv.stream, iv.kind, iv.phase)), []).append(
                    (iv.start * 1e3, (iv.end - iv.start) * 1e3)
                )
            for (y, colour), spans in bars.items():
                ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=colour, linewidth=0, zorder=2)
            exposed = [(s * 1e3, (e - s) * 1e3) for s, e in stats[rank].exposed_segments]
            if exposed:
                ax.broken_barh(exposed, (y_compute - 0.5, 2.0), facecolors=EXPOSED_COLOUR, alpha=0.25,
                               linewidth=0, zorder=1)
            # Graph boundaries per rank: ranks start their graphs at different times.
            for graph, (start, _end) in tl.graph_spans(rank).items():
                ax.vlines(start * 1e3, y_compute - 0.5, y_comm + 0.5, colors="black", linewidth=0.6,
                          linestyles=":", zorder=3)
                if k == 0:
                    ax.annotate(graph, (start * 1e3, -0.5), xytext=(2, 2), textcoords="offset points",
                                fontsize=8, va="bottom")
        ax.set_yticks(ticks, labels)
        ax.set_ylim(2 * max(1, len(tl.ranks)) - 0.5, -0.9)
        ax.set_xlabel(f"{tl.source} time (ms)")
        ax.grid(axis="x", alpha=0.3)
        worst = max(stats.values(), key=lambda s: s.step_time, default=None)
        if worst is not None:
            ax.set_title(
                f"{tl.source}: step {worst.step_time * 1e3:.3f} ms, communication "
                f"{worst.comm_total * 1e3:.3f} ms, exposed {worst.exposed_comm * 1e3:.3f} ms "
                f"({worst.overlap_ratio:.0%} hidden; rank {worst.rank})",
                fontsize=10,
            )
    handles = [Patch(color=c, label=_LABELS[p]) for p, c in PHASE_COLOURS.items()]
    handles += [
        Patch(color=WAIT_COLOUR, label="wait (compute blocked)"),
        Patch(color=COMM_COLOUR, label="communication"),
        Patch(color=EXPOSED_COLOUR, alpha=0.25, label="exposed communication"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
    fig.suptitle("graphsched timeline")
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path
