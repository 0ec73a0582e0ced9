"""Cost model: flop and byte counts of aten nodes, alpha-beta fits, the node profiler and its cache.
Cost agreement across ranks and collectives timed on two gloo ranks: ``tests/test_comm_costs.py``."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import flop_counter

from graphsched.analysis.commmodel import AlphaBeta, CommModel, fit_alpha_beta
from graphsched.analysis.costmodel import (
    CostModel,
    DeviceSpec,
    analytic_cost,
    collective_bytes,
    collective_kind,
    fused_node_bytes,
    is_compute_node,
    is_view_node,
    node_bytes,
    node_flops,
)
from graphsched.analysis.profiler import NodeProfiler
from graphsched.errors import ConfigError, GraphschedError

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


# ---------------------------------------------------------------------------------------------
# Graphs used by several tests


class TinyNet(nn.Module):
    """Embedding (integer input), attention, an MLP and a cross-entropy loss (integer target)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16, bias=False)
        self.head = nn.Linear(16, 5)

    def forward(self, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        b, s, _ = h.shape
        q = h.view(b, s, 2, 8).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(b, s, 16)
        h = self.down(F.relu(self.up(a))) + h
        return F.cross_entropy(self.head(h).flatten(0, 1), target.flatten())


def capture(model: nn.Module, *inputs: torch.Tensor) -> dict[str, fx.GraphModule]:
    """Forward and backward aten graphs of ``model`` as AOTAutograd hands them to a compiler."""
    graphs: dict[str, fx.GraphModule] = {}

    def recorder(name: str):
        def compiler(gm: fx.GraphModule, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    torch.compile(model, backend=backend, fullgraph=True)(*inputs).backward()
    return graphs


@pytest.fixture(scope="module")
def tiny_graphs() -> dict[str, fx.GraphModule]:
    torch.manual_seed(0)
    idx = torch.randint(0, 11, (2, 6))
    target = torch.randint(0, 5, (2, 6))
    graphs = capture(TinyNet(), idx, target)
    assert set(graphs) == {"forward", "backward"}
    return graphs


def call_nodes(gm: fx.GraphModule, packet) -> list[fx.Node]:
    return [
        n for n in gm.graph.nodes
        if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is packet
    ]


def shape(node_or_arg) -> tuple[int, ...]:
    return tuple(node_or_arg.meta["val"].shape)


# ---------------------------------------------------------------------------------------------
# Analytic costs


def test_mm_addmm_bmm_flops_are_2mnk():
    def f(a, b, c, x, y):
        return torch.mm(a, b), torch.addmm(c, a, b), torch.bmm(x, y)

    m, k, n, batch = 3, 5, 7, 4
    gm = make_fx(f, tracing_mode="fake")(
        torch.randn(m, k), torch.randn(k, n), torch.randn(n), torch.randn(batch, m, k),
        torch.randn(batch, k, n),
    )
    (mm,) = call_nodes(gm, aten.mm)
    (addmm,) = call_nodes(gm, aten.addmm)
    (bmm,) = call_nodes(gm, aten.bmm)
    assert node_flops(mm) == 2 * m * n * k
    assert node_flops(addmm) == 2 * m * n * k
    assert node_flops(bmm) == 2 * batch * m * n * k
    # float32 mm reads a and b and writes the product.
    assert node_bytes(mm) == 4 * (m * k + k * n + m * n)


def test_flops_of_captured_matmuls_and_cpu_attention(tiny_graphs):
    checked = 0
    for gm in tiny_graphs.values():
        for node in call_nodes(gm, aten.mm):
            (m, k), (_, n) = shape(node.args[0]), shape(node.args[1])
            assert node_flops(node) == 2 * m * n * k
            checked += 1
        for node in call_nodes(gm, aten.addmm):
            (m, k), (_, n) = shape(node.args[1]), shape(node.args[2])
            assert node_flops(node) == 2 * m * n * k
            checked += 1
    assert checked >= 6  # 3 linears forward, their input and weight gradients backward

    fwd = tiny_graphs["forward"]
    (attn,) = call_nodes(fwd, aten._scaled_dot_product_flash_attention_for_cpu)
    q, k, v = (shape(a) for a in attn.args[:3])
    assert node_flops(attn) == flop_counter.sdpa_flop_count(q, k, v) > 0
    (attn_bw,) = call_nodes(
        tiny_graphs["backward"], aten._scaled_dot_product_flash_attention_for_cpu_backward
    )
    assert node_flops(attn_bw) > node_flops(attn)


def test_views_and_graph_plumbing_cost_nothing(tiny_graphs):
    spec = DeviceSpec.cpu()
    view_targets = set()
    for gm in tiny_graphs.values():
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output") or is_view_node(node):
                assert analytic_cost(node, spec) == 0.0, node.format_node()
                assert node_bytes(node) == 0.0, node.format_node()
                if node.op == "call_function":
                    view_targets.add(getattr(node.target, "__name__", str(node.target)))
            else:
                assert analytic_cost(node, spec) >= spec.launch_overhead_s, node.format_node()
    # The captured graphs do use the usual view ops; each was recognised above.
    for name in ("view.default", "t.default", "transpose.int", "getitem", "_unsafe_view.default"):
        assert name in view_targets, sorted(view_targets)


def test_analytic_cost_is_a_roofline():
    spec = DeviceSpec(name="toy", peak_flops=1e9, memory_bandwidth=1e9, launch_overhead_s=1e-6)
    gm = make_fx(torch.mm, tracing_mode="fake")(torch.randn(64, 64), torch.randn(64, 64))
    (mm,) = call_nodes(gm, aten.mm)
    flops, nbytes = 2 * 64**3, 3 * 64 * 64 * 4
    assert analytic_cost(mm, spec) == pytest.approx(1e-6 + max(flops, nbytes) / 1e9)


def test_broadcast_input_counts_its_memory_once():
    gm = make_fx(lambda a, b: a + b, tracing_mode="fake")(
        torch.randn(1000, 8).expand(1000, 8).contiguous(), torch.randn(8).expand(1000, 8)
    )
    (add,) = call_nodes(gm, aten.add)
    assert node_bytes(add) == 4 * (1000 * 8 + 8 + 1000 * 8)


def test_fused_bytes_count_only_what_crosses_a_fused_kernels_edge():
    # mm -> relu -> (view) -> mul -> mm: relu and mul fuse into one kernel that reads the first
    # mm's output and writes what the second mm reads; the value between them never hits memory.
    def f(a, b, c):
        return torch.mm((torch.relu(a @ b).view(64, 64) * 2.0), c)

    gm = make_fx(f, tracing_mode="fake")(torch.randn(64, 64), torch.randn(64, 64), torch.randn(64, 64))
    fusable = lambda n: is_compute_node(n) and node_flops(n) == 0  # noqa: E731
    (relu,) = call_nodes(gm, aten.relu)
    (mul,) = call_nodes(gm, aten.mul)
    tile = 64 * 64 * 4
    assert fused_node_bytes(relu, fusable) == tile  # reads the mm's output, writes nothing
    assert fused_node_bytes(mul, fusable) == tile  # reads nothing, writes the second mm's input
    assert node_bytes(relu) == node_bytes(mul) == 2 * tile  # unfused: each reads and writes


def mock_collective_graph() -> tuple[fx.Graph, dict[str, fx.Node]]:
    """all_to_all -> wait -> all_reduce -> wait, with meta tensors standing for the fake values."""
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(6, 4, dtype=torch.bfloat16, device="meta")
    a2a = g.call_function(c10d.all_to_all_single.default, (x, [3, 3], [3, 3], "0"))
    a2a.meta["val"] = torch.empty(6, 4, dtype=torch.bfloat16, device="meta")
    w1 = g.call_function(c10d.wait_tensor.default, (a2a,))
    w1.meta["val"] = a2a.meta["val"]
    ar = g.call_function(c10d.all_reduce.default, (w1, "sum", "0"))
    ar.meta["val"] = a2a.meta["val"]
    ag = g.call_function(c10d.all_gather_into_tensor.default, (w1, 2, "0"))
    ag.meta["val"] = torch.empty(12, 4, dtype=torch.bfloat16, device="meta")
    g.output((ar, ag))
    return g, {"x": x, "a2a": a2a, "wait": w1, "all_reduce": ar, "all_gather": ag}


def test_collective_kind_and_bytes_of_functional_collectives():
    _, n = mock_collective_graph()
    assert collective_kind(n["a2a"]) == "all_to_all"
    assert collective_kind(n["wait"]) == "wait"
    assert collective_kind(n["all_reduce"]) == "all_reduce"
    assert collective_kind(n["all_gather"]) == "all_gather"
    assert collective_kind(n["x"]) == ""
    assert collective_bytes(n["a2a"]) == 6 * 4 * 2
    # An all-gather is sized by the shard a rank hands in, not by the gathered output.
    assert collective_bytes(n["all_gather"]) == 6 * 4 * 2
    assert collective_bytes(n["wait"]) == 0
    spec = DeviceSpec.h100()
    for node in n.values():
        assert analytic_cost(node, spec) == 0.0


# ---------------------------------------------------------------------------------------------
# Device specs and the cost-model bundle


def test_device_specs():
    h100, h200, cpu = DeviceSpec.h100(), DeviceSpec.h200(), DeviceSpec.cpu(num_threads=2)
    assert h100.flops_for(torch.bfloat16) > h100.flops_for(torch.float32)
    assert h200.memory_bandwidth > h100.memory_bandwidth
    assert h200.flops_for(torch.bfloat16) == h100.flops_for(torch.bfloat16)
    assert h100.flops_for(torch.int8) == h100.flops_for("default")
    assert DeviceSpec.detect("cpu").name.startswith("cpu")
    assert cpu.flops_for(torch.float32) == 2 * DeviceSpec.cpu(num_threads=1).flops_for(None)
    with pytest.raises(ConfigError, match="peak_flops"):
        DeviceSpec(name="bad", peak_flops=0.0, memory_bandwidth=1e9, launch_overhead_s=0.0)


def test_cost_model_prefers_measured_and_prices_collectives_with_the_comm_model(tiny_graphs):
    fwd = tiny_graphs["forward"]
    (addmm, *_) = call_nodes(fwd, aten.addmm)
    comm = CommModel({"all_to_all": AlphaBeta(1e-5, 1e-9, 0.01)})
    model = CostModel(DeviceSpec.h100(), measured={addmm.name: 0.123}, comm=comm)
    assert model.node_cost(addmm) == 0.123
    (mm, *_) = call_nodes(fwd, aten.mm) or call_nodes(tiny_graphs["backward"], aten.mm)
    assert model.node_cost(mm) == analytic_cost(mm, DeviceSpec.h100())

    _, n = mock_collective_graph()
    assert model.node_cost(n["a2a"]) == pytest.approx(1e-5 + 48 * 1e-9)
    assert model.node_cost(n["wait"]) == 0.0
    with pytest.raises(GraphschedError, match="all_reduce"):
        model.node_cost(n["all_reduce"])
    # Without a measured comm model the spec's interconnect is used.
    bare = CostModel(DeviceSpec.h100())
    assert bare.node_cost(n["all_reduce"]) > DeviceSpec.h100().interconnect_latency_s

    costs = model.costs(fwd)
    assert set(costs) == {node.name for node in fwd.graph.nodes}
    again = CostModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again == model
    assert again.costs(fwd) == costs


def test_analytic_comm_model_scales_by_algorithm():
    comm = CommModel.analytic(bandwidth_bytes_s=1e9, latency_s=1e-5, world_size=4)
    assert comm.time("all_to_all", 1e6) == pytest.approx(1e-5 + 1e-3)
    assert comm.time("all_reduce", 1e6) == pytest.approx(1e-5 + 1.5e-3)
    assert comm.time("all_gather", 1e6) == pytest.approx(1e-5 + 3e-3)
    assert CommModel.from_dict(json.loads(json.dumps(comm.to_dict()))) == comm


def test_comm_model_carries_its_contention_factor_and_refuses_one_below_one():
    comm = CommModel.analytic(bandwidth_bytes_s=1e9, latency_s=1e-5)
    assert comm.contention == 1.0
    slowed = CommModel(comm.per_kind, contention=1.08)
    again = CommModel.from_dict(json.loads(json.dumps(slowed.to_dict())))
    assert again == slowed and again.contention == 1.08
    old_record = {"per_kind": slowed.to_dict()["per_kind"]}  # written before the factor existed
    assert CommModel.from_dict(old_record).contention == 1.0
    with pytest.raises(ConfigError, match="contention"):
        CommModel(comm.per_kind, contention=0.9)


# ---------------------------------------------------------------------------------------------
# Where a group's collective buffers live


@pytest.mark.parametrize("backend, registered, preferred, cuda, expected", [
    ("gloo", ["cpu", "cuda"], "cuda:1", True, "cpu"),            # gloo runs on the host
    ("nccl", ["cuda"], "cpu", True, "cuda:0"),                    # NCCL never takes host buffers
    ("nccl", ["cuda"], "cuda:1", True, "cuda:1"),
    ("mybackend", ["cuda", "cpu"], "cpu", True, "cpu"),           # a CPU model's group: host buffers
    ("mybackend", ["cuda", "cpu"], "cuda:1", True, "cuda:1"),     # a GPU model's: its device
    ("mybackend", ["cuda", "cpu"], None, True, "cuda:0"),
    ("mybackend", ["cuda", "cpu"], None, False, "cpu"),
    ("mybackend", ["xpu"], "cpu", True, "cpu"),                   # neither device registered
    ("unregistered", None, "cpu", True, "cpu"),                   # torch does not say: the model's
    ("unregistered", None, "cuda:1", True, "cuda:1"),
    ("unregistered", None, None, True, "cuda:0"),
])
def test_a_group_of_any_backend_gets_buffers_on_the_device_its_collectives_use(
    monkeypatch, backend, registered, preferred, cuda, expected
):
    from graphsched.analysis import collective_calls

    capability = dict(getattr(dist.Backend, "backend_capability", {}))
    capability.pop(backend, None)
    if registered is not None:
        capability[backend] = registered
    monkeypatch.setattr(dist.Backend, "backend_capability", capability, raising=False)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    found = collective_calls.group_device(None, None if preferred is None else torch.device(preferred))
    assert found == torch.device(expected)


def test_a_group_that_says_it_takes_no_link_time_on_a_device_is_not_timed_there():
    from graphsched.analysis.collective_calls import times_collectives

    class HostCopies:
        def times_collectives(self, device: torch.device) -> bool:
            return device.type == "cuda"

    assert times_collectives(HostCopies(), torch.device("cuda", 0))
    assert not times_collectives(HostCopies(), torch.device("cpu"))
    assert times_collectives(object(), torch.device("cpu"))  # a group that says nothing is timed


# ---------------------------------------------------------------------------------------------
# Alpha-beta fit


def test_fit_alpha_beta_recovers_latency_and_bandwidth_from_noisy_times():
    alpha, beta = 30e-6, 1 / 12e9
    sizes = [2**k for k in range(10, 27)]
    exact = fit_alpha_beta(sizes, [alpha + beta * s for s in sizes])
    assert exact.alpha_s == pytest.approx(alpha, rel=1e-9)
    assert exact.beta_s_per_byte == pytest.approx(beta, rel=1e-9)
    assert exact.rel_error < 1e-9

    rng = random.Random(0)
    noisy = [(alpha + beta * s) * (1 + rng.uniform(-0.03, 0.03)) for s in sizes]
    fit = fit_alpha_beta(sizes, noisy)
    assert fit.alpha_s == pytest.approx(alpha, rel=0.1)
    assert fit.beta_s_per_byte == pytest.approx(beta, rel=0.05)
    worst = max(abs(fit.time(s) - t) / t for s, t in zip(sizes, noisy))
    assert fit.rel_error == pytest.approx(worst)
    assert 0.0 < fit.rel_error < 0.08


def test_fit_alpha_beta_stays_non_negative_and_rejects_bad_input():
    flat = fit_alpha_beta([1, 2, 4, 8], [2.0, 1.9, 2.1, 2.0])
    assert flat.beta_s_per_byte >= 0.0 and flat.alpha_s == pytest.approx(2.0, rel=0.05)
    shrinking = fit_alpha_beta([1, 2, 4, 8], [4.0, 3.0, 2.0, 1.0])
    assert shrinking.beta_s_per_byte == 0.0
    with pytest.raises(ConfigError, match="two distinct"):
        fit_alpha_beta([8, 8], [1.0, 1.1])
    with pytest.raises(ConfigError, match="positive"):
        fit_alpha_beta([1, 2], [1.0, 0.0])


# ---------------------------------------------------------------------------------------------
# Measured node costs


class CountingProfiler(NodeProfiler):
    """Counts the ops it actually runs."""

    def __init__(self, *args, **kwargs) -> None:
        self.calls = 0
        super().__init__(*args, **kwargs)

    def time_callable(self, fn):
        self.calls += 1
        return super().time_callable(fn)


def test_profiler_measures_forward_and_backward_nodes(tiny_graphs, tmp_path):
    prof = CountingProfiler("cpu", tmp_path, repeats=2, warmup=1)
    for name, gm in tiny_graphs.items():
        measured = prof.measure_nodes(gm)
        for node in gm.graph.nodes:
            plumbing = node.op != "call_function" or is_view_node(node)
            if plumbing:
                assert node.name not in measured
                assert prof.measure(node) == 0.0
            else:
                assert measured[node.name] > 0.0, (name, node.format_node())
        # Index ops ran on the zero-filled integer inputs.
        ops = {getattr(n.target, "overloadpacket", None) for n in gm.graph.nodes
               if n.name in measured}
        expected = aten.embedding if name == "forward" else aten.embedding_dense_backward
        assert expected in ops
    assert prof.calls > 0


def test_profiler_cache_is_reused_by_a_second_instance(tiny_graphs, tmp_path):
    first = CountingProfiler("cpu", tmp_path, repeats=1, warmup=0)
    numbers = {name: first.measure_nodes(gm) for name, gm in tiny_graphs.items()}
    distinct = {first.key(n) for name, gm in tiny_graphs.items() for n in gm.graph.nodes
                if n.name in numbers[name]}
    # Nodes with the same op and signature are measured once.
    assert first.calls == len(distinct) > 0
    assert os.path.exists(first.cache_path)

    second = CountingProfiler("cpu", tmp_path, repeats=1, warmup=0)
    assert {name: second.measure_nodes(gm) for name, gm in tiny_graphs.items()} == numbers
    (mm, *_) = call_nodes(tiny_graphs["backward"], aten.mm)
    assert second.measure(mm) == numbers["backward"][mm.name]
    assert second.calls == 0

    other_dir = CountingProfiler("cpu", tmp_path / "elsewhere", repeats=1, warmup=0)
    other_dir.measure(mm)
    assert other_dir.calls == 1


def test_profiler_key_tells_shapes_and_layouts_apart(tmp_path):
    prof = NodeProfiler("cpu", cache_dir=tmp_path)
    keys = set()
    for a, b in [
        (torch.randn(4, 8), torch.randn(8, 4)),
        (torch.randn(4, 8), torch.randn(4, 8).t()),
        (torch.randn(4, 16), torch.randn(16, 4)),
        (torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)),
    ]:
        (mm,) = call_nodes(make_fx(torch.mm, tracing_mode="fake")(a, b), aten.mm)
        keys.add(prof.key(mm))
    assert len(keys) == 4
