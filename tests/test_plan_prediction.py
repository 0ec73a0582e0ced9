"""The plan-level prediction (``schedule.predict``) scores any plan with the planner's own model."""

import torch
import torch.fx as fx

from graphsched.analysis.graph import analyse_graph
from graphsched.analysis.labels import GraphKind
from graphsched.schedule.plans import simple_plan
from graphsched.schedule.predict import predict_plan


def _overlap_graph():
    """x -> mul -> all-to-all -> wait -> add(wait, other), with ``other`` independent of the
    transfer and listed after its issue (the identity plan overlaps them)."""
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.ops.aten.mul.Tensor, (x, 2))
    issue = g.call_function(torch.ops._c10d_functional.all_to_all_single.default, (a, [2, 2], [2, 2], "0"))
    other = g.call_function(torch.ops.aten.add.Tensor, (x, 1))
    wait = g.call_function(torch.ops._c10d_functional.wait_tensor.default, (issue,))
    out = g.call_function(torch.ops.aten.add.Tensor, (wait, other))
    g.output((out,))
    gm = fx.GraphModule(torch.nn.Module(), g)
    costs = {a.name: 1.0, issue.name: 4.0, other.name: 5.0, out.name: 0.5}
    analysis = analyse_graph(gm, "g", GraphKind.FORWARD, lambda n: costs.get(n.name, 0.0))
    return analysis, simple_plan(analysis, gm, "identity")


def test_compute_beside_a_transfer_is_slowed_by_the_contention_factor():
    analysis, plan = _overlap_graph()
    assert predict_plan(plan, analysis).makespan == 6.5  # mul 1, other 1..6 beside the transfer 1..5
    analysis.contention = 1.5
    # 4 s beside the transfer do 4 / 1.5 of other's 5 s of work; the rest runs alone.
    assert abs(predict_plan(plan, analysis).makespan - (1 + 4 + (5 - 4 / 1.5) + 0.5)) < 1e-9


def test_a_plan_for_inductor_starts_its_collectives_behind_the_compute_listed_before_them():
    analysis, plan = _overlap_graph()
    names = [t.name for t in plan.tasks]
    issue = next(i for i, n in enumerate(names) if "all_to_all" in n)
    other = next(i for i, t in enumerate(plan.tasks) if any(n.startswith("add") for n in t.nodes) and i > issue)
    plan.tasks[issue], plan.tasks[other] = plan.tasks[other], plan.tasks[issue]  # other listed first
    assert predict_plan(plan, analysis).makespan == 6.5  # the transfer still starts after mul
    plan.options["issues_follow_compute"] = True
    assert predict_plan(plan, analysis).makespan == 1 + 5 + 4 + 0.5  # behind other: 6..10
