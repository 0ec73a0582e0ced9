"""The emulated interconnect and the benchmark harness, on CPU in one process.

The emulated backend plays rank 0 of a virtual group of 4 ranks: no other process, no gloo. On CPU
it copies data and counts bytes (nothing is timed), which is what these tests check; speed is only
measured on a GPU (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol

from benchmarks.presets import ALL_VARIANTS, PRESETS, get_bench_preset
from benchmarks.report import build_record, derived, format_table
from benchmarks.run import apply_overrides, main, run_benchmark
from benchmarks.timing import Timing
from benchmarks.comm_replay import replay_ops
from benchmarks.context import VariantResult
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


class _TwoSizes(nn.Module):
    """Two all-to-alls of different sizes in the forward; only the first one's in the backward."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.lin = nn.Linear(4, 4)

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


# ---------------------------------------------------------------------------------------------
# The harness

TEST_VARIANTS = (
    "eager", "compute-only", "comm-only", "inductor-reorder", "deepspeed", "graphsched-ilp",
)


def test_tiny_cpu_preset_writes_a_complete_record(tmp_path):
    out = tmp_path / "tiny.json"
    lines: list[str] = []
    run_benchmark(
        get_bench_preset("tiny-cpu"), steps=2, warmup=1, variants=TEST_VARIANTS, out=str(out),
        command="python -m benchmarks.run --preset tiny-cpu --steps 2", log=lines.append,
    )
    assert not dist.is_initialized()  # the harness tears its group down
    record = json.loads(out.read_text())
    assert record["schema"] == "graphsched-benchmark/1"
    assert record["emulated"] is True
    assert record["command"].startswith("python -m benchmarks.run --preset tiny-cpu")
    assert record["bandwidth_gbps"] == 25.0 and record["virtual_size"] == 4
    assert record["device"]["type"] == "cpu" and record["device"]["name"]
    assert record["versions"]["torch"] == torch.__version__
    assert record["timing"] == {
        "method": "wall-clock", "statistic": "median", "warmup": 1, "steps": 2,
        "step": "forward+backward",
    }
    by_name = {v["name"]: v for v in record["variants"]}
    assert list(by_name) == list(TEST_VARIANTS)
    for name, v in by_name.items():
        if name == "deepspeed" and v["status"] == "skipped":
            assert "deepspeed" in v["reason"]
            continue
        assert v["status"] == "ok", (name, v["reason"])
        assert v["median_ms"] > 0 and len(v["samples_ms"]) == 2
    eager, compute, comm = by_name["eager"], by_name["compute-only"], by_name["comm-only"]
    # The same collectives everywhere; only the compute-only twin's cost no emulated bytes.
    assert eager["wire_bytes_per_step"] > 0
    assert compute["wire_bytes_per_step"] == eager["wire_bytes_per_step"]
    assert comm["wire_bytes_per_step"] == eager["wire_bytes_per_step"]
    assert by_name["graphsched-ilp"]["wire_bytes_per_step"] == eager["wire_bytes_per_step"]
    assert compute["emulated_bytes_per_step"] == 0
    assert eager["emulated_bytes_per_step"] == eager["wire_bytes_per_step"]  # scale 1 on CPU
    assert eager["speedup_vs_eager"] == 1.0
    assert record["summary"]["compute_ms"] == compute["median_ms"]
    assert any("EMULATED" in line for line in lines)
    assert any(line.startswith("graphsched-ilp") for line in "\n".join(lines).splitlines())


def _result(
    name: str, ms: float | None, status: str = "ok", losses: list[float] | None = None
) -> VariantResult:
    from benchmarks.variant_names import family_of

    return VariantResult(
        name=name, family=family_of(name), status=status,
        timing=Timing([ms]) if ms is not None else None, losses=list(losses or []),
    )


def _issue_13_table() -> dict[str, VariantResult]:
    """The H200 figures of issue 13 (gpu-smoke, 12.5 GB/s), plus two graphsched variants."""
    loss = [10.40, 10.40]
    rows = [
        ("eager", 59.1), ("compute-only", 36.3), ("comm-only", 23.9), ("inductor", 38.0),
        ("compute-only-inductor", 14.8), ("inductor-classic", 35.2), ("deepspeed", 45.1),
        ("compute-only-deepspeed", 20.9), ("graphsched-ilp", 46.2), ("deepspeed+graphsched", 40.0),
    ]
    return {n: _result(n, ms, losses=None if n == "comm-only" else loss) for n, ms in rows}


