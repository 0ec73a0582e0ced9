"""Classify the nodes of an aten-level FX graph: what kind of work, and which phase of training.

Kinds: ``compute`` (does arithmetic), ``view`` (metadata only: view, permute, getitem, ...),
``collective_issue`` (starts an asynchronous collective), ``collective_wait`` (blocks until one
finishes), ``placeholder`` and ``output``.

Phases: ``forward`` for every node of a forward or inference graph. In a backward graph a node is
``weight_grad`` when everything it computes flows into the gradient of exactly one parameter and
into no collective: nothing else waits for it, so it can be deferred to overlap communication
(Lancet's dW). Every other backward node is ``input_grad``: it lies on the chain of activation
gradients that the next collective, or the next layer, waits for.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import torch
import torch.fx as fx

from graphsched.analysis.costmodel import is_collective_node, is_view_node, is_wait_node
from graphsched.plan import Phase  # one Phase for graph nodes and plan tasks


class NodeKind(str, Enum):
    COMPUTE = "compute"
    VIEW = "view"
    COLLECTIVE_ISSUE = "collective_issue"
    COLLECTIVE_WAIT = "collective_wait"
    PLACEHOLDER = "placeholder"
    OUTPUT = "output"


class GraphKind(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    INFERENCE = "inference"


def _op_name(target: object) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.name()
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target)
    return getattr(target, "__name__", str(target))


def node_kind(node: fx.Node) -> NodeKind:
    """The kind of a node, from the cost model's op classification (one source of truth)."""
    if node.op == "placeholder":
        return NodeKind.PLACEHOLDER
    if node.op == "output":
        return NodeKind.OUTPUT
    if node.op != "call_function":
        # get_attr / call_module / call_method do not appear in AOTAutograd graphs; treat them as
        # compute so that they are never reordered past something they might depend on.
        return NodeKind.COMPUTE
    if is_wait_node(node):
        return NodeKind.COLLECTIVE_WAIT
    if is_collective_node(node):
        return NodeKind.COLLECTIVE_ISSUE
    if is_view_node(node):
        return NodeKind.VIEW
    return NodeKind.COMPUTE


def op_name(node: fx.Node) -> str:
    return _op_name(node.target) if node.op == "call_function" else node.op


@dataclass(frozen=True)
class _Many:
    """Marker: a node's results reach more than one gradient, or a collective."""


_MANY = _Many()


def gradient_reach(graph: fx.Graph, param_grad_positions: Sequence[int] | None) -> dict[str, object]:
    """For every node of a backward graph: the single parameter-gradient output position it
    reaches (an int), ``None`` when it reaches no output, or a marker object when it reaches
    several outputs, an input gradient or a collective."""
    param_positions = set(param_grad_positions or ())
    nodes = list(graph.nodes)
    reach: dict[fx.Node, object] = {}

    def merge(a: object, b: object) -> object:
        if a is None:
            return b
        if b is None or a == b:
            return a
        return _MANY

    for node in reversed(nodes):
        if node.op == "output":
            continue
        acc: object = None
        for user in node.users:
            if user.op == "output":
                outs = user.args[0]
                outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                for pos, out in enumerate(outs):
                    if out is node:
                        acc = merge(acc, pos if pos in param_positions else _MANY)
            elif node_kind(user) in (NodeKind.COLLECTIVE_ISSUE, NodeKind.COLLECTIVE_WAIT):
                acc = _MANY
            else:
                acc = merge(acc, reach.get(user))
            if acc is _MANY:
                break
        reach[node] = acc
    return {n.name: r for n, r in reach.items()}


def weight_grad_target(reach: object) -> int | None:
    """The parameter-gradient position a weight-gradient node feeds, else None."""
    if isinstance(reach, int) and not isinstance(reach, bool):
        return reach
    return None


def label_phases(
    graph: fx.Graph,
    graph_kind: GraphKind,
    param_grad_positions: Sequence[int] | None,
    reach: dict[str, object] | None = None,
) -> dict[str, Phase]:
    """Phase of every call_function node of ``graph``.

    ``param_grad_positions`` lists the positions of the backward graph's outputs that are parameter
    gradients (the backward outputs line up one to one with the forward's primal inputs). With
    ``None`` nothing is labelled weight-gradient (conservative: nothing is deferred). ``reach``:
    ``gradient_reach(graph, param_grad_positions)`` when the caller has it already.
    """
    if graph_kind != GraphKind.BACKWARD:
        return {n.name: Phase.FORWARD for n in graph.nodes if n.op == "call_function"}
    if reach is None:
        reach = gradient_reach(graph, param_grad_positions)
    phases: dict[str, Phase] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        single_param = weight_grad_target(reach.get(node.name)) is not None
        if single_param and node_kind(node) in (NodeKind.COMPUTE, NodeKind.VIEW):
            phases[node.name] = Phase.WEIGHT_GRAD
        else:
            phases[node.name] = Phase.INPUT_GRAD
    return phases
