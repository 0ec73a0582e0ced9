"""The order pass: inductor's fused kernels emitted in a graphsched plan's order.

Inductor compiles the captured aten graph as it would for ``torch.compile`` (lowering, fusion,
memory planning); graphsched only decides the order in which the fused kernels are emitted. The
hook is ``torch._inductor.config.reorder_for_compute_comm_overlap_passes``: a callable there gets
the scheduler nodes (fused kernels, extern calls, collectives and waits) after fusion and returns
them in the order the wrapper code is generated in. :class:`InductorPlanOrder` is that callable:

1. every scheduler node is mapped to the plan's tasks through its FX origins (the aten nodes of
   the graph handed to inductor, whose names are the plan's node names);
2. a node's wanted position is the latest plan task it holds (a kernel fusing a deferred
   weight-gradient op with an earlier op runs where the deferred op was planned), or the window of
   a deferred weight-gradient task it holds when nothing it depends on is planned later; then it
   is lowered to the wanted position of its earliest consumer (a kernel runs before what needs it);
3. a list schedule over the data dependencies (``unmet_dependencies``, resolved to the producing
   node) emits the ready node with the smallest wanted position: always a valid topological order
   (inductor checks none), and the plan's order wherever fusion allows it;
4. the report says which weight-gradient tasks fusion pulled out of the all-to-all window the plan
   put them in, maps every task to its kernels and gives each kernel a first cost.

See ``docs/inductor.md`` for why this route (and not FX-level control dependencies or compiling
segments) and for the compile-cache choice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from graphsched.analysis.graph import GraphAnalysis, ordered_topological_sort
from graphsched.codegen.snodes import (
    buffer_names,
    comm_role,
    dependency_edges,
    estimated_runtime,
    is_issue_kernel,
    is_wait_kernel,
    origin_names,
    snode_name,
)
from graphsched.plan import Phase, Plan

log = logging.getLogger(__name__)

def order_by_wanted_position(
    wanted: Sequence[float], deps: Sequence[set[int]]
) -> list[int]:
    """A topological order of ``deps`` following ``wanted`` (a position per node; ties: index).

    A node's effective position is the smallest of its own and its consumers' (it must run before
    them); the list schedule emits the ready node with the smallest (effective, own, index).
    Input indices must be a topological order already (inductor's is).
    """
    n = len(wanted)
    users: list[list[int]] = [[] for _ in range(n)]
    for i, ds in enumerate(deps):
        for j in ds:
            users[j].append(i)
    effective = list(wanted)
    for i in reversed(range(n)):
        for u in users[i]:
            if effective[u] < effective[i]:
                effective[i] = effective[u]
    order = ordered_topological_sort(range(n), users.__getitem__, lambda i: (effective[i], wanted[i], i))
    if len(order) != n:
        raise RuntimeError(
            f"graphsched: the scheduler nodes' dependencies have a cycle ({n - len(order)} nodes "
            "never became ready); inductor's order is kept."
        )
    return order


@dataclass
class InductorPlanOrder:
    """Inductor's ``reorder_for_compute_comm_overlap_passes`` entry emitting one plan's order.

    Called once per compile (one graph); afterwards :attr:`report` describes what it did and
    :attr:`called` is True. A plain object (not pickled by name) on purpose: see docs/inductor.md.
    """

    plan: Plan
    analysis: GraphAnalysis | None = None
    #: collectives issued as soon as their inputs are made, waits just before their first reader
    early_issue_late_wait: bool = True
    called: bool = False
    report: dict[str, Any] = field(default_factory=dict)

    def __call__(self, snodes: list[Any]) -> list[Any]:
        self.called = True
        try:
            ordered = self._order(list(snodes))
        except Exception as exc:  # noqa: BLE001 - never leave inductor with a broken order
            log.warning("%s: order pass failed (%s: %s); inductor's order kept",
                        self.plan.graph_name, type(exc).__name__, exc)
            self.report = {"error": f"{type(exc).__name__}: {exc}"}
            return snodes
        return ordered

    def _order(self, snodes: list[Any]) -> list[Any]:
        task_of = {name: i for i, t in enumerate(self.plan.tasks) for name in t.nodes}
        origins = [origin_names(sn) for sn in snodes]
        tasks_of = [sorted({task_of[o] for o in names if o in task_of}) for names in origins]
        self._own_collective_tasks(snodes, tasks_of)
        wanted = [float(ts[-1]) if ts else math.inf for ts in tasks_of]
        deps, unresolved = dependency_edges(snodes)
        self._prefer_windows(wanted, tasks_of, deps)
        if self.early_issue_late_wait:
            deps = issue_early_wait_late(snodes, wanted, deps)
        order = order_by_wanted_position(wanted, deps)
        result = [snodes[i] for i in order]
        self.report = self._describe(snodes, order, tasks_of, unresolved)
        self.report["predicted_time"] = self._predict(snodes, order, deps)
        return result

    def _own_collective_tasks(self, snodes: list[Any], tasks_of: list[list[int]]) -> None:
        """A collective's (or wait's) kernel belongs to its issue (wait) task alone. Its origins
        can hold views of its input or output that the plan puts in other tasks, later ones
        included; counting those ran a micro-batch's dispatch where its output's first reader is
        planned, behind the other micro-batch's whole forward (measured on an H200)."""
        for i, sn in enumerate(snodes):
            role = comm_role(sn)
            if role is None:
                continue
            own = [t for t in tasks_of[i] if self.plan.tasks[t].kind == role]
            if own:
                tasks_of[i] = own

    def _windows(self) -> list[tuple[int, int]]:
        """(issue task, first wait task) positions of every collective of the plan that has a
        wait, from the plan's own pairs: a chunked graph slices a collective's output before
        each slice's wait, and the first of those waits is where the compute stream blocks."""
        first_wait: dict[int, int] = {}
        for wait, issue in self.plan.collective_pairs().items():
            first_wait[issue] = min(wait, first_wait.get(issue, wait))
        return sorted(first_wait.items())

    def _prefer_windows(self, wanted: list[float], tasks_of: list[list[int]], deps: list[set[int]]) -> None:
        """A kernel that fused a weight-gradient task planned inside a window with later tasks
        runs in that window when nothing it depends on is planned after it: its later work then
        runs early (harmless: its inputs are ready), instead of the dW work running late. Kernels
        that need the window's wait (or later work) keep the latest position."""
        in_window = {
            t for lo, hi in self._windows() for t in range(lo + 1, hi)
            if self.plan.tasks[t].phase == Phase.WEIGHT_GRAD
        }
        if not in_window:
            return
        # Latest planned position among each kernel's ancestors (kernels are in topological order).
        latest_before = [-math.inf] * len(wanted)
        for i, ds in enumerate(deps):
            for j in ds:
                own = wanted[j] if math.isfinite(wanted[j]) else -math.inf
                latest_before[i] = max(latest_before[i], latest_before[j], own)
        for i, ts in enumerate(tasks_of):
            if len(ts) < 2:
                continue
            fits = [t for t in ts if t in in_window and t > latest_before[i]]
            if fits and max(fits) < wanted[i]:
                wanted[i] = float(max(fits))

    def _predict(self, snodes: list[Any], order: list[int], deps: list[set[int]]) -> float:
        """The emitted kernel order simulated with each kernel's first cost (its aten nodes' plan
        costs): the plan's prediction at the level of what runs (see :func:`predict_kernels`)."""
        names = [snode_name(sn, i) for i, sn in enumerate(snodes)]
        issues = {c.issue for c in self.analysis.collectives} if self.analysis is not None else set()
        self.report["kernel_deps"] = {names[i]: sorted(names[j] for j in deps[i]) for i in range(len(snodes))}
        self.report["comm_kernels"] = sorted(
            names[i] for i, sn in enumerate(snodes) if is_issue_kernel(sn) and origin_names(sn) & issues
        )
        return predict_kernels(self.report, self.plan.costs or {}, issues)

    def _describe(
        self, snodes: list[Any], order: list[int], tasks_of: list[list[int]], unresolved: list[str]
    ) -> dict[str, Any]:
        tasks = self.plan.tasks
        names = [snode_name(sn, i) for i, sn in enumerate(snodes)]
        position = {i: p for p, i in enumerate(order)}
        kernels_of_task: dict[int, list[int]] = {}
        for i, ts in enumerate(tasks_of):
            for t in ts:
                kernels_of_task.setdefault(t, []).append(i)
        windows = self._windows()
        planned_in: list[str] = []
        pulled_out: list[str] = []
        pulled_detail: list[dict[str, Any]] = []
        for lo, hi in windows:
            issue_k = [position[k] for k in kernels_of_task.get(lo, [])]
            wait_k = [position[k] for k in kernels_of_task.get(hi, [])]
            if not issue_k or not wait_k:
                continue
            start, end = max(issue_k), min(wait_k)
            for t in range(lo + 1, hi):
                if tasks[t].phase != Phase.WEIGHT_GRAD or t not in kernels_of_task:
                    continue
                planned_in.append(tasks[t].name)
                outside = [k for k in kernels_of_task[t] if not (start < position[k] < end)]
                if outside:
                    pulled_out.append(tasks[t].name)
                    pulled_detail.append({
                        "task": tasks[t].name,
                        "window": [tasks[lo].name, tasks[hi].name],
                        "window_kernel_positions": [start, end],
                        "kernels": {
                            names[k]: {"position": position[k],
                                       "fused_with_tasks": [tasks[u].name for u in tasks_of[k] if u != t]}
                            for k in outside
                        },
                    })
        costs = self.plan.costs or {}
        kernel_costs: dict[str, dict[str, float | None]] = {}
        for i, sn in enumerate(snodes):
            aten = sum(costs.get(o, 0.0) for o in origin_names(sn))
            kernel_costs[names[i]] = {"aten_s": aten, "inductor_s": estimated_runtime(sn)}
        fused_tasks = sum(1 for ts in tasks_of if len(ts) > 1)
        issues = {c.issue for c in self.analysis.collectives} if self.analysis is not None else set()
        return {
            # The FX issue nodes of the collectives, in the order the code launches them.
            "collective_order": [
                name for i in order if is_issue_kernel(snodes[i])
                for name in sorted(origin_names(snodes[i]) & issues)
            ],
            "kernels": len(snodes),
            "kernel_order": [names[i] for i in order],
            "inductor_order": names,
            "order_changed": order != list(range(len(snodes))),
            "kernel_buffers": {names[i]: buffer_names(sn) for i, sn in enumerate(snodes)},
            # The FX nodes each kernel computes: what a profiled kernel's time is split over.
            "kernel_origins": {names[i]: sorted(origin_names(sn)) for i, sn in enumerate(snodes)},
            "task_kernels": {
                tasks[t].name: [names[k] for k in sorted(ks, key=position.__getitem__)]
                for t, ks in sorted(kernels_of_task.items())
            },
            "kernel_costs": kernel_costs,
            "unmapped_kernels": sum(1 for ts in tasks_of if not ts),
            "kernels_spanning_tasks": fused_tasks,
            "weight_grad_tasks_planned_in_windows": len(planned_in),
            "weight_grad_tasks_pulled_out": pulled_out,
            "pulled_out_detail": pulled_detail,
            "kernel_tasks": {names[i]: [tasks[t].name for t in ts] for i, ts in enumerate(tasks_of)},
            "unresolved_dependencies": sorted(set(unresolved)),
        }