def test_true_limit_is_the_fastest_compute_of_any_family_or_the_comm():
    from benchmarks.report import true_limit

    results = _issue_13_table()
    lim = true_limit(results)
    # max(min(36.3, 14.8, 20.9), 23.9): communication bounds it, not eager's compute.
    assert lim["limit_ms"] == pytest.approx(23.9)
    assert lim["limit_compute_variant"] == "compute-only-inductor"
    assert lim["limit_compute_ms"] == pytest.approx(14.8)
    d = derived(results)
    for name in ("eager", "inductor-classic", "deepspeed", "graphsched-ilp"):
        assert d[name]["limit_ms"] == pytest.approx(23.9)
        assert d[name]["limit_fraction"] == pytest.approx(23.9 / results[name].median_ms)
    # Compute-bound: the fastest compute alone is the limit.
    results["comm-only"] = _result("comm-only", 5.0)
    assert true_limit(results)["limit_ms"] == pytest.approx(14.8)
    # A failed compute-only step does not set the limit.
    results["compute-only-inductor"].status = "failed"
    assert true_limit(results)["limit_ms"] == pytest.approx(20.9)
    assert true_limit(results)["limit_compute_variant"] == "compute-only-deepspeed"


def test_best_peer_is_named_and_every_graphsched_variant_is_compared_with_it():
    from benchmarks.report import best_peer

    results = _issue_13_table()
    assert best_peer(results) == ("inductor-classic", pytest.approx(35.2))
    d = derived(results)
    assert d["graphsched-ilp"]["speedup_vs_best_peer"] == pytest.approx(35.2 / 46.2)
    # DeepSpeed's model under graphsched is graphsched's, compared with DeepSpeed's compute alone.
    assert d["deepspeed+graphsched"]["speedup_vs_best_peer"] == pytest.approx(35.2 / 40.0)
    assert d["deepspeed+graphsched"]["compute_reference"] == "compute-only-deepspeed"
    assert d["compute-only-inductor"]["speedup_vs_best_peer"] is None
    table = format_table(results)
    assert "best peer: inductor-classic (35.20 ms)" in table
    assert "limit: 23.90 ms" in table and "compute-only-inductor" in table
    summary = build_record(results, {})["summary"]
    assert summary["best_peer"] == "inductor-classic" and summary["limit_ms"] == pytest.approx(23.9)
    # graphsched never counts as a peer, however fast.
    results["graphsched-ilp"] = _result("graphsched-ilp", 20.0, losses=[10.40, 10.40])
    assert best_peer(results)[0] == "inductor-classic"


def test_a_variant_with_a_nan_or_wrong_loss_fails_and_enters_no_table():
    from benchmarks.report import check_losses

    results = _issue_13_table()
    # Fast and wrong: NaN loss; fast and off by more than the bf16 tolerance (1e-2 absolute).
    results["graphsched-chunks2"] = _result("graphsched-chunks2", 20.0, losses=[10.40, float("nan")])
    results["graphsched-full"] = _result("graphsched-full", 21.0, losses=[10.42, 10.42])
    # Within tolerance passes; DeepSpeed's model is checked against plain DeepSpeed.
    results["graphsched-chunks4"] = _result("graphsched-chunks4", 50.0, losses=[10.405, 10.405])
    results["compute-only-deepspeed"].losses = [10.40 + 0.5] * 2
    results["deepspeed"].losses = [10.40 + 0.5] * 2
    check_losses(results, "bfloat16")
    assert results["graphsched-chunks2"].status == "failed"
    assert "non-finite" in results["graphsched-chunks2"].reason
    assert results["graphsched-full"].status == "failed"
    assert "tolerance 0.01 absolute" in results["graphsched-full"].reason
    assert results["graphsched-chunks4"].status == "ok"
    assert results["deepspeed+graphsched"].status == "failed"  # 10.40 against DeepSpeed's 10.90
    assert results["compute-only-deepspeed"].status == "ok"
    table = format_table(results)
    rows = [line.split()[0] for line in table.split("failed:")[0].splitlines() if line.strip()]
    assert "graphsched-chunks2" not in rows and "graphsched-full" not in rows
    assert "graphsched-chunks4" in rows
    failed = table.split("failed:")[1]
    assert "graphsched-chunks2: loss check: non-finite" in failed and "graphsched-full" in failed
    record = build_record(results, {})
    assert record["summary"]["fastest_variant"] == "compute-only-inductor" or record["summary"][
        "fastest_variant"] != "graphsched-chunks2"
    assert set(record["summary"]["failed"]) == {"graphsched-chunks2", "graphsched-full", "deepspeed+graphsched"}
    assert derived(results)["graphsched-chunks2"]["speedup_vs_eager"] is None
    # float32: 1e-4 relative.
    fp32 = {"eager": _result("eager", 1.0, losses=[2.0]), "inductor": _result("inductor", 1.0, losses=[2.0003])}
    check_losses(fp32, "float32")
    assert fp32["inductor"].status == "failed" and "relative" in fp32["inductor"].reason
    fp32 = {"eager": _result("eager", 1.0, losses=[2.0]), "inductor": _result("inductor", 1.0, losses=[2.0001])}
    check_losses(fp32, "float32")
    assert fp32["inductor"].status == "ok"


