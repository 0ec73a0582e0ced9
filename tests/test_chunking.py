"""Micro-chunking: regions around all-to-alls cut into k chunks train like the eager model.

Cutting the MoE layer along the expert capacity slots keeps routing, capacity, drops and the
auxiliary loss exactly as in the unchunked model. With the einsum dispatch only the combine einsum's
sum over slots is split into per-chunk partial sums that are then added; with the index dispatch
(gathers) the combine reads the joined slots; in both, autograd adds the per-chunk gradients of the
weights, so float summation order changes. Stated tolerance against eager, float32, over three
AdamW steps: |loss difference| <= 1e-5 and |gradient difference| <= 1e-5 (measured: about 5e-7 and
1.3e-7). chunks=1 changes nothing: bitwise equal.

All multi-process checks run in one spawn of two gloo ranks.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from graphsched.config import GraphschedConfig
from graphsched.errors import ConfigError
from graphsched.models import Experts, MoELayer
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
from graphsched.testing import run_distributed
from graphsched.testing.parity import ParitySpec, run_parity

LOSS_TOL = 1e-5
GRAD_TOL = 1e-5

TOP1 = {"top_k": 1, "capacity_factor": 0.5, "moe_dispatch": "einsum"}
TOP2 = {"top_k": 2, "capacity_factor": 0.75, "moe_dispatch": "einsum"}
#: The default dispatch (gathers, as DeepSpeed's layer): no combine einsum, the region ends at
#: the combine all-to-all's wait and the combine gather reads the joined slots.
INDEX_TOP1 = {**TOP1, "moe_dispatch": "index"}
INDEX_TOP2 = {**TOP2, "moe_dispatch": "index"}


def _parity_specs(cache_dir: str) -> dict[str, ParitySpec]:
    def spec(model, chunks, schedule="identity", inference=False):
        return ParitySpec(
            model_overrides=model,
            steps=3,
            wrap_options={"chunks": chunks, "schedule": schedule, "cache_dir": cache_dir,
                          "solver_time_limit_s": 2.0},
            check_inference=inference,
            collect_report=False,
        )

    return {
        "top1-k1": spec(TOP1, 1),
        "top1-k2": spec(TOP1, 2, inference=True),
        "top1-k4": spec(TOP1, 4, "ilp"),
        "top2-k1": spec(TOP2, 1),
        "top2-k2": spec(TOP2, 2, "ilp"),
        "top2-k4": spec(TOP2, 4),
        "index-top1-k4": spec(INDEX_TOP1, 4),
        "index-top2-k2": spec(INDEX_TOP2, 2, "ilp", inference=True),
    }


# -- a model with an op that has no split rule --------------------------------------------------


@torch.library.custom_op("graphsched_tests::soft_clip", mutates_args=())
def soft_clip(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.tanh(x)


@soft_clip.register_fake
def _soft_clip_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _soft_clip_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _soft_clip_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    return grad * 2.0 * (1 - torch.tanh(x) ** 2)


soft_clip.register_autograd(_soft_clip_backward, setup_context=_soft_clip_setup)


class _CustomOpExperts(Experts):
    """The reference experts with a custom op (no split rule) between the two matmuls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(x, self.w1) + self.b1.unsqueeze(1)
        return torch.bmm(soft_clip(h), self.w2) + self.b2.unsqueeze(1)


class _CustomOpMoE(nn.Module):
    D, FF, E = 16, 32, 4

    def __init__(self, group) -> None:
        super().__init__()
        self.moe = MoELayer(self.D, self.FF, self.E, top_k=1, capacity_factor=1.0, process_group=group)
        old = self.moe.experts
        self.moe.experts = _CustomOpExperts(old.num_local, self.D, self.FF, old.first_expert, self.E)
        self.moe.experts.reset_parameters(0.1, 0.1)
        self.head = nn.Linear(self.D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, aux = self.moe(x)
        return self.head(y).pow(2).mean() + 0.01 * aux


def _train_side_by_side(eager, wrapped, batches, lr: float | None = 1e-2) -> dict:
    """Both models on the same batches (tuples of arguments), an AdamW step after each when ``lr``
    is given; the largest loss and gradient differences."""
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m in (eager, wrapped)] if lr else []
    out = {"loss_diff": 0.0, "grad_diff": 0.0}
    for args in batches:
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        le, lw = eager(*args), wrapped(*args)
        le.backward()
        lw.backward()
        out["loss_diff"] = max(out["loss_diff"], abs(le.item() - lw.item()))
        for pe, pw in zip(eager.parameters(), wrapped.parameters()):
            out["grad_diff"] = max(out["grad_diff"], (pe.grad - pw.grad).abs().max().item())
        for opt in opts:
            opt.step()
    return out


