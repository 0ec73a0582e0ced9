"""codegen="inductor": graphsched's plans run as inductor-generated code.

One distributed run (2 gloo ranks, CPU inductor) compiles the reference model twice, with
graphsched's ILP plan and with the inductor oracle (same AOTAutograd partitioner, same inductor
settings, inductor's own order); the tests read its results. The order pass itself is also tested
on hand-made scheduler nodes (no compile).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from graphsched.codegen.order import InductorPlanOrder, order_by_wanted_position
from graphsched.codegen.settings import resolve_codegen
from graphsched.config import GraphschedConfig
from graphsched.errors import ConfigError
from graphsched.plan import COMM_STREAM, Plan, Task
from graphsched.testing import run_distributed
from graphsched.testing.inductor_checks import inductor_parity_checks


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    # Two ranks on two cores: no pool of compile workers (read by the spawned ranks at import;
    # a config assignment would be thread-local and miss the backward's compile).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
        return run_distributed(
            inductor_parity_checks, world_size=2, args=(str(tmp_path_factory.mktemp("plans")),),
            timeout_s=600,
        )


def test_inductor_plan_trains_bitwise_equal_to_the_inductor_oracle(compiled):
    for r in compiled:
        assert set(r["codegen"].values()) == {"inductor"}
        assert len(r["steps"]) == 3
        for step in r["steps"]:
            assert step["losses_equal"], step["losses"]
            assert step["grads_same_names"]
            assert step["grads_bitwise_equal"], step["max_grad_diff"]
        assert r["params_bitwise_equal_after"]


def test_generated_code_runs_weight_gradient_kernels_inside_the_all_to_all_windows(compiled):
    for r in compiled:
        ours, oracle = r["windows_graphsched"], r["windows_oracle"]
        assert ours["windows"] == 2 and oracle["windows"] == 2  # one MoE layer: 2 backward a2a
        # The plan differs from inductor's own order: inductor waits right after each issue.
        assert oracle["dw_kernels_inside"] == []
        inside_tasks = {entry.split(":")[0] for entry in ours["dw_kernels_inside"]}
        # The expert weight gradients (the big matmuls) run between all_to_all_single and its wait.
        assert any(t.startswith("blocks.0.ffn.experts.dW") for t in inside_tasks), inside_tasks
        assert r["backward_report"]["order_changed"]
        assert r["backward_report"]["unmapped_kernels"] == 0
        assert r["backward_report"]["unresolved_dependencies"] == []


def test_fusion_never_moves_a_deferred_weight_gradient_silently(compiled):
    for r in compiled:
        report = r["backward_report"]
        info = r["backward_options"]["inductor"]
        pulled = set(info["weight_grad_tasks_pulled_out"])
        assert info["weight_grad_tasks_pulled_out_count"] == len(pulled)
        planned = info["weight_grad_tasks_planned_in_windows"]
        assert planned >= len(pulled) and planned > 0
        inside_tasks = {entry.split(":")[0] for entry in r["windows_graphsched"]["dw_kernels_inside"]}
        # Every dW task the plan put in a window is inside it in the code, or reported as pulled out.
        for detail in report["pulled_out_detail"]:
            assert detail["task"] in pulled
            assert all(k["fused_with_tasks"] for k in detail["kernels"].values())  # fusion did it
        assert planned - len(pulled) <= len(inside_tasks)
        assert "pulled out by fusion" in r["explain"]
        # A first cost per fused kernel, and the plan's tasks mapped onto kernels.
        assert r["kernel_costs"] and all(c["aten_s"] >= 0 for c in r["kernel_costs"].values())
        assert sum(c["aten_s"] for c in r["kernel_costs"].values()) > 0
        assert info["task_kernels"]
        # The emitted kernel order re-simulated with those costs: the plan's prediction at the
        # kernel level (kernels that inline an op count it again, so it is no lower than the plan's).
        assert info["predicted_time"] >= 0.9 * r["backward_predicted"]


def test_inductor_that_cannot_reorder_falls_back_to_the_aten_executor_with_one_warning(compiled):
    r = compiled[0]["fallback"]
    assert len(r["warnings"]) == 1 and "aten executor" in r["warnings"][0]
    assert "deterministic" in r["warnings"][0]
    assert set(r["codegen"].values()) == {"aten"} and all(r["executors"].values())
    assert r["loss_close"]


def test_codegen_option_is_validated_and_auto_keeps_the_aten_executor_on_cpu():
    with pytest.raises(ConfigError, match="codegen"):
        GraphschedConfig(codegen="triton")
    assert GraphschedConfig().codegen == "auto"
    assert resolve_codegen("auto", torch.device("cpu")) == "aten"
    assert resolve_codegen("inductor", torch.device("cpu")) == "inductor"


# --- the order pass on hand-made scheduler nodes ---------------------------------------------


class _Origin:
    def __init__(self, name):
        self.name = name


class _IR:
    def __init__(self, origins):
        self._origins = [_Origin(o) for o in origins]

    def get_origins(self):
        return self._origins


class _CollectiveKernel(_IR):
    """Named as inductor's collective IR node (what the pass falls back to recognising)."""