def test_quick_selects_the_peers_that_matter_and_variants_still_win(tmp_path):
    from benchmarks.presets import QUICK_STEPS, QUICK_VARIANTS
    from benchmarks.run import parse_args, quick_preset

    preset = quick_preset(get_bench_preset("gpu-e16"))
    assert preset.variants == QUICK_VARIANTS
    assert (preset.warmup, preset.steps) == (QUICK_STEPS["warmup"], QUICK_STEPS["steps"])
    assert preset.solver_time_limit_s <= 5.0
    for needed in ("eager", "comm-only", "compute-only", "compute-only-inductor",
                   "compute-only-deepspeed", "inductor-classic", "deepspeed",
                   "deepspeed+graphsched", "graphsched-ilp"):
        assert needed in QUICK_VARIANTS
    assert set(QUICK_VARIANTS) <= set(ALL_VARIANTS)
    assert "graphsched-chunks4" not in QUICK_VARIANTS and "inductor-overlap" not in QUICK_VARIANTS
    assert parse_args(["--quick"]).quick
    # --variants picks the subset, --quick the steps; the record says it was quick.
    out = tmp_path / "q.json"
    record = run_benchmark(
        get_bench_preset("tiny-cpu"), variants=["eager", "comm-only", "graphsched-inductor"],
        quick=True, out=str(out), log=lambda _line: None,
    )
    assert [v["name"] for v in record["variants"]] == ["eager", "comm-only", "graphsched-inductor"]
    tiny = get_bench_preset("tiny-cpu")
    assert record["quick"] is True
    assert record["timing"]["steps"] == min(tiny.steps, QUICK_STEPS["steps"])
    assert record["preset"]["solver_time_limit_s"] <= 5.0


def test_derived_figures_follow_the_documented_formulas():
    results = {
        r.name: r
        for r in (
            _result("eager", 20.0), _result("compute-only", 12.0), _result("comm-only", 8.0),
            _result("graphsched-ilp", 15.0), _result("inductor", 16.0),
            _result("compute-only-inductor", 10.0), _result("deepspeed", None, "skipped"),
        )
    }
    d = derived(results)
    assert d["graphsched-ilp"]["speedup_vs_eager"] == pytest.approx(20 / 15)
    assert d["graphsched-ilp"]["exposed_comm_ms"] == pytest.approx(3.0)
    # The limit takes the fastest compute alone of any family (inductor's 10 ms), not eager's.
    assert d["graphsched-ilp"]["limit_fraction"] == pytest.approx(10 / 15)
    # Inductor is compared with its own compute-only step.
    assert d["inductor"]["compute_reference"] == "compute-only-inductor"
    assert d["inductor"]["exposed_comm_ms"] == pytest.approx(6.0)
    assert d["inductor"]["limit_fraction"] == pytest.approx(10 / 16)
    assert d["deepspeed"]["speedup_vs_eager"] is None
    record = build_record(results, {"command": "x"})
    assert record["summary"]["best_possible_speedup_vs_eager"] == pytest.approx(20 / 10)
    assert record["summary"]["fastest_variant"] == "graphsched-ilp"
    table = format_table(results)
    assert all(name in table for name in results) and "skipped" in table


def test_presets_and_overrides():
    assert "tiny-cpu" in PRESETS and any(p.device == "cuda" for p in PRESETS.values())
    for preset in PRESETS.values():
        assert set(preset.variants) <= set(ALL_VARIANTS)
    changed = apply_overrides(get_bench_preset("tiny-cpu"), ["batch_size=2", "model.n_layers=3"])
    assert changed.batch_size == 2 and changed.model.n_layers == 3
    with pytest.raises(ConfigError, match="virtual_size"):
        apply_overrides(get_bench_preset("tiny-cpu"), ["virtual_size=3"])
    assert apply_overrides(get_bench_preset("tiny-cpu"), ["model_family=swiglu"]).model_family == "swiglu"
    with pytest.raises(ConfigError, match="model_family=swiglu"):
        apply_overrides(get_bench_preset("tiny-cpu"), ["model_family=mixtral"])
    with pytest.raises(ConfigError, match="unknown benchmark preset"):
        get_bench_preset("huge")
    with pytest.raises(ConfigError, match="CUDA"):
        run_benchmark(get_bench_preset("gpu-smoke")) if not torch.cuda.is_available() else (
            _ for _ in ()).throw(ConfigError("CUDA present"))


