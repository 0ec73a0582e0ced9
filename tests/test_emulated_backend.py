"""The emulated interconnect (``graphsched.testing.emulated``), on CPU in one process.

The emulated backend plays rank 0 of a virtual group of 4 ranks: no other process, no gloo. On CPU
it copies data and counts bytes (nothing is timed), which is what these tests check; speed is only
measured on a GPU (docs/benchmarks.md). The benchmark harness' own tests are in
``tests/test_benchmarks.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol

from benchmarks.presets import get_bench_preset
from benchmarks.run import main
from benchmarks.comm_replay import replay_ops
from graphsched.errors import ConfigError, GraphschedError
from graphsched.models import MoEGPT, get_preset, make_batch
from graphsched.testing.emulated.backend import init_emulated_process_group, new_emulated_group
from graphsched.testing.emulated.group import BACKEND_NAME, EmulatedProcessGroup
from graphsched.testing.emulated.link import EmulationOptions, wire_bytes

N = 4
BANDWIDTH = 25.0
COPY_BANDWIDTH = 50.0  # given, not measured: on CPU nothing is timed
SCALE = COPY_BANDWIDTH / BANDWIDTH


@pytest.fixture
def world():
    pg = init_emulated_process_group(N, BANDWIDTH, copy_bandwidth_gbps=COPY_BANDWIDTH)
    try:
        yield pg
    finally:
        dist.destroy_process_group()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------
# The emulated backend


def test_world_group_reports_the_virtual_size_and_rank_zero(world):
    assert isinstance(world, EmulatedProcessGroup)
    assert dist.get_world_size() == N and dist.get_rank() == 0
    assert world.size() == N and world.rank() == 0
    assert dist.get_backend(world) == BACKEND_NAME
    assert world.group_name  # functional collectives resolve groups by this name


def test_all_to_all_returns_right_shape_and_counts_wire_and_scaled_bytes(world):
    x = torch.randn(8, 3)
    out = funcol.all_to_all_single(x, None, None, world)
    out = funcol.wait_tensor(out)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x)  # every "peer" contributes this rank's own data
    wire = nbytes(x) * (N - 1) // N
    assert world.stats.calls == {"all_to_all": 1}
    assert world.stats.wire_bytes["all_to_all"] == wire
    assert world.stats.emulated_bytes == round(wire * SCALE)
    assert world.stats.copied_bytes == 0  # CPU: counted, not copied


def test_plain_all_to_all_single_as_deepspeed_calls_it(world):
    x = torch.arange(12.0).reshape(4, 3)
    out = torch.full_like(x, float("nan"))
    dist.all_to_all_single(out, x, group=world)
    torch.testing.assert_close(out, x)
    # Uneven splits: the rank keeps its own rows and sends the rest.
    out2 = torch.full((6, 3), float("nan"))
    dist.all_to_all_single(out2, x, [3, 1, 1, 1], [1, 1, 1, 1], group=world)
    assert torch.isfinite(out2).all()
    assert world.stats.wire_bytes["all_to_all"] == nbytes(x) * 3 // 4 + nbytes(x) * 3 // 4


def test_reductions_gathers_and_broadcast_act_as_n_identical_ranks(world):
    t = torch.ones(5)
    dist.all_reduce(t, group=world)
    assert torch.equal(t, torch.full((5,), float(N)))
    t = torch.tensor([1.0, -2.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world)
    assert torch.equal(t, torch.tensor([1.0, -2.0]))
    gathered = torch.empty(N * 3)
    dist.all_gather_into_tensor(gathered, torch.arange(3.0), group=world)
    assert torch.equal(gathered, torch.arange(3.0).repeat(N))
    shard = torch.empty(2)
    dist.reduce_scatter_tensor(shard, torch.ones(2 * N), group=world)
    assert torch.equal(shard, torch.full((2,), float(N)))
    b = torch.arange(4.0)
    dist.broadcast(b, src=0, group=world)
    assert torch.equal(b, torch.arange(4.0))
    dist.barrier(group=world)
    objects = [None] * N
    dist.all_gather_object(objects, {"rank": 0}, group=world)
    assert objects == [{"rank": 0}] * N
    assert world.stats.wire_bytes["all_reduce"] == 2 * (5 * 4) * (N - 1) // N + 2 * 8 * (N - 1) // N


def test_functional_collectives_run_through_the_backend(world):
    summed = funcol.wait_tensor(funcol.all_reduce(torch.ones(3), "sum", world))
    assert torch.equal(summed, torch.full((3,), float(N)))
    x = torch.randn(8, 2, requires_grad=True)
    y = funcol.all_to_all_single_autograd(x, None, None, world)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert world.stats.calls["all_to_all"] == 2  # forward and backward


class _Exchange(nn.Module):
    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = funcol.all_to_all_single_autograd(self.lin(x), None, None, self.group)
        return torch.relu(y).sum()


def test_compiled_graphs_hold_the_collectives_of_the_emulated_group(world):
    captured: list[str] = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(g, _inputs):
            captured.append(str(g.graph))
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    model = _Exchange(world)
    loss = torch.compile(model, backend=backend, fullgraph=True)(torch.randn(8, 4))
    loss.backward()
    assert len(captured) == 2  # forward and backward graphs
    assert all("all_to_all_single" in g and "wait_tensor" in g for g in captured)
    assert world.stats.calls["all_to_all"] == 2


def test_moegpt_builds_a_rank_of_the_virtual_group_and_trains(world):
    config = get_preset("tiny").replace(num_experts=8, top_k=2)
    torch.manual_seed(0)
    model = MoEGPT(config, process_group=world)
    assert model.moe_layers()[0].num_local_experts == config.num_experts // N
    idx, targets = make_batch(config, 2, seed=0)
    with world.recording() as calls:
        loss = model(idx, targets)
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.expert_parameters())
    moe_layers = len(model.moe_layers())
    # Dispatch and combine in the forward, their transposes in the backward.
    assert [c.kind for c in calls] == ["all_to_all"] * 4 * moe_layers
    assert sum(c.wire_bytes for c in calls) == world.stats.total_wire_bytes


def test_graphsched_collective_microbenchmark_runs_on_the_emulated_group(world):
    from graphsched.analysis.commmodel import COLLECTIVE_KINDS, benchmark_collectives

    model = benchmark_collectives(world, sizes=(4096, 16384), kinds=COLLECTIVE_KINDS, repeats=1)
    assert set(model.per_kind) == set(COLLECTIVE_KINDS)
    assert all(ab.alpha_s >= 0 and ab.beta_s_per_byte >= 0 for ab in model.per_kind.values())


class _TwoSizes(_Exchange):
    """Two all-to-alls of different sizes in the forward; only the first one's in the backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = funcol.all_to_all_single_autograd(self.lin(x), None, None, self.group)
        z = funcol.wait_tensor(funcol.all_to_all_single(x.repeat(1, 4), None, None, self.group))
        return torch.relu(y).sum() + z.sum()


