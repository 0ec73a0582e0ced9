"""Coarsen an analysed graph into scheduling tasks for the two-resource problem.

Every collective issue becomes a task on the ``comm`` resource (its transfer) and every wait a
zero-duration task on ``compute`` (where the compute stream blocks on it). Compute and view nodes
are grouped by (phase, the collectives they depend on, the collectives that depend on them, and,
for weight-gradient nodes, the parameter they feed): a chain of compute between two collective
points is one task, and each parameter's weight-gradient chain is a task of its own, so the solver
can move it into any communication window it is independent of.

Grouping by those sets can never create a cycle between groups: along an edge u -> v the set of
collective points (issues and waits) u depends on can only grow and the set depending on u can only
shrink, so two groups that reach each other, directly or through a collective's tasks, have equal
keys and are one group.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphsched.analysis.graph import GraphAnalysis
from graphsched.analysis.labels import NodeKind
from graphsched.plan import Phase, TaskKind
from graphsched.schedule.problem import COLLECTIVE, COMM, COMPUTE, WEIGHT_GRAD, SchedTask, ScheduleProblem


@dataclass
class CoarseGraph:
    problem: ScheduleProblem
    #: task id -> its nodes, in captured (topological) order.
    nodes: dict[str, list[str]]
    #: task id -> (kind, phase) of its nodes.
    kind: dict[str, tuple[TaskKind, Phase]]


def task_kind(kind: NodeKind) -> TaskKind:
    """The kind of the task a node of ``kind`` runs in: views run in compute tasks."""
    if kind == NodeKind.COLLECTIVE_ISSUE:
        return TaskKind.COLLECTIVE_ISSUE
    if kind == NodeKind.COLLECTIVE_WAIT:
        return TaskKind.COLLECTIVE_WAIT
    return TaskKind.COMPUTE


def _collective_bits(analysis: GraphAnalysis) -> tuple[dict[str, int], dict[str, int]]:
    """Bitsets of the collective points (issues and waits) each node depends on and that depend
    on it. Waits count too: a chunked graph may slice a collective's output before waiting on
    it, and a group must never hold nodes on both sides of a wait."""
    dag = analysis.dag
    points = [
        n
        for n in analysis.order
        if analysis.node(n).kind in (NodeKind.COLLECTIVE_ISSUE, NodeKind.COLLECTIVE_WAIT)
    ]
    bit = {n: 1 << i for i, n in enumerate(points)}
    anc: dict[str, int] = {}
    for n in analysis.order:
        acc = 0
        for p in dag.predecessors(n):
            acc |= anc[p] | bit.get(p, 0)
        anc[n] = acc
    desc: dict[str, int] = {}
    for n in reversed(analysis.order):
        acc = 0
        for s in dag.successors(n):
            acc |= desc[s] | bit.get(s, 0)
        desc[n] = acc
    return anc, desc


def coarsen(analysis: GraphAnalysis, issues_follow_compute: bool = False) -> CoarseGraph:
    """The tasks of ``analysis``; ``issues_follow_compute``: the graph runs as inductor's code,
    where a collective starts behind the compute listed before it (``ScheduleProblem``)."""
    dag = analysis.dag
    anc, desc = _collective_bits(analysis)
    task_of: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    kinds: dict[str, tuple[TaskKind, Phase]] = {}
    group_ids: dict[tuple, str] = {}
    for n in analysis.order:
        info = analysis.node(n)
        kind = info.kind
        if kind in (NodeKind.PLACEHOLDER, NodeKind.OUTPUT):
            continue
        phase = info.phase or Phase.FORWARD
        if kind in (NodeKind.COLLECTIVE_ISSUE, NodeKind.COLLECTIVE_WAIT):
            tid = f"{'c' if kind == NodeKind.COLLECTIVE_ISSUE else 'w'}:{n}"
        else:
            key = (phase, anc[n], desc[n], info.grad_target)
            if key not in group_ids:
                group_ids[key] = f"t{len(group_ids)}:{phase.value}"
            tid = group_ids[key]
        task_of[n] = tid
        members.setdefault(tid, []).append(n)
        kinds.setdefault(tid, (task_kind(kind), phase))

    deps: dict[str, set[str]] = {tid: set() for tid in members}
    for n, tid in task_of.items():
        for p in dag.predecessors(n):
            ptid = task_of.get(p)
            if ptid is not None and ptid != tid:
                deps[tid].add(ptid)

    tasks = []
    for tid, nodes in members.items():
        kind, phase = kinds[tid]
        if kind == TaskKind.COLLECTIVE_ISSUE:
            resource, tags = COMM, frozenset({COLLECTIVE})
        else:
            resource = COMPUTE
            tags = frozenset({WEIGHT_GRAD}) if phase == Phase.WEIGHT_GRAD else frozenset()
        duration = sum(float(analysis.node(m).cost) for m in nodes)
        tasks.append(SchedTask(tid, resource, duration, tuple(sorted(deps[tid])), tags))
    problem = ScheduleProblem(
        tasks, contention=analysis.contention, issues_follow_compute=issues_follow_compute
    )
    return CoarseGraph(problem, members, kinds)