def test_cli_lists_presets(capsys):
    assert main(["--list"]) == 0
    assert "tiny-cpu" in capsys.readouterr().out


def test_benchmark_records_go_outside_the_source_tree_by_default():
    from benchmarks.presets import get_bench_preset
    from benchmarks.run import default_out_path

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = default_out_path(get_bench_preset("tiny-cpu"), 25.0, {"type": "cpu", "name": "x86_64"})
    assert not os.path.abspath(path).startswith(repo + os.sep), path
    assert "graphsched_bench" in path


def test_cpu_figures_are_labelled_as_not_speed_results():
    from benchmarks.run import cpu_note

    results = {r.name: r for r in (
        _result("eager", 10.0), _result("compute-only", 8.0), _result("comm-only", 5.0),
        _result("graphsched-ilp", 7.5),  # beats its compute-only reference: CPU noise
    )}
    note = cpu_note(results, "cpu")
    assert "not speed results" in note and "negative exposed ms" in note and "graphsched-ilp" in note
    assert cpu_note(results, "cuda") is None


def test_deepspeed_variants_are_skipped_cleanly_without_deepspeed(monkeypatch):
    import importlib.util
    import sys

    from benchmarks import variants

    real = importlib.util.find_spec
    monkeypatch.setattr(
        variants.importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    with pytest.raises(variants.Skip, match="deepspeed not installed"):
        variants.deepspeed_ready(torch.device("cpu"), None)
    monkeypatch.setattr(variants.importlib.util, "find_spec", real)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # installed, but its import fails
    if real("deepspeed") is not None:
        with pytest.raises(variants.Skip, match="deepspeed not installed: import failed"):
            variants.deepspeed_ready(torch.device("cpu"), None)


def test_model_speed_times_both_dispatch_modes_with_equal_losses(tmp_path):
    from benchmarks.model_speed import main as model_speed

    out = tmp_path / "speed.json"
    assert model_speed([
        "--preset", "tiny-cpu", "--modes", "eager", "--models", "reference:einsum,reference:index",
        "--steps", "1", "--warmup", "1", "--count", "--out", str(out),
    ]) == 0
    assert not dist.is_initialized()
    record = json.loads(out.read_text())
    counts = {r["model"]: r for r in record["results"] if r["mode"] == "count"}
    # The index dispatch does the experts' FLOPs only; the einsums add 5 matmuls of S*E*C*d.
    assert counts["reference:index"]["tflop"] < counts["reference:einsum"]["tflop"]
    assert counts["reference:index"]["gb_written"] < counts["reference:einsum"]["gb_written"]
    rows = {r["model"]: r for r in record["results"] if r["mode"] == "eager"}
    assert set(rows) == {"reference:einsum", "reference:index"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows.values())
    assert rows["reference:einsum"]["loss"] == pytest.approx(rows["reference:index"]["loss"], abs=1e-6)
    assert record["versions"]["torch"] == torch.__version__ and record["command"]


def test_micro_batch_variants_run_graphsched_and_peers_on_the_same_micro_batches():
    from benchmarks.variant_names import compute_only_of, loss_reference_of, micro_batches_of
    from benchmarks.variants import RUNNERS, graphsched_options

    assert graphsched_options("inductor-mb2") == {"schedule": "ilp", "codegen": "inductor", "micro_batches": 2}
    assert graphsched_options("inductor-chunks4-mb2")["chunks"] == 4
    assert graphsched_options("inductor-mbauto")["micro_batches"] == "auto"
    assert micro_batches_of("inductor-classic-mb2") == 2 and micro_batches_of("inductor-classic") == 1
    # Losses are checked against eager run on the same micro-batches; peers get the same step.
    assert loss_reference_of("graphsched-inductor-mb2") == "eager-mb2"
    assert loss_reference_of("inductor-classic-mb2") == "eager-mb2"
    assert loss_reference_of("graphsched-inductor-mbauto") == "eager"
    assert compute_only_of("graphsched-inductor-mb2") == "compute-only-inductor-mb2"
    assert {"eager-mb2", "inductor-classic-mb2", "graphsched-inductor-mbauto"} <= set(RUNNERS) <= set(ALL_VARIANTS)
