"""A captured graph's own collectives, timed as the graph issues them.

The sweep in ``wrap`` (``commmodel.benchmark_collectives``) fits ``alpha + beta * bytes`` per kind
over doubling sizes on the world group; a graph's collectives have their own sizes, dtypes,
devices and groups. Measured costs (``cost_source.MeasuredCosts``) therefore time each distinct
collective of a graph (kind, input bytes, dtype, device, group) before its nodes are costed:
``analyse_graph`` calls the cost function's ``prepare``, which calls
:func:`measure_graph_collectives`. Each is timed once per process, through the process group the
node names, on the device its buffers live on (``collective_calls.group_device``), so an emulated
or NCCL link is timed as what it is; the sweep's fit prices what is not timed (a group that spends
no link time on its device, a kind the benchmark cannot run).

This is the one place where graphsched issues collectives while compiling, so it keeps the ranks'
collectives matched:

* every rank gets here for the same graph at the same point: it is the first step of the graph's
  analysis, after ``check_same_graph`` agreed on the graph, before anything a rank decides alone
  (caches, fallbacks);
* before the first collective, the ranks exchange through the store the exact list they will time
  (rank-independent descriptions: a group is named by its place among the graph's groups, since
  ranks of different expert-parallel groups hold different group names) and whether each could
  allocate its buffers; unless every rank sent the same list and succeeded, no rank times anything
  and the fit prices the graph. That exchange is also the rendezvous: no rank has gone on to the
  step's own collectives while another times;
* collectives issued earlier on a group (an earlier graph's) run before these on every rank, in
  issue order; they can delay a first sample (the warm-up absorbs it), not be matched wrongly;
* the medians are agreed through the store (the slowest rank's), like every other cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx as fx

from graphsched.agreement import exchange
from graphsched.analysis.collective_calls import (
    COLLECTIVE_KINDS,
    collective_call,
    group_backend,
    group_device,
    median_time,
    times_collectives,
)
from graphsched.analysis.costmodel import (
    collective_bytes,
    collective_inputs,
    collective_kind,
    is_collective_node,
)

log = logging.getLogger(__name__)

#: (group name, kind, input bytes, dtype, device type): one timed collective, in this process.
CollectiveKey = tuple[str, str, int, str, str]


@dataclass(frozen=True)
class GraphCollective:
    """One distinct collective of a graph, as the benchmark must reproduce it."""

    kind: str
    nbytes: int
    dtype: torch.dtype
    #: where its buffers live (the graph's device, unless the backend cannot run there)
    device: torch.device
    group_name: str
    #: the group's place among the graph's groups in order of first use (the same on every rank)
    group_slot: int
    group_size: int
    #: whether timing it times its link (see ``collective_calls.times_collectives``)
    timed: bool
    group: Any = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> CollectiveKey:
        return (self.group_name, self.kind, self.nbytes, str(self.dtype), self.device.type)

    @property
    def shared(self) -> str:
        """Its description in the ranks' exchange: no rank-local name in it."""
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"{self.kind}:{self.nbytes}B:{dtype}:{self.device.type}:"
                f"group{self.group_slot}/{self.group_size}")


def _group_arg(node: fx.Node) -> Any:
    """The ``group_name`` argument of a functional collective (a name or, on newer torch, the
    group itself); None when the op has none."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    for i, arg in enumerate(schema.arguments):
        if arg.name == "group_name":
            if i < len(node.args):
                return node.args[i]
            return node.kwargs.get("group_name")
    return None


def _process_group(value: Any) -> dist.ProcessGroup | None:
    if value is None:
        return None
    if isinstance(value, dist.ProcessGroup):
        return value
    from graphsched.compat import resolve_process_group

    try:
        return resolve_process_group(value)
    except Exception:  # noqa: BLE001 - an unknown name: the fit prices the node
        return None


def _name_of(group: dist.ProcessGroup, value: Any) -> str:
    return str(getattr(group, "group_name", None) or value)


@dataclass
class _Described:
    """What one node's collective is, before the graph's groups are numbered."""

    kind: str
    nbytes: int
    dtype: torch.dtype
    device: torch.device
    group: dist.ProcessGroup
    group_name: str


def _describe(node: fx.Node) -> _Described | None:
    """A collective issue node as something the benchmark can run; None when it cannot."""
    if not is_collective_node(node):
        return None
    kind = collective_kind(node)
    value = _group_arg(node)
    group = _process_group(value)
    inputs = collective_inputs(node)
    if kind not in COLLECTIVE_KINDS or group is None or not inputs:
        return None
    tensor = inputs[0]
    device = group_device(group, tensor.device)
    return _Described(kind, collective_bytes(node), tensor.dtype, device, group, _name_of(group, value))


def collective_key(node: fx.Node) -> CollectiveKey | None:
    """The key :func:`measure_graph_collectives` times ``node``'s collective under (None: none)."""
    d = _describe(node)
    if d is None:
        return None
    return (d.group_name, d.kind, d.nbytes, str(d.dtype), d.device.type)


