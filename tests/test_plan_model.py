"""The plan model: its file format, and the analysis and planning passes on small hand-built graphs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx

import graphsched.analysis.graph as graph_module
import graphsched.analysis.labels as labels_module
from graphsched.analysis.graph import NodeInfo, analyse_graph
from graphsched.analysis.labels import GraphKind, NodeKind
from graphsched.plan import PLAN_FORMAT_VERSION, ModelPlan, Phase, Plan, Task, TaskKind
from graphsched.schedule.coarsen import coarsen
from graphsched.schedule.ilp import solve
from graphsched.schedule.planner import collective_windows, plan_from_schedule, tasks_inside_windows
from graphsched.schedule.plans import simple_plan


def _plan() -> Plan:
    return Plan("g0.forward", "h", [
        Task("m.fwd", ["a"]),
        Task("m.all_to_all_single", ["c"], "comm", "collective_issue"),
        Task("m.wait", ["w"], kind="collective_wait", collective="m.all_to_all_single"),
    ])


def test_kinds_and_phases_are_enums_that_read_and_write_as_their_strings():
    plan = _plan()
    assert plan.tasks[1].kind is TaskKind.COLLECTIVE_ISSUE and plan.tasks[1].kind == "collective_issue"
    assert plan.tasks[0].phase is Phase.FORWARD and f"{plan.tasks[0].phase}" == "forward"
    data = json.loads(plan.to_json())
    assert [t["kind"] for t in data["tasks"]] == ["compute", "collective_issue", "collective_wait"]
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.tasks[2].kind is TaskKind.COLLECTIVE_WAIT
    assert again.collective_pairs() == {2: 1}
    with pytest.raises(ValueError, match="kind is one of"):
        Task("t", ["a"], kind="shuffle")


def test_a_plan_file_of_the_previous_format_names_the_fix():
    old = json.loads(ModelPlan({"g0.forward": _plan()}).to_json())
    old["version"] = PLAN_FORMAT_VERSION - 1
    for p in old["plans"].values():
        p["version"] = PLAN_FORMAT_VERSION - 1
        for t in p["tasks"]:
            del t["collective"]
    with pytest.raises(ValueError, match="Re-plan: delete the file"):
        ModelPlan.from_json(json.dumps(old))
    with pytest.raises(ValueError, match="Re-plan: delete the file"):
        Plan.from_dict(old["plans"]["g0.forward"])
    with pytest.raises(ValueError, match="Re-plan: delete the file"):  # graphsched demo's plan.json
        ModelPlan.from_json(json.dumps(old["plans"]))


def test_only_a_wait_names_a_collective_and_it_must_be_in_the_plan():
    with pytest.raises(ValueError, match="only wait"):
        Plan("g", "h", [Task("c", ["c"], "comm", "collective_issue", collective="c")])
    with pytest.raises(ValueError, match="no collective task"):
        Plan("g", "h", [Task("w", ["w"], kind="collective_wait", collective="c")])


def test_a_wait_that_names_no_collective_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="names no collective.*set collective=.*finish_tasks"):
        Plan("g", "h", [Task("c", ["c"], "comm", "collective_issue"), Task("w", ["w"], kind="collective_wait")])
    data = json.loads(_plan().to_json())  # a plan file whose wait lost its collective
    data["tasks"][2]["collective"] = None
    with pytest.raises(ValueError, match="names no collective"):
        Plan.from_dict(data)


def test_the_runtime_refuses_a_plan_whose_wait_lost_its_collective_after_construction():
    from graphsched.errors import PlanError
    from graphsched.runtime.executor import validate_plan

    gm, a = _analyse_forward()
    plan = simple_plan(a, gm, "identity")
    assert validate_plan(gm.graph, plan)  # as planned: valid
    plan.tasks[3].collective = None
    with pytest.raises(PlanError, match="wait task 'ffn.wait' of plan 'g0.forward' names no collective"):
        validate_plan(gm.graph, plan)


# -- the analysis and planning passes on hand-built graphs (no process group: nothing runs) ---------

aten = torch.ops.aten
funcol = torch.ops._c10d_functional


def _call(g: fx.Graph, name: str, target, *args) -> fx.Node:
    return g.create_node("call_function", target, args, name=name)


def _in_module(node: fx.Node, path: str) -> fx.Node:
    node.meta["nn_module_stack"] = {path: (f"L['self'].{path}", torch.nn.Module)}
    return node


def forward_graph() -> fx.GraphModule:
    """gate: a = x @ w1 and b = x @ w2; ffn: all-to-all of a, then its wait; experts: e = d @ w3.

    ``b`` depends on no collective and nothing waits on it: it can run while the all-to-all is in
    flight."""
    g = fx.Graph()
    x, w1, w2, w3 = (g.placeholder(n) for n in ("x", "w1", "w2", "w3"))
    a = _in_module(_call(g, "mm", aten.mm.default, x, w1), "gate")
    c = _in_module(_call(g, "all_to_all_single", funcol.all_to_all_single.default, a, [2, 2], [2, 2], "0"), "ffn")
    b = _in_module(_call(g, "mm_1", aten.mm.default, x, w2), "gate")
    d = _in_module(_call(g, "wait_tensor", funcol.wait_tensor.default, c), "ffn")
    e = _in_module(_call(g, "mm_2", aten.mm.default, d, w3), "experts")
    g.output((e, b))
    return fx.GraphModule(torch.nn.Module(), g)


COSTS = {"mm": 1.0, "mm_1": 2.0, "mm_2": 1.0, "all_to_all_single": 3.0}


def _cost(node: fx.Node) -> float:
    return COSTS.get(node.name, 0.0)


def _analyse_forward():
    gm = forward_graph()
    return gm, analyse_graph(gm, "g0.forward", GraphKind.FORWARD, _cost)


def test_analysis_labels_costs_and_collectives_of_a_forward_graph():
    gm, a = _analyse_forward()
    assert [n.name for n in gm.graph.nodes][4:9] == ["mm", "all_to_all_single", "mm_1", "wait_tensor", "mm_2"]
    assert a.node("mm") == NodeInfo(NodeKind.COMPUTE, "aten::mm", Phase.FORWARD, 1.0, None)
    assert a.node("all_to_all_single").kind == NodeKind.COLLECTIVE_ISSUE
    assert a.node("all_to_all_single").cost == 3.0
    assert a.node("wait_tensor").kind == NodeKind.COLLECTIVE_WAIT and a.node("wait_tensor").cost == 0.0
    assert a.node("x").kind == NodeKind.PLACEHOLDER and a.node("x").phase is None
    assert a.node_costs() == {"mm": 1.0, "all_to_all_single": 3.0, "mm_1": 2.0, "mm_2": 1.0}
    [c] = a.collectives
    assert (c.issue, c.wait, c.op) == ("all_to_all_single", "wait_tensor", "_c10d_functional::all_to_all_single")
    assert c.independent == ["mm_1"] and c.independent_cost == 2.0 and c.cost == 3.0


def test_identity_plan_names_tasks_pairs_the_wait_and_keeps_the_captured_order():
    gm, a = _analyse_forward()
    plan = simple_plan(a, gm, "identity")
    assert [(t.name, t.nodes, t.stream, t.kind) for t in plan.tasks] == [
        ("gate.fwd", ["mm"], "compute", TaskKind.COMPUTE),
        ("ffn.all_to_all_single", ["all_to_all_single"], "comm", TaskKind.COLLECTIVE_ISSUE),
        ("gate.fwd[1]", ["mm_1"], "compute", TaskKind.COMPUTE),
        ("ffn.wait", ["wait_tensor"], "compute", TaskKind.COLLECTIVE_WAIT),
        ("experts.fwd", ["mm_2"], "compute", TaskKind.COMPUTE),
    ]
    assert plan.tasks[3].collective == "ffn.all_to_all_single"
    assert plan.collective_pairs() == {3: 1} and collective_windows(plan) == [(1, 3)]
    assert [t.name for t in tasks_inside_windows(plan)] == ["gate.fwd[1]"]
    assert Plan.from_json(plan.to_json()) == plan


def test_reverse_independent_plan_takes_the_last_captured_ready_node_first():
    gm, a = _analyse_forward()
    plan = simple_plan(a, gm, "reverse_independent")
    # mm_1 and mm are both ready at the start: mm_1 (captured later) goes first, and the two
    # forward compute nodes in a row form one task, named after its first node's module.
    assert [(t.name, t.nodes) for t in plan.tasks] == [
        ("gate.fwd", ["mm_1", "mm"]),
        ("ffn.all_to_all_single", ["all_to_all_single"]),
        ("ffn.wait", ["wait_tensor"]),
        ("experts.fwd", ["mm_2"]),
    ]
    assert plan.tasks[2].collective == "ffn.all_to_all_single"


def test_solved_plan_runs_the_independent_compute_inside_the_all_to_all():
    gm, a = _analyse_forward()
    coarse = coarsen(a)
    assert sorted(coarse.kind.values()) == sorted([
        (TaskKind.COMPUTE, Phase.FORWARD), (TaskKind.COMPUTE, Phase.FORWARD), (TaskKind.COMPUTE, Phase.FORWARD),
        (TaskKind.COLLECTIVE_ISSUE, Phase.FORWARD), (TaskKind.COLLECTIVE_WAIT, Phase.FORWARD),
    ])
    schedule = solve(coarse.problem, time_limit_s=5.0)
    plan = plan_from_schedule(a, gm, coarse, schedule)
    # mm, then the all-to-all [1, 4] with mm_1 [1, 3] under it, then the wait and mm_2 [4, 5].
    assert [t.name for t in plan.tasks] == [
        "gate.fwd", "ffn.all_to_all_single", "gate.fwd[1]", "ffn.wait", "experts.fwd"
    ]
    assert plan.predicted_time == pytest.approx(5.0)
    assert [(t.start, t.end) for t in plan.tasks] == [(0.0, 1.0), (1.0, 4.0), (1.0, 3.0), (4.0, 4.0), (4.0, 5.0)]
    assert plan.tasks[3].collective == "ffn.all_to_all_single"
    assert [t.name for t in tasks_inside_windows(plan)] == ["gate.fwd[1]"]
    assert plan.costs == a.node_costs()


class _ContendedCosts:
    """The forward graph's costs with the independent mm_1 as long as the all-to-all, so that
    stretching it beside the transfer delays the wait; ``contention`` goes into the analysis."""

    def __init__(self, contention: float) -> None:
        self.contention = contention

    def __call__(self, node: fx.Node) -> float:
        return {"mm": 1.0, "mm_1": 3.0, "mm_2": 1.0, "all_to_all_single": 3.0}.get(node.name, 0.0)


def test_the_predicted_step_grows_with_the_contention_factor(tmp_path):
    from graphsched.config import GraphschedConfig
    from graphsched.schedule.planner import IlpPlanner, plan_key

    planner = IlpPlanner(GraphschedConfig(schedule="ilp", cache_dir=str(tmp_path)))
    predicted, keys = {}, set()
    for factor in (1.0, 1.2, 1.5):
        gm = forward_graph()
        analysis = analyse_graph(gm, "g0.forward", GraphKind.FORWARD, _ContendedCosts(factor))
        assert analysis.contention == factor
        plan = planner(analysis, gm)
        predicted[factor] = plan.predicted_time
        keys.add(plan_key(analysis, 1))
        assert plan.options.get("contention", 1.0) == factor
        # mm_1 stays under the all-to-all rather than after it (8 s).
        assert [t.name for t in tasks_inside_windows(plan)] == ["gate.fwd[1]"]
    # mm_1 does 3 / factor of its 3 s of work beside the all-to-all [1, 4], the rest after it;
    # the wait and mm_2 follow it.
    assert predicted == pytest.approx({1.0: 5.0, 1.2: 5.5, 1.5: 6.0})
    assert len(keys) == 3  # a plan made under one factor is not reused under another


def sliced_wait_graph() -> fx.GraphModule:
    """A chunked graph's shape: the all-to-all's output is sliced (a view) before each slice is
    waited for, so neither wait is a direct user of the issue."""
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    a = _in_module(_call(g, "mm", aten.mm.default, x, w), "gate")
    c = _in_module(_call(g, "all_to_all_single", funcol.all_to_all_single.default, a, [2, 2], [2, 2], "0"), "ffn")
    s0 = _in_module(_call(g, "slice_1", aten.slice.Tensor, c, 0, 0, 2), "ffn")
    s1 = _in_module(_call(g, "slice_2", aten.slice.Tensor, c, 0, 2, 4), "ffn")
    w0 = _in_module(_call(g, "wait_tensor", funcol.wait_tensor.default, s0), "ffn")
    w1 = _in_module(_call(g, "wait_tensor_1", funcol.wait_tensor.default, s1), "ffn")
    out = _in_module(_call(g, "add", aten.add.Tensor, w0, w1), "experts")
    g.output((out,))
    return fx.GraphModule(torch.nn.Module(), g)


def test_waits_reached_through_views_are_paired_with_their_collective():
    gm = sliced_wait_graph()
    a = analyse_graph(gm, "g0.forward", GraphKind.FORWARD, _cost)
    plan = simple_plan(a, gm, "identity")
    waits = [t for t in plan.tasks if t.kind == TaskKind.COLLECTIVE_WAIT]
    assert [t.name for t in waits] == ["ffn.wait", "ffn.wait[1]"]
    assert all(t.collective == "ffn.all_to_all_single" for t in waits)
    issue = next(i for i, t in enumerate(plan.tasks) if t.kind == TaskKind.COLLECTIVE_ISSUE)
    assert sorted(plan.collective_pairs().values()) == [issue, issue]


def backward_graph() -> fx.GraphModule:
    """Outputs (grad_w, grad_x): grad_w = x.t() @ gy feeds only the parameter's gradient; grad_x
    goes through an all-to-all (the next layer's input gradient)."""
    g = fx.Graph()
    x, w, gy = (g.placeholder(n) for n in ("x", "w", "gy"))
    xt = _call(g, "t", aten.t.default, x)
    grad_w = _call(g, "mm", aten.mm.default, xt, gy)
    wt = _call(g, "t_1", aten.t.default, w)
    dx = _call(g, "mm_1", aten.mm.default, gy, wt)
    c = _call(g, "all_to_all_single", funcol.all_to_all_single.default, dx, [2, 2], [2, 2], "0")
    grad_x = _call(g, "wait_tensor", funcol.wait_tensor.default, c)
    g.output((grad_w, grad_x))
    return fx.GraphModule(torch.nn.Module(), g)


def test_backward_labels_weight_and_input_gradients_with_one_gradient_reach(monkeypatch):
    calls = []
    reach = labels_module.gradient_reach

    def counted(*args, **kwargs):
        calls.append(1)
        return reach(*args, **kwargs)

    monkeypatch.setattr(labels_module, "gradient_reach", counted)
    monkeypatch.setattr(graph_module, "gradient_reach", counted)
    gm = backward_graph()
    a = analyse_graph(gm, "g0.backward", GraphKind.BACKWARD, lambda n: 1.0, param_grad_positions=[0])
    assert len(calls) == 1
    phases = {n: a.node(n).phase for n in a.order if a.node(n).phase is not None}
    assert phases == {
        "t": Phase.WEIGHT_GRAD, "mm": Phase.WEIGHT_GRAD,
        "t_1": Phase.INPUT_GRAD, "mm_1": Phase.INPUT_GRAD,
        "all_to_all_single": Phase.INPUT_GRAD, "wait_tensor": Phase.INPUT_GRAD,
    }
    assert a.node("mm").grad_target == 0 and a.node("t").grad_target == 0 and a.node("mm_1").grad_target is None
    assert a.node("t").kind == NodeKind.VIEW and a.node("t").cost == 0.0
    [c] = a.collectives
    assert c.independent == ["mm"] and c.independent_weight_grad_cost == 1.0

    plan = simple_plan(a, gm, "identity")
    assert [(t.name, t.nodes, t.phase) for t in plan.tasks] == [
        ("graph.dW", ["t", "mm"], Phase.WEIGHT_GRAD),
        ("graph.dX", ["t_1", "mm_1"], Phase.INPUT_GRAD),
        ("graph.all_to_all_single", ["all_to_all_single"], Phase.INPUT_GRAD),
        ("graph.wait", ["wait_tensor"], Phase.INPUT_GRAD),
    ]
    assert plan.collective_pairs() == {3: 2}

    # The solver runs the weight gradient while the all-to-all is in flight.
    coarse = coarsen(a)
    solved = plan_from_schedule(a, gm, coarse, solve(coarse.problem, time_limit_s=5.0))
    times = {t.name: (t.start, t.end) for t in solved.tasks}
    assert times["graph.dW"] == times["graph.all_to_all_single"] == (1.0, 2.0)
    assert solved.predicted_time == pytest.approx(2.0)
    assert solved.tasks[-1].collective == "graph.all_to_all_single"


def _kernel_of(*names: str) -> object:
    """A stand-in for an inductor scheduler node lowered from the FX nodes ``names``."""
    from types import SimpleNamespace

    return SimpleNamespace(node=SimpleNamespace(origins=[SimpleNamespace(name=n) for n in names]))


def test_the_fusion_guard_cuts_the_plan_at_every_wait_of_a_sliced_output():
    from graphsched.codegen.fusion import PlanSegments

    gm = sliced_wait_graph()
    plan = simple_plan(analyse_graph(gm, "g0.forward", GraphKind.FORWARD, _cost), gm, "identity")
    guard = PlanSegments(plan)
    # Work before the issue, between issue and first wait, and after the second wait: three
    # sides of cuts, so no fusion may join them.
    assert not guard.allows(_kernel_of("mm"), _kernel_of("add"))
    assert not guard.allows(_kernel_of("slice_1"), _kernel_of("add"))
    assert guard.allows(_kernel_of("add"), _kernel_of("add"))
    assert guard.refused == 2