def _custom_op_run(rank: int) -> dict:
    """Eager vs chunks=2 on the custom-op model; which nodes the forward graph holds."""
    import graphsched

    group = dist.group.WORLD
    torch.manual_seed(7)
    eager = _CustomOpMoE(group)
    torch.manual_seed(7)
    wrapped = _CustomOpMoE(group)
    graphsched.wrap(wrapped, chunks=2)
    batches = [(torch.randn(2, 8, _CustomOpMoE.D, generator=torch.Generator().manual_seed(100 * step + rank)),)
               for step in range(2)]
    out = _train_side_by_side(eager, wrapped, batches)
    fwd = [gm for name, gm in graphsched.captured_graphs(wrapped).items() if name.endswith("forward")][0]
    custom = [n for n in fwd.graph.nodes if "soft_clip" in str(n.target)]
    out["custom_op_nodes"] = len(custom)
    out["custom_op_tagged"] = [(n.meta.get("custom") or {}).get("graphsched_chunk") for n in custom]
    out["all_to_alls"] = sum(1 for n in fwd.graph.nodes if "all_to_all_single" in str(n.target))
    return out


# -- the all-to-all as torch 2.11 records it ------------------------------------------------------


class _WaitAsAutogradFunction(torch.autograd.Function):
    """torch <= 2.12's ``funcol._FromTorchTensor``: Dynamo records this wait as
    ``autograd_function_apply``, an op no split rule knows (what the GPU machines' torch 2.11 gives
    for every ``all_to_all_single_autograd``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        return funcol._maybe_wrap_tensor(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _all_to_all_like_torch_2_11(group):
    world = dist.get_world_size(group)

    def all_to_all(x: torch.Tensor) -> torch.Tensor:
        splits = [x.shape[0] // world] * world
        t = torch.ops._c10d_functional_autograd.all_to_all_single(x, splits, splits, group.group_name)
        return _WaitAsAutogradFunction.apply(t)

    return all_to_all


def _unwaited_in_aten_graphs(model) -> list[str]:
    import graphsched

    bad = []
    for name, gm in graphsched.captured_graphs(model).items():
        for n in gm.graph.nodes:
            if "all_to_all_single" in str(n.target):
                bad += [f"{name}:{n.name}->{u.name}" for u in n.users if "wait_tensor" not in str(u.target)]
    return bad


def _legacy_wait_run(rank: int) -> dict:
    """Eager vs chunks=2 on the reference model whose all-to-alls wait the torch 2.11 way."""
    import graphsched
    from graphsched.models import MoEGPT, get_preset, make_batch

    group = dist.group.WORLD
    config = get_preset("tiny").replace(**TOP2)

    def build():
        torch.manual_seed(3)
        model = MoEGPT(config, group)
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                layer._all_to_all = _all_to_all_like_torch_2_11(group)
        return model

    eager, wrapped = build(), graphsched.wrap(build(), chunks=2)
    out = _train_side_by_side(eager, wrapped, [make_batch(config, 2, seed=10 * step + rank) for step in range(3)])
    plans = graphsched.captured_plans(wrapped)
    fwd = next(p for n, p in plans.items() if n.endswith("forward"))
    out["regions"] = [(d["k"], len(d["collectives"])) for d in fwd.options["chunks"].values()]
    out["unwaited"] = _unwaited_in_aten_graphs(wrapped)
    out["scheduled"] = sorted(plans)
    return out


# -- an in-place op inside the span of a region ------------------------------------------------


class _InPlaceMoE(MoELayer):
    """The reference layer, but the copy of the tokens the dispatch einsum reads is cleared in
    place once it has run (harmless eagerly; autograd does not need it)."""

    def forward(self, x):
        shape, d_model = x.shape, x.shape[-1]
        tokens = x.reshape(-1, d_model)
        l_aux, combine_weights, dispatch_mask = self.gate(tokens)
        num_experts, capacity = combine_weights.shape[1], combine_weights.shape[2]
        scratch = tokens.clone()
        dispatched = torch.einsum("sec,sm->ecm", dispatch_mask.to(x.dtype), scratch)
        scratch.zero_()
        world, local = self.ep_size, self.num_local_experts
        received = self._all_to_all(dispatched.reshape(num_experts * capacity, d_model))
        expert_in = received.reshape(world, local, capacity, d_model).transpose(0, 1).reshape(local, world * capacity, d_model)
        expert_out = self.experts(expert_in)
        outgoing = expert_out.reshape(local, world, capacity, d_model).transpose(0, 1).reshape(num_experts * capacity, d_model)
        expert_out = self._all_to_all(outgoing).reshape(num_experts, capacity, d_model)
        combined = torch.einsum("sec,ecm->sm", combine_weights.to(x.dtype), expert_out)
        return combined.reshape(shape), l_aux


def _inplace_run(rank: int) -> dict:
    import graphsched
    from graphsched.models import MoEGPT, get_preset, make_batch

    group = dist.group.WORLD
    config = get_preset("tiny").replace(**TOP2)

    def build():
        torch.manual_seed(4)
        model = MoEGPT(config, group)
        for block in model.blocks:
            old = block.ffn
            block.ffn = _InPlaceMoE(config.d_model, config.d_ff, config.num_experts, config.top_k,
                                    config.capacity_factor, config.min_capacity, group)
            block.ffn.load_state_dict(old.state_dict())
        return model

    eager, wrapped = build(), graphsched.wrap(build(), chunks=2)
    return _train_side_by_side(eager, wrapped, [make_batch(config, 2, seed=step + 10 * rank) for step in range(2)], lr=None)


# -- region and choice checks on the reference model's Dynamo graph ------------------------------


class _Captured(Exception):
    pass


def _dynamo_graph(model: nn.Module, *inputs) -> torch.fx.GraphModule:
    box = {}

    def backend(gm, example_inputs):
        box["gm"] = gm
        raise _Captured()

    torch._dynamo.reset()
    try:
        torch.compile(model, backend=backend, dynamic=False)(*inputs)
    except Exception as exc:  # noqa: BLE001 - Dynamo wraps the backend's exception
        if "gm" not in box:
            raise exc
    torch._dynamo.reset()
    return box["gm"]


def _region_checks(rank: int) -> dict:
    from graphsched.analysis.commmodel import CommModel
    from graphsched.analysis.costmodel import DeviceSpec
    from graphsched.models import MoEGPT, get_preset, make_batch
    from graphsched.partition.costers import AnalyticCoster
    from graphsched.partition.pipeline_model import region_pipeline
    from graphsched.partition.regions import find_regions

    config = get_preset("tiny").replace(**TOP2)
    torch.manual_seed(0)
    model = MoEGPT(config, dist.group.WORLD)
    gm = _dynamo_graph(model, *make_batch(config, 2, seed=rank))
    rules = default_rules()
    regions = find_regions(gm, rules)
    out = {"regions": [r.describe(rules) for r in regions]}
    # Leaving gelu out of the rules ends the region at the experts' activation.
    without = find_regions(gm, rules.without(F.gelu))
    out["without_gelu"] = [r.describe() for r in without]
    out["gelu_in_a_region"] = any(n.target is F.gelu for r in without for n in r.nodes)
    index_config = get_preset("tiny").replace(**INDEX_TOP2)
    torch.manual_seed(0)
    index_gm = _dynamo_graph(MoEGPT(index_config, dist.group.WORLD), *make_batch(index_config, 2, seed=rank))
    out["index"] = [r.describe(rules) for r in find_regions(index_gm, rules)]
    # The choice on the real region: an H100 with a slow link of little latency (communication
    # dominates: each all-to-all takes about 60 us, the compute of the region 45 us) and with an
    # infinitely fast one (communication costs nothing, the extra launches of chunks do).
    spec = DeviceSpec.h100()
    for name, comm in (("slow_link", CommModel.analytic(1e8, 1e-6)), ("free_link", CommModel.analytic(1e30, 0.0))):
        pipeline, _ = region_pipeline(regions[0], rules, AnalyticCoster(spec, comm))
        choice = choose_chunks(pipeline, (1, 2, 4, 8), None, time_limit_s=0.5)
        out[name] = {"k": choice.k, "predicted": choice.predicted}
    return out


def _distributed_checks(rank: int, world_size: int, specs: dict[str, ParitySpec]) -> dict:
    out: dict = {"parity": {}}
    for name, spec in specs.items():
        # Each wrapped model compiles the same forward code again: past dynamo's recompile limit
        # a later one would run uncompiled.
        torch._dynamo.reset()
        out["parity"][name] = run_parity(rank, world_size, spec)
    torch._dynamo.reset()
    out["custom_op"] = _custom_op_run(rank)
    torch._dynamo.reset()
    out["legacy_wait"] = _legacy_wait_run(rank)
    torch._dynamo.reset()
    out["inplace"] = _inplace_run(rank)
    out["regions"] = _region_checks(rank)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    specs = _parity_specs(str(tmp_path_factory.mktemp("plans")))
    return run_distributed(_distributed_checks, world_size=2, args=(specs,))


# -- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["top1", "top2"])
def test_one_chunk_is_bitwise_equal_to_eager(ranks, model):
    for r in ranks:
        result = r["parity"][f"{model}-k1"]
        assert result.bitwise_equal and result.params_bitwise_equal_after


CHUNKED = ["top1-k2", "top1-k4", "top2-k2", "top2-k4", "index-top1-k4", "index-top2-k2"]


@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_training_matches_eager_within_tolerance(ranks, name):
    for r in ranks:
        result = r["parity"][name]
        assert len(result.steps) == 3
        assert result.max_loss_diff <= LOSS_TOL, result.steps
        assert result.max_grad_diff <= GRAD_TOL, result.steps
        assert result.label_problems == []


@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_graphs_issue_one_all_to_all_per_chunk(ranks, name):
    k = int(name[-1])
    stats = ranks[0]["parity"][name].graph_stats
    fwd = next(v for n, v in stats.items() if n.endswith(".forward"))
    bwd = next(v for n, v in stats.items() if n.endswith(".backward"))
    # 2 MoE layers x (dispatch + combine) x k chunks, forward and backward alike.
    assert fwd["collective_issue"] == 4 * k and bwd["collective_issue"] == 4 * k
    assert fwd["scheduled"] == 1 and bwd["scheduled"] == 1


@pytest.mark.parametrize("model", ["top1", "top2"])
def test_parity_runs_drop_tokens(ranks, model):
    assert sum(r["parity"][f"{model}-k2"].dropped_tokens for r in ranks) > 0


@pytest.mark.parametrize("name", ["top1-k2", "index-top2-k2"])
def test_chunked_inference_matches_eager(ranks, name):
    for r in ranks:
        assert r["parity"][name].inference_max_diff <= GRAD_TOL


# -- regions -----------------------------------------------------------------------------------


def test_each_moe_layer_is_one_region_cut_along_capacity(ranks):
    regions = ranks[0]["regions"]["regions"]
    assert [r["module"] for r in regions] == ["blocks.0.ffn", "blocks.1.ffn"]
    for r in regions:
        assert len(r["collectives"]) == 2  # dispatch and combine in one pipeline
        assert len(r["anchors"]) == 6  # dispatch einsum, 2 all-to-alls, 2 bmm, combine einsum
        # [E*C, d] rows: every rank's block keeps its experts, the capacity slots are cut.
        assert r["cut"] == "cut(dim 0, extent 12, outer 4)"
        assert r["extent"] == 12
        # Routing stays whole: only the dispatch mask and combine weights are cut (along c).
        assert len(r["inputs"]) == 2
        assert list(r["outputs"].values()) == ["partial"]


def test_the_index_dispatch_is_one_region_up_to_the_combine_all_to_alls_wait(ranks):
    regions = ranks[0]["regions"]["index"]
    assert [r["module"] for r in regions] == ["blocks.0.ffn", "blocks.1.ffn"]
    for r in regions:
        assert len(r["collectives"]) == 2  # dispatch and combine in one pipeline
        assert r["cut"] == "cut(dim 0, extent 12, outer 4)"
        # The gathers stay whole: the dispatched slots come in whole and are cut, the combine
        # all-to-all's chunks are joined after their waits.
        assert len(r["inputs"]) == 1
        [(out, spec)] = r["outputs"].items()
        assert out.startswith("wait") and spec == "cut(dim 0, extent 12, outer 4)"


def test_an_op_without_rule_ends_the_region(ranks):
    without = ranks[0]["regions"]["without_gelu"]
    assert len(without) == 4  # two per layer: the activation splits each pipeline in two
    assert all(len(r["collectives"]) == 1 for r in without)
    assert not ranks[0]["regions"]["gelu_in_a_region"]


def test_custom_op_without_rule_stays_whole_and_training_is_right(ranks):
    for r in ranks:
        c = r["custom_op"]
        assert c["all_to_alls"] == 4  # dispatch and combine, 2 chunks each
        assert c["custom_op_nodes"] == 1 and c["custom_op_tagged"] == [None]
        assert c["loss_diff"] <= LOSS_TOL and c["grad_diff"] <= GRAD_TOL


def test_waits_recorded_as_autograd_functions_stay_inside_their_regions(ranks):
    # torch 2.11 records every all-to-all's wait as an autograd function: each MoE layer must
    # still be one region holding both collectives and their waits, so that no chunk's
    # all-to-all output is joined before it has arrived.
    for r in ranks:
        c = r["legacy_wait"]
        assert c["regions"] == [(2, 2), (2, 2)]
        assert c["unwaited"] == []
        assert len(c["scheduled"]) == 2  # forward and backward run under a plan
        assert c["loss_diff"] <= LOSS_TOL and c["grad_diff"] <= GRAD_TOL


def test_an_in_place_op_inside_a_regions_span_keeps_the_region_whole(ranks):
    # Chunking would move the dispatch einsum's chunks after the in-place clear of its input.
    for r in ranks:
        assert r["inplace"]["loss_diff"] <= LOSS_TOL and r["inplace"]["grad_diff"] <= GRAD_TOL


def test_choice_on_the_real_region_follows_the_link_speed(ranks):
    slow, free = ranks[0]["regions"]["slow_link"], ranks[0]["regions"]["free_link"]
    assert slow["k"] > 1 and slow["predicted"][slow["k"]] < slow["predicted"][1]
    assert free["k"] == 1


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
