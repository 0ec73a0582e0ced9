"""Where a node's cost number came from, and a summary of those sources per graph.

Three classes, from the most to the least trustworthy for predicting a step:

* ``measured_in_step``: attributed from the profiled training steps of the compiled graph (the
  kernels and collectives that really ran, in the order they ran, with their launch gaps);
* ``measured_alone``: the op timed by itself on the device (``analysis/profiler.py``), or a
  collective priced by the process group's microbenchmark;
* ``estimated``: a model (FLOPs and bytes, fused-kernel bytes, the analytic link).

The summary (count and time share of each class) is what ``graphsched.explain`` and the timeline
summary print; it is plain JSON so that it travels in ``Plan.options``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Iterable, Mapping


class CostSource(str, Enum):
    """The provenance of one cost number (a string-valued enum: JSON writes the plain string)."""

    MEASURED_IN_STEP = "measured_in_step"
    MEASURED_ALONE = "measured_alone"
    ESTIMATED = "estimated"

    __str__ = str.__str__
    __format__ = str.__format__


#: How each class is named in text output.
_LABEL = {
    CostSource.MEASURED_IN_STEP: "measured in the step",
    CostSource.MEASURED_ALONE: "measured alone",
    CostSource.ESTIMATED: "estimated",
}


def source_summary(items: Iterable[tuple[float, str]]) -> dict[str, dict[str, float]]:
    """``{source: {"nodes": count, "seconds": total, "share": fraction of all seconds}}`` over
    (cost, source) pairs; every class is present, with zeros where no node has it."""
    out: dict[str, dict[str, float]] = {s.value: {"nodes": 0, "seconds": 0.0, "share": 0.0} for s in CostSource}
    for cost, source in items:
        entry = out[CostSource(source).value]
        entry["nodes"] += 1
        entry["seconds"] += float(cost)
    total = sum(e["seconds"] for e in out.values())
    for e in out.values():
        e["share"] = e["seconds"] / total if total > 0 else 0.0
    return out


def describe_sources(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """One line: ``measured in the step 120 nodes (85%), measured alone 30 (10%), estimated 40 (5%)``."""
    parts = []
    for s in CostSource:
        e = summary.get(s.value) or {}
        nodes = int(e.get("nodes", 0))
        share = float(e.get("share", 0.0))
        parts.append(f"{_LABEL[s]} {nodes} node{'s' if nodes != 1 else ''} ({share:.0%} of the time)")
    return ", ".join(parts)
