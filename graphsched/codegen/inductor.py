"""Run a graphsched plan as inductor-generated code.

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

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from graphsched.analysis.graph import GraphAnalysis, ordered_topological_sort
from graphsched.analysis.labels import GraphKind
from graphsched.config import CODEGENS
from graphsched.plan import Plan

log = logging.getLogger("graphsched.codegen")

#: Weight-gradient phase name in plans.
_WEIGHT_GRAD = "weight_grad"


def inductor_available(device: torch.device) -> bool:
    """True where ``codegen="auto"`` picks inductor: a CUDA device with triton installed."""
    if device.type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - very old torch
        return False
    return bool(has_triton())


def resolve_codegen(codegen: str, device: torch.device) -> str:
    """``"aten"`` or ``"inductor"`` for the option value ``codegen`` on ``device``."""
    if codegen not in CODEGENS:
        raise ValueError(f"codegen={codegen!r} is not one of {CODEGENS}")
    if codegen == "auto":
        return "inductor" if inductor_available(device) else "aten"
    return codegen


def inductor_deterministic() -> bool:
    """Inductor's ``config.deterministic``: when on, inductor skips every reordering pass."""
    from graphsched.compat import inductor_config as ic

    return bool(getattr(ic, "deterministic", False))


def inductor_aot_options(codegen: str) -> dict[str, Any]:
    """Extra ``aot_autograd`` arguments for graphs that inductor will compile: its decompositions."""
    if codegen != "inductor":
        return {}
    from graphsched.compat import select_decomp_table

    return {"decompositions": select_decomp_table()}


def partition_fn_for(codegen: str) -> Callable[..., Any]:
    """AOTAutograd's partitioner for graphs that ``codegen`` runs.

    The aten executor: ``default_partition`` (the backward runs the ops eager autograd runs,
    nothing recomputed: eager's numerics). Inductor: the partitioner ``torch.compile`` uses
    (inductor's joint-graph passes, then min-cut rematerialisation), so graphsched's kernels are
    torch.compile's kernels; with ``default_partition`` inductor's step computed 1 ms more on
    gpu-smoke (an H200: 211 kernels against 188, the loss backward unfused).
    """
    if codegen == "inductor":
        from graphsched.compat import inductor_partition_fn

        return inductor_partition_fn
    from graphsched.compat import default_partition

    return default_partition


def inductor_settings(order_pass: Callable[[list[Any]], list[Any]] | None) -> dict[str, Any]:
    """The inductor config graphsched compiles under; ``order_pass=None`` keeps inductor's order.

    The same settings, with and without the pass, are the oracle: the two compiles differ only in
    the order of whole kernels. ``reorder_for_compute_comm_overlap`` must be on for the pass list
    to run (it also changes two lowerings, so the oracle sets it too); the list holds graphsched's
    pass alone, so inductor's own ``sink_waits`` / ``raise_comms`` never run. The FX-graph cache is
    off: the pass is a per-graph object the cache cannot key on (see docs/inductor.md).
    """
    from graphsched.compat import inductor_config as ic

    settings: dict[str, Any] = {
        "reorder_for_compute_comm_overlap": True,
        "reorder_for_compute_comm_overlap_passes": [order_pass] if order_pass is not None else [],
        "fx_graph_cache": False,
        "fx_graph_remote_cache": False,
    }
    settings = {k: v for k, v in settings.items() if hasattr(ic, k)}
    # Inductor's FX-level overlap schedulers would reorder the graph before ours sees it (and
    # from torch 2.14 enable_simple_overlap runs after user passes): off where they exist.
    dist_opts = getattr(ic, "aten_distributed_optimizations", None)
    for name in ("enable_overlap_scheduling", "enable_simple_overlap"):
        if dist_opts is not None and hasattr(dist_opts, name):
            settings[f"aten_distributed_optimizations.{name}"] = False
    return settings


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    kind: GraphKind,
    order_pass: Callable[[list[Any]], list[Any]] | None = None,
    fusion_guard: "PlanSegments | None" = None,
) -> Callable[[list[Any]], Any]:
    """Compile one AOTAutograd graph with inductor (what ``torch.compile``'s compilers call).

    Returns inductor's boxed callable. ``gm`` is left untouched: inductor's post-grad passes
    rewrite the graph in place, so a copy (same node names) is what inductor gets.
    ``fusion_guard``: fusions that would join work of two plan segments are refused.
    """
    import contextlib

    from graphsched.compat import inductor_config as ic
    from graphsched.compat import compile_fx_inner

    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    choices = contextlib.nullcontext() if fusion_guard is None else _plan_choices(fusion_guard)
    with ic.patch(inductor_settings(order_pass)), choices:
        return compile_fx_inner(
            copied,
            list(example_inputs),
            is_backward=kind == GraphKind.BACKWARD,
            is_inference=kind == GraphKind.INFERENCE,
        )


