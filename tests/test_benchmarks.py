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
from benchmarks.variants import VariantResult, replay_ops
from graphsched.errors import ConfigError, GraphschedError
from graphsched.models import MoEGPT, get_preset, make_batch
from graphsched.runtime.emulated import (
    BACKEND_NAME,
    EmulatedProcessGroup,
    EmulationOptions,
    init_emulated_process_group,
    new_emulated_group,
    wire_bytes,
)

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


def _result(name: str, ms: float | None, status: str = "ok") -> VariantResult:
    from benchmarks.variants import family_of

    return VariantResult(
        name=name, family=family_of(name), status=status,
        timing=Timing([ms]) if ms is not None else None,
    )


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
    assert d["graphsched-ilp"]["limit_fraction"] == pytest.approx(12 / 15)
    # Inductor is compared with its own compute-only step.
    assert d["inductor"]["compute_reference"] == "compute-only-inductor"
    assert d["inductor"]["exposed_comm_ms"] == pytest.approx(6.0)
    assert d["inductor"]["limit_fraction"] == pytest.approx(10 / 16)
    assert d["deepspeed"]["speedup_vs_eager"] is None
    record = build_record(results, {"command": "x"})
    assert record["summary"]["best_possible_speedup_vs_eager"] == pytest.approx(20 / 12)
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
