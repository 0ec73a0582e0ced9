"""Profile-guided costs on recorded data: traces, launch sites and task timings -> node costs.

Synthetic inputs only (no compile, no device): a Chrome-trace event list shaped as
``torch.profiler`` exports it for one compiled-graph call, the wrapper lines inductor generates,
and the aten executor's task timings.
"""

from __future__ import annotations

import json
import math

from graphsched.analysis.cost_cache import CachedCosts, StepCostCache, cost_key
from graphsched.analysis.provenance import CostSource, describe_sources, source_summary
from graphsched.analysis.step_costs import (
    ROLE_COLLECTIVE,
    ROLE_WAIT,
    Activity,
    CallTrace,
    LaunchSite,
    StepCosts,
    collective_call_costs,
    kernel_call_costs,
    kernel_step_costs,
    match_ops,
    op_key,
    split,
    task_step_costs,
)
from graphsched.analysis.trace_events import call_trace
from graphsched.codegen.launches import launch_sites
from graphsched.plan import COMM_STREAM, Plan, Task

LABEL = "graphsched/g0.backward/call1"
US = 1e-6


def _op(name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": "cpu_op", "name": name, "pid": 100, "tid": tid, "ts": ts, "dur": dur, "args": args}


def _launch(ts, corr, name="cudaLaunchKernel", cat="cuda_runtime"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 100, "tid": 1, "ts": ts, "dur": 1, "args": {"correlation": corr}}


def _kernel(name, ts, dur, corr, stream=7, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
            "args": {"correlation": corr, "stream": stream, "device": 0}}


def gpu_trace() -> list[dict]:
    """One inductor backward call: a triton kernel called from two sites, an mm, an all-to-all
    whose copies run on the link's stream (20), its wait, and a kernel after the wait."""
    return [
        {"ph": "X", "cat": "user_annotation", "name": LABEL, "pid": 100, "tid": 1, "ts": 0, "dur": 1000},
        _op("## Call CompiledFxGraph abc ##", 1, 998),
        _op("triton_poi_fused_add_0", 10, 5), _launch(12, 1, "cuLaunchKernel", "cuda_driver"),
        _op("aten::mm", 20, 10), _op("aten::cublas_thing", 22, 6), _launch(25, 2),
        _op("aten::empty_strided", 35, 1),
        _op("_c10d_functional::all_to_all_single", 40, 20), _op("aten::copy_", 42, 5), _launch(43, 3),
        _launch(50, 4, "cudaMemcpyAsync"),
        _op("triton_poi_fused_add_0", 70, 5), _launch(72, 5, "cuLaunchKernel", "cuda_driver"),
        _op("_c10d_functional::wait_tensor", 80, 2),
        _op("triton_red_fused_sum_1", 90, 5), _launch(92, 6, "cuLaunchKernel", "cuda_driver"),
        # device side
        _kernel("triton_poi_fused_add_0", 100, 50, 1),
        _kernel("sm90_gemm_kernel", 160, 200, 2),
        _kernel("elementwise_copy", 170, 30, 3, stream=20),
        _kernel("Memcpy DtoH (Device -> Pinned)", 200, 300, 4, stream=20, cat="gpu_memcpy"),
        _kernel("triton_poi_fused_add_0", 370, 20, 5),
        _kernel("triton_red_fused_sum_1", 600, 40, 6),
        # another call's kernel (launched outside the annotation): not this call's
        _launch(2000, 9), _kernel("triton_poi_fused_add_0", 2100, 10, 9),
        # another thread's op inside the window: not this call's
        _op("aten::mm", 30, 5, tid=2),
    ]


SITES = [
    LaunchSite("triton_poi_fused_add_0", ("add_a",)),
    LaunchSite("mm", ("mm_1", "t_1")),
    LaunchSite("all_to_all_single", ("a2a", "slice_1"), ROLE_COLLECTIVE),
    LaunchSite("triton_poi_fused_add_0", ("add_b", "mul_b")),
    LaunchSite("wait_tensor", ("wait_1",), ROLE_WAIT),
    LaunchSite("triton_red_fused_sum_1", ("sum_c",)),
]
ESTIMATES = {"add_a": 1.0, "mm_1": 5.0, "a2a": 100.0, "add_b": 1.0, "mul_b": 3.0, "sum_c": 2.0}


def test_call_trace_reads_top_level_ops_through_inductors_call_scope_and_links_device_work():
    trace = call_trace(gpu_trace(), LABEL)
    assert trace is not None
    assert trace.ops == ["triton_poi_fused_add_0", "mm", "empty_strided", "all_to_all_single",
                         "triton_poi_fused_add_0", "wait_tensor", "triton_red_fused_sum_1"]
    by_name = {a.name: a for a in trace.activities}
    assert len(trace.activities) == 6  # the other call's kernel is left out
    assert by_name["sm90_gemm_kernel"].op == 1
    assert by_name["Memcpy DtoH (Device -> Pinned)"].op == 3  # launched inside the collective
    assert by_name["elementwise_copy"].stream == "stream:20"
    assert by_name["triton_red_fused_sum_1"].op == 6
    assert math.isclose(by_name["sm90_gemm_kernel"].duration_s, 200 * US)
    assert call_trace(gpu_trace(), "graphsched/other/call1") is None


def test_kernels_are_attributed_to_nodes_with_launch_gaps_folded_except_after_a_wait():
    trace = call_trace(gpu_trace(), LABEL)
    costs, details = kernel_call_costs(trace, SITES, ESTIMATES, issues={"a2a"})
    expected = {
        "add_a": 50,                   # first on its stream: nothing to fold
        "mm_1": 200 + 10,              # the gap after add_a's kernel is its launch wait
        "a2a": 30 + 300,               # the link's busy time: copy kernel + device-to-host copies
        "add_b": (20 + 10) * 1 / 4,    # a kernel fused over two nodes: split 1 : 3 by estimate
        "mul_b": (20 + 10) * 3 / 4,
        "sum_c": 40,                   # after the wait: the idle stream may have been blocked
    }
    assert set(costs) == set(expected)
    for node, us in expected.items():
        assert math.isclose(costs[node], us * US), (node, costs[node])
    assert math.isclose(details["folded_gap_s"], 20 * US)
    assert details["unattributed_s"] == 0.0
    assert details["ops_unmatched"] == 1  # empty_strided launches nothing of the plan
    no_fold, _ = kernel_call_costs(trace, SITES, ESTIMATES, issues={"a2a"}, fold_gaps=False)
    assert math.isclose(no_fold["mm_1"], 200 * US)


def test_medians_over_calls_and_unattributed_work():
    fast = CallTrace(["k", "x"], [Activity("k", "s", 0.0, 1.0, 0), Activity("x", "s", 1.0, 0.5, 1)])
    slow = CallTrace(["k", "x"], [Activity("k", "s", 0.0, 3.0, 0), Activity("x", "s", 3.0, 0.5, 1)])
    mid = CallTrace(["k", "x"], [Activity("k", "s", 0.0, 2.0, 0), Activity("x", "s", 2.0, 0.5, 1)])
    step = kernel_step_costs([fast, slow, mid], [LaunchSite("k", ("n",))], {"n": 1.0})
    assert step.costs == {"n": 2.0} and step.measured == ["n"] and step.calls == 3
    assert step.details["unattributed_s"] == 0.5  # x has no launch site
    again = StepCosts.from_dict(json.loads(json.dumps(step.to_dict())))
    assert again == step


def test_matching_is_by_name_and_occurrence():
    sites = [LaunchSite("k", ("a",)), LaunchSite("mm", ("b",)), LaunchSite("k", ("c",))]
    assert match_ops(["k", "empty", "mm", "k", "k"], sites) == [0, None, 1, 2, None]
    assert op_key("aten::mm") == "mm"
    assert op_key("_c10d_functional::all_to_all_single") == "all_to_all_single"
    assert op_key("graph_3_cpp_fused_add_0") == "cpp_fused_add_0"
    assert split(6.0, ["a", "b"], {"a": 1.0, "b": 2.0}) == {"a": 2.0, "b": 4.0}
    assert split(6.0, ["a", "b"], {}) == {"a": 3.0, "b": 3.0}


def test_a_cpu_trace_uses_the_top_level_ops_as_the_work():
    events = [
        {"ph": "X", "cat": "user_annotation", "name": LABEL, "pid": 1, "tid": 5, "ts": 0, "dur": 100},
        _op("graph_0_cpp_fused_add_0", 10, 20, tid=5), _op("aten::mm", 40, 30, tid=5),
        _op("aten::addmm", 45, 5, tid=5),  # nested in mm: not top level
    ]
    for e in events:
        e["pid"] = 1
    trace = call_trace(events, LABEL)
    assert trace.ops == ["cpp_fused_add_0", "mm"]
    assert [(a.name, a.op, a.stream) for a in trace.activities] == [
        ("cpp_fused_add_0", 0, "host:5"), ("mm", 1, "host:5")]
    costs, _ = kernel_call_costs(trace, [LaunchSite("cpp_fused_add_0", ("add",)), LaunchSite("mm", ("mm",))],
                                 {"add": 1.0, "mm": 1.0})
    assert math.isclose(costs["mm"], (30 + 10) * US)  # the host gap before it folds in


WRAPPER = '''
# kernel path: /tmp/x.py
# Topologically Sorted Source Nodes: [add_a], Original ATen: [aten.add]
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', \'\'\'
def triton_poi_fused_add_0(in_ptr0, out_ptr0, xnumel, XBLOCK):
    pass
\'\'\')
cpp_fused_sum_1 = async_compile.cpp_pybinding(['float*'], r\'\'\'
extern "C" void kernel() {}
\'\'\')
class Runner:
    def call(self, args):
        primals_1, tangents_1 = args
        args.clear()
        buf0 = empty_strided_cuda((4, ), (1, ), torch.float32)
        # Topologically Sorted Source Nodes: [add_a], Original ATen: [aten.add]
        stream0 = get_raw_stream(0)
        triton_poi_fused_add_0.run(primals_1, buf0, 4, stream=stream0)
        buf1 = empty_strided_cuda((4, 4), (4, 1), torch.float32)
        # Topologically Sorted Source Nodes: [t_1, mm_1], Original ATen: [aten.t, aten.mm]
        extern_kernels.mm(buf0, primals_1, out=buf1)
        # Topologically Sorted Source Nodes: [slice_1, a2a], Original ATen: [_c10d_functional.all_to_all_single]
        buf2 = torch.ops._c10d_functional.all_to_all_single.default(buf1, [2, 2], [2, 2], '0')
        buf3 = buf0; del buf0  # reuse
        buf4 = buf3; del buf3  # reuse
        cpp_fused_sum_1(buf1, buf4)
        # Topologically Sorted Source Nodes: [wait_1], Original ATen: [_c10d_functional.wait_tensor]
        torch.ops._c10d_functional.wait_tensor.default(buf2)
        buf5 = torch.ops.aten.cumsum.default(buf2, dim=0)
        buf6 = buf5[0]
        aten.scatter_reduce_.two(buf6, 1, buf1, buf4, reduce='sum')
        del buf1
        return (buf4, )
'''


def test_launch_sites_of_a_wrapper():
    report_buffers = {"op3": ["buf3"], "op4": ["buf4"], "op5": ["buf5"]}
    report_origins = {"op3": ["sum_c"], "op4": ["sum_d", "not_in_plan"], "op5": ["cumsum_1"]}
    plan_nodes = {"add_a", "t_1", "mm_1", "slice_1", "a2a", "sum_c", "sum_d", "wait_1", "cumsum_1"}
    sites = launch_sites(WRAPPER, plan_nodes, report_buffers, report_origins)
    assert [(s.name, s.nodes, s.role) for s in sites] == [
        ("triton_poi_fused_add_0", ("add_a",), "compute"),
        ("mm", ("mm_1", "t_1"), "compute"),
        ("all_to_all_single", ("a2a", "slice_1"), "collective"),
        # no comment: the buffers it writes (buf4, which took over buf3's storage) name its nodes
        ("cpp_fused_sum_1", ("sum_c", "sum_d"), "compute"),
        ("wait_tensor", ("wait_1",), "wait"),
        ("cumsum", ("cumsum_1",), "compute"),
        ("scatter_reduce_", (), "compute"),  # mutates buffers made before: no nodes of its own
    ]
    # With the emitted order, such a launch takes the scheduler node nobody claimed between the
    # launches around it.
    order = ["op3", "op4", "op5", "op6"]
    sites = launch_sites(WRAPPER, plan_nodes | {"scatter_1"}, report_buffers,
                         {**report_origins, "op6": ["scatter_1"]}, order)
    assert sites[-1].nodes == ("scatter_1",)


def _plan() -> Plan:
    return Plan("g0.backward", "h", [
        Task("c0", ["a", "b"]),
        Task("x.all_to_all_single", ["a2a"], COMM_STREAM, "collective_issue", "input_grad"),
        Task("dw", ["d"], phase="weight_grad"),
        Task("x.wait", ["w"], kind="collective_wait", collective="x.all_to_all_single"),
        Task("c2", ["e"]),
    ])


def _timings(wait_end_ms: float) -> list[dict]:
    ms = 1e-3

    def t(task, stream, kind, start, end):
        return {"graph": "g0.backward", "task": task, "stream": stream, "kind": kind, "phase": "x",
                "start_s": start * ms, "end_s": end * ms}

    return [
        t("c0", "compute", "compute", 0, 10),
        t("x.all_to_all_single", "comm", "collective_issue", 10, wait_end_ms),
        t("dw", "compute", "compute", 12, 20),
        t("x.wait", "compute", "collective_wait", 20, wait_end_ms),
        t("c2", "compute", "compute", wait_end_ms, wait_end_ms + 5),
    ]


def test_task_timings_give_node_costs_and_a_blocked_wait_measures_its_collective():
    estimates = {"a": 1.0, "b": 3.0, "a2a": 1.0, "d": 1.0, "e": 1.0}
    step = task_step_costs([_timings(40.0)], _plan(), estimates)
    ms = 1e-3
    assert math.isclose(step.costs["a"], 2.5 * ms) and math.isclose(step.costs["b"], 7.5 * ms)
    assert math.isclose(step.costs["d"], 10 * ms)  # its start waited 2 ms for the host: folded
    assert math.isclose(step.costs["e"], 5 * ms)
    assert math.isclose(step.costs["a2a"], 30 * ms)  # the wait blocked: issue to wait end
    assert set(step.measured) == {"a", "b", "a2a", "d", "e"}


def test_a_hidden_collective_keeps_its_estimate_capped_by_its_bound():
    estimates = {"a": 1.0, "b": 1.0, "a2a": 0.004, "d": 1.0, "e": 1.0}
    step = task_step_costs([_timings(20.0)], _plan(), estimates)
    assert "a2a" not in step.measured
    assert step.costs["a2a"] == 0.004  # bound 10 ms is above the estimate
    tight = task_step_costs([_timings(20.0)], _plan(), {**estimates, "a2a": 1.0})
    assert math.isclose(tight.costs["a2a"], 10e-3)  # capped: it ended before the wait began
    # A trace of the same call measures it (the link's busy time), whatever the wait did.
    step = task_step_costs([_timings(20.0)], _plan(), estimates, collectives=[{"a2a": 0.003}])
    assert step.costs["a2a"] == 0.003 and "a2a" in step.measured


def test_collectives_of_an_aten_call_from_its_trace():
    trace = CallTrace(["mm", "all_to_all_single", "mm"], [
        Activity("gemm", "stream:7", 0.0, 1.0, 0), Activity("Memcpy", "stream:20", 0.5, 2.0, 1),
        Activity("Memcpy", "stream:20", 2.5, 1.0, 1),
    ])
    got = collective_call_costs(trace, _plan(), {"a2a": "_c10d_functional::all_to_all_single"}, {"a2a": 1.0})
    assert got == {"a2a": 3.0}


def test_source_summary_and_its_line():
    summary = source_summary([(3.0, "measured_in_step"), (1.0, CostSource.ESTIMATED)])
    assert summary["measured_in_step"] == {"nodes": 1, "seconds": 3.0, "share": 0.75}
    assert summary["measured_alone"]["nodes"] == 0
    assert describe_sources(summary).startswith("measured in the step 1 node (75% of the time)")


def test_cost_cache_round_trip_and_key(tmp_path):
    cache = StepCostCache(str(tmp_path))
    key = cost_key("graph-hash", "aten", "cpu-1threads")
    assert key != cost_key("graph-hash", "inductor", "cpu-1threads")
    assert key != cost_key("other-hash", "aten", "cpu-1threads")
    assert cache.load(key) is None
    entry = CachedCosts({"a": 1.5}, {"a": CostSource.MEASURED_IN_STEP}, 3)
    cache.store(key, entry)
    assert cache.load(key) == entry
    (tmp_path / "step_costs" / f"{key}.json").write_text("{not json")
    assert cache.load(key) is None