# --------------------------------------------------------------------------------------------
# Fusion that respects the plan.


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
    analysis: GraphAnalysis | None = None
    refused: int = 0
    _segment_of: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        position = {name: i for i, t in enumerate(self.plan.tasks) for name in t.nodes}
        bounds: set[int] = set()
        for c in self.analysis.collectives if self.analysis is not None else ():
            for name in (c.issue, c.wait):
                if name is not None and name in position:
                    bounds.add(position[name])
        cuts = sorted(bounds)
        import bisect

        self._segment_of = {name: bisect.bisect_right(cuts, p) for name, p in position.items()}

    def segments(self, snode: Any) -> set[int]:
        return {self._segment_of[o] for o in origin_names(snode) if o in self._segment_of}

    def allows(self, node1: Any, node2: Any) -> bool:
        s1, s2 = self.segments(node1), self.segments(node2)
        if len(s1 | s2) <= 1 or s1 == s2:
            return True
        self.refused += 1
        return False


def _plan_choices(guard: PlanSegments) -> Any:
    """Inductor's heuristics with ``guard`` consulted first, installed for one compile."""
    from graphsched.compat import V, InductorChoices

    class _PlanChoices(InductorChoices):
        def can_fuse(self, scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:  # type: ignore[override]
            return guard.allows(node1, node2) and InductorChoices.can_fuse(
                scheduler, node1, node2, shared_data_score
            )

    return V.set_choices_handler(_PlanChoices())


def inductor_oracle_backend() -> Callable[..., Any]:
    """A ``torch.compile`` backend: inductor in its own order, through graphsched's AOTAutograd.

    The same partitioner as graphsched-on-inductor (``partition_fn_for("inductor")``: torch.compile's)
    and the same inductor settings, but no order pass: what graphsched-on-inductor must match
    bitwise where only the order of kernels differs. ``torch.compile(backend="inductor")``
    differs from it only by those settings (``reorder_for_compute_comm_overlap`` changes two
    lowerings).
    """
    from functools import partial

    from graphsched.compat import aot_autograd

    def compiler(kind: GraphKind, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        return compile_graph(gm, example_inputs, kind, None)

    return aot_autograd(
        fw_compiler=partial(compiler, GraphKind.FORWARD),
        bw_compiler=partial(compiler, GraphKind.BACKWARD),
        inference_compiler=partial(compiler, GraphKind.INFERENCE),
        partition_fn=partition_fn_for("inductor"),
        **inductor_aot_options("inductor"),
    )


# --------------------------------------------------------------------------------------------
# The order pass.


def _sub_nodes(snode: Any) -> list[Any]:
    try:
        return list(snode.get_nodes())
    except Exception:  # noqa: BLE001 - inductor IR differs across versions
        return [snode]


def origin_names(snode: Any) -> set[str]:
    """Names of the FX nodes a scheduler node (fused or not) was lowered from."""
    names: set[str] = set()
    for s in _sub_nodes(snode):
        ir = getattr(s, "node", None)
        if ir is None:
            continue
        getter = getattr(ir, "get_origins", None)
        origins = getter() if callable(getter) else getattr(ir, "origins", ())
        for o in origins or ():
            name = getattr(o, "name", None)
            if name is not None:
                names.add(name)
    return names


def _buffer_names(snode: Any) -> list[str]:
    try:
        return sorted(snode.get_buffer_names())
    except Exception:  # noqa: BLE001
        return []


def _producers(snodes: Sequence[Any]) -> dict[str, int]:
    """Buffer and operation name -> index of the scheduler node that makes it."""
    prod: dict[str, int] = {}
    for i, sn in enumerate(snodes):
        for s in [sn, *_sub_nodes(sn)]:
            for getter in ("get_buffer_names", "get_operation_names"):
                try:
                    names = getattr(s, getter)()
                except Exception:  # noqa: BLE001
                    continue
                for n in names:
                    prod[n] = i
    return prod


def dependency_edges(snodes: Sequence[Any]) -> tuple[list[set[int]], list[str]]:
    """For each scheduler node the indices of the nodes it depends on, and unresolved names.

    Dependencies are ``unmet_dependencies`` (buffers read, weak ordering deps of mutations),
    resolved to the node that produces the buffer; names of graph inputs have no producer.

    Inductor chains every collective and wait to the one before it in the captured graph (fake
    weak deps, ``decide_global_ordering_of_comms``) so that each rank issues them alike. Those
    edges are dropped: the plan is the same on every rank, and ``issue_early_wait_late`` chains
    the issues in the plan's order instead. Kept, they pinned two micro-batches' all-to-alls to
    the captured order (all of micro-batch 0's, then micro-batch 1's), whatever the plan said.
    """
    prod = _producers(snodes)
    comm = [_is_collective_kernel(sn) or _is_wait_kernel(sn) for sn in snodes]
    deps: list[set[int]] = [set() for _ in snodes]
    unresolved: list[str] = []
    for i, sn in enumerate(snodes):
        for d in getattr(sn, "unmet_dependencies", ()):
            name = getattr(d, "name", None)
            if name is None:
                continue
            if comm[i] and _is_fake_order_dep(d):
                j = prod.get(name)
                if j is not None and comm[j]:
                    continue
            j = prod.get(name)
            if j is None:
                # A buffer of an op fused away or renamed: ask the scheduler who defines it.
                sched = getattr(sn, "scheduler", None)
                buf = getattr(sched, "name_to_buf", {}).get(name) if sched is not None else None
                if buf is not None:
                    try:
                        j = prod.get(buf.defining_op_name())
                    except Exception:  # noqa: BLE001
                        j = None
            if j is None:
                if not _is_graph_input(name):
                    unresolved.append(name)
                continue
            if j != i:
                deps[i].add(j)
    return deps, unresolved


def _is_fake_order_dep(dep: Any) -> bool:
    """A weak dependency that orders without reading (inductor's ``WeakDep(is_fake=True)``)."""
    return type(dep).__name__ == "WeakDep" and bool(getattr(dep, "is_fake", False))


def _is_graph_input(name: str) -> bool:
    try:
        from graphsched.compat import V

        graph = V.graph
        return name in graph.graph_inputs or name in getattr(graph, "constants", {})
    except Exception:  # noqa: BLE001 - no graph being lowered
        return False


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
            role = ("collective_issue" if _is_collective_kernel(sn)
                    else "collective_wait" if _is_wait_kernel(sn) else None)
            if role is None:
                continue
            own = [t for t in tasks_of[i] if self.plan.tasks[t].kind == role]
            if own:
                tasks_of[i] = own

    def _windows(self) -> list[tuple[int, int]]:
        """(issue task, wait task) positions of every collective of the plan that has a wait."""
        task_of = {name: i for i, t in enumerate(self.plan.tasks) for name in t.nodes}
        if self.analysis is None:
            return []
        return [
            (task_of[c.issue], task_of[c.wait])
            for c in self.analysis.collectives
            if c.wait is not None and c.issue in task_of and c.wait in task_of
        ]

    def _prefer_windows(self, wanted: list[float], tasks_of: list[list[int]], deps: list[set[int]]) -> None:
        """A kernel that fused a weight-gradient task planned inside a window with later tasks
        runs in that window when nothing it depends on is planned after it: its later work then
        runs early (harmless: its inputs are ready), instead of the dW work running late. Kernels
        that need the window's wait (or later work) keep the latest position."""
        in_window = {
            t for lo, hi in self._windows() for t in range(lo + 1, hi)
            if self.plan.tasks[t].phase == _WEIGHT_GRAD
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
        """The emitted kernel order simulated on two in-order resources (compute, comm) with each
        kernel's first cost (sum of its aten nodes' plan costs): the plan's prediction, at the
        level of what runs."""
        costs = self.plan.costs or {}
        issues = {c.issue for c in self.analysis.collectives} if self.analysis is not None else set()
        free = {"compute": 0.0, "comm": 0.0}
        end: dict[int, float] = {}
        for i in order:
            names = origin_names(snodes[i])
            comm = _is_collective_kernel(snodes[i]) and bool(names & issues)
            resource = "comm" if comm else "compute"
            cost = sum(costs.get(o, 0.0) for o in names if (o in issues) == comm)
            start = max([free[resource], *(end[j] for j in deps[i] if j in end)])
            end[i] = start + cost
            free[resource] = end[i]
        return max(end.values(), default=0.0)

    def _describe(
        self, snodes: list[Any], order: list[int], tasks_of: list[list[int]], unresolved: list[str]
    ) -> dict[str, Any]:
        tasks = self.plan.tasks
        names = [_snode_name(sn, i) for i, sn in enumerate(snodes)]
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
                if tasks[t].phase != _WEIGHT_GRAD or t not in kernels_of_task:
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
            kernel_costs[names[i]] = {"aten_s": aten, "inductor_s": _estimate(sn)}
        fused_tasks = sum(1 for ts in tasks_of if len(ts) > 1)
        issues = {c.issue for c in self.analysis.collectives} if self.analysis is not None else set()
        return {
            # The FX issue nodes of the collectives, in the order the code launches them.
            "collective_order": [
                name for i in order if _is_collective_kernel(snodes[i])
                for name in sorted(origin_names(snodes[i]) & issues)
            ],
            "kernels": len(snodes),
            "kernel_order": [names[i] for i in order],
            "inductor_order": names,
            "order_changed": order != list(range(len(snodes))),
            "kernel_buffers": {names[i]: _buffer_names(sn) for i, sn in enumerate(snodes)},
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
    issues = [i for i, sn in enumerate(snodes) if _is_collective_kernel(sn)]
    waits = set(i for i, sn in enumerate(snodes) if _is_wait_kernel(sn))
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


def _ir_is(snode: Any, predicate: str, fallback: str) -> bool:
    """``graphsched.compat.<predicate>`` on the snode's IR node; on an inductor without it, the
    IR class name containing ``fallback``."""
    ir = getattr(snode, "node", None)
    try:
        from graphsched import compat

        if ir is not None and getattr(compat, predicate)(ir):
            return True
    except Exception:  # noqa: BLE001 - older or newer inductor
        pass
    return fallback in type(ir).__name__


def _is_wait_kernel(snode: Any) -> bool:
    return _ir_is(snode, "is_wait", "_WaitKernel")


def _is_collective_kernel(snode: Any) -> bool:
    return _ir_is(snode, "is_collective", "Collective")


def _snode_name(snode: Any, i: int) -> str:
    try:
        return str(snode.get_name())
    except Exception:  # noqa: BLE001
        return f"node{i}"


def _estimate(snode: Any) -> float | None:
    """Inductor's own runtime estimate of a kernel, seconds (None where it has none)."""
    try:
        value = snode.get_estimated_runtime()
    except Exception:  # noqa: BLE001 - estimates are best effort
        return None
    if value is None or not math.isfinite(float(value)):
        return None
    # Inductor estimates in nanoseconds.
    return float(value) * 1e-9


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


class _VerifyOnFirstCall:
    """Inductor's compiled graph, with the cross-rank plan check before its first run."""

    def __init__(self, compiled: Callable[[list[Any]], Any], plan: Plan, verify: Callable[[Plan], None] | None):
        # Instance attribute: AOTAutograd copies __dict__ (functools.wraps), not class attributes.
        self._boxed_call = True
        self.compiled = compiled
        self.plan = plan
        self._verify = verify

    def __call__(self, args: list[Any]) -> Any:
        if self._verify is not None:
            verify, self._verify = self._verify, None
            verify(self.plan)
        return self.compiled(args)


def compile_plan(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    kind: GraphKind,
    plan: Plan,
    analysis: GraphAnalysis | None,
    verify_plan: Callable[[Plan], None] | None = None,
    deterministic: bool | None = None,
    fusion_within_segments: bool = True,
) -> tuple[Callable[[list[Any]], Any], InductorPlanOrder]:
    """Compile ``gm`` with inductor, its kernels emitted in ``plan``'s order.

    Raises when inductor fails, when its deterministic mode would skip the order pass, or when the
    pass was not called or failed: the caller then runs the plan on the aten executor.
    ``deterministic``: inductor's deterministic flag as the user's thread sees it (inductor's
    config is thread-local and the backward may compile on autograd's thread); None reads it here.
    ``fusion_within_segments``: refuse fusions across a collective's issue or wait (PlanSegments).
    """
    if deterministic is None:
        deterministic = inductor_deterministic()
    if deterministic:
        raise RuntimeError(
            "torch._inductor.config.deterministic is on, and inductor then skips the reordering "
            "passes graphsched's order runs in"
        )
    order = InductorPlanOrder(plan, analysis)
    guard = PlanSegments(plan, analysis) if fusion_within_segments else None
    compiled = compile_graph(gm, example_inputs, kind, order, guard)
    if guard is not None:
        order.report["fusions_refused"] = guard.refused
    if not order.called:
        raise RuntimeError("inductor never called graphsched's order pass (a cached or changed compile path)")
    if "error" in order.report:
        raise RuntimeError(f"the order pass failed: {order.report['error']}")
    plan.options = {**plan.options, "codegen": "inductor", "inductor": summary(order.report)}
    return _VerifyOnFirstCall(compiled, plan, verify_plan), order


def describe_codegen(plan: Plan) -> str:
    """One line for ``graphsched.explain``: what inductor made of a plan."""
    info = plan.options.get("inductor") or {}
    pulled = info.get("weight_grad_tasks_pulled_out", [])
    text = (
        f"inductor code, {info.get('kernels', '?')} kernels for {len(plan.tasks)} tasks "
        f"({info.get('kernels_spanning_tasks', 0)} kernels fuse ops of several tasks); "
        f"{info.get('weight_grad_tasks_planned_in_windows', 0)} weight-gradient tasks planned in "
        f"all-to-all windows, {len(pulled)} pulled out by fusion"
    )
    if pulled:
        text += f" ({', '.join(pulled[:6])}{', ...' if len(pulled) > 6 else ''})"
    if info.get("predicted_time") is not None and plan.predicted_time is not None:
        text += (f"; predicted {info['predicted_time'] * 1e3:.3f} ms as kernels "
                 f"(plan: {plan.predicted_time * 1e3:.3f} ms)")
    return text
