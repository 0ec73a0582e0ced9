"""Node costs from profiled steps: what each task really took in the step that runs.

Pure functions from recorded data to per-node seconds; nothing here runs anything. Two inputs:

* **task timings** (the aten executor's ``StepRecorder``: one interval per plan task and per
  collective, CUDA events on GPU, the host clock on CPU): :func:`task_step_costs`;
* **call traces** (``torch.profiler`` of one compiled-graph call, as :class:`CallTrace`: the call's
  top-level ops in launch order and the kernels, copies and collectives they launched) matched to
  the **launch sites** of the compiled code (:class:`LaunchSite`: each kernel call of the wrapper
  and the plan nodes it computes): :func:`kernel_step_costs`.

Each profiled call gives one number per node; a node's cost is the median over the calls. A task's
(or kernel's) time is split over its nodes in proportion to their current estimates (the ratio
inside a fused kernel cannot be measured, its sum can), so a plan that groups the same nodes into
other tasks still gets the measured sums.

Rules that decide what is measured (docs/costs.md says why):

* **Launch gaps fold into the work after them.** A stream idle between two pieces of work of one
  call waited for the host to launch the next one; the scheduler's simulator has no launch model,
  so that time belongs to the work that waited for it. Not after a collective's wait (the stream
  may have been blocked on the transfer, which the simulator derives from the dependencies).
* **A collective's time** is the busy time of the work it launched (the link's copies, the NCCL
  kernel) when a trace has it. From task timings alone (CPU, or no trace): issue to the end of its
  wait when the wait blocked (the transfer ended there); when the wait did not block, the
  transfer ended somewhere before the wait began, so the estimate is kept, capped at that bound,
  and the node stays unmeasured.
* Wait tasks cost nothing (where the compute stream stalls follows from the dependencies).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from graphsched.analysis.provenance import CostSource
from graphsched.plan import Plan, TaskKind

#: A wait that took longer than this (and than BLOCKED_FRACTION of its collective's interval)
#: blocked its stream: the transfer ended when the wait did.
BLOCKED_MIN_S = 10e-6
BLOCKED_FRACTION = 0.02

ROLE_COMPUTE = "compute"
ROLE_COLLECTIVE = "collective"
ROLE_WAIT = "wait"
ROLES = (ROLE_COMPUTE, ROLE_COLLECTIVE, ROLE_WAIT)


@dataclass(frozen=True)
class Activity:
    """One piece of work of a profiled call: a kernel, copy or memset on a device stream, or (on
    CPU, where kernels are host functions) a host op. ``op``: the index in the call's top-level
    ops of the op that launched it."""

    name: str
    stream: str
    start_s: float
    duration_s: float
    op: int

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


@dataclass
class CallTrace:
    """One profiled call of a compiled graph: its top-level ops in launch order (names as
    :func:`op_key` gives them) and the work they launched."""

    ops: list[str]
    activities: list[Activity] = field(default_factory=list)


@dataclass(frozen=True)
class LaunchSite:
    """One launch of a compiled graph's code, in code order: a kernel call (its kernel's name), an
    extern or fallback op (the op's name, ``mm``), a collective or a wait; and the plan nodes it
    computes."""

    name: str
    nodes: tuple[str, ...]
    role: str = ROLE_COMPUTE

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"launch site {self.name!r}: role {self.role!r} is not one of {ROLES}")


@dataclass
class StepCosts:
    """Per-node seconds from profiled calls of one graph (JSON via to_dict / from_dict).

    ``costs`` may also hold numbers that are not measurements (a hidden collective's estimate
    capped by its bound); ``measured`` names the nodes whose number was measured in the step.
    ``details``: medians over the calls of what the attribution saw (attributed and unattributed
    seconds, folded launch gaps, matched and unmatched ops)."""

    costs: dict[str, float]
    measured: list[str]
    calls: int
    details: dict[str, float] = field(default_factory=dict)

    def sources(self) -> dict[str, CostSource]:
        return {n: CostSource.MEASURED_IN_STEP for n in self.measured}

    def to_dict(self) -> dict[str, Any]:
        return {"costs": self.costs, "measured": sorted(self.measured), "calls": self.calls,
                "details": self.details}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StepCosts":
        return cls({str(k): float(v) for k, v in data["costs"].items()}, [str(n) for n in data["measured"]],
                   int(data["calls"]), {str(k): float(v) for k, v in data.get("details", {}).items()})


# -- names -----------------------------------------------------------------------------------------

_GRAPH_PREFIX = re.compile(r"^graph_\d+_")


def op_key(name: str) -> str:
    """The name a launch is matched by: ``aten::mm`` -> ``mm``,
    ``_c10d_functional::all_to_all_single`` -> ``all_to_all_single``; kernel names stay (inductor's
    C++ kernels, profiled, carry a ``graph_<i>_`` prefix, dropped)."""
    name = _GRAPH_PREFIX.sub("", name.strip())
    return name.rsplit("::", 1)[-1]


def match_ops(ops: Sequence[str], sites: Sequence[LaunchSite]) -> list[int | None]:
    """For each top-level op of a call, the index of its launch site (None: no site).

    The k-th op of a name is the k-th site of that name: the code launches in its own order
    every call, and one kernel can be called from several sites (inductor reuses identical
    kernels), so names alone do not decide."""
    by_name: dict[str, list[int]] = {}
    for i, s in enumerate(sites):
        by_name.setdefault(s.name, []).append(i)
    seen: dict[str, int] = {}
    out: list[int | None] = []
    for name in ops:
        k = seen.get(name, 0)
        seen[name] = k + 1
        candidates = by_name.get(name, [])
        out.append(candidates[k] if k < len(candidates) else None)
    return out


# -- splitting ---------------------------------------------------------------------------------------


def split(seconds: float, nodes: Sequence[str], estimates: Mapping[str, float]) -> dict[str, float]:
    """``seconds`` over ``nodes`` in proportion to their estimates (equal shares when all are 0)."""
    if not nodes:
        return {}
    weights = [max(0.0, float(estimates.get(n, 0.0))) for n in nodes]
    total = sum(weights)
    if total <= 0:
        return {n: seconds / len(nodes) for n in nodes}
    return {n: seconds * w / total for n, w in zip(nodes, weights)}


def _add(into: dict[str, float], more: Mapping[str, float]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + v


def _medians(per_call: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = sorted({k for c in per_call for k in c})
    return {k: float(statistics.median(c.get(k, 0.0) for c in per_call)) for k in keys}


# -- kernels of a compiled graph -------------------------------------------------------------------


def kernel_call_costs(
    trace: CallTrace,
    sites: Sequence[LaunchSite],
    estimates: Mapping[str, float],
    issues: Iterable[str] = (),
    fold_gaps: bool = True,
) -> tuple[dict[str, float], dict[str, float]]:
    """Node seconds of one call, and what the attribution saw (see :class:`StepCosts.details`).

    ``estimates``: the current cost of every costed node (compute nodes and collective issues),
    what fused kernels are split by; ``issues``: the collective issue nodes (a collective site's
    time goes to them alone)."""
    issues = set(issues)
    site_of_op = match_ops(trace.ops, sites)
    wait_ops = [i for i, s in enumerate(site_of_op) if s is not None and sites[s].role == ROLE_WAIT]
    site_time: dict[int, float] = {}
    unattributed = folded = 0.0
    last_on_stream: dict[str, Activity] = {}
    for a in sorted(trace.activities, key=lambda a: (a.start_s, a.op)):
        s = site_of_op[a.op] if 0 <= a.op < len(site_of_op) else None
        if s is None:
            unattributed += a.duration_s
            continue
        role = sites[s].role
        seconds = a.duration_s
        if role == ROLE_COMPUTE:
            prev = last_on_stream.get(a.stream)
            if fold_gaps and prev is not None and not any(prev.op < w <= a.op for w in wait_ops):
                gap = max(0.0, a.start_s - prev.end_s)
                seconds += gap
                folded += gap
            last_on_stream[a.stream] = a
        elif role == ROLE_WAIT:
            unattributed += seconds  # a wait launches nothing the plan could cost
            continue
        site_time[s] = site_time.get(s, 0.0) + seconds
    costs: dict[str, float] = {}
    for s, seconds in site_time.items():
        site = sites[s]
        if site.role == ROLE_COLLECTIVE:
            targets = [n for n in site.nodes if n in issues]
        else:
            targets = [n for n in site.nodes if n in estimates and n not in issues]
        if not targets:
            unattributed += seconds
            continue
        _add(costs, split(seconds, targets, estimates))
    matched = sum(1 for s in site_of_op if s is not None)
    details = {
        "attributed_s": sum(costs.values()),
        "unattributed_s": unattributed,
        "folded_gap_s": folded,
        "ops_matched": float(matched),
        "ops_unmatched": float(len(site_of_op) - matched),
    }
    return costs, details


def kernel_step_costs(
    traces: Sequence[CallTrace],
    sites: Sequence[LaunchSite],
    estimates: Mapping[str, float],
    issues: Iterable[str] = (),
    fold_gaps: bool = True,
) -> StepCosts:
    """The medians over profiled calls of :func:`kernel_call_costs`; every node a site holds that
    got time counts as measured."""
    issues = set(issues)
    per_call, details = [], []
    for t in traces:
        c, d = kernel_call_costs(t, sites, estimates, issues, fold_gaps)
        per_call.append(c)
        details.append(d)
    costs = _medians(per_call) if per_call else {}
    return StepCosts(costs, sorted(costs), len(traces), _medians(details) if details else {})


# -- tasks of the aten executor -------------------------------------------------------------------


def _get(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def task_call_costs(
    timings: Sequence[Any],
    plan: Plan,
    estimates: Mapping[str, float],
    collectives: Mapping[str, float] | None = None,
    fold_gaps: bool = True,
) -> tuple[dict[str, float], set[str], dict[str, float]]:
    """Node seconds of one call from its task timings (``TaskTiming`` objects or their dicts),
    the nodes measured, and what was seen.

    ``collectives``: issue node -> seconds measured from a trace of the same call (the link's busy
    time), used instead of the timings' issue-to-wait intervals."""
    by_task = {str(_get(t, "task")): t for t in timings}
    tasks = {t.name: t for t in plan.tasks}
    costs: dict[str, float] = {}
    measured: set[str] = set()
    folded = 0.0
    # Compute-stream work in the order it ran; a collective's interval (issue to wait) is not a
    # stream's occupancy and stays out of the folding.
    lanes: dict[str, list[Any]] = {}
    for t in timings:
        if _get(t, "kind") != TaskKind.COLLECTIVE_ISSUE:
            lanes.setdefault(str(_get(t, "stream")), []).append(t)
    for lane in lanes.values():
        lane.sort(key=lambda t: (float(_get(t, "start_s")), float(_get(t, "end_s"))))
        prev_end: float | None = None
        for t in lane:
            start, end = float(_get(t, "start_s")), float(_get(t, "end_s"))
            task = tasks.get(str(_get(t, "task")))
            if task is not None and task.kind == TaskKind.COMPUTE:
                begin = start
                if fold_gaps and prev_end is not None and prev_end < start:
                    folded += start - prev_end
                    begin = prev_end
                targets = [n for n in task.nodes if n in estimates]
                _add(costs, split(max(0.0, end - begin), targets, estimates))
                measured.update(targets)
            prev_end = end if prev_end is None else max(prev_end, end)
    pairs = plan.collective_pairs()
    for wait_i, issue_i in pairs.items():
        issue, wait = plan.tasks[issue_i], plan.tasks[wait_i]
        nodes = [n for n in issue.nodes if n in estimates]
        if collectives is not None and all(n in collectives for n in nodes):
            for n in nodes:
                costs[n] = float(collectives[n])
            measured.update(nodes)
            continue
        ti, tw = by_task.get(issue.name), by_task.get(wait.name)
        if ti is None or tw is None:
            continue
        i_start, i_end = float(_get(ti, "start_s")), float(_get(ti, "end_s"))
        w_start, w_end = float(_get(tw, "start_s")), float(_get(tw, "end_s"))
        interval = max(0.0, i_end - i_start)
        if w_end - w_start > max(BLOCKED_MIN_S, BLOCKED_FRACTION * interval):
            _add(costs, split(interval, nodes, estimates))
            measured.update(nodes)
        else:
            bound = max(0.0, w_start - i_start)
            for n in nodes:
                costs[n] = min(float(estimates.get(n, 0.0)), bound)
    details = {"attributed_s": sum(costs[n] for n in measured if n in costs), "folded_gap_s": folded}
    return costs, measured, details


def task_step_costs(
    calls: Sequence[Sequence[Any]],
    plan: Plan,
    estimates: Mapping[str, float],
    collectives: Sequence[Mapping[str, float] | None] | None = None,
    fold_gaps: bool = True,
) -> StepCosts:
    """The medians over profiled calls of :func:`task_call_costs` (``collectives``: per call, the
    trace-measured collective seconds, or None)."""
    per_call, details = [], []
    measured_all: set[str] | None = None
    for i, timings in enumerate(calls):
        extra = collectives[i] if collectives is not None and i < len(collectives) else None
        c, m, d = task_call_costs(timings, plan, estimates, extra, fold_gaps)
        per_call.append(c)
        details.append(d)
        # Measured only if measured in every call (a collective hidden in one call is not).
        measured_all = set(m) if measured_all is None else measured_all & m
    costs = _medians(per_call) if per_call else {}
    return StepCosts(costs, sorted(measured_all or ()), len(calls), _medians(details) if details else {})


def collective_call_costs(
    trace: CallTrace, plan: Plan, ops: Mapping[str, str], estimates: Mapping[str, float]
) -> dict[str, float]:
    """Issue node -> seconds of one aten-executor call, from its trace: the executor issues the
    plan's collectives in plan order, so the k-th collective op of a name is the k-th issue task
    of that op (see :func:`collective_sites`). ``ops``: node -> op name."""
    sites = collective_sites(plan, ops)
    costs, _ = kernel_call_costs(trace, sites, estimates, issues=[n for s in sites for n in s.nodes],
                                 fold_gaps=False)
    return costs


def collective_sites(plan: Plan, ops: Mapping[str, Any]) -> list[LaunchSite]:
    """The launch sites of the aten executor's collectives: its issue tasks in plan order, each
    named by its op (``ops``: node -> op name, e.g. ``_c10d_functional::all_to_all_single``; a
    node missing there is named by itself)."""
    sites = []
    for t in plan.tasks:
        if t.kind != TaskKind.COLLECTIVE_ISSUE:
            continue
        for n in t.nodes:
            op = ops.get(n)
            name = op_key(op) if isinstance(op, str) else n
            sites.append(LaunchSite(name, (n,), ROLE_COLLECTIVE))
    return sites
