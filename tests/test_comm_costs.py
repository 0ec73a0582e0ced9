"""Costs across two gloo ranks: agreement on costs each rank measured, a real collective benchmark
and its alpha-beta fit, and the collectives of captured graphs priced at their own sizes. The
single-process cost model (flops, bytes, fits, the node profiler) is in ``tests/test_costmodel.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from graphsched.analysis.commmodel import (
    AlphaBeta,
    CommModel,
    agree_comm_model,
    agree_costs,
    benchmark_collectives,
)
from graphsched.analysis.costmodel import CostModel, DeviceSpec, collective_bytes, collective_kind
from graphsched.errors import GraphschedError
from graphsched.testing import run_distributed

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


# ---------------------------------------------------------------------------------------------
# Two gloo ranks: agreement, a real collective benchmark, collectives in captured graphs


def _distributed_checks(rank: int, world_size: int) -> dict:
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    out: dict = {}
    raw = {"mm": 1e-3 * (rank + 1), "add": 2e-6 * (world_size - rank), "gelu": 0.1 + rank / 3}
    for reduce in ("max", "mean", "rank0"):
        out[reduce] = agree_costs(raw, reduce=reduce)
    lopsided = dict(raw, **{f"only_on_rank{rank}": 1.0})
    try:
        agree_costs(lopsided)
        out["mismatch"] = None
    except GraphschedError as exc:
        out["mismatch"] = str(exc)

    comm = benchmark_collectives(
        # Up to 8 MB: below about 1 MB gloo's latency hides the per-byte cost in timing noise.
        sizes=[2**k for k in range(12, 24)], kinds=("all_to_all",), repeats=3
    )
    out["comm"] = comm.to_dict()
    skewed = CommModel({k: AlphaBeta(v.alpha_s * (1 + rank), v.beta_s_per_byte, v.rel_error)
                        for k, v in comm.per_kind.items()})
    out["agreed_comm"] = agree_comm_model(skewed).to_dict()

    graphs = capture_collective_block(all_to_all_single_autograd)
    model = CostModel(DeviceSpec.cpu(), comm=comm)
    out["collectives"] = [
        (name, collective_kind(n), collective_bytes(n), model.node_cost(n),
         comm.time("all_to_all", collective_bytes(n)))
        for name, gm in graphs.items() for n in gm.graph.nodes if collective_kind(n)
    ]
    out["graph_timing"] = _time_graph_collectives(graphs, comm, rank)
    return out


def _time_graph_collectives(graphs: dict[str, fx.GraphModule], comm: CommModel, rank: int) -> dict:
    """What measured costs time for the graphs' own collectives, and how they price the nodes."""
    from graphsched.analysis import graph_collectives
    from graphsched.analysis.cost_source import MeasuredCosts

    timed_calls: list[tuple[str, int, str]] = []
    real_call = graph_collectives.collective_call

    def spy(kind, numel, group, device, dtype=torch.float32, async_op=False):
        timed_calls.append((kind, numel * torch.empty((), dtype=dtype).element_size(), str(device)))
        return real_call(kind, numel, group, device, dtype, async_op)

    graph_collectives.collective_call = spy
    try:
        costs = MeasuredCosts(torch.device("cpu"), comm)
        node_costs = []
        for name in ("forward", "backward"):
            costs.prepare(graphs[name])
            node_costs += [(name, collective_bytes(n), costs(n))
                           for n in graphs[name].graph.nodes if collective_bytes(n)]
    finally:
        graph_collectives.collective_call = real_call
    return {
        "timed": {"/".join(map(str, k)): v for k, v in costs.timed_collectives.items()},
        "calls": timed_calls,
        "node_costs": node_costs,
        "graph_bytes": sorted({collective_bytes(n) for gm in graphs.values() for n in gm.graph.nodes
                               if collective_bytes(n)}),
        "contention": costs.contention,
        "fit_64mb": comm.time("all_to_all", 64 << 20),
    }


def capture_collective_block(all_to_all) -> dict[str, fx.GraphModule]:
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)

    def block(x: torch.Tensor) -> torch.Tensor:
        return all_to_all(lin(x), None, None, dist.group.WORLD).square().sum()

    graphs: dict[str, fx.GraphModule] = {}

    def recorder(name: str):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    torch.compile(block, backend=backend, fullgraph=True)(torch.randn(6, 8)).backward()
    return graphs


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_distributed(_distributed_checks, world_size=2, timeout_s=240)


