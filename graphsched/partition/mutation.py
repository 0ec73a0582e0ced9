"""In-place ops in a Dynamo graph, as far as chunking must know them.

The chunk rewrite moves a region's nodes to the position of its last node and splits its inputs
there. An in-place op (``buf.scatter_(...)``, ``x += y``, ``x[i] = v``) that runs in between, or
that writes a value the region reads, would then be seen at another time than in the captured
graph: such a region is not chunked (it stays whole and right).
"""

from __future__ import annotations

import operator
from typing import Iterable

import torch
import torch.fx as fx

_INPLACE_FUNCTIONS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul,
})
#: Ops whose result may share memory with their first operand.
_ALIASING_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "expand", "expand_as",
    "squeeze", "unsqueeze", "flatten", "unflatten", "narrow", "select", "split", "chunk", "unbind",
    "detach", "contiguous", "to", "type_as", "as_strided", "diagonal", "movedim", "swapaxes",
    "__getitem__",
})


def is_inplace(node: fx.Node) -> bool:
    """Whether ``node`` writes into one of its operands."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op != "call_function":
        return False
    target = node.target
    if target in _INPLACE_FUNCTIONS:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def _aliases_first_operand(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _ALIASING_METHODS
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target is operator.getitem or name in _ALIASING_METHODS
    return False


def alias_root(node: fx.Node) -> fx.Node:
    """The value ``node`` may share memory with, following views back to their base."""
    while _aliases_first_operand(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def mutated_roots(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Each in-place node -> the base value it writes."""
    return {n: alias_root(n.args[0]) for n in graph.nodes
            if is_inplace(n) and n.args and isinstance(n.args[0], fx.Node)}


def conflicts_with_mutation(nodes: Iterable[fx.Node], order: dict[fx.Node, int],
                            mutations: dict[fx.Node, fx.Node]) -> bool:
    """A region (``nodes``) whose chunking could change what an in-place op reads or writes."""
    members = set(nodes)
    if not mutations or not members:
        return False
    first = min(order[n] for n in members)
    last = max(order[n] for n in members)
    touched = {alias_root(a) for n in members for a in n.all_input_nodes} | {alias_root(n) for n in members}
    for node, root in mutations.items():
        if node in members or first < order[node] < last or root in touched:
            return True
    return False


__all__ = ["alias_root", "conflicts_with_mutation", "is_inplace", "mutated_roots"]
