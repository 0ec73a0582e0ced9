"""Profile the first calls of a compiled graph, then hand what they cost to the planner.

``ProfiledGraph`` is the callable AOTAutograd holds for a graph under profile-guided planning
(``profile_steps > 0``). Its calls, counted per graph:

    call 0                      runs as compiled (first-call work: allocations, autotuning)
    calls 1 .. steps            profiled (``CallProfiler``): task timings, a torch.profiler
                                trace of the call, or both
    call steps + 1              before it runs, ``decide(samples)`` re-plans from the samples
                                and may return a new compiled function, which runs from then on

Every rank calls each graph equally often and in the same order, so every rank reaches the
decision of a graph at the same point, which is what lets the decision agree through the store.
The samples are collected on every rank (the steps then run alike everywhere); rank 0's decide.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from graphsched.runtime.recorder import StepRecorder, TaskTiming


@dataclass(frozen=True)
class ProfileSchedule:
    """Which calls of a graph are profiled: ``steps`` calls after ``warmup`` unprofiled ones."""

    steps: int
    warmup: int = 1

    @property
    def decide_at(self) -> int:
        """The call before which the graph is re-planned."""
        return self.warmup + self.steps

    def profiles(self, call: int) -> bool:
        return self.warmup <= call < self.decide_at


@dataclass
class CallSample:
    """What one profiled call recorded: the annotation it ran under, its task timings (the aten
    executor's recorder) and its trace (Chrome-trace events), whichever were taken."""

    label: str
    recorder: StepRecorder | None = None
    trace: list[dict[str, Any]] | None = None
    #: host seconds the call took, profiling included
    wall_s: float = 0.0

    def timings(self) -> list[TaskTiming] | None:
        """The task timings (resolving CUDA events synchronizes); None when none were taken."""
        return None if self.recorder is None else self.recorder.finish()


def _chrome_events(prof: Any) -> list[dict[str, Any]]:
    fd, path = tempfile.mkstemp(prefix="graphsched-profile-", suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            data = json.load(f)
    finally:
        os.unlink(path)
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    return [e for e in events if isinstance(e, dict)]


@dataclass
class CallProfiler:
    """Profiles one call. ``record_tasks``: attach a StepRecorder to the target (an executor with
    a ``recorder`` attribute); ``trace``: run the call under torch.profiler (CUDA activity on a
    GPU), bracketed by the annotation the sample names."""

    device: torch.device
    record_tasks: bool = False
    trace: bool = False
    rank: int = 0

    def run(self, target: Callable[[list[Any]], Any], args: list[Any], label: str) -> tuple[Any, CallSample]:
        from graphsched.compat import profiler_enabled

        sample = CallSample(label)
        recorder = None
        # A recorder the user attached (graphsched.record) stays; this call is then not sampled.
        if self.record_tasks and getattr(target, "recorder", "absent") is None:
            recorder = StepRecorder(rank=self.rank)
            target.recorder = recorder  # type: ignore[attr-defined]
        cuda = self.device.type == "cuda"
        t0 = time.perf_counter()
        try:
            if self.trace and not profiler_enabled():
                from torch.profiler import ProfilerActivity, profile, record_function

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                with profile(activities=activities) as prof:
                    with record_function(label):
                        out = target(args)
                    if cuda:
                        # Work still running when the profiler stops is not in its trace.
                        torch.cuda.synchronize(self.device)
                sample.trace = _chrome_events(prof)
            else:
                out = target(args)
        finally:
            if recorder is not None:
                target.recorder = None  # type: ignore[attr-defined]
        sample.recorder = recorder
        sample.wall_s = time.perf_counter() - t0
        return out, sample


@dataclass
class GraphCallTimer:
    """Times every call of the graphs it is attached to (``ProfiledGraph.timer``): CUDA events on
    the caller's stream on a GPU, the host clock elsewhere. ``seconds()`` resolves them."""

    device: torch.device
    _marks: list[tuple[str, Any, Any]] = field(default_factory=list)

    def _mark(self) -> Any:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def around(self, name: str, call: Callable[[], Any]) -> Any:
        start = self._mark()
        out = call()
        self._marks.append((name, start, self._mark()))
        return out

    def seconds(self) -> dict[str, list[float]]:
        """graph name -> the seconds of each timed call, in call order."""
        if self.device.type == "cuda" and self._marks:
            torch.cuda.synchronize(self.device)
        out: dict[str, list[float]] = {}
        for name, a, b in self._marks:
            out.setdefault(name, []).append(a.elapsed_time(b) / 1e3 if self.device.type == "cuda" else b - a)
        return out

    def clear(self) -> None:
        self._marks.clear()


class ProfiledGraph:
    """A compiled graph (AOTAutograd's boxed calling convention) profiled over its first calls,
    then re-planned once (see the module doc)."""

    def __init__(
        self,
        name: str,
        target: Callable[[list[Any]], Any],
        schedule: ProfileSchedule,
        profiler: CallProfiler,
        decide: Callable[[list[CallSample]], Callable[[list[Any]], Any] | None] | None,
    ) -> None:
        # Instance attribute: AOTAutograd copies __dict__ (functools.wraps), not class attributes.
        self._boxed_call = True
        self.name = name
        self.target = target
        self.schedule = schedule
        self.profiler = profiler
        #: The decision, made once before call ``schedule.decide_at`` (kept for inspection); None:
        #: nothing to decide (costs came from the cache), the calls only run (and can be timed).
        self.decide = decide
        self.decided = decide is None
        self.samples: list[CallSample] = []
        self.calls = 0
        self.profiled_calls = 0
        #: A GraphCallTimer to time each call (None: not timed).
        self.timer: GraphCallTimer | None = None
        #: Seconds the decision took (re-planning and any recompile), once made.
        self.decide_s: float | None = None

    def install(self, target: Callable[[list[Any]], Any]) -> None:
        """Run ``target`` from the next call on (a graph compiled for another plan)."""
        self.target = target

    def __call__(self, args: list[Any]) -> Any:
        call = self.calls
        self.calls += 1
        if not self.decided and call >= self.schedule.decide_at:
            self.decided = True
            samples, self.samples = self.samples, []
            t0 = time.perf_counter()
            new = self.decide(samples) if self.decide is not None else None
            self.decide_s = time.perf_counter() - t0
            if new is not None:
                self.target = new
        if not self.decided and self.schedule.profiles(call):
            out, sample = self.profiler.run(self.target, args, f"graphsched/{self.name}/call{call}")
            self.samples.append(sample)
            self.profiled_calls += 1
            return out
        if self.timer is not None:
            return self.timer.around(self.name, lambda: self.target(args))
        return self.target(args)
