"""Turn a node order into a Plan: coarsen nodes into tasks and bind each task to a stream.

Also the two orders that need no solver: ``identity`` (the captured order) and
``reverse_independent`` (a different valid order: among the ready nodes always take the one captured
last). The latter exists to prove that the runtime's results do not depend on the order.
"""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from graphsched.analysis.graph import GraphAnalysis, ordered_topological_sort, random_order_edges
from graphsched.analysis.labels import NodeKind
from graphsched.plan import COMM_STREAM, COMPUTE_STREAM, Phase, Plan, Task, TaskKind


def module_path(node: fx.Node) -> str:
    """The dotted module path a node came from (forward stack, or the forward's for backward)."""
    for key in ("nn_module_stack", "fwd_nn_module_stack"):
        stack = node.meta.get(key)
        if stack:
            path = list(stack.values())[-1][0]
            return _clean_path(str(path))
    return ""


def _clean_path(path: str) -> str:
    # Dynamo spells paths like "L['self'].layers[0].attn" or "L__self___layers_0_attn".
    for prefix in ("L['self'].", "L['self']", "L__self___"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path.replace("[", ".").replace("]", "").replace("'", "")


_ROLE = {Phase.FORWARD: "fwd", Phase.INPUT_GRAD: "dX", Phase.WEIGHT_GRAD: "dW"}


def tasks_from_order(
    analysis: GraphAnalysis, gm: fx.GraphModule, order: Sequence[str]
) -> list[Task]:
    """Coarsen an order of call_function nodes into tasks.

    A collective issue is a task of its own on the communication stream, a wait one on the compute
    stream; consecutive compute/view nodes of one phase form one compute task.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    tasks: list[Task] = []
    for name in order:
        attrs = analysis.dag.nodes[name]
        kind: NodeKind = attrs["kind"]
        phase: Phase = attrs["phase"] or Phase.FORWARD
        path = module_path(by_name[name]) or "graph"
        if kind == NodeKind.COLLECTIVE_ISSUE:
            op = attrs["op"].split("::")[-1]
            tasks.append(Task(f"{path}.{op}", [name], COMM_STREAM, TaskKind.COLLECTIVE_ISSUE, phase))
        elif kind == NodeKind.COLLECTIVE_WAIT:
            tasks.append(Task(f"{path}.wait", [name], COMPUTE_STREAM, TaskKind.COLLECTIVE_WAIT, phase))
        else:
            last = tasks[-1] if tasks else None
            if last is not None and last.kind == TaskKind.COMPUTE and last.phase == phase:
                last.nodes.append(name)
            else:
                tasks.append(Task(f"{path}.{_ROLE[phase]}", [name], COMPUTE_STREAM, TaskKind.COMPUTE, phase))
    _number_duplicate_names(tasks)
    pair_collectives(tasks, analysis)
    return tasks


def pair_collectives(tasks: Sequence[Task], analysis: GraphAnalysis) -> None:
    """Name in every wait task the collective task it completes (``Task.collective``).

    The one place where a plan's collective/wait pairs are made, from the analysis' pairs of issue
    and wait nodes; run it once the tasks have their final names.
    """
    task_of = {n: t for t in tasks for n in t.nodes}
    for c in analysis.collectives:
        issue = task_of.get(c.issue)
        wait = task_of.get(c.wait) if c.wait is not None else None
        if issue is None or wait is None:
            continue
        if issue.kind == TaskKind.COLLECTIVE_ISSUE and wait.kind == TaskKind.COLLECTIVE_WAIT:
            wait.collective = issue.name


def _number_duplicate_names(tasks: list[Task]) -> None:
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t.name] = counts.get(t.name, 0) + 1
    seen: dict[str, int] = {}
    for t in tasks:
        if counts[t.name] > 1:
            i = seen.get(t.name, 0)
            seen[t.name] = i + 1
            t.name = f"{t.name}[{i}]"


def captured_order(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function"]


def reverse_independent_order(gm: fx.GraphModule) -> list[str]:
    """A topological order that, among ready nodes, always takes the one captured last."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    position = {n: i for i, n in enumerate(nodes)}
    # Data edges plus the chain that keeps random ops in captured order.
    users: dict[fx.Node, list[fx.Node]] = {n: [u for u in n.users if u in position] for n in nodes}
    for a, b in random_order_edges(gm.graph):
        users[a].append(b)
    order = ordered_topological_sort(nodes, users.__getitem__, lambda n: (-position[n], n.name))
    return [n.name for n in order]


def plan_from_order(
    analysis: GraphAnalysis, gm: fx.GraphModule, order: Sequence[str], schedule: str
) -> Plan:
    return Plan(
        graph_name=analysis.name,
        graph_hash=analysis.graph_hash,
        tasks=tasks_from_order(analysis, gm, order),
        options={"schedule": schedule},
        # The estimates the graph was analysed with: enough to predict a timeline of the plan.
        costs=analysis.node_costs(),
    )


def simple_plan(analysis: GraphAnalysis, gm: fx.GraphModule, schedule: str) -> Plan:
    """The plan of a schedule that needs no cost model: ``identity`` or ``reverse_independent``."""
    if schedule == "identity":
        return plan_from_order(analysis, gm, captured_order(gm), schedule)
    if schedule == "reverse_independent":
        return plan_from_order(analysis, gm, reverse_independent_order(gm), schedule)
    raise ValueError(f"simple_plan does not make {schedule!r} plans")
