"""The runtime runs any topologically valid plan with the captured graph's exact numerics."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from functorch.compile import default_partition, make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from graphsched.analysis.graph import analyse_graph
from graphsched.analysis.labels import GraphKind
from graphsched.errors import PlanError
from graphsched.plan import Plan, Task
from graphsched.runtime.executor import GraphExecutor
from graphsched.schedule.plans import captured_order, plan_from_order, reverse_independent_order


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)
        self.c = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return (self.ln(self.b(h)) + self.c(x)).square().mean()


def _capture(model, x):
    graphs = {}

    def grab(kind):
        def compiler(gm, _example):
            graphs[kind] = gm
            return make_boxed_func(gm)
        return compiler

    compiled = torch.compile(
        model,
        backend=aot_autograd(fw_compiler=grab("fw"), bw_compiler=grab("bw"), partition_fn=default_partition),
        fullgraph=True,
    )
    compiled(x).backward()
    model.zero_grad()
    return graphs


@pytest.fixture()
def captured():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(8, 16)
    return model, x, _capture(model, x)


def _example_args(gm: fx.GraphModule, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    args = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            v = n.meta["val"]
            args.append(torch.randn(v.shape, generator=gen, dtype=v.dtype))
    return args


def _plan(gm, order, name="g"):
    analysis = analyse_graph(gm, name, GraphKind.BACKWARD, lambda n: 1.0)
    return plan_from_order(analysis, gm, order, "test")


@pytest.mark.parametrize("which", ["fw", "bw"])
def test_any_valid_order_gives_bitwise_equal_outputs(captured, which):
    _, _, graphs = captured
    gm = graphs[which]
    reference = gm(*_example_args(gm))
    for order in (captured_order(gm), reverse_independent_order(gm)):
        out = GraphExecutor(gm, _plan(gm, order))(_example_args(gm))
        assert len(out) == len(reference)
        for a, b in zip(out, reference):
            assert (a is None and b is None) or torch.equal(a, b)


def test_reverse_order_really_differs(captured):
    gm = captured[2]["bw"]
    assert captured_order(gm) != reverse_independent_order(gm)
    assert sorted(captured_order(gm)) == sorted(reverse_independent_order(gm))


def test_boxed_inputs_are_released_on_entry(captured):
    gm = captured[2]["bw"]
    args = _example_args(gm)
    GraphExecutor(gm, _plan(gm, captured_order(gm)))(args)
    assert args == []


def test_every_intermediate_is_freed_at_its_last_use(captured):
    gm = captured[2]["fw"]
    ex = GraphExecutor(gm, _plan(gm, captured_order(gm)))
    released = [slot for ins in ex.instructions.instrs for slot in ins.release]
    assert len(released) == len(set(released)), "a slot is released twice"
    outputs = {n for n in next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes}
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    non_output_computed = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n not in outputs)
    # Every computed value that is not returned dies; so does every input not returned.
    assert len([s for s in released if s >= n_placeholders]) == non_output_computed


def _order_with_swap(gm):
    order = captured_order(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    for i in range(len(order) - 1):
        if by_name[order[i]] in by_name[order[i + 1]].all_input_nodes:
            order[i], order[i + 1] = order[i + 1], order[i]
            return order
    raise AssertionError("no dependent pair found")


def test_non_topological_plan_is_rejected(captured):
    gm = captured[2]["fw"]
    with pytest.raises(PlanError, match="not topological"):
        GraphExecutor(gm, _plan(gm, _order_with_swap(gm)))


def test_plan_missing_a_node_is_rejected(captured):
    gm = captured[2]["fw"]
    order = captured_order(gm)
    with pytest.raises(PlanError, match="leaves out"):
        GraphExecutor(gm, _plan(gm, order[:-1]))


def test_plan_for_another_graph_is_rejected(captured):
    gm = captured[2]["fw"]
    plan = Plan("g", "hash", [Task("t", ["no_such_node"])])
    with pytest.raises(PlanError, match="re-plan"):
        GraphExecutor(gm, plan)


def test_plan_running_a_node_twice_is_rejected(captured):
    gm = captured[2]["fw"]
    order = captured_order(gm)
    plan = Plan("g", "h", [Task("t", order + order[-1:])])
    with pytest.raises(PlanError, match="twice"):
        GraphExecutor(gm, plan)


def test_plan_json_round_trip_keeps_the_content_hash(captured):
    gm = captured[2]["bw"]
    plan = _plan(gm, reverse_independent_order(gm))
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.content_hash() == plan.content_hash()
    other = _plan(gm, captured_order(gm))
    assert other.content_hash() != plan.content_hash()


class TwoDropouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        # Two independent branches that each draw random numbers.
        return (nn.functional.dropout(self.a(x), 0.5) + nn.functional.dropout(self.b(x), 0.5)).sum()


def test_random_ops_keep_their_captured_order_under_any_schedule():
    torch.manual_seed(0)
    model = TwoDropouts()
    graphs = _capture(model, torch.randn(4, 16))
    gm = graphs["fw"]
    order = reverse_independent_order(gm)
    from graphsched.analysis.graph import is_random

    randoms = [n.name for n in gm.graph.nodes if is_random(n)]
    assert len(randoms) >= 2
    captured = [n for n in captured_order(gm) if n in randoms]
    assert [n for n in order if n in randoms] == captured
    torch.manual_seed(5)
    reference = gm(*_example_args(gm))
    torch.manual_seed(5)
    out = GraphExecutor(gm, _plan(gm, order))(_example_args(gm))
    assert all(torch.equal(a, b) for a, b in zip(out, reference) if isinstance(a, torch.Tensor))


def test_a_plan_that_reorders_random_ops_is_rejected():
    torch.manual_seed(0)
    gm = _capture(TwoDropouts(), torch.randn(4, 16))["fw"]
    from graphsched.analysis.graph import is_random

    randoms = [n.name for n in gm.graph.nodes if is_random(n)]
    first, second = randoms[0], randoms[1]
    # A data-valid order that runs the second draw (and what it needs) before the first.
    by_name = {n.name: n for n in gm.graph.nodes}
    needed, stack = set(), [by_name[second]]
    while stack:
        n = stack.pop()
        if n.op == "call_function" and n.name not in needed:
            needed.add(n.name)
            stack.extend(n.all_input_nodes)
    assert first not in needed
    captured = captured_order(gm)
    order = [n for n in captured if n in needed] + [n for n in captured if n not in needed]
    with pytest.raises(PlanError, match="reorders random ops"):
        GraphExecutor(gm, _plan(gm, order))


def test_recording_path_and_generated_code_give_the_same_results(captured):
    from graphsched.runtime.recorder import StepRecorder

    gm = captured[2]["bw"]
    plan = _plan(gm, reverse_independent_order(gm))
    fast = GraphExecutor(gm, plan)(_example_args(gm))
    recorded_ex = GraphExecutor(gm, plan)
    recorded_ex.recorder = StepRecorder()
    slow = recorded_ex(_example_args(gm))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(fast, slow))
    timings = recorded_ex.recorder.finish()
    assert {t.task for t in timings} == {t.name for t in plan.tasks}
    assert all(t.end_s >= t.start_s for t in timings)
