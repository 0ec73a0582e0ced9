"""A text summary of timelines: step time, communication total and exposed, overlap, compute gaps,
and, with both a predicted and a measured timeline, the error report (``report.py``)."""

from __future__ import annotations

from typing import Any

from graphsched.analysis.provenance import describe_sources
from graphsched.timelines.model import Timelines, TimelinesLike
from graphsched.timelines.report import error_report
from graphsched.timelines.stats import RankStats, timeline_stats


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _chunks(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{region}={n}" for region, n in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _plan_lines(options: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for graph, opts in options.items():
        parts = [f"schedule {opts.get('schedule', '?')}"]
        if "status" in opts:
            parts.append(f"{opts.get('method', '?')} ({opts['status']})")
        if "chunks" in opts:
            parts.append(f"chunks per region: {_chunks(opts['chunks'])}")
        if isinstance(opts.get("costs"), dict) and opts["costs"].get("summary"):
            parts.append(f"costs: {describe_sources(opts['costs']['summary'])}")
        lines.append(f"  {graph}: " + "; ".join(parts))
    return lines


def summarize(timelines: TimelinesLike, max_gaps: int = 5) -> str:
    """Figures per source and rank, per graph of the slowest rank, and its largest compute gaps."""
    tls = Timelines.of(timelines)
    stats = {tl.source: timeline_stats(tl) for tl in tls}
    lines = ["graphsched timeline (times in ms)"]
    lines.append(
        f"{'source':<10} {'rank':>4} {'step':>9} {'compute':>9} {'comm':>9} {'exposed':>9} {'hidden':>9} {'overlap':>8}"
    )
    for source, per_rank in stats.items():
        for rank, s in per_rank.items():
            lines.append(
                f"{source:<10} {rank:>4} {_ms(s.step_time):>9} {_ms(s.compute_busy):>9} {_ms(s.comm_total):>9} "
                f"{_ms(s.exposed_comm):>9} {_ms(s.hidden_comm):>9} {s.overlap_ratio:>8.0%}"
            )
    slowest: dict[str, RankStats] = {
        source: max(per_rank.values(), key=lambda s: s.step_time) for source, per_rank in stats.items() if per_rank
    }
    if "predicted" in slowest and "measured" in slowest and slowest["predicted"].step_time > 0:
        p, m = slowest["predicted"], slowest["measured"]
        lines.append(
            f"step time: predicted {_ms(p.step_time)} ms, measured {_ms(m.step_time)} ms "
            f"(measured / predicted = {m.step_time / p.step_time:.2f})"
        )
    for source, s in slowest.items():
        lines.append(f"\n{source}, rank {s.rank} (the slowest rank):")
        for g in s.graphs:
            lines.append(
                f"  {g.graph:<16} span {_ms(g.span):>9}  compute {_ms(g.compute_busy):>9}  "
                f"comm {_ms(g.comm_total):>9}  exposed {_ms(g.exposed_comm):>9}"
            )
        if s.gaps:
            lines.append(f"  largest compute gaps ({len(s.gaps)} in all, {_ms(sum(g.duration for g in s.gaps))} ms idle):")
        for gap in s.gaps[:max_gaps]:
            where = f"after {gap.after or 'graph start'}, before {gap.before or 'graph end'}"
            waiting = f"; waiting on {', '.join(gap.waiting_on)}" if gap.waiting_on else ""
            lines.append(
                f"    {_ms(gap.duration):>9}  {gap.graph} at {_ms(gap.start)}: {where}{waiting}"
            )
    if tls.predicted is not None and tls.measured is not None and tls.measured.ranks and tls.predicted.ranks:
        lines.append("\n" + error_report(tls))
    for tl in tls:
        if tl.options:
            lines.append(f"\nplans ({tl.source}):")
            lines += _plan_lines(tl.options)
            break
    return "\n".join(lines)
