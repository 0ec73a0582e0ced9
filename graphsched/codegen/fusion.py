"""Fusion that respects the plan: inductor's choices with graphsched's segment check first."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from graphsched.codegen.snodes import origin_names
from graphsched.plan import Plan, TaskKind


@dataclass
class PlanSegments:
    """The plan cut at every collective issue and wait: fusion stays inside one segment.

    Inductor fuses before the order pass runs. A kernel that joins work planned on two sides of a
    collective's issue or wait must run at the later side: a deferred weight gradient leaves its
    all-to-all window, or (chunked) chunk 0's experts fused with chunk 1's wait for chunk 1's
    dispatch, so chunk 0's combine is issued late and nothing overlaps. Refusing exactly those
    fusions keeps every other fusion inductor would make.
    """

    plan: Plan
    refused: int = 0
    _segment_of: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        position = {name: i for i, t in enumerate(self.plan.tasks) for name in t.nodes}
        # Every issue and wait task of the plan, the waits of a sliced (chunked) output included.
        cuts = [
            i for i, t in enumerate(self.plan.tasks)
            if t.kind in (TaskKind.COLLECTIVE_ISSUE, TaskKind.COLLECTIVE_WAIT)
        ]
        self._segment_of = {name: bisect.bisect_right(cuts, p) for name, p in position.items()}

    def segments(self, snode: Any) -> set[int]:
        return {self._segment_of[o] for o in origin_names(snode) if o in self._segment_of}

    def allows(self, node1: Any, node2: Any) -> bool:
        s1, s2 = self.segments(node1), self.segments(node2)
        if len(s1 | s2) <= 1 or s1 == s2:
            return True
        self.refused += 1
        return False


def plan_choices(guard: PlanSegments) -> Any:
    """Inductor's heuristics with ``guard`` consulted first, installed for one compile."""
    from graphsched.compat import V, InductorChoices

    class _PlanChoices(InductorChoices):
        def can_fuse(self, scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:  # type: ignore[override]
            return guard.allows(node1, node2) and InductorChoices.can_fuse(
                scheduler, node1, node2, shared_data_score
            )

    return V.set_choices_handler(_PlanChoices())
