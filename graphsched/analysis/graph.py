"""The dependency graph of one captured FX graph, with labels, costs and overlap regions.

``analyse_graph`` turns a GraphModule into a :class:`GraphAnalysis`: a networkx DAG whose nodes are
FX node names, each carrying a :class:`NodeInfo` (kind, phase, op, cost, gradient target), plus,
for every collective, the region of compute that neither feeds it nor depends on it (what could run
while it is in flight) and that region's estimated cost. Read a node's record with
``GraphAnalysis.node(name)``; this module is the only one that knows how the DAG stores it.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence, TypeVar

import networkx as nx
import torch
import torch.fx as fx

from graphsched.analysis.provenance import CostSource, source_summary
from graphsched.analysis.labels import (
    GraphKind,
    NodeKind,
    Phase,
    gradient_reach,
    label_phases,
    weight_grad_target,
    node_kind,
    op_name,
)
from graphsched.errors import UnwaitedCollectiveError

CostFn = Callable[[fx.Node], float]

_Item = TypeVar("_Item", bound=Hashable)


def ordered_topological_sort(
    items: Iterable[_Item],
    successors: Callable[[_Item], Iterable[_Item]],
    key: Callable[[_Item], Any],
) -> list[_Item]:
    """Kahn's algorithm that, among the ready items, always takes the one with the smallest key.

    ``successors(x)``: the items that depend on ``x`` (each dependency edge once per listing; an
    edge listed twice must be waited for twice). Keys must be distinct, so the order is unique.
    Items on or behind a dependency cycle never become ready and are missing from the result:
    callers compare its length with the item count.
    """
    items = list(items)
    pending = {x: 0 for x in items}
    for x in items:
        for s in successors(x):
            pending[s] += 1
    ready = [(key(x), x) for x in items if pending[x] == 0]
    heapq.heapify(ready)
    order: list[_Item] = []
    while ready:
        _, x = heapq.heappop(ready)
        order.append(x)
        for s in successors(x):
            pending[s] -= 1
            if pending[s] == 0:
                heapq.heappush(ready, (key(s), s))
    return order


@dataclass
class NodeInfo:
    """What the analysis knows of one node."""

    kind: NodeKind
    #: The op's name (``aten::mm``, ``_c10d_functional::all_to_all_single``, ``placeholder``...).
    op: str
    #: The phase of a call_function node (None for placeholders and the output).
    phase: Phase | None = None
    #: Estimated seconds (compute nodes and collective issues; 0 for everything else).
    cost: float = 0.0
    #: A weight-gradient node: the output position of the one parameter gradient it feeds.
    grad_target: int | None = None
    #: Where ``cost`` came from (measured in the step, measured alone, estimated).
    cost_source: CostSource = CostSource.ESTIMATED


#: The DAG node attribute that holds a node's NodeInfo.
_INFO = "info"


def node_info(dag: nx.DiGraph, name: str) -> NodeInfo:
    """The record of node ``name`` of an analysis DAG."""
    return dag.nodes[name][_INFO]


@dataclass
class CollectiveInfo:
    """One collective: where it is issued and waited for, and what could overlap it."""

    issue: str
    wait: str | None
    op: str
    nbytes: int
    #: Compute nodes with no path to the issue and no path from it.
    independent: list[str] = field(default_factory=list)
    independent_cost: float = 0.0
    #: Of those, the weight-gradient ones (Lancet's candidates in backward).
    independent_weight_grad_cost: float = 0.0
    cost: float = 0.0


@dataclass
class GraphAnalysis:
    name: str
    graph_kind: GraphKind
    dag: nx.DiGraph
    order: list[str]
    collectives: list[CollectiveInfo]
    graph_hash: str
    #: How much slower compute runs while a collective is in flight (the cost function's
    #: ``contention``; 1.0 when it has none), for the scheduler's simulator.
    contention: float = 1.0

    def node(self, name: str) -> NodeInfo:
        """The record of node ``name`` (kind, phase, op, cost, gradient target)."""
        return node_info(self.dag, name)

    def node_costs(self) -> dict[str, float]:
        """Estimated seconds of every compute node and collective issue (what plans record)."""
        costs: dict[str, float] = {}
        for n in self.order:
            info = self.node(n)
            if info.kind in (NodeKind.COMPUTE, NodeKind.COLLECTIVE_ISSUE):
                costs[n] = float(info.cost)
        return costs

    def cost_sources(self) -> dict[str, CostSource]:
        """Where each cost of :meth:`node_costs` came from."""
        return {n: self.node(n).cost_source for n in self.node_costs()}

    def cost_summary(self) -> dict[str, dict[str, float]]:
        """Count and time share of each cost source over the costed nodes (JSON)."""
        return source_summary((self.node(n).cost, self.node(n).cost_source) for n in self.node_costs())

    def set_costs(self, costs: dict[str, float], sources: dict[str, CostSource] | None = None) -> None:
        """Replace node costs (and, where given, their sources); the collectives' sums follow.

        Names the graph does not have are ignored: costs are matched by node name only."""
        for name, cost in costs.items():
            if name in self.dag:
                self.node(name).cost = float(cost)
        for name, source in (sources or {}).items():
            if name in self.dag:
                self.node(name).cost_source = CostSource(source)
        for c in self.collectives:
            c.cost = self.node(c.issue).cost
            c.independent_cost = sum(self.node(n).cost for n in c.independent)
            c.independent_weight_grad_cost = sum(
                self.node(n).cost for n in c.independent if self.node(n).phase == Phase.WEIGHT_GRAD
            )


def _meta_signature(node: fx.Node) -> str:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    parts = []
    for v in vals:
        if isinstance(v, torch.Tensor):
            parts.append(f"{tuple(v.shape)}:{v.dtype}")
        else:
            parts.append(type(v).__name__)
    return ",".join(parts)


def graph_hash(graph: fx.Graph) -> str:
    """Structural hash: ops, argument wiring, constants and output shapes, in graph order.

    Identical on every rank of an SPMD program (node names and process-group names included, as
    both are deterministic), and different as soon as a shape or an op differs.
    """
    index = {n: i for i, n in enumerate(graph.nodes)}
    h = hashlib.sha256()

    def enc(a: object) -> str:
        if isinstance(a, fx.Node):
            return f"%{index[a]}"
        if isinstance(a, (list, tuple)):
            return "[" + ",".join(enc(x) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ",".join(f"{k}:{enc(v)}" for k, v in sorted(a.items())) + "}"
        return repr(a)

    for n in graph.nodes:
        h.update(f"{n.op}|{op_name(n)}|{enc(n.args)}|{enc(n.kwargs)}|{_meta_signature(n)}\n".encode())
    return h.hexdigest()


def collective_nbytes(node: fx.Node) -> int:
    """Bytes of the tensor a collective issue node sends (its first tensor input)."""
    for a in node.args:
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor):
                return int(v.numel() * v.element_size())
    return 0


def is_random(node: fx.Node) -> bool:
    """Ops that draw from the global RNG: their relative order decides the numbers they draw.

    The attention kernels are tagged as seeded for their dropout, but draw nothing when
    ``dropout_p`` is 0: chaining them in captured order would tie every micro-batch's attention
    to the one before it, and with it that micro-batch's all-to-alls."""
    target = node.target
    return (
        node.op == "call_function"
        and isinstance(target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded in target.tags
        and not _without_dropout(node)
    )


def _without_dropout(node: fx.Node) -> bool:
    """True for a call whose schema has a ``dropout_p`` argument that is 0 in this call."""
    for i, arg in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if arg.name != "dropout_p":
            continue
        if arg.name in node.kwargs:
            value = node.kwargs[arg.name]
        elif i < len(node.args) and not arg.kwarg_only:
            value = node.args[i]
        else:
            value = arg.default_value
        return isinstance(value, (int, float)) and value == 0
    return False


def random_order_edges(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """Edges chaining random ops in captured order, so no schedule reorders their draws."""
    randoms = [n for n in graph.nodes if is_random(n)]
    return list(zip(randoms, randoms[1:]))


def build_dag(graph: fx.Graph) -> nx.DiGraph:
    dag = nx.DiGraph()
    for n in graph.nodes:
        dag.add_node(n.name)
        for inp in n.all_input_nodes:
            dag.add_edge(inp.name, n.name)
    for a, b in random_order_edges(graph):
        dag.add_edge(a.name, b.name, order_only=True)
    return dag


def _check_waited(graph: fx.Graph, dag: nx.DiGraph) -> None:
    """Refuse a graph that reads a collective's result before waiting for it.

    Such a graph reads a buffer the transfer may still be writing: its numbers depend on timing,
    and no order can make them right (tuple results reach their waits through ``getitem``).
    """
    def waited(user: fx.Node) -> bool:
        kind = node_info(dag, user.name).kind
        if kind == NodeKind.COLLECTIVE_WAIT:
            return True
        # Views and tuple indexing read no data: what matters is that their readers wait.
        return kind == NodeKind.VIEW and bool(user.users) and all(waited(u) for u in user.users)

    for n in graph.nodes:
        if node_info(dag, n.name).kind == NodeKind.COLLECTIVE_ISSUE:
            early = [u.name for u in n.users if not waited(u)]
            if early:
                raise UnwaitedCollectiveError(
                    f"graphsched: {n.name}'s result is read by {early} before its wait_tensor, so "
                    "the graph reads a buffer the transfer may still be writing. Every functional "
                    "collective must be waited (funcol.wait_tensor or an AsyncCollectiveTensor's "
                    "first use) before use; fix the model's collective calls."
                )


def analyse_graph(
    gm: fx.GraphModule,
    name: str,
    graph_kind: GraphKind,
    cost_fn: CostFn,
    param_grad_positions: Sequence[int] | None = None,
) -> GraphAnalysis:
    """Labels, dependencies, costs and overlap regions of ``gm``.

    A cost function with a ``prepare(gm)`` method is given the graph first (measured costs time
    the graph's collectives there, before any rank can take another path; see
    ``graph_collectives.py``), and its ``contention`` attribute, if any, goes into the analysis.
    """
    prepare = getattr(cost_fn, "prepare", None)
    if prepare is not None:
        prepare(gm)
    graph = gm.graph
    dag = build_dag(graph)
    # One pass over the backward graph says which gradient each node reaches: the phases and the
    # weight-gradient targets are both read from it.
    reach = gradient_reach(graph, param_grad_positions) if graph_kind == GraphKind.BACKWARD else None
    phases = label_phases(graph, graph_kind, param_grad_positions, reach=reach)
    by_name = {n.name: n for n in graph.nodes}
    # A cost function may say where each number comes from (MeasuredCosts does); others estimate.
    source_of = getattr(cost_fn, "cost_source", None)
    info: dict[str, NodeInfo] = {}
    for n in graph.nodes:
        kind = node_kind(n)
        phase = phases.get(n.name)
        costed = kind in (NodeKind.COMPUTE, NodeKind.COLLECTIVE_ISSUE)
        info[n.name] = dag.nodes[n.name][_INFO] = NodeInfo(
            kind=kind,
            op=op_name(n),
            phase=phase,
            cost=float(cost_fn(n)) if costed else 0.0,
            cost_source=CostSource(source_of(n)) if costed and callable(source_of) else CostSource.ESTIMATED,
            # Which parameter's gradient a weight-gradient node feeds (per-parameter dW chains are
            # independent of each other, so the scheduler may move each on its own).
            grad_target=(
                weight_grad_target(reach.get(n.name)) if reach is not None and phase == Phase.WEIGHT_GRAD else None
            ),
        )

    _check_waited(graph, dag)
    collectives: list[CollectiveInfo] = []
    compute_nodes = [n.name for n in graph.nodes if info[n.name].kind == NodeKind.COMPUTE]
    for n in graph.nodes:
        if info[n.name].kind != NodeKind.COLLECTIVE_ISSUE:
            continue
        waits = [u.name for u in n.users if info[u.name].kind == NodeKind.COLLECTIVE_WAIT]
        related = nx.ancestors(dag, n.name) | nx.descendants(dag, n.name)
        independent = [c for c in compute_nodes if c not in related]
        collectives.append(
            CollectiveInfo(
                issue=n.name,
                wait=waits[0] if waits else None,
                op=info[n.name].op,
                nbytes=collective_nbytes(by_name[n.name]),
                independent=independent,
                independent_cost=sum(info[c].cost for c in independent),
                independent_weight_grad_cost=sum(
                    info[c].cost for c in independent if info[c].phase == Phase.WEIGHT_GRAD
                ),
                cost=info[n.name].cost,
            )
        )
    return GraphAnalysis(
        name=name,
        graph_kind=graph_kind,
        dag=dag,
        order=[n.name for n in graph.nodes],
        collectives=collectives,
        graph_hash=graph_hash(graph),
        contention=float(getattr(cost_fn, "contention", 1.0)),
    )
