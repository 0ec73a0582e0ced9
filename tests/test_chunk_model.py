"""Micro-chunking without processes: the choice of k from a region's pipeline model, and the cut
rules that say how each op splits (``partition/pipeline_model.py``, ``partition/split_rules.py``).

The distributed parity and region checks are in ``tests/test_chunking.py``.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphsched.config import GraphschedConfig
from graphsched.errors import ConfigError
from graphsched.partition.chunking import make_graph_transform
from graphsched.partition.pipeline_model import (
    PipelineCosts,
    RegionPipeline,
    Stage,
    choose_chunks,
    fixed_chunks,
    predict,
)
from graphsched.partition.rewrite import chunk_sizes
from graphsched.partition.split_kinds import map_cut_through_reshape
from graphsched.partition.split_rules import default_rules
from graphsched.partition.split_specs import OUT, PARTIAL, Cut, OpShapes


# -- the choice of k with synthetic costs (no processes) ----------------------------------------

_STAGES = [
    Stage("compute0", "compute"),
    Stage("comm1", "comm", ("compute0",)),
    Stage("compute1", "compute", ("comm1",)),
    Stage("comm2", "comm", ("compute1",)),
    Stage("compute2", "compute", ("comm2",)),
]


def _synthetic(comm_s: float, compute_s: float = 1e-3, launch_s: float = 1e-5, extra_per_chunk: int = 1000):
    """A dispatch / experts / combine pipeline: work scales with the chunk, launches do not."""

    def costs(sizes: list[int]) -> PipelineCosts:
        total = sum(sizes)
        stage = [
            {
                "compute0": launch_s + compute_s * 0.2 * part / total,
                "comm1": launch_s + comm_s * part / total,
                "compute1": 3 * launch_s + compute_s * part / total,
                "comm2": launch_s + comm_s * part / total,
                "compute2": launch_s + compute_s * 0.2 * part / total,
            }
            for part in sizes
        ]
        k = len(sizes)
        return PipelineCosts(stage, split=0.0, join=launch_s * (k > 1), extra_bytes=extra_per_chunk * k * (k > 1))

    return RegionPipeline("synthetic", _STAGES, extent=64, costs=costs)


def test_communication_bound_region_is_chunked_and_predicted_faster():
    pipeline = _synthetic(comm_s=2e-3)
    choice = choose_chunks(pipeline, time_limit_s=0.5)
    assert choice.k > 1
    assert choice.predicted[choice.k] < 0.8 * choice.predicted[1]
    assert choice.sizes == chunk_sizes(64, choice.k)
    # The forward overlaps: shorter than running its tasks one after another.
    serial = sum(sum(stage.values()) for stage in pipeline.costs(choice.sizes).stage)
    assert choice.forward_s < 0.8 * serial
    assert {f"comm1@c{i}" for i in range(choice.k)} <= set(choice.order)


def test_contention_beside_transfers_is_part_of_the_chunk_prediction():
    plain = _synthetic(comm_s=2e-3)
    contended = _synthetic(comm_s=2e-3)
    contended.contention = 1.5
    for k in (1, 4):
        sizes = chunk_sizes(64, k)
        slower = predict(contended, sizes, time_limit_s=0.5).total
        assert slower >= predict(plain, sizes, time_limit_s=0.5).total - 1e-12
    # Four chunks put the experts beside the transfers: contention costs them time; one chunk
    # runs no compute beside its transfers and costs nothing more.
    assert predict(contended, chunk_sizes(64, 4), time_limit_s=0.5).total > predict(plain, chunk_sizes(64, 4), time_limit_s=0.5).total
    assert predict(contended, [64], time_limit_s=0.5).total == pytest.approx(predict(plain, [64], time_limit_s=0.5).total)


def test_negligible_communication_keeps_one_chunk():
    choice = choose_chunks(_synthetic(comm_s=0.0), time_limit_s=0.5)
    assert choice.k == 1
    assert all(choice.predicted[k] >= choice.predicted[1] for k in choice.predicted)


def test_a_gain_below_the_threshold_keeps_one_chunk():
    pipeline = _synthetic(comm_s=2e-3)
    eager = choose_chunks(pipeline, time_limit_s=0.5, min_gain=0.0)
    gain = 1 - eager.predicted[eager.k] / eager.predicted[1]
    assert eager.k > 1 and gain > 0
    assert choose_chunks(pipeline, time_limit_s=0.5, min_gain=gain + 0.01).k == 1


def test_memory_limit_rejects_chunk_counts_that_do_not_fit():
    choice = choose_chunks(_synthetic(comm_s=2e-3, extra_per_chunk=1000), memory_limit_bytes=2500, time_limit_s=0.5)
    assert choice.k == 2  # 2 chunks need 2000 bytes, 4 need 4000
    assert set(choice.rejected) == {4, 8}
    fixed = fixed_chunks(_synthetic(comm_s=2e-3), 8, memory_limit_bytes=4500)
    assert fixed.k == 4 and 8 in fixed.rejected and 1 in fixed.predicted


def test_chunk_counts_above_the_extent_are_rejected():
    pipeline = _synthetic(comm_s=2e-3)
    pipeline.extent = 3
    choice = choose_chunks(pipeline, time_limit_s=0.5)
    assert choice.k in (1, 2, 3) and {4, 8} <= set(choice.rejected)
    assert chunk_sizes(10, 4) == [3, 3, 2, 2]


# -- split rules (no processes) --------------------------------------------------------------


def test_reshape_keeps_the_cut_factor_inside_merged_dimensions():
    # [E, C, d] cut along C, flattened to [E*C, d]: rows are (expert, slot), slots cut.
    flat = map_cut_through_reshape((4, 8, 32), (32, 32), Cut(1, 8))
    assert flat == Cut(0, 8, outer=4)
    assert map_cut_through_reshape((32, 32), (2, 2, 8, 32), flat) == Cut(2, 8)
    # Merging dimensions puts the factor inside; splitting it over two dimensions has no rule.
    assert map_cut_through_reshape((4, 8), (32,), Cut(0, 4)) == Cut(0, 4, inner=8)
    assert map_cut_through_reshape((32,), (8, 4), Cut(0, 16, outer=2)) is None


def _node(fn, shapes, before=(), after=()):
    """An FX node ``fn(*before, *tensors of shapes, *after)`` with example values attached."""
    graph = torch.fx.Graph()
    args = []
    for i, shape in enumerate(shapes):
        p = graph.placeholder(f"x{i}")
        p.meta["val"] = torch.empty(shape, device="meta")
        args.append(p)
    node = graph.call_function(fn, (*before, *args, *after))
    node.meta["val"] = fn(*before, *(a.meta["val"] for a in args), *after)
    return node


def test_einsum_reduction_over_the_cut_gives_partial_sums():
    rules = default_rules()
    node = _node(torch.einsum, [(32, 4, 8), (4, 8, 16)], before=("sec,ecm->sm",))
    got = rules.assign(node, {1: Cut(1, 8)})
    assert got == {0: Cut(2, 8), 1: Cut(1, 8), OUT: PARTIAL}
    got = rules.assign(node, {0: Cut(0, 32)})  # tokens are batch-like here
    assert got == {0: Cut(0, 32), 1: None, OUT: Cut(0, 32)}


def test_adding_a_whole_bias_to_a_partial_has_no_rule():
    rules = default_rules()
    node = _node(operator.add, [(2, 8, 16), (2, 1, 16)])
    # (p0 + p1) + b != (p0 + b) + (p1 + b): a partial adds only to partials.
    assert rules.assign(node, {0: PARTIAL, 1: None}) is None
    assert rules.assign(node, {0: PARTIAL}) == {0: PARTIAL, 1: PARTIAL, OUT: PARTIAL}
    assert rules.assign(node, {0: Cut(1, 8)}) == {0: Cut(1, 8), 1: None, OUT: Cut(1, 8)}
    scaled = _node(operator.mul, [(2, 8, 16), (2, 1, 16)])
    assert rules.assign(scaled, {0: PARTIAL}) == {0: PARTIAL, 1: None, OUT: PARTIAL}


def test_all_to_all_accepts_only_cuts_inside_each_ranks_block():
    rules = default_rules()
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(32, 16, device="meta")
    a2a = graph.call_function(torch.ops._c10d_functional.all_to_all_single, (x, [16, 16], [16, 16], "0"))
    a2a.meta["val"] = torch.empty(32, 16, device="meta")
    assert rules.assign(a2a, {0: Cut(0, 8, outer=4)}) == {0: Cut(0, 8, outer=4), OUT: Cut(0, 8, outer=4)}
    assert rules.assign(a2a, {0: Cut(0, 32)}) is None  # chunk 0 would be rank 0's whole block
    assert rules.assign(a2a, {0: Cut(1, 16)}) == {0: Cut(1, 16), OUT: Cut(1, 16)}
    assert rules.assign(a2a, {0: PARTIAL}) is None
    call = rules.lookup(a2a).chunk_call(a2a, (x, [16, 16], [16, 16], "0"), {}, [(8, 16)], (8, 16))
    assert call.args[1] == [4, 4] and call.args[2] == [4, 4]


def test_layer_norm_is_batch_like_only_outside_the_normalised_dims():
    rules = default_rules()
    node = _node(F.layer_norm, [(2, 8, 16)], after=((16,),))
    assert OpShapes.of(node).inputs == ((2, 8, 16),)
    assert rules.assign(node, {0: Cut(1, 8)}) == {0: Cut(1, 8), OUT: Cut(1, 8)}
    assert rules.assign(node, {0: Cut(2, 16)}) is None


# -- rewriting a hand-built graph (no processes: nothing runs, shapes are propagated) ----------


def _hand_built_region_graph() -> torch.fx.GraphModule:
    """all-to-all -> wait -> q = w @ W (W whole) ; p = w + W (W cut) ; r = p @ V."""
    graph = torch.fx.Graph()

    def placeholder(name, shape):
        node = graph.placeholder(name)
        node.meta["val"] = torch.empty(shape, device="meta")
        return node

    def call(fn, *args):
        node = graph.call_function(fn, args)
        node.meta["val"] = fn(*[a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args])
        return node

    x, w_mat, v_mat = placeholder("x", (8, 8)), placeholder("wmat", (8, 8)), placeholder("vmat", (8, 3))
    sent = call(torch.ops._c10d_functional.all_to_all_single, x, [4, 4], [4, 4], "0")
    got = call(torch.ops._c10d_functional.wait_tensor, sent)
    q = call(torch.mm, got, w_mat)
    p = call(torch.add, got, w_mat)
    r = call(torch.mm, p, v_mat)
    graph.output((q, r))
    return torch.fx.GraphModule(nn.Module(), graph)


def test_a_value_cut_for_one_node_and_used_whole_by_another_gets_both():
    from graphsched.partition.regions import find_regions
    from graphsched.partition.rewrite import rewrite_region

    gm = _hand_built_region_graph()
    (region,) = find_regions(gm)
    by_name = {n.name: n for n in region.nodes}
    assert region.operand_specs(by_name["mm"])[1] is None  # q = w @ W: W whole
    assert region.operand_specs(by_name["add"])[1] == Cut(0, 4, outer=2)  # p = w + W: W cut
    rewrite_region(gm, region, chunk_sizes(region.extent, 2))  # propagates and checks shapes
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["mm_c0"].args[1].op == "placeholder"
    assert nodes["add_c1"].args[1].name == "wmat_s1r"
    a2a = [n for n in gm.graph.nodes if "all_to_all" in str(n.target)]
    assert [tuple(n.meta["example_value"].shape) for n in a2a] == [(4, 8), (4, 8)]
    assert all(n.args[1] == [2, 2] for n in a2a)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert [tuple(v.meta["example_value"].shape) for v in out.args[0]] == [(8, 8), (8, 3)]
    assert {(n.meta.get("custom") or {}).get("graphsched_chunk") for n in a2a} == {"r0.c0", "r0.c1"}


# -- configuration ---------------------------------------------------------------------------


def test_chunks_option_is_validated_and_one_chunk_installs_no_transform():
    assert make_graph_transform(GraphschedConfig()) is None
    assert make_graph_transform(GraphschedConfig(chunks="auto")) is not None
    for bad in (0, 9, "many", 2.5, True):
        with pytest.raises(ConfigError, match="chunks"):
            GraphschedConfig(chunks=bad)
    with pytest.raises(ConfigError, match="memory_limit_bytes"):
        GraphschedConfig(memory_limit_bytes=-1)
    assert GraphschedConfig(chunks=16, max_chunks=16).chunks == 16
    assert GraphschedConfig(memory_limit_bytes=2**30).memory_limit_bytes == 2**30
