"""The reference MoE layer's fast paths keep its semantics: gate outputs in the compute dtype,
and the index dispatch (``moe_dispatch="index"``) against the einsum dispatch."""

from __future__ import annotations

import pytest
import torch

from graphsched.errors import ConfigError
from graphsched.models import MoEGPT, TopKGate, get_preset, make_batch
from graphsched.models.gating import top1_routing, top2_routing


def _dense_reference(logits: torch.Tensor, top_k: int, cf: float, min_cap: int):
    """Routing written the long way: one-hot products over [T, E, C] (the former gating code)."""
    from graphsched.models.gating import compute_capacity, load_balancing_loss

    t, e = logits.shape
    cap = compute_capacity(t, e, top_k, cf, min_cap)
    gates = torch.softmax(logits.float(), dim=1)
    eye = torch.eye(e, dtype=torch.int64)
    m1 = eye[gates.argmax(1)]
    choices = [m1]
    if top_k == 2:
        choices.append(eye[gates.masked_fill(m1.bool(), -1.0).argmax(1)])
    loc = [torch.cumsum(m1, 0) - 1]
    if top_k == 2:
        loc.append(torch.cumsum(choices[1], 0) - 1 + m1.sum(0, keepdim=True))
    g = [(gates * m.float()).sum(1) for m in choices]
    if top_k == 2:
        denom = torch.clamp(g[0] + g[1], min=torch.finfo(torch.float32).eps)
        g = [x / denom for x in g]
    combine = torch.zeros(t, e, cap)
    for m, lc, gv in zip(choices, loc, g):
        kept = m * (lc < cap)
        slot = (lc * kept).sum(1)
        placed = kept.float()[:, :, None] * torch.eye(cap)[slot][:, None, :]
        combine = combine + gv[:, None, None] * placed
    return load_balancing_loss(gates, m1), combine


@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_matches_the_dense_one_hot_products(top_k):
    torch.manual_seed(top_k)
    logits = torch.randn(200, 8) * 2
    route = top1_routing if top_k == 1 else top2_routing
    out = route(logits, 0.6, 2).dense()
    l_aux, combine = _dense_reference(logits, top_k, 0.6, 2)
    assert torch.equal(out.combine_weights, combine)
    assert torch.equal(out.l_aux, l_aux)
    assert out.dispatch_mask.dtype == torch.bool
    assert int(out.dispatch_mask.sum()) < top_k * 200  # the case drops choices


def test_gate_in_the_compute_dtype_equals_the_float32_output_cast():
    torch.manual_seed(0)
    gate = TopKGate(16, 8, top_k=2, capacity_factor=0.75, min_capacity=1).to(torch.bfloat16)
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    ref = gate(x)
    fast = gate(x, dtype=torch.bfloat16)
    assert fast.combine_weights.dtype == fast.dispatch_mask.dtype == torch.bfloat16
    assert torch.equal(fast.combine_weights, ref.combine_weights.to(torch.bfloat16))
    assert torch.equal(fast.dispatch_mask, ref.dispatch_mask.to(torch.bfloat16))
    assert torch.equal(fast.l_aux, ref.l_aux)
    routing = gate(x, sparse=True)
    assert routing.slots.shape == routing.kept.shape == routing.weights.shape == (64, 2)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("top_k", [1, 2])
def test_index_dispatch_matches_einsum_dispatch(top_k, dtype, tol):
    cfg = get_preset("tiny").replace(top_k=top_k, capacity_factor=0.5, dtype=dtype)
    results = []
    for mode in ("einsum", "index"):
        torch.manual_seed(0)
        model = MoEGPT(cfg.replace(moe_dispatch=mode))
        loss = model(*make_batch(cfg, 4, seed=5))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=0, atol=tol)
    for name in ga:
        torch.testing.assert_close(ga[name].float(), gb[name].float(), rtol=tol, atol=tol, msg=name)


def test_unknown_dispatch_mode_is_refused():
    with pytest.raises(ConfigError, match="moe_dispatch"):
        get_preset("tiny").replace(moe_dispatch="sparse")