def predict_kernels(report: dict[str, Any], costs: dict[str, float], issues: set[str]) -> float:
    """The time of a compiled graph's kernels in their emitted order (``report``: the order pass's,
    with ``kernel_order``, ``kernel_origins``, ``kernel_deps`` and ``comm_kernels``) on two in-order
    resources, compute and the link, each kernel costing its FX nodes' ``costs`` (a collective's
    kernel its issue nodes'; a node inlined into several kernels shared by them, since profiled
    costs are the sum of its shares). Recomputed with other costs (profiled ones) it predicts the
    same code anew.

    A collective's kernel starts no earlier than the compute kernels emitted before it end: the
    compiled wrapper calls it on the compute stream (on CPU: after the kernels before it returned),
    so the transfer queues behind them."""
    order = report.get("kernel_order", [])
    origins = {k: set(v) for k, v in report.get("kernel_origins", {}).items()}
    deps = report.get("kernel_deps", {})
    comm_kernels = set(report.get("comm_kernels", []))
    # A node's share is counted among kernels of its own resource: a collective's issue node is
    # also an origin of the compute kernel that copies its input, and splitting the transfer's cost
    # with that kernel (which takes no issue cost) lost half of it (measured on an H200: every
    # forward all-to-all, the forward predicted 39% short).
    kernels_of: dict[str, int] = {}
    for k, names in origins.items():
        comm = k in comm_kernels
        for o in names:
            if (o in issues) == comm:
                kernels_of[o] = kernels_of.get(o, 0) + 1
    free = {"compute": 0.0, "comm": 0.0}
    end: dict[str, float] = {}
    for k in order:
        comm = k in comm_kernels
        resource = "comm" if comm else "compute"
        cost = sum(costs.get(o, 0.0) / kernels_of[o] for o in origins.get(k, ()) if (o in issues) == comm)
        start = max([free[resource], *(end[j] for j in deps.get(k, ()) if j in end)])
        if comm:
            start = max(start, free["compute"])
        end[k] = start + cost
        free[resource] = end[k]
    return max(end.values(), default=0.0)


