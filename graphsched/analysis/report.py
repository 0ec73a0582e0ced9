"""A readable text report of what graphsched captured and found (``graphsched.explain``)."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from graphsched.analysis.graph import GraphAnalysis
from graphsched.analysis.labels import NodeKind, Phase
from graphsched.analysis.provenance import describe_sources


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def graph_summary(a: GraphAnalysis, max_collectives: int = 12) -> list[str]:
    kinds = Counter(a.node(n).kind for n in a.order)
    lines = [
        f"{a.name} [{a.graph_kind.value}] {len(a.order)} nodes: "
        + ", ".join(f"{k.value} {kinds.get(k, 0)}" for k in NodeKind if k not in (NodeKind.PLACEHOLDER, NodeKind.OUTPUT)),
    ]
    phase_cost: dict[Phase, float] = {}
    phase_count: Counter[Phase] = Counter()
    for n in a.order:
        info = a.node(n)
        if info.kind == NodeKind.COMPUTE and info.phase is not None:
            phase_cost[info.phase] = phase_cost.get(info.phase, 0.0) + info.cost
            phase_count[info.phase] += 1
    lines.append(
        "  compute by phase: "
        + ", ".join(f"{p.value} {phase_count[p]} nodes ({_ms(phase_cost[p])})" for p in Phase if phase_count[p])
    )
    lines.append(f"  costs: {describe_sources(a.cost_summary())}")
    comm = sum(c.cost for c in a.collectives)
    lines.append(
        f"  collectives: {len(a.collectives)}, est. {_ms(comm)} of communication"
        + (f"; compute beside one runs {a.contention:.3f}x longer" if a.contention != 1.0 else "")
    )
    for c in a.collectives[:max_collectives]:
        hidden = min(c.cost, c.independent_cost)
        lines.append(
            f"    {c.issue:<24} {c.op.split('::')[-1]:<20} {_bytes(c.nbytes):>10}  est {_ms(c.cost)}; "
            f"independent compute: {len(c.independent)} nodes, {_ms(c.independent_cost)}"
            + (f" (dW {_ms(c.independent_weight_grad_cost)})" if c.independent_weight_grad_cost else "")
            + f"; could hide {_ms(hidden)}"
        )
    if len(a.collectives) > max_collectives:
        lines.append(f"    ... {len(a.collectives) - max_collectives} more")
    return lines


def render_report(analyses: Sequence[GraphAnalysis], header: str) -> str:
    lines = [header]
    for a in analyses:
        lines.extend(graph_summary(a))
    return "\n".join(lines)
