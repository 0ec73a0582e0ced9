"""What graphsched reads of inductor's scheduler nodes (fused kernels, extern calls, collectives).

The FX nodes a kernel was lowered from (``origin_names``), the buffers it makes, its data
dependencies resolved to the producing node (``dependency_edges``), whether it is a collective or
a wait (``comm_role``), and inductor's runtime estimate. Inductor's IR differs across versions, so
every reader is best effort.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from graphsched.plan import TaskKind


def sub_nodes(snode: Any) -> list[Any]:
    try:
        return list(snode.get_nodes())
    except Exception:  # noqa: BLE001 - inductor IR differs across versions
        return [snode]


def origin_names(snode: Any) -> set[str]:
    """Names of the FX nodes a scheduler node (fused or not) was lowered from."""
    names: set[str] = set()
    for s in sub_nodes(snode):
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


def buffer_names(snode: Any) -> list[str]:
    try:
        return sorted(snode.get_buffer_names())
    except Exception:  # noqa: BLE001
        return []


def _producers(snodes: Sequence[Any]) -> dict[str, int]:
    """Buffer and operation name -> index of the scheduler node that makes it."""
    prod: dict[str, int] = {}
    for i, sn in enumerate(snodes):
        for s in [sn, *sub_nodes(sn)]:
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
    comm = [comm_role(sn) is not None for sn in snodes]
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


#: (role, ``graphsched.compat`` predicate on the IR node, IR class-name fragment used where the
#: predicate is missing or fails): how a scheduler node is told to be a collective or a wait.
_COMM_ROLES = (
    (TaskKind.COLLECTIVE_ISSUE, "is_collective", "Collective"),
    (TaskKind.COLLECTIVE_WAIT, "is_wait", "_WaitKernel"),
)


def comm_role(snode: Any) -> TaskKind | None:
    """The kind of plan task a kernel belongs to when it is a collective's (``COLLECTIVE_ISSUE``)
    or a wait's (``COLLECTIVE_WAIT``), else None.

    Asked of ``graphsched.compat.is_collective`` / ``is_wait`` on the snode's IR node; on an
    inductor without them, read from the IR class name."""
    ir = getattr(snode, "node", None)
    for role, predicate, fallback in _COMM_ROLES:
        try:
            from graphsched import compat

            if ir is not None and getattr(compat, predicate)(ir):
                return role
        except Exception:  # noqa: BLE001 - older or newer inductor
            pass
        if fallback in type(ir).__name__:
            return role
    return None


def is_issue_kernel(snode: Any) -> bool:
    return comm_role(snode) == TaskKind.COLLECTIVE_ISSUE


def is_wait_kernel(snode: Any) -> bool:
    return comm_role(snode) == TaskKind.COLLECTIVE_WAIT


def snode_name(snode: Any, i: int) -> str:
    try:
        return str(snode.get_name())
    except Exception:  # noqa: BLE001
        return f"node{i}"


def estimated_runtime(snode: Any) -> float | None:
    """Inductor's own runtime estimate of a kernel, seconds (None where it has none)."""
    try:
        value = snode.get_estimated_runtime()
    except Exception:  # noqa: BLE001 - estimates are best effort
        return None
    if value is None or not math.isfinite(float(value)):
        return None
    # Inductor estimates in nanoseconds.
    return float(value) * 1e-9
