"""Record when each task of a plan ran, per stream (off by default; no cost when off).

On CPU the host clock brackets each task; a collective's interval runs from its issue to the end
of its wait (gloo moves the bytes on its own threads in between). On CUDA, events are recorded on
the task's stream around it and read after a synchronize at the end of the step; a collective's
interval ends at the event recorded after its wait on the compute stream (an upper bound: the
transfer may have finished earlier).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskTiming:
    graph: str
    task: str
    stream: str
    kind: str
    phase: str
    start_s: float
    end_s: float


@dataclass
class StepRecorder:
    """Collects TaskTimings from every executor it is attached to, for one or more steps."""

    rank: int = 0
    timings: list[TaskTiming] = field(default_factory=list)
    #: graph name -> the Plan its timings were recorded under (set by ``graphsched.record``): the
    #: plan names which wait completes each collective, which the timings alone do not say.
    plans: dict[str, Any] = field(default_factory=dict)
    #: CUDA: (graph, task, stream, kind, phase, start event, end event), resolved by ``finish``.
    _pending: list[tuple[Any, ...]] = field(default_factory=list)
    _origin_event: Any = None
    _origin_s: float = field(default_factory=time.perf_counter)

    def now(self) -> float:
        return time.perf_counter() - self._origin_s

    def add(self, graph: str, task: str, stream: str, kind: str, phase: str, start_s: float, end_s: float) -> None:
        self.timings.append(TaskTiming(graph, task, stream, kind, phase, start_s, end_s))

    def origin_event(self) -> Any:
        import torch

        if self._origin_event is None:
            self._origin_event = torch.cuda.Event(enable_timing=True)
            self._origin_event.record()
        return self._origin_event

    def add_events(self, graph: str, task: str, stream: str, kind: str, phase: str, start: Any, end: Any) -> None:
        self.origin_event()
        self._pending.append((graph, task, stream, kind, phase, start, end))

    def finish(self) -> list[TaskTiming]:
        """Resolve CUDA events (synchronizes) and return every timing, sorted by start."""
        if self._pending:
            import torch

            torch.cuda.synchronize()
            origin = self._origin_event
            for graph, task, stream, kind, phase, start, end in self._pending:
                self.add(graph, task, stream, kind, phase,
                         origin.elapsed_time(start) / 1e3, origin.elapsed_time(end) / 1e3)
            self._pending.clear()
        self.timings.sort(key=lambda t: (t.start_s, t.end_s))
        return self.timings