def _aten_graphs(model: nn.Module, x: torch.Tensor) -> list:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)(x).backward()
    return graphs


def test_measured_costs_on_the_emulated_group_on_cpu_use_the_analytic_model_and_say_so(world, caplog):
    import logging

    from graphsched.analysis.collective_calls import times_collectives
    from graphsched.analysis.cost_source import MeasuredCosts, analytic_comm_model, measure_comm_model
    from graphsched.analysis.costmodel import collective_bytes, is_collective_node
    from graphsched.analysis.graph_collectives import graph_collectives

    cpu = torch.device("cpu")
    assert not times_collectives(world, cpu)  # on the host the link spends no time
    with caplog.at_level(logging.INFO, logger="graphsched.analysis"):
        comm = measure_comm_model("measured", cpu)
    assert comm == analytic_comm_model(cpu)
    assert "takes no link time on cpu" in caplog.text and "analytic model" in caplog.text
    assert world.stats.calls == {}  # nothing was benchmarked

    caplog.clear()
    costs = MeasuredCosts(cpu, comm)
    graphs = _aten_graphs(_TwoSizes(world), torch.randn(8, 4))
    with caplog.at_level(logging.INFO, logger="graphsched.analysis"):
        for gm in graphs:
            costs.prepare(gm)
    assert costs.timed_collectives == {} and world.stats.calls.get("all_to_all", 0) == 3
    assert "takes no link time on cpu" in caplog.text
    found = graph_collectives(graphs[0])
    assert [(c.kind, c.nbytes, c.group_size, c.timed) for c in found] == [
        ("all_to_all", 8 * 4 * 4, N, False), ("all_to_all", 8 * 16 * 4, N, False)]
    for gm in graphs:
        for n in gm.graph.nodes:
            if is_collective_node(n):
                assert costs(n) == comm.time("all_to_all", collective_bytes(n))


