"""What the GPU's streams did during one step: the kernel-level check of overlap.

``python -m benchmarks.run ... --profile-dir DIR`` profiles one step of every variant after timing
(``torch.profiler``, CUDA activity) and writes ``DIR/<preset>_<variant>.trace.json`` (open in
Perfetto / chrome://tracing) and a summary into the result: per stream the busy time, how much of
the link's busy time (its copy stream) overlaps compute kernels, and the idle gaps of the compute
stream while the link is busy. The step time says *that* communication is exposed; this says
*where*.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def stream_summary(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary of trace events (``ph == "X"`` device events with ``tid`` = stream, ``ts``/``dur`` in
    us): the busiest stream is compute, the stream of memcpy events is the link."""
    by_stream: dict[Any, list[tuple[float, float]]] = {}
    copies: dict[Any, int] = {}
    for ev in events:
        if ev.get("ph") != "X" or ev.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        s = float(ev["ts"])
        by_stream.setdefault(ev.get("tid"), []).append((s, s + float(ev.get("dur", 0.0))))
        if ev.get("cat") == "gpu_memcpy":
            copies[ev.get("tid")] = copies.get(ev.get("tid"), 0) + 1
    if not by_stream:
        return {"error": "no device events in the profile"}
    busy = {k: _union(v) for k, v in by_stream.items()}
    link = max(copies, key=copies.get) if copies else None
    others = [k for k in busy if k != link]
    compute = max(others, key=lambda k: _length(busy[k])) if others else None
    start = min(iv[0][0] for iv in busy.values() if iv)
    end = max(iv[-1][1] for iv in busy.values() if iv)
    out: dict[str, Any] = {
        "span_ms": (end - start) / 1e3,
        "streams": {str(k): {"busy_ms": _length(v) / 1e3, "events": len(by_stream[k])} for k, v in busy.items()},
        "compute_stream": str(compute), "link_stream": str(link),
    }
    if compute is not None and link is not None:
        c, l = busy[compute], busy[link]
        both = _intersect(c, l)
        out["compute_busy_ms"] = _length(c) / 1e3
        out["link_busy_ms"] = _length(l) / 1e3
        out["link_overlapped_ms"] = both / 1e3
        out["link_exposed_ms"] = (_length(l) - both) / 1e3
    return out


def profile_one_step(step: Callable[[], None], path: str) -> dict[str, Any]:
    """Run ``step`` once under the profiler; write the trace to ``path``; return its summary."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    summary = stream_summary(events)
    summary["trace"] = os.path.basename(path)
    return summary
