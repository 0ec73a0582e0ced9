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

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from graphsched.models import Experts, MoELayer
from graphsched.partition.pipeline_model import choose_chunks
from graphsched.partition.split_rules import default_rules
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