def test_measured_costs_time_each_collective_of_a_graph_at_its_own_size(world, monkeypatch):
    from graphsched.analysis import graph_collectives
    from graphsched.analysis.commmodel import CommModel
    from graphsched.analysis.cost_source import MeasuredCosts
    from graphsched.analysis.costmodel import collective_bytes, is_collective_node

    # A group that is timed on the host (as gloo is): the graph's sizes are what gets timed.
    monkeypatch.setattr(EmulatedProcessGroup, "times_collectives", lambda self, device: True)
    timed_calls: list[tuple[str, int, torch.dtype]] = []
    real_call = graph_collectives.collective_call

    def spy(kind, numel, group, device, dtype=torch.float32, async_op=False):
        assert group is world and device.type == "cpu"
        timed_calls.append((kind, numel * torch.empty((), dtype=dtype).element_size(), dtype))
        return real_call(kind, numel, group, device, dtype, async_op)

    monkeypatch.setattr(graph_collectives, "collective_call", spy)
    comm = CommModel.analytic(1e9, 1e-5, N)
    costs = MeasuredCosts(torch.device("cpu"), comm)
    graphs = _aten_graphs(_TwoSizes(world), torch.randn(8, 4))
    for gm in graphs:
        costs.prepare(gm)
    graph_sizes = [collective_bytes(n) for gm in graphs for n in gm.graph.nodes if is_collective_node(n)]
    assert sorted(graph_sizes) == [128, 128, 512]  # forward: both; backward: the first again
    # Each distinct size once, in graph order: the backward's 128 bytes were already timed.
    assert timed_calls == [("all_to_all", 128, torch.float32), ("all_to_all", 512, torch.float32)]
    timed = costs.timed_collectives
    assert sorted(k[2] for k in timed) == [128, 512]
    for gm in graphs:
        for n in gm.graph.nodes:
            if is_collective_node(n):
                assert costs(n) == timed[(world.group_name, "all_to_all", collective_bytes(n), "torch.float32", "cpu")]


def test_commcheck_puts_graphsched_costs_beside_the_harness_fit_per_size(tmp_path, capsys):
    from benchmarks.commcheck import check, main

    record = check(12.5, torch.device("cpu"), get_bench_preset("tiny-cpu"), fit_sizes=(4096, 65536),
                   cache_dir=str(tmp_path))
    assert record["virtual_size"] == 4 and record["graphsched_comm_model"]["contention"] == 1.0
    assert [r["bytes"] for r in record["harness_points"]] == [4096, 65536]
    assert all(r["ratio"] is not None and r["ratio"] > 0 for r in record["sweep"])
    rows = record["graph"]["rows"]
    # Every all-to-all of the step (dispatch and combine per MoE layer, forward and backward).
    assert len(rows) == 8 and {r["source"].split(":")[0] for r in rows} == {"g0.forward", "g0.backward"}
    assert not dist.is_initialized()
    out = tmp_path / "cc.json"
    assert main(["--device", "cpu", "--no-graph", "--bandwidth", "25", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["bandwidth_gbps"] == 25 and "graph" not in saved and saved["command"].endswith(str(out))
    assert "graphsched's sweep fit vs the harness fit" in capsys.readouterr().out


def test_compute_only_twin_moves_the_same_data_but_no_emulated_bytes(world):
    twin = new_emulated_group(math.inf)
    assert twin.size() == N and twin.options.bandwidth_gbps == math.inf
    x = torch.randn(16, 4)
    out = funcol.wait_tensor(funcol.all_to_all_single(x, None, None, twin))
    torch.testing.assert_close(out, x)
    assert twin.stats.wire_bytes["all_to_all"] == nbytes(x) * (N - 1) // N
    assert twin.stats.emulated_bytes == 0
    assert world.stats.calls == {}  # the twin's traffic is its own


def test_subgroups_inherit_the_world_options_and_link(world):
    sub = dist.new_group([0, 1])
    assert isinstance(sub, EmulatedProcessGroup) and sub.size() == 2
    assert sub.options == world.options and sub.link is world.link
    assert dist.new_group([2, 3]) == dist.GroupMember.NON_GROUP_MEMBER


def test_replayed_step_moves_the_recorded_bytes(world):
    config = get_preset("tiny").replace(num_experts=8)
    model = MoEGPT(config, process_group=world)
    with world.recording() as calls:
        model(*make_batch(config, 2, seed=0)).backward()
    world.reset_stats()
    for op in replay_ops(calls, world, torch.device("cpu")):
        op()
    assert world.stats.total_wire_bytes == sum(c.wire_bytes for c in calls)


def test_wire_byte_rules():
    assert wire_bytes("all_to_all", 800, 8) == 700
    assert wire_bytes("reduce_scatter", 800, 8) == 700
    assert wire_bytes("all_reduce", 800, 8) == 1400
    assert wire_bytes("all_gather", 100, 8) == 700
    assert wire_bytes("all_to_all", 800, 1) == 0
    with pytest.raises(ConfigError, match="all_to_all"):
        wire_bytes("gossip", 8, 2)


@pytest.mark.parametrize(
    "bad", [{"bandwidth_gbps": 0}, {"latency_us": -1.0}, {"copy_bandwidth_gbps": math.inf},
            {"staging_mib": 0}]
)
def test_bad_options_name_the_fix(bad):
    with pytest.raises(ConfigError, match="must be"):
        EmulationOptions(**bad)


def test_second_initialisation_is_refused(world):
    with pytest.raises(GraphschedError, match="destroy_process_group"):
        init_emulated_process_group(N)
