"""Structural checks on captured graphs, used by the tests (and handy when debugging a model)."""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

from graphsched.analysis.graph import GraphAnalysis
from graphsched.analysis.labels import GraphKind, NodeKind, Phase


def output_positions(gm: fx.GraphModule) -> dict[str, list[int]]:
    """Node name -> the output positions it is returned at."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    args = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    positions: dict[str, list[int]] = {}
    for i, a in enumerate(args):
        if isinstance(a, fx.Node):
            positions.setdefault(a.name, []).append(i)
    return positions


def phase_label_violations(
    analysis: GraphAnalysis, gm: fx.GraphModule, param_positions: set[int]
) -> list[str]:
    """Everything wrong with a backward graph's phase labels, as readable strings (empty: fine).

    - the node returned as each parameter's gradient must be labelled weight-gradient;
    - a weight-gradient node must reach exactly one output, a parameter gradient, and no collective;
    - every node that feeds a collective or an input gradient must be labelled input-gradient.
    """
    assert analysis.graph_kind == GraphKind.BACKWARD
    dag = analysis.dag
    outs = output_positions(gm)
    problems: list[str] = []
    collective_nodes = {
        n for n in analysis.order if analysis.node(n).kind in (NodeKind.COLLECTIVE_ISSUE, NodeKind.COLLECTIVE_WAIT)
    }
    for name, positions in outs.items():
        if name not in dag or analysis.node(name).kind in (NodeKind.PLACEHOLDER,):
            continue
        if any(p in param_positions for p in positions) and analysis.node(name).phase != Phase.WEIGHT_GRAD:
            problems.append(f"{name} returns a parameter gradient but is labelled {analysis.node(name).phase}")
    for name in analysis.order:
        phase = analysis.node(name).phase
        desc = nx.descendants(dag, name) | {name}
        reached_outputs = {p for d in desc for p in outs.get(d, [])}
        if phase == Phase.WEIGHT_GRAD:
            if desc & collective_nodes:
                problems.append(f"weight-gradient node {name} feeds a collective")
            if len(reached_outputs) != 1 or not reached_outputs <= param_positions:
                problems.append(f"weight-gradient node {name} reaches outputs {sorted(reached_outputs)}")
        elif phase == Phase.INPUT_GRAD and analysis.node(name).kind == NodeKind.COMPUTE:
            feeds_collective = bool(desc & collective_nodes)
            feeds_input_grad = bool(reached_outputs - param_positions)
            several = len(reached_outputs) > 1
            if not (feeds_collective or feeds_input_grad or several or not reached_outputs):
                problems.append(f"input-gradient node {name} only feeds parameter gradient {reached_outputs}")
    return problems