class _Dep:
    def __init__(self, name):
        self.name = name


class _SNode:
    """Enough of inductor's BaseSchedulerNode for the order pass."""

    def __init__(self, name, origins, deps=(), ir=_IR):
        self.name = name
        self.node = ir(origins)
        self.unmet_dependencies = {_Dep(f"buf_{d}") for d in deps}

    def get_nodes(self):
        return [self]

    def get_name(self):
        return self.name

    def get_buffer_names(self):
        return {f"buf_{self.name}"}

    def get_operation_names(self):
        return {self.name}

    def get_estimated_runtime(self):
        return 1000.0


def _plan():
    # fwd -> issue -> (dW planned in the window) -> wait -> dX -> late dW
    tasks = [
        Task("a.dX", ["n0"], kind="compute", phase="input_grad"),
        Task("ffn.all_to_all_single", ["n1"], COMM_STREAM, "collective_issue", "input_grad"),
        Task("w.dW", ["n2"], kind="compute", phase="weight_grad"),
        Task("ffn.wait", ["n3"], kind="collective_wait", phase="input_grad", collective="ffn.all_to_all_single"),
        Task("x.dX", ["n4"], kind="compute", phase="input_grad"),
        Task("v.dW", ["n5"], kind="compute", phase="weight_grad"),
    ]
    costs = {f"n{i}": 1e-3 for i in range(6)}
    return Plan("g.backward", "h", tasks, costs=costs)


_ANALYSIS = SimpleNamespace(collectives=[SimpleNamespace(issue="n1", wait="n3")])


def test_order_pass_emits_the_plan_order_where_inductor_put_the_weight_gradient_last():
    s0, s1 = _SNode("s0", ["n0"]), _SNode("s1", ["n1"], ["s0"], _CollectiveKernel)
    s3, s4 = _SNode("s3", ["n3"], ["s1"]), _SNode("s4", ["n4"], ["s3"])
    s2, s5 = _SNode("s2", ["n2"], ["s0"]), _SNode("s5", ["n5"], ["s4"])
    order = InductorPlanOrder(_plan(), _ANALYSIS)
    out = order([s0, s1, s3, s4, s2, s5])  # inductor's own order: dW after the wait
    assert [s.name for s in out] == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert order.called and order.report["order_changed"]
    assert order.report["weight_grad_tasks_planned_in_windows"] == 1
    assert order.report["weight_grad_tasks_pulled_out"] == []
    assert order.report["task_kernels"]["w.dW"] == ["s2"]
    assert math.isclose(order.report["kernel_costs"]["s2"]["inductor_s"], 1e-6)
    # Six 1 ms kernels; the dW kernel runs while the all-to-all is in flight.
    assert math.isclose(order.report["predicted_time"], 5e-3)


