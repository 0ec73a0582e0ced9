"""Regions around all-to-alls that can run as a pipeline of micro-chunks.

For every all-to-all of a Dynamo graph, regions are grown from several seed cuts (each dimension of
the tensors next to the collective, through its reshapes). Growth follows the split rules both ways,
to consumers and to producers, while every tensor keeps one consistent spec (cut along the same
factor, partial, or whole); an op without a rule, or whose rule disagrees, ends the region there.
The grown set is then trimmed to the span between its *anchors* (collectives and matmul-like ops):
elementwise work before the first or after the last anchor (the gating's mask arithmetic, say)
gains nothing from being chunked and would only add kernel launches. The largest region wins
(most collectives, then most anchors, then most nodes, then the longest cut factor).

For the reference MoE layer this is Tutel's pipeline: routing runs on the whole batch, the
dispatch einsum's output ``[E, C, d]`` is cut along the capacity slots ``C``, then the dispatch
all-to-all, the experts and the combine all-to-all run per chunk, and the combine einsum
``sec,ecm->sm`` sums over ``c``: each chunk yields a partial sum and the partials are added.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx

from graphsched.partition.mutation import conflicts_with_mutation, mutated_roots
from graphsched.partition.split_kinds import AllToAll
from graphsched.partition.split_rules import SplitRules, default_rules
from graphsched.partition.split_specs import (
    OUT,
    Cut,
    Partial,
    Spec,
    example_value,
    is_tensor_node,
    operands,
)
from graphsched.schedule.plans import module_path

_CALLS = ("call_function", "call_method")


@dataclass
class Region:
    """A set of nodes cut along one factor: every value it touches has a spec."""

    id: str
    nodes: list[fx.Node]
    #: Spec of every region node's output and of every boundary input that is cut.
    specs: dict[fx.Node, Spec]
    #: Size of the cut factor: a region can be cut into at most this many chunks.
    extent: int
    seed: str = ""
    module: str = ""
    #: Spec of each operand (see ``split_specs.operands``) of each region node: a value cut for
    #: one node may be used whole by another.
    uses: dict[fx.Node, list[Spec]] = field(default_factory=dict)
    _members: set[fx.Node] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self._members = set(self.nodes)
        for n in self.nodes:
            if n not in self.uses:
                self.uses[n] = [self.specs.get(a) for a in operands(n)]

    def operand_specs(self, node: fx.Node) -> list[Spec]:
        return self.uses[node]

    def __contains__(self, node: object) -> bool:
        return node in self._members

    def collectives(self, rules: SplitRules) -> list[fx.Node]:
        return [n for n in self.nodes if getattr(rules.lookup(n), "collective", False)]

    def anchors(self, rules: SplitRules) -> list[fx.Node]:
        return [n for n in self.nodes if _is_anchor(rules, n)]

    def inputs(self) -> list[fx.Node]:
        """Values from outside the region that the region cuts (each is split into chunks)."""
        seen: dict[fx.Node, None] = {}
        for n in self.nodes:
            for a, spec in zip(operands(n), self.uses[n]):
                if a not in self and isinstance(spec, Cut):
                    seen[a] = None
        return list(seen)

    def outputs(self) -> list[fx.Node]:
        """Region nodes whose value is used outside (each is joined: cat, or a sum of partials)."""
        return [n for n in self.nodes if any(u not in self for u in n.users)]

    def remapped(self, env: dict[fx.Node, fx.Node]) -> "Region":
        """The same region in a rebuilt graph (``env``: old node -> new node)."""
        return Region(
            self.id,
            [env[n] for n in self.nodes],
            {env[k]: v for k, v in self.specs.items() if k in env},
            self.extent,
            self.seed,
            self.module,
            {env[n]: list(v) for n, v in self.uses.items()},
        )

    def describe(self, rules: SplitRules | None = None) -> dict[str, Any]:
        rules = rules or default_rules()
        colls = self.collectives(rules)
        cut = self.specs.get(operands(colls[0])[0]) if colls else None
        return {
            "id": self.id,
            "module": self.module,
            "nodes": len(self.nodes),
            "collectives": [n.name for n in colls],
            "anchors": [n.name for n in self.anchors(rules)],
            "extent": self.extent,
            "cut": cut.describe() if cut is not None else "",
            "seed": self.seed,
            "inputs": [n.name for n in self.inputs()],
            "outputs": {n.name: _describe(self.specs[n]) for n in self.outputs()},
        }


def _describe(spec: Spec) -> str:
    return "whole" if spec is None else spec.describe()


def _is_anchor(rules: SplitRules, node: fx.Node) -> bool:
    rule = rules.lookup(node)
    return bool(rule is not None and (rule.anchor or rule.collective))


def _ends_span(rules: SplitRules, node: fx.Node) -> bool:
    """An anchor, or a collective's wait: with a combine that is no matmul (gathers, as in
    DeepSpeed's layer) the last anchor is the combine all-to-all, and trimming at it would cut its
    wait off and, with it (see ``_unwaited_outside``), the all-to-all itself."""
    return _is_anchor(rules, node) or bool(getattr(rules.lookup(node), "wait", False))


# -- seeds -----------------------------------------------------------------------------------


def _free_chain_back(value: fx.Node, rules: SplitRules) -> list[fx.Node]:
    """``value`` and the values it is a pure re-view of (reshape / transpose / wait), upstream."""
    chain = [value]
    while value.op in _CALLS and getattr(rules.lookup(value), "free", False):
        ops = operands(value)
        if len(ops) != 1:
            break
        value = ops[0]
        chain.append(value)
    return chain


def _free_chain_forward(value: fx.Node, rules: SplitRules) -> list[fx.Node]:
    chain, queue = [], deque([value])
    while queue:
        v = queue.popleft()
        chain.append(v)
        for u in v.users:
            if u.op in _CALLS and getattr(rules.lookup(u), "free", False) and is_tensor_node(u):
                queue.append(u)
    return chain


def _seeds(collective: fx.Node, rules: SplitRules) -> Iterator[tuple[fx.Node, Cut]]:
    """Candidate cuts next to a collective: every dim of the tensors around it, plus, for the
    all-to-all's input, the rows inside each rank's block."""
    ops = operands(collective)
    if not ops:
        return
    values = _free_chain_back(ops[0], rules) + _free_chain_forward(collective, rules)
    for v in values:
        shape = tuple(int(s) for s in example_value(v).shape)
        for d, size in enumerate(shape):
            if size >= 2:
                yield v, Cut(d, size)
    rule = rules.lookup(collective)
    if isinstance(rule, AllToAll):
        world = rule.world(collective)
        rows = int(example_value(ops[0]).shape[0])
        if world and world > 1 and rows % world == 0 and rows // world >= 2:
            yield ops[0], Cut(0, rows // world, outer=world)


# -- growth ----------------------------------------------------------------------------------


@dataclass
class _Grown:
    nodes: set[fx.Node]
    specs: dict[fx.Node, Spec]
    #: node -> its rule's assignment (slot -> spec)
    assignments: dict[fx.Node, dict]


def _grow(seed: fx.Node, spec: Cut, rules: SplitRules, taken: set[fx.Node]) -> _Grown:
    specs: dict[fx.Node, Spec] = {seed: spec}
    region: set[fx.Node] = set()
    #: Rejected nodes and how many of their slots were known then: retried once more are known.
    rejected: dict[fx.Node, int] = {}
    #: Values some region node uses whole: their producers may not join the region.
    whole: set[fx.Node] = set()
    assignments: dict[fx.Node, dict] = {}
    queue: deque[fx.Node] = deque([seed, *seed.users])
    while queue:
        n = queue.popleft()
        if n in region or n in taken or n.op not in _CALLS:
            continue
        ops = operands(n)
        known = {j: specs[a] for j, a in enumerate(ops) if a in specs}
        if n in specs:
            known[OUT] = specs[n]
        if not known or len(known) <= rejected.get(n, -1):
            continue
        assignment = rules.assign(n, known)
        ok = assignment is not None and assignment.get(OUT) is not None and n not in whole
        if ok:
            for j, a in enumerate(ops):
                s = assignment.get(j)
                if s is None and a in region:
                    ok = False  # a chunked value needed whole here
                elif s is not None and a in specs and specs[a] != s:
                    ok = False
                elif isinstance(s, Partial) and a not in specs:
                    ok = False  # partial sums only come from region nodes, never from outside
        if not ok:
            rejected[n] = len(known)
            continue
        region.add(n)
        assignments[n] = assignment
        specs[n] = assignment[OUT]
        for j, a in enumerate(ops):
            s = assignment.get(j)
            if s is None:
                whole.add(a)
            elif a not in specs:
                specs[a] = s
                queue.append(a)
                queue.extend(a.users)
        queue.extend(n.users)
    return _Grown(region, specs, assignments)


# -- trimming --------------------------------------------------------------------------------


def _reach(starts: Iterable[fx.Node], step, within: set[fx.Node]) -> set[fx.Node]:
    seen = set(starts)
    queue = deque(seen)
    while queue:
        n = queue.popleft()
        for m in step(n):
            if m in within and m not in seen:
                seen.add(m)
                queue.append(m)
    return seen


def _users(n: fx.Node) -> list[fx.Node]:
    return list(n.users)


def _inputs(n: fx.Node) -> list[fx.Node]:
    return list(n.all_input_nodes)


def _trim(nodes: set[fx.Node], rules: SplitRules) -> set[fx.Node]:
    """Keep the nodes lying on a path between two anchors (inclusive)."""
    anchors = [n for n in nodes if _ends_span(rules, n)]
    after = _reach(anchors, _users, nodes)
    before = _reach(anchors, _inputs, nodes)
    return after & before


def _holes(nodes: set[fx.Node], all_nodes: set[fx.Node]) -> set[fx.Node]:
    """Outside nodes on a path from the region back into it (the region would not be convex)."""
    outside = all_nodes - nodes
    below = _reach(nodes, _users, all_nodes) - nodes
    above = _reach(nodes, _inputs, all_nodes) - nodes
    return below & above & outside


def _unwaited_outside(node: fx.Node, nodes: set[fx.Node], rules: SplitRules) -> bool:
    """A collective of the region whose result is used outside it before any wait.

    The chunks' copies of such a collective would be joined (``cat``) while their transfers are
    still in flight, and the wait outside would then wait on the join, not on the transfers: a
    read of buffers the communication stream is still writing. Every collective of a region
    must therefore be waited inside it.
    """
    return bool(getattr(rules.lookup(node), "collective", False)) and any(u not in nodes for u in node.users)


#: An outside value cut along an inner dimension is copied per chunk (its slices are strided):
#: worth it only while it is not much larger than what the region's collectives move.
COPY_LIMIT = 4


def _nbytes(node: fx.Node) -> int:
    val = example_value(node)
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def _strided(spec: Spec, node: fx.Node) -> bool:
    """A chunk of ``node`` under ``spec`` is not one contiguous block of it."""
    val = example_value(node)
    if not isinstance(spec, Cut) or not isinstance(val, torch.Tensor):
        return False
    return spec.outer > 1 or any(d != 1 for d in val.shape[: spec.dim])


def _copies_big_inputs(n: fx.Node, nodes: set[fx.Node], grown: _Grown, limit: int) -> bool:
    """``n`` reads an outside value cut strided that is over ``limit`` bytes: every chunk copies its
    slice (measured on an H200, gpu-smoke: the dispatch mask and combine weights [S, E, C] cut
    along C, 8x the all-to-all buffer, made chunking cost 2.5 ms of copies a step)."""
    assigned = grown.assignments.get(n, {})
    for j, a in enumerate(operands(n)):
        if a in nodes or not isinstance(a, fx.Node):
            continue
        spec = assigned.get(j)
        if isinstance(spec, Cut) and _strided(spec, a) and _nbytes(a) > limit:
            return True
    return False


def _collective_bytes(nodes: set[fx.Node], rules: SplitRules) -> int:
    sizes = [_nbytes(a) for n in nodes if getattr(rules.lookup(n), "collective", False)
             for a in operands(n) if isinstance(a, fx.Node)]
    return max(sizes, default=0)


def _finish(grown: _Grown, rules: SplitRules, all_nodes: set[fx.Node]) -> set[fx.Node]:
    nodes = _trim(grown.nodes, rules)
    limit = COPY_LIMIT * _collective_bytes(nodes, rules)
    while True:
        drop: set[fx.Node] = set()
        for n in nodes:
            if limit and _copies_big_inputs(n, nodes, grown, limit):
                drop.add(n)
            if _unwaited_outside(n, nodes, rules):
                drop |= _reach([n], _users, nodes)
            for a in operands(n):
                # A partial coming from outside cannot be split into addends.
                if a not in nodes and isinstance(grown.specs.get(a), Partial):
                    drop.add(n)
        holes = _holes(nodes, all_nodes)
        if holes:
            drop |= _reach(holes, _users, all_nodes) & nodes
        if not drop:
            return nodes
        nodes = _trim(nodes - drop, rules)


def _extent(nodes: set[fx.Node], specs: dict[fx.Node, Spec]) -> int:
    extents = {s.extent for n in nodes if isinstance(s := specs.get(n), Cut)}
    return max(extents, default=0)


def find_regions(gm: fx.GraphModule | fx.Graph, rules: SplitRules | None = None) -> list[Region]:
    """The best region around every all-to-all (regions do not overlap), in graph order."""
    rules = rules or default_rules()
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    order = {n: i for i, n in enumerate(graph.nodes)}
    all_nodes = set(order)
    taken: set[fx.Node] = set()
    regions: list[Region] = []
    mutations = mutated_roots(graph)
    for node in graph.nodes:
        if node in taken or not getattr(rules.lookup(node), "collective", False):
            continue
        best: tuple[tuple, Region] | None = None
        tried: set[frozenset[fx.Node]] = set()
        for value, spec in _seeds(node, rules):
            grown = _grow(value, spec, rules, taken)
            if node not in grown.nodes:
                continue
            nodes = _finish(grown, rules, all_nodes)
            key_nodes = frozenset(nodes)
            if node not in nodes or key_nodes in tried:
                continue
            tried.add(key_nodes)
            if conflicts_with_mutation(nodes, order, mutations):
                continue  # an in-place op would see the chunks at another time (mutation.py)
            extent = _extent(nodes, grown.specs)
            if extent < 2:
                continue
            specs = {n: grown.specs[n] for n in nodes}
            uses = {n: [grown.assignments[n].get(j) for j in range(len(operands(n)))] for n in nodes}
            for n in nodes:
                for a, s in zip(operands(n), uses[n]):
                    if a not in nodes and s is not None:
                        specs[a] = s
            ordered = sorted(nodes, key=order.__getitem__)
            region = Region("", ordered, specs, extent, seed=f"{value.name}: {spec.describe()}", uses=uses)
            n_coll = len(region.collectives(rules))
            key = (n_coll, len(region.anchors(rules)), len(ordered), extent)
            if best is None or key > best[0]:
                best = (key, region)
        if best is not None:
            region = best[1]
            region.id = f"r{len(regions)}"
            colls = region.collectives(rules)
            region.module = module_path(colls[0]) if colls else ""
            regions.append(region)
            taken |= set(region.nodes)
    return regions


__all__ = ["Region", "find_regions"]