def graph_collectives(gm: fx.GraphModule) -> list[GraphCollective]:
    """The graph's distinct collectives that the benchmark can run, in graph order."""
    slots: dict[str, int] = {}
    found: dict[CollectiveKey, GraphCollective] = {}
    for node in gm.graph.nodes:
        d = _describe(node)
        if d is None:
            continue
        slot = slots.setdefault(d.group_name, len(slots))
        item = GraphCollective(
            d.kind, d.nbytes, d.dtype, d.device, d.group_name, slot, dist.get_world_size(d.group),
            times_collectives(d.group, d.device), d.group,
        )
        found.setdefault(item.key, item)
    return list(found.values())


def _element_count(item: GraphCollective) -> int:
    return max(1, -(-item.nbytes // item.dtype.itemsize))


def _prepare(items: list[GraphCollective]) -> tuple[list[Callable[[], Any]], str]:
    """Each item's buffers and call; an error text (empty when all were made)."""
    calls = []
    try:
        for item in items:
            fn, _ = collective_call(item.kind, _element_count(item), item.group, item.device, item.dtype)
            calls.append(fn)
    except Exception as exc:  # noqa: BLE001 - reported to every rank before any collective runs
        return [], f"{type(exc).__name__}: {exc}"
    return calls, ""


def measure_graph_collectives(
    gm: fx.GraphModule,
    known: dict[CollectiveKey, float],
    repeats: int = 5,
    warmup: int = 1,
) -> dict[CollectiveKey, float]:
    """Seconds of each of ``gm``'s collectives not in ``known`` (agreed: the slowest rank's).

    Every rank must call it for the same graph (see the module doc); a graph without collectives
    exchanges nothing. Untimed collectives (``GraphCollective.timed`` False) are left out, and
    logged, for the caller's fit to price.
    """
    if not any(is_collective_node(n) for n in gm.graph.nodes):
        return {}
    found = graph_collectives(gm)
    for item in found:
        if not item.timed and item.key not in known:
            log.info(
                "%s on group %s (%s) takes no link time on %s; the collective model prices it",
                item.shared, item.group_name, group_backend(item.group), item.device,
            )
    todo = [item for item in found if item.timed and item.key not in known]
    calls, error = _prepare(todo)
    mine = {"collectives": [item.shared for item in todo], "error": error}
    gathered = exchange(mine, "graph-collectives")
    if any(g != {"collectives": mine["collectives"], "error": ""} for g in gathered):
        detail = "; ".join(
            f"rank {r}: {g['error'] or g['collectives']}" for r, g in enumerate(gathered)
        )
        log.warning("the graph's collectives are not timed (%s); the collective model prices "
                    "them", detail)
        return {}
    medians = [median_time(fn, item.group, item.device, repeats, warmup) for item, fn in zip(todo, calls)]
    agreed = exchange(medians, "graph-collective-times")
    times = {item.key: max(float(rank[i]) for rank in agreed) for i, item in enumerate(todo)}
    for item in todo:
        log.info("timed %s on group %s (%s, %s): %.3f ms", item.shared, item.group_name,
                 group_backend(item.group), item.device, times[item.key] * 1e3)
    return times