def test_a_kernel_fusing_a_deferred_weight_gradient_with_later_work_is_reported_pulled_out():
    s0, s1 = _SNode("s0", ["n0"]), _SNode("s1", ["n1"], ["s0"])
    s3, s4 = _SNode("s3", ["n3"], ["s1"]), _SNode("s4", ["n4"], ["s3"])
    fused = _SNode("s2_s5", ["n2", "n5"], ["s0", "s4"])  # dW in the window fused with the late dW
    order = InductorPlanOrder(_plan(), _ANALYSIS)
    out = order([s0, s1, s3, s4, fused])
    names = [s.name for s in out]
    assert names.index("s2_s5") > names.index("s4")  # its dependencies win: after the wait
    assert order.report["weight_grad_tasks_pulled_out"] == ["w.dW"]
    detail = order.report["pulled_out_detail"][0]
    assert detail["kernels"]["s2_s5"]["fused_with_tasks"] == ["v.dW"]


def test_a_kernel_fusing_a_deferred_weight_gradient_with_independent_later_work_runs_in_the_window():
    s0, s1 = _SNode("s0", ["n0"]), _SNode("s1", ["n1"], ["s0"])
    s3, s4 = _SNode("s3", ["n3"], ["s1"]), _SNode("s4", ["n4"], ["s3"])
    fused = _SNode("s2_s5", ["n2", "n5"], ["s0"])  # the late dW needs nothing after the window
    order = InductorPlanOrder(_plan(), _ANALYSIS)
    out = order([s0, s1, s3, s4, fused])
    assert [s.name for s in out] == ["s0", "s1", "s2_s5", "s3", "s4"]
    assert order.report["weight_grad_tasks_pulled_out"] == []


def test_a_consumer_pulls_its_producers_forward_and_the_order_stays_topological():
    # wanted positions: node 2 wants to run first but needs node 1, which wants to run last.
    wanted = [0.0, 9.0, 1.0, 5.0]
    deps = [set(), {0}, {1}, {0}]
    order = order_by_wanted_position(wanted, deps)
    assert order == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="cycle"):
        order_by_wanted_position([0.0, 1.0], [{1}, {0}])


def test_a_failing_order_pass_keeps_inductors_order():
    s0, s1 = _SNode("s0", ["n0"], ["s1"]), _SNode("s1", ["n1"], ["s0"])  # a cycle
    order = InductorPlanOrder(_plan(), _ANALYSIS)
    nodes = [s0, s1]
    assert order(nodes) == nodes
    assert "error" in order.report


class _WaitKernel(_IR):
    """Named as inductor's wait IR node."""


def test_collectives_are_issued_as_soon_as_their_inputs_exist_and_waited_just_before_use():
    # The plan issues the all-to-all after an unrelated kernel and waits right after the issue;
    # what runs issues it right after its input and waits only where its result is read.
    tasks = [
        Task("a.dX", ["n0"], kind="compute", phase="input_grad"),
        Task("b.dW", ["n1"], kind="compute", phase="weight_grad"),
        Task("ffn.all_to_all_single", ["n2"], COMM_STREAM, "collective_issue", "input_grad"),
        Task("ffn.wait", ["n3"], kind="collective_wait", phase="input_grad", collective="ffn.all_to_all_single"),
        Task("c.dW", ["n4"], kind="compute", phase="weight_grad"),
        Task("x.dX", ["n5"], kind="compute", phase="input_grad"),
    ]
    plan = Plan("g.backward", "h", tasks, costs={f"n{i}": 1e-3 for i in range(6)})
    analysis = SimpleNamespace(collectives=[SimpleNamespace(issue="n2", wait="n3")])
    s0, s1 = _SNode("s0", ["n0"]), _SNode("s1", ["n1"])
    s2 = _SNode("s2", ["n2"], ["s0"], _CollectiveKernel)
    s3, s4 = _SNode("s3", ["n3"], ["s2"], _WaitKernel), _SNode("s4", ["n4"])
    s5 = _SNode("s5", ["n5"], ["s3"])
    nodes = [s0, s1, s2, s3, s4, s5]
    as_planned = InductorPlanOrder(plan, analysis, early_issue_late_wait=False)
    assert [s.name for s in as_planned(list(nodes))] == ["s0", "s1", "s2", "s3", "s4", "s5"]
    moved = InductorPlanOrder(plan, analysis)
    assert [s.name for s in moved(list(nodes))] == ["s0", "s2", "s1", "s4", "s3", "s5"]


