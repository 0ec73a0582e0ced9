"""Read one profiled graph call out of ``torch.profiler``'s Chrome-trace events.

The runtime brackets each profiled call with a user annotation (``record_function(label)``) and
exports the profile as Chrome-trace JSON (``export_chrome_trace``); :func:`call_trace` turns its
``traceEvents`` into a :class:`CallTrace`: the call's top-level host ops in the order they ran
(those directly inside the annotation, on its thread), and every device activity (``kernel``,
``gpu_memcpy``, ``gpu_memset``) linked to one of them.

A device activity is linked through its ``correlation`` to the runtime or driver call that
launched it (``cuda_runtime`` / ``cuda_driver`` events, on the host thread) and from there, by
time, to the top-level op that was running; failing that, through its ``External id`` to a host
op. A launch made outside every top-level op (a kernel launched without a profiler op of its own)
becomes an op named after the kernel, at its launch's place. Without device activities (a CPU
run, whose kernels are host functions) the top-level ops are themselves the activities.

The Chrome-trace format (``ph: "X"`` events with ``ts``/``dur`` in microseconds, ``cat``,
``args``) is what every torch since 1.8 exports, on CPU and CUDA alike; nothing else of the
profiler is read.
"""

from __future__ import annotations

import bisect
from typing import Any, Iterable, Mapping

from graphsched.analysis.step_costs import Activity, CallTrace, op_key

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
HOST_CATEGORIES = ("cpu_op", "user_annotation")
_US = 1e-6


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _span(ev: Mapping[str, Any]) -> tuple[float, float]:
    ts = _num(ev.get("ts"))
    return ts, ts + _num(ev.get("dur"))


def _complete(events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in events if isinstance(e, Mapping) and e.get("ph") == "X"]


def _transparent(name: str) -> bool:
    """Scopes that wrap a whole compiled call (inductor's ``## Call CompiledFxGraph ... ##`` and
    its optional wrapper mark): their children are the call's ops."""
    return (name.startswith("## ") and name.endswith(" ##")) or name.endswith("_inductor_wrapper_call")


def _top_level(host: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The outermost host ops (sorted by start, longest first), looking through transparent scopes."""
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    stack: list[int] = []
    for i, e in enumerate(host):
        s, _ = _span(e)
        while stack and s >= _span(host[stack[-1]])[1]:
            stack.pop()
        (children.setdefault(stack[-1], []) if stack else roots).append(i)
        stack.append(i)

    out: list[Mapping[str, Any]] = []

    def visit(ids: list[int]) -> None:
        for i in ids:
            if _transparent(str(host[i].get("name", ""))):
                visit(children.get(i, []))
            else:
                out.append(host[i])

    visit(roots)
    return out


def call_trace(events: Iterable[Mapping[str, Any]], label: str) -> CallTrace | None:
    """The call bracketed by the annotation ``label`` (None when the trace has no such annotation)."""
    evs = _complete(events)
    ann = next((e for e in evs if e.get("cat") == "user_annotation" and e.get("name") == label), None)
    if ann is None:
        return None
    a0, a1 = _span(ann)
    where = (ann.get("pid"), ann.get("tid"))
    host = [
        e for e in evs
        if e is not ann and e.get("cat") in HOST_CATEGORIES and (e.get("pid"), e.get("tid")) == where
        and a0 <= _num(e.get("ts")) <= a1
    ]
    host.sort(key=lambda e: (_num(e.get("ts")), -_num(e.get("dur"))))
    top = _top_level(host)
    starts = [_span(e)[0] for e in top]

    def enclosing(ts: float) -> int | None:
        i = bisect.bisect_right(starts, ts) - 1
        if i >= 0 and ts <= _span(top[i])[1]:
            return i
        return None

    launches = {
        e.get("args", {}).get("correlation"): e for e in evs
        if e.get("cat") in LAUNCH_CATEGORIES and (e.get("pid"), e.get("tid")) == where
        and e.get("args", {}).get("correlation") is not None
    }
    by_external: dict[Any, Mapping[str, Any]] = {}
    for e in host:
        ext = e.get("args", {}).get("External id")
        if ext is not None:
            by_external.setdefault(ext, e)
    # (launch time, op index or None, device event)
    linked: list[tuple[float, int | None, Mapping[str, Any]]] = []
    for e in evs:
        if e.get("cat") not in DEVICE_CATEGORIES:
            continue
        args = e.get("args", {})
        launch = launches.get(args.get("correlation"))
        if launch is not None:
            ts = _num(launch.get("ts"))
            if not a0 <= ts <= a1:
                continue  # launched by another call
            linked.append((ts, enclosing(ts), e))
            continue
        op = by_external.get(args.get("External id"))
        if op is not None:
            ts = _num(op.get("ts"))
            linked.append((ts, enclosing(ts), e))
    if not linked:
        ops = [op_key(str(e.get("name", ""))) for e in top]
        acts = [
            Activity(ops[i], f"host:{e.get('tid')}", _span(e)[0] * _US, _num(e.get("dur")) * _US, i)
            for i, e in enumerate(top)
        ]
        return CallTrace(ops, acts)
    # Launches outside every top-level op get an op of their own, named after their kernel.
    linked.sort(key=lambda x: x[0])
    orphan_times = [ts for ts, i, _ev in linked if i is None]
    entries = [(starts[i], 0, i) for i in range(len(top))] + [
        (ts, 1, len(top) + k) for k, ts in enumerate(orphan_times)
    ]
    entries.sort(key=lambda x: (x[0], x[1]))
    position = {key: pos for pos, (_ts, _o, key) in enumerate(entries)}
    orphan_names = [op_key(str(ev.get("name", ""))) for _ts, i, ev in linked if i is None]
    ops = [op_key(str(top[key].get("name", ""))) if key < len(top) else orphan_names[key - len(top)]
           for _ts, _o, key in entries]
    acts: list[Activity] = []
    orphan = 0
    for _ts, i, ev in linked:
        if i is None:
            op = position[len(top) + orphan]
            orphan += 1
        else:
            op = position[i]
        stream = ev.get("args", {}).get("stream", ev.get("tid"))
        acts.append(Activity(str(ev.get("name", "")), f"stream:{stream}", _span(ev)[0] * _US,
                             _num(ev.get("dur")) * _US, op))
    return CallTrace(ops, acts)