def test_ranks_agree_on_costs_they_measured_differently(two_ranks):
    r0, r1 = two_ranks
    for reduce in ("max", "mean", "rank0"):
        assert r0[reduce] == r1[reduce]
    assert r0["max"] == {"mm": 2e-3, "add": 4e-6, "gelu": 0.1 + 1 / 3}
    assert r0["rank0"] == {"mm": 1e-3, "add": 4e-6, "gelu": 0.1}
    assert r0["mean"]["mm"] == pytest.approx(1.5e-3)


def test_ranks_with_different_nodes_get_an_error_naming_the_fix(two_ranks):
    for rank, res in enumerate(two_ranks):
        msg = res["mismatch"]
        assert msg is not None, f"rank {rank} accepted different keys"
        assert "only_on_rank" in msg and "same model" in msg


def test_benchmarked_all_to_all_has_positive_latency_and_per_byte_cost(two_ranks):
    r0, r1 = two_ranks
    a2a = r0["comm"]["per_kind"]["all_to_all"]
    assert a2a["alpha_s"] > 0 and a2a["beta_s_per_byte"] > 0
    assert math.isfinite(a2a["rel_error"]) and a2a["rel_error"] >= 0
    # Timings are reduced across ranks before fitting: both ranks fit the same model.
    assert r0["comm"] == r1["comm"]
    assert r0["agreed_comm"] == r1["agreed_comm"]
    assert r0["agreed_comm"]["per_kind"]["all_to_all"]["alpha_s"] == pytest.approx(
        2 * a2a["alpha_s"]
    )


def test_the_gloo_fit_is_sane(two_ranks):
    a2a = two_ranks[0]["comm"]["per_kind"]["all_to_all"]
    # Loopback between two processes: a latency under 20 ms, a bandwidth between 10 MB/s and 1 TB/s.
    assert 0 < a2a["alpha_s"] < 20e-3
    assert 1e7 < 1 / a2a["beta_s_per_byte"] < 1e12
    assert two_ranks[0]["comm"]["contention"] == 1.0  # measured on CUDA only
    timing = two_ranks[0]["graph_timing"]
    small = list(timing["timed"].values())
    # 192 bytes beat 64 MiB (8 MiB was too close: one loopback timing on a busy CPU spiked past it).
    assert small and all(0 < t < timing["fit_64mb"] for t in small)


def test_measured_costs_time_the_graphs_own_collective_sizes_on_gloo(two_ranks):
    for timing in (r["graph_timing"] for r in two_ranks):
        # The forward all-to-all and its backward transpose move the same 192 bytes: one timing,
        # of exactly the graph's size, on host buffers (gloo), and no other.
        assert timing["graph_bytes"] == [6 * 8 * 4]
        assert timing["calls"] == [("all_to_all", 6 * 8 * 4, "cpu")]
        [(key, seconds)] = timing["timed"].items()
        assert key.split("/")[1:] == ["all_to_all", "192", "torch.float32", "cpu"]
        # Both graphs' all-to-all nodes are priced by that timing.
        assert [(g, b) for g, b, _ in timing["node_costs"]] == [("forward", 192), ("backward", 192)]
        assert all(cost == seconds for _, _, cost in timing["node_costs"])
    # Agreed: both ranks hold the slower rank's time.
    assert two_ranks[0]["graph_timing"]["timed"] == two_ranks[1]["graph_timing"]["timed"]


def test_collectives_of_a_captured_block_are_priced_by_the_comm_model(two_ranks):
    found = two_ranks[0]["collectives"]
    by_graph = {(g, kind) for g, kind, *_ in found}
    assert {("forward", "all_to_all"), ("forward", "wait"),
            ("backward", "all_to_all"), ("backward", "wait")} <= by_graph
    for graph, kind, nbytes, cost, expected in found:
        if kind == "all_to_all":
            assert nbytes == 6 * 8 * 4  # the (6, 8) float32 activation or its gradient
            assert cost == pytest.approx(expected)
        else:
            assert nbytes == 0 and cost == 0.0
