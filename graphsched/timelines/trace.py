"""Timelines as Chrome trace-event JSON (open in https://ui.perfetto.dev or chrome://tracing).

One process per rank and source, named ``rank N (predicted)`` / ``rank N (measured)``, each with a
``compute`` and a ``comm`` thread. Every task is a complete ("X") event named after the task, with
its graph, phase, kind and lane in ``args``; a flow arrow ("s" -> "f") links each collective to the
wait that completes it. Times are microseconds from the rank's step start.

The events carry everything a Timeline holds, so :func:`timelines_from_trace` reads a trace written
here back (``graphsched inspect trace.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from graphsched.errors import ConfigError
from graphsched.plan import COMM_STREAM, COMPUTE_STREAM
from graphsched.timelines.model import ISSUE, SOURCES, WAIT, Interval, Timeline, Timelines, TimelinesLike

#: Thread id of each lane inside a process.
TIDS = {COMPUTE_STREAM: 1, COMM_STREAM: 2}


def pid_of(rank: int, source: str) -> int:
    """Process ids group a rank's predicted and measured processes next to each other."""
    return 1 + len(SOURCES) * rank + SOURCES.index(source)


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def _metadata(pid: int, rank: int, source: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": pid, "tid": 0, "name": "process_name", "args": {"name": f"rank {rank} ({source})"}},
        {"ph": "M", "pid": pid, "tid": 0, "name": "process_sort_index", "args": {"sort_index": pid}},
    ]
    for lane, tid in TIDS.items():
        events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": lane}})
        events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
    return events


def to_chrome_trace(timelines: TimelinesLike) -> dict[str, Any]:
    """The trace-event JSON object of ``timelines`` (every rank of every source)."""
    events: list[dict[str, Any]] = []
    flow_id = 0
    options: dict[str, Any] = {}
    for tl in Timelines.of(timelines):
        options[tl.source] = tl.options
        for rank in sorted(tl.ranks):
            pid = pid_of(rank, tl.source)
            events += _metadata(pid, rank, tl.source)
            for graph, ivs in tl.ranks[rank].items():
                waits = {iv.name: iv for iv in ivs if iv.kind == WAIT}
                for iv in ivs:
                    tid = TIDS.get(iv.stream, TIDS[COMPUTE_STREAM])
                    args = {
                        "graph": graph, "phase": iv.phase, "kind": iv.kind, "stream": iv.stream,
                        "source": tl.source, "rank": rank,
                    }
                    if iv.wait is not None:
                        args["wait"] = iv.wait
                    events.append({
                        "name": iv.name, "cat": iv.phase, "ph": "X", "ts": _us(iv.start),
                        "dur": round(max(0.0, _us(iv.end) - _us(iv.start)), 3), "pid": pid, "tid": tid, "args": args,
                    })
                    wait = waits.get(iv.wait or "")
                    if iv.kind == ISSUE and wait is not None:
                        flow_id += 1
                        common = {"name": "collective", "cat": "collective", "id": flow_id, "pid": pid}
                        events.append({**common, "ph": "s", "ts": _us(iv.start), "tid": tid})
                        events.append({**common, "ph": "f", "bp": "e", "ts": _us(wait.start),
                                       "tid": TIDS[COMPUTE_STREAM]})
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"generator": "graphsched", "options": options},
    }


def write_chrome_trace(path: str | Path, timelines: TimelinesLike) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_chrome_trace(timelines)))
    return path


def timelines_from_trace(trace: Mapping[str, Any]) -> Timelines:
    """Read back a trace written by :func:`to_chrome_trace`."""
    found: dict[str, Timeline] = {}
    for ev in trace.get("traceEvents", []):
        args = ev.get("args", {})
        if ev.get("ph") != "X" or "source" not in args:
            continue
        tl = found.setdefault(args["source"], Timeline(args["source"]))
        start = ev["ts"] / 1e6
        iv = Interval(ev["name"], args["stream"], args["kind"], args["phase"], start, start + ev["dur"] / 1e6,
                      args.get("wait"))
        tl.ranks.setdefault(int(args["rank"]), {}).setdefault(args["graph"], []).append(iv)
    if not found:
        raise ConfigError(
            "this trace has no graphsched events (complete events whose args name source, rank and "
            "graph); pass a trace written by graphsched (graphsched demo or inspect --trace)."
        )
    for source, tl in found.items():
        tl.options = dict(trace.get("otherData", {}).get("options", {}).get(source, {}))
        tl.ranks = dict(sorted(tl.ranks.items()))
    return Timelines.of(list(found.values()))