def test_collectives_keep_the_plans_order_among_themselves_when_moved_early():
    # Two independent all-to-alls: the plan issues B (input ready late) before A (input ready
    # early); moving issues early must not swap them (every rank issues in the plan's order).
    tasks = [
        Task("a.dX", ["n0"], kind="compute", phase="input_grad"),
        Task("b.dX", ["n1"], kind="compute", phase="input_grad"),
        Task("B.all_to_all_single", ["n2"], COMM_STREAM, "collective_issue", "input_grad"),
        Task("A.all_to_all_single", ["n3"], COMM_STREAM, "collective_issue", "input_grad"),
    ]
    plan = Plan("g.backward", "h", tasks, costs={f"n{i}": 1e-3 for i in range(4)})
    analysis = SimpleNamespace(collectives=[SimpleNamespace(issue="n2", wait=None),
                                            SimpleNamespace(issue="n3", wait=None)])
    s0, s1 = _SNode("s0", ["n0"]), _SNode("s1", ["n1"])
    sA, sB = _SNode("sA", ["n3"], ["s0"], _CollectiveKernel), _SNode("sB", ["n2"], ["s1"], _CollectiveKernel)
    out = [s.name for s in InductorPlanOrder(plan, analysis)([s0, sA, s1, sB])]
    assert out.index("sB") < out.index("sA"), out


def test_a_later_chunks_issue_and_the_kernel_making_its_input_go_ahead_of_earlier_chunks_work():
    # Chunked dispatch: the plan issues chunk 1 after chunk 0's experts. A collective's stream
    # first waits for all compute launched before it, so chunk 1 would wait for those experts;
    # what runs issues both chunks (with the slice kernel feeding chunk 1) before any experts.
    tasks = [
        Task("gate.fwd", ["n0"], kind="compute"),
        Task("ffn.all_to_all_single", ["n1", "n2"], COMM_STREAM, "collective_issue"),
        Task("ffn.wait", ["n4"], kind="collective_wait", collective="ffn.all_to_all_single"),
        Task("experts.fwd", ["n5"], kind="compute"),
        Task("ffn.all_to_all_single[1]", ["n3", "n6"], COMM_STREAM, "collective_issue"),
        Task("ffn.wait[1]", ["n7"], kind="collective_wait", collective="ffn.all_to_all_single[1]"),
        Task("experts.fwd[1]", ["n8"], kind="compute"),
    ]
    plan = Plan("g.forward", "h", tasks, costs={f"n{i}": 1e-3 for i in range(9)})
    analysis = SimpleNamespace(collectives=[SimpleNamespace(issue="n2", wait="n4"),
                                            SimpleNamespace(issue="n6", wait="n7")])
    gate, in0 = _SNode("gate", ["n0"]), _SNode("in0", ["n1"], ["gate"])
    d0 = _SNode("d0", ["n2"], ["in0"], _CollectiveKernel)
    in1 = _SNode("in1", ["n3"], ["gate"])
    w0 = _SNode("w0", ["n4"], ["d0"], _WaitKernel)
    e0 = _SNode("e0", ["n5"], ["w0"])
    d1 = _SNode("d1", ["n6"], ["in1"], _CollectiveKernel)
    w1 = _SNode("w1", ["n7"], ["d1"], _WaitKernel)
    e1 = _SNode("e1", ["n8"], ["w1"])
    nodes = [gate, in0, d0, in1, w0, e0, d1, w1, e1]
    as_planned = InductorPlanOrder(plan, analysis, early_issue_late_wait=False)
    assert [s.name for s in as_planned(list(nodes))] == [
        "gate", "in0", "d0", "w0", "e0", "in1", "d1", "w1", "e1"]
    pipelined = [s.name for s in InductorPlanOrder(plan, analysis)(list(nodes))]
    assert pipelined == ["gate", "in0", "d0", "in1", "d1", "w0", "e0", "w1", "e1"], pipelined


def test_a_cycle_in_the_dependencies_is_reported_not_looped_on():
    s0, s1 = _SNode("s0", ["n0"], ["s1"]), _SNode("s1", ["n1"], ["s0"], _CollectiveKernel)
    order = InductorPlanOrder(_plan(), _ANALYSIS)
    assert order([s0, s1]) == [s0, s1]
    assert "cycle" in order.report["error"]
