"""Specs of the reference MoE GPT: config checks, gating on hand-built logits, expert parallel."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.distributed as dist

from graphsched.errors import ConfigError
from graphsched.models import (
    PRESETS,
    MoEGPT,
    MoEGPTConfig,
    TopKGate,
    compute_capacity,
    get_preset,
    make_batch,
    top1gating,
    top2gating,
)
from graphsched.models.moe import check_expert_split
from graphsched.testing import run_distributed

# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"top_k": 3}, "use 1 (Switch) or 2"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "must be a number > 0"),
        ({"d_model": 30, "n_heads": 4}, "choose n_heads dividing d_model"),
        ({"moe_every": 0}, "moe_every"),
        ({"moe_every": 3, "n_layers": 2}, "moe_every <= n_layers"),
        ({"num_experts": 1, "top_k": 2}, "raise num_experts"),
        ({"dtype": "float16"}, "float32, bfloat16"),
        ({"vocab_size": 0}, "positive integer"),
        ({"aux_loss_coef": -0.1}, ">= 0"),
        ({"tie_embeddings": "yes"}, "True or False"),
        ({"min_capacity": 0}, "min_capacity"),
    ],
)
def test_config_rejects_bad_values_and_names_the_fix(changes, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        MoEGPTConfig(**changes)


def test_presets_are_valid_and_unknown_names_are_listed():
    for name in PRESETS:
        assert isinstance(get_preset(name), MoEGPTConfig)
    large = get_preset("gpu_large")
    assert (large.d_model, large.d_ff, large.top_k, large.capacity_factor) == (2048, 8192, 2, 1.25)
    with pytest.raises(ConfigError, match="tiny, small, gpu_medium, gpu_large"):
        get_preset("huge")


def test_moe_every_two_makes_every_other_layer_dense():
    cfg = get_preset("tiny").replace(n_layers=4, moe_every=2)
    model = MoEGPT(cfg)
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    assert len(model.moe_layers()) == 2


def test_expert_split_must_divide_num_experts():
    check_expert_split(4, 2)
    with pytest.raises(ConfigError, match="choose num_experts a multiple of the world size"):
        check_expert_split(3, 2)


# ---------------------------------------------------------------------------------------------
# Gating


def test_capacity_formula():
    assert compute_capacity(64, 4, 1, 1.0, 4) == 16
    assert compute_capacity(64, 4, 2, 1.25, 4) == 40
    assert compute_capacity(8, 4, 1, 0.5, 4) == 4  # min_capacity wins
    assert compute_capacity(20, 2, 1, 1.1, 1) == 11  # 20 * 1.1 / 2 is 11, not 11.000000000000002
    assert compute_capacity(2, 4, 1, 1.0, 4) == 2  # never more slots than tokens


def test_top1_drops_tokens_past_capacity_in_token_order():
    # Tokens choose experts 0,0,0,1,0,1; capacity ceil(6 * 0.5 / 2) = 2 slots per expert.
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 2.0]])
    l_aux, combine, dispatch = top1gating(logits, capacity_factor=0.5, min_capacity=1)
    assert combine.shape == dispatch.shape == (6, 2, 2)
    assert dispatch.dtype == torch.bool and combine.dtype == torch.float32
    gates = torch.softmax(logits, dim=1)
    expected_slots = {0: (0, 0), 1: (0, 1), 3: (1, 0), 5: (1, 1)}  # token -> (expert, slot)
    expected = torch.zeros(6, 2, 2)
    for t, (e, c) in expected_slots.items():
        expected[t, e, c] = gates[t, e]
    assert torch.equal(dispatch, expected > 0)
    torch.testing.assert_close(combine, expected, rtol=0, atol=0)
    # Tokens 2 and 4 (third and fourth choice of expert 0) are dropped: nothing to combine.
    assert combine[2].sum() == 0 and combine[4].sum() == 0


def _hand_aux(logits: list[list[float]], first_choice: list[int]) -> float:
    num_tokens, num_experts = len(logits), len(logits[0])
    probs = []
    for row in logits:
        z = [math.exp(v) for v in row]
        probs.append([v / sum(z) for v in z])
    mean_gate = [sum(p[e] for p in probs) / num_tokens for e in range(num_experts)]
    frac = [first_choice.count(e) / num_tokens for e in range(num_experts)]
    return num_experts * sum(g * f for g, f in zip(mean_gate, frac))


def test_top1_aux_loss_matches_hand_computation():
    rows = [[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 2.0]]
    l_aux, _, _ = top1gating(torch.tensor(rows), capacity_factor=0.5, min_capacity=1)
    # The first-choice fractions count dropped tokens too (4 of 6 chose expert 0).
    assert l_aux.item() == pytest.approx(_hand_aux(rows, [0, 0, 0, 1, 0, 1]), rel=1e-6)


def test_top2_places_second_choices_after_first_and_renormalises():
    # (first, second) choices: t0 (0,1), t1 (0,2), t2 (0,1), t3 (1,0).
    # Capacity ceil(2 * 4 * 0.75 / 3) = 2.
    rows = [[3.0, 1.0, 0.0], [3.0, 0.0, 1.0], [3.0, 1.0, 0.0], [1.0, 3.0, 0.0]]
    logits = torch.tensor(rows)
    l_aux, combine, dispatch = top2gating(logits, capacity_factor=0.75, min_capacity=1)
    assert combine.shape == (4, 3, 2)
    gates = torch.softmax(logits, dim=1)

    def weight(t: int, chosen: int, other: int) -> torch.Tensor:
        return gates[t, chosen] / (gates[t, chosen] + gates[t, other])

    expected = torch.zeros(4, 3, 2)
    expected[0, 0, 0] = weight(0, 0, 1)  # first choices of expert 0 take slots 0, 1 ...
    expected[1, 0, 1] = weight(1, 0, 2)  # ... and t2's first choice (slot 2) is dropped
    expected[3, 1, 0] = weight(3, 1, 0)  # t3 first choice; its second (expert 0, slot 3) dropped
    expected[0, 1, 1] = weight(0, 1, 0)  # t0 second choice queues behind t3's first choice
    expected[1, 2, 0] = weight(1, 2, 0)  # t2's second choice (expert 1, slot 2) dropped
    torch.testing.assert_close(combine, expected, rtol=1e-6, atol=0)
    assert torch.equal(dispatch, expected > 0)
    assert combine[2].sum() == 0  # both choices of t2 dropped: the residual alone carries it
    # Top-2 weights are renormalised over the two chosen experts, before any drop.
    assert combine[0].sum().item() == pytest.approx(1.0, abs=1e-6)
    assert combine[3].sum().item() < 1.0
    assert l_aux.item() == pytest.approx(_hand_aux(rows, [0, 0, 0, 1]), rel=1e-6)


def test_gate_module_routes_in_float32_with_its_capacity():
    torch.manual_seed(0)
    gate = TopKGate(8, 4, top_k=2, capacity_factor=0.5, min_capacity=1).to(torch.bfloat16)
    out = gate(torch.randn(32, 8, dtype=torch.bfloat16))
    assert out.combine_weights.shape == (32, 4, gate.capacity(32)) == (32, 4, 8)
    assert out.combine_weights.dtype == torch.float32 and out.l_aux.dtype == torch.float32
    assert int(out.dispatch_mask.sum()) <= 4 * 8  # never more than capacity per expert
    assert int(out.dispatch_mask.sum(dim=0).max()) <= 1  # one token per slot


# ---------------------------------------------------------------------------------------------
# Model


def test_same_seed_builds_equal_models_and_expert_tags():
    cfg = get_preset("tiny").replace(dtype="bfloat16", tie_embeddings=True)
    torch.manual_seed(7)
    a = MoEGPT(cfg)
    torch.manual_seed(7)
    b = MoEGPT(cfg)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    experts = list(a.expert_parameters())
    assert len(experts) == 4 * len(a.moe_layers())
    assert all(p.expert_parallel and p.dtype == torch.bfloat16 for p in experts)
    n_all = len(list(a.parameters()))
    assert len(list(a.non_expert_parameters())) == n_all - len(experts)
    assert a.lm_head.weight is a.wte.weight


def test_forward_returns_logits_or_loss_and_backward_reaches_every_parameter():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = MoEGPT(cfg)
    idx, targets = make_batch(cfg, 2, seed=3)
    assert torch.equal(idx[:, 1:], targets[:, :-1])
    assert model(idx).shape == (2, cfg.seq_len, cfg.vocab_size)
    loss = model(idx, targets)
    assert loss.shape == () and math.isfinite(loss.item())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert float(model.blocks[0].ffn.gate.wg.weight.grad.abs().sum()) > 0  # aux loss trains router
    idx2, _ = make_batch(cfg, 2, seed=3)
    assert torch.equal(idx, idx2)
    with pytest.raises(ConfigError, match="larger seq_len"):
        model(torch.zeros(1, cfg.seq_len + 1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Expert parallelism over 2 gloo ranks (one spawn for every distributed check)

SEED = 1234


def _dropped_choices(model: MoEGPT) -> list[int]:
    """Install hooks recording, per gate call, how many token choices found no slot."""
    drops: list[int] = []
    for layer in model.moe_layers():
        k = layer.gate.top_k

        def hook(_mod, _inp, out, k=k):
            if hasattr(out, "kept"):  # the index dispatch's sparse routing: [tokens, k] kept
                drops.append(out.kept.numel() - int(out.kept.sum()))
            else:
                drops.append(k * out.dispatch_mask.shape[0] - int(out.dispatch_mask.sum()))

        layer.gate.register_forward_hook(hook)
    return drops


def _parity(rank: int, world: int, cfg: MoEGPTConfig) -> dict:
    group = dist.group.WORLD
    torch.manual_seed(SEED)
    ep = MoEGPT(cfg, group)
    torch.manual_seed(SEED)
    ref = MoEGPT(cfg)  # one process, every expert
    local = cfg.num_experts // world
    experts = slice(rank * local, (rank + 1) * local)
    expert_pairs = list(zip(ep.expert_parameters(), ref.expert_parameters()))
    other_pairs = list(zip(ep.non_expert_parameters(), ref.non_expert_parameters()))
    same_init = all(torch.equal(pe, pr[experts]) for pe, pr in expert_pairs) and all(
        torch.equal(pe, pr) for pe, pr in other_pairs
    )
    ep_drops, ref_drops = _dropped_choices(ep), _dropped_choices(ref)
    idx, targets = make_batch(cfg, 4, seed=100 + rank)  # each rank its own tokens
    loss_ep = ep(idx, targets)
    loss_ep.backward()
    loss_ref = ref(idx, targets)
    loss_ref.backward()
    # An expert's gradient sums the tokens every rank routed to it.
    expert_err = 0.0
    for pe, pr in expert_pairs:
        total = pr.grad.clone()
        dist.all_reduce(total)
        expert_err = max(expert_err, float((pe.grad - total[experts]).abs().max()))
    other_err = max(float((pe.grad - pr.grad).abs().max()) for pe, pr in other_pairs)
    shared = torch.cat([p.detach().flatten() for p in ep.non_expert_parameters()])
    return {
        "same_init": same_init,
        "loss_err": abs(loss_ep.item() - loss_ref.item()),
        "expert_grad_err": expert_err,
        "other_grad_err": other_err,
        "ep_drops": ep_drops,
        "ref_drops": ref_drops,
        "shared": shared,
    }


def _compiled_matches_eager(rank: int, cfg: MoEGPTConfig) -> dict:
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")
    graphs: list[list[str]] = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    group = dist.group.WORLD
    torch.manual_seed(SEED)
    eager = MoEGPT(cfg, group)
    torch.manual_seed(SEED)
    compiled = torch.compile(MoEGPT(cfg, group), backend=recording_aot_eager, fullgraph=True)
    idx, targets = make_batch(cfg, 4, seed=200 + rank)
    loss_e = eager(idx, targets)
    loss_e.backward()
    loss_c = compiled(idx, targets)
    loss_c.backward()
    grads_equal = all(
        torch.equal(pe.grad, pc.grad) for pe, pc in zip(eager.parameters(), compiled.parameters())
    )
    return {
        "loss_equal": torch.equal(loss_e, loss_c),
        "grads_equal": grads_equal,
        "graphs": len(graphs),
        "all_to_alls": sum("all_to_all" in t for t in graphs[0]) if graphs else 0,
    }


def _ep_worker(rank: int, world: int) -> dict:
    base = get_preset("tiny").replace(capacity_factor=0.5)
    out = {
        "top1": _parity(rank, world, base),
        "top2": _parity(rank, world, base.replace(top_k=2)),
        "compiled": _compiled_matches_eager(rank, base.replace(top_k=2)),
    }
    try:
        MoEGPT(base.replace(num_experts=3), dist.group.WORLD)
        out["split_error"] = ""
    except ConfigError as exc:
        out["split_error"] = str(exc)
    return out


@pytest.fixture(scope="module")
def ep_results() -> list[dict]:
    # gloo even where GPUs exist: the checks run on CPU tensors.
    return run_distributed(_ep_worker, world_size=2, backend="gloo")


@pytest.mark.parametrize("case", ["top1", "top2"])
def test_expert_parallel_matches_single_process_model(ep_results, case):
    for rank, result in enumerate(ep_results):
        r = result[case]
        assert r["same_init"], f"rank {rank}: weights differ from the single-process model's"
        assert sum(r["ep_drops"]) > 0, "the test must exercise dropped tokens"
        assert r["ep_drops"] == r["ref_drops"]
        assert r["loss_err"] <= 1e-6
        assert r["expert_grad_err"] <= 1e-6
        assert r["other_grad_err"] <= 1e-6
    # Ranks share every non-expert weight.
    assert torch.equal(ep_results[0][case]["shared"], ep_results[1][case]["shared"])


def test_fullgraph_capture_is_bitwise_equal_to_eager(ep_results):
    for result in ep_results:
        r = result["compiled"]
        assert r["graphs"] == 1
        assert r["all_to_alls"] == 4  # dispatch and combine of each of the 2 MoE layers
        assert r["loss_equal"] and r["grads_equal"]


def test_group_size_must_divide_num_experts(ep_results):
    for result in ep_results:
        assert "choose num_experts a multiple of the world size" in result["split_error"]