def issue_early_wait_late(
    snodes: Sequence[Any], wanted: list[float], deps: list[set[int]]
) -> list[set[int]]:
    """Collective issues, with the kernels making their inputs, move up to just after their
    latest input; waits down to just before their first reader; the collectives keep the plan's
    order among themselves.

    The plan's own model is indifferent to where inside its slack an issue or a wait sits, but the
    device is not: a plan made from costs that are off (eager costs for fused kernels) can leave
    an issue behind compute that does not feed it, and the link idle meanwhile. Issuing early
    never delays compute (the link is its own stream), and waiting late never delays the link.
    ``wanted`` is changed in place; returns ``deps`` with the order edges between collectives.
    """
    issues = [i for i, sn in enumerate(snodes) if is_issue_kernel(sn)]
    waits = set(i for i, sn in enumerate(snodes) if is_wait_kernel(sn))
    planned = sorted(issues, key=lambda i: (wanted[i], i))
    deps = [set(d) for d in deps]
    ancestors = _ancestor_sets(deps)
    # An issue and the kernels that make its inputs go as early as their own inputs allow: on the
    # device a collective's stream first waits for everything launched before it on the compute
    # stream (NCCL's and the emulated link's issue alike), so compute launched ahead of an issue
    # it does not feed delays the transfer (measured on an H200: chunk 2's dispatch waited for
    # chunk 0's experts and the link sat idle between chunks). Waits stay where the plan has them
    # for this purpose, so nothing pulled moves ahead of a window's work.
    plan_position = list(wanted)
    cone = set(issues).union(*(ancestors[i] for i in issues)) - waits
    for j in range(len(snodes)):  # inductor's order is topological
        if j in cone:
            inputs = [plan_position[k] if k in waits else wanted[k] for k in deps[j]]
            inputs = [w for w in inputs if math.isfinite(w)]
            earliest = max(inputs) if inputs else -math.inf
            wanted[j] = earliest if j in issues else min(wanted[j], earliest)
    for i in waits:
        wanted[i] = math.inf  # its position becomes its first reader's (order_by_wanted_position)
    for a, b in zip(planned, planned[1:]):
        if b in ancestors[a]:
            continue  # the data puts b first: nothing to keep
        if a not in ancestors[b]:
            deps[b].add(a)
            ancestors = _add_edge(ancestors, deps, a, b)
        wanted[b] = max(wanted[b], wanted[a])
    return deps


