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
from graphsched.schedule.coarsen import task_kind


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


#: The role of a compute task in its name, by phase.
_ROLE = {Phase.FORWARD: "fwd", Phase.INPUT_GRAD: "dX", Phase.WEIGHT_GRAD: "dW"}


def task_label(analysis: GraphAnalysis, node: fx.Node, kind: TaskKind, phase: Phase) -> str:
    """The name of a task whose first node is ``node``, before duplicates are numbered:
    ``<module>.<collective op>`` for a collective, ``<module>.wait`` for a wait and
    ``<module>.fwd|dX|dW`` for compute (``graph`` when the node has no module)."""
    path = module_path(node) or "graph"
    if kind == TaskKind.COLLECTIVE_ISSUE:
        return f"{path}.{analysis.node(node.name).op.split('::')[-1]}"
    if kind == TaskKind.COLLECTIVE_WAIT:
        return f"{path}.wait"
    return f"{path}.{_ROLE[phase]}"


def stream_of(kind: TaskKind) -> str:
    """Collectives run on the communication stream, everything else (waits too) on compute."""
    return COMM_STREAM if kind == TaskKind.COLLECTIVE_ISSUE else COMPUTE_STREAM


def finish_tasks(tasks: Sequence[Task], analysis: GraphAnalysis) -> None:
    """Give tasks named by :func:`task_label` their final names and pair waits with collectives.

    Of the tasks that share a label the first keeps it and the later ones get ``[1]``, ``[2]``, ...
    in plan order. Every way of making a plan ends here, so names and pairs are made one way.
    """
    seen: dict[str, int] = {}
    for t in tasks:
        count = seen.get(t.name, 0)
        seen[t.name] = count + 1
        if count:
            t.name = f"{t.name}[{count}]"
    pair_collectives(tasks, analysis)


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
        info = analysis.node(name)
        kind = task_kind(info.kind)
        phase: Phase = info.phase or Phase.FORWARD
        last = tasks[-1] if tasks else None
        if kind == TaskKind.COMPUTE and last is not None and last.kind == TaskKind.COMPUTE and last.phase == phase:
            last.nodes.append(name)
            continue
        label = task_label(analysis, by_name[name], kind, phase)
        tasks.append(Task(label, [name], stream_of(kind), kind, phase))
    finish_tasks(tasks, analysis)
    return tasks


def pair_collectives(tasks: Sequence[Task], analysis: GraphAnalysis) -> None:
    """Name in every wait task the collective task it completes (``Task.collective``).

    The one place where a plan's collective/wait pairs are made: a wait completes the collective
    issue its input comes from, through views (a chunked graph slices a collective's output
    before waiting on each slice; a coalesced collective's outputs reach their waits through
    ``getitem``). Run it once the tasks have their final names. A wait it cannot pair keeps
    ``collective=None``, which ``Plan`` refuses.
    """
    task_of = {n: t for t in tasks for n in t.nodes}
    for wait in tasks:
        if wait.kind != TaskKind.COLLECTIVE_WAIT:
            continue
        found = {
            task_of[issue].name
            for node in wait.nodes
            for issue in issues_behind(analysis, node)
            if issue in task_of and task_of[issue].kind == TaskKind.COLLECTIVE_ISSUE
        }
        if len(found) == 1:
            wait.collective = found.pop()


def issues_behind(analysis: GraphAnalysis, node: str) -> set[str]:
    """The collective issue nodes whose results reach ``node`` through views only."""
    found: set[str] = set()
    todo = [p for p, _, data in analysis.dag.in_edges(node, data=True) if not data.get("order_only")]
    seen: set[str] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        kind = analysis.node(p).kind
        if kind == NodeKind.COLLECTIVE_ISSUE:
            found.add(p)
        elif kind == NodeKind.VIEW:
            todo += [q for q, _, data in analysis.dag.in_edges(p, data=True) if not data.get("order_only")]
    return found


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