def _ancestor_sets(deps: Sequence[set[int]]) -> list[set[int]]:
    """Every node's transitive dependencies; ``deps`` must be acyclic (inductor's nodes are)."""
    memo: list[set[int] | None] = [None] * len(deps)
    open_: set[int] = set()

    def visit(i: int) -> set[int]:
        stack = [(i, False)]
        while stack:
            k, done = stack.pop()
            if memo[k] is not None:
                continue
            if not done:
                if k in open_:
                    raise RuntimeError("graphsched: the scheduler nodes' dependencies have a cycle")
                open_.add(k)
            if done:
                open_.discard(k)
                acc: set[int] = set()
                for j in deps[k]:
                    acc.add(j)
                    acc |= memo[j] or set()
                memo[k] = acc
            else:
                stack.append((k, True))
                stack.extend((j, False) for j in deps[k] if memo[j] is None)
        return memo[i] or set()

    return [visit(i) for i in range(len(deps))]


def _add_edge(ancestors: list[set[int]], deps: Sequence[set[int]], a: int, b: int) -> list[set[int]]:
    """``ancestors`` after the edge a -> b: b and everything that depends on b gain a's set."""
    gained = ancestors[a] | {a}
    for k in range(len(deps)):
        if k == b or b in ancestors[k]:
            ancestors[k] |= gained
    return ancestors


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The compact part of a pass report that goes into the plan's options."""
    keys = (
        "kernels", "order_changed", "unmapped_kernels", "kernels_spanning_tasks",
        "weight_grad_tasks_planned_in_windows", "weight_grad_tasks_pulled_out",
        "unresolved_dependencies", "task_kernels", "predicted_time", "fusions_refused", "error",
    )
    out = {k: report[k] for k in keys if k in report}
    if "weight_grad_tasks_pulled_out" in out:
        out["weight_grad_tasks_pulled_out_count"] = len(out["weight_grad_tasks_pulled_out"])
    return out
