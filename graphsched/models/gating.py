"""Top-1 / top-2 capacity gating (Switch / GShard semantics) with static shapes only.

Everything here is a function of tensor shapes, never of tensor values: no ``nonzero``, no
``.item()``, no branch on a routing result. That is what lets ``torch.compile(fullgraph=True)``
capture an MoE layer in one graph, and it keeps runs reproducible bitwise (no random token
selection, no noise on the logits).

Routing of T tokens over E experts with capacity C (see ``compute_capacity``):

* every token picks its expert(s) by ``argmax`` of the softmax gates (ties go to the lowest expert
  index); top-2 takes the best expert other than the first as its second choice;
* a token's slot in an expert is its rank among the tokens sent there, in token order (a cumulative
  sum); for top-2 every second choice is placed after all first choices of that expert, as GShard
  does, so second choices are dropped first;
* a choice whose slot is >= C is dropped: its combine weight is 0, so the residual connection alone
  carries that token through the layer;
* combine weights: top-1 uses the gate probability of the chosen expert; top-2 uses the two gate
  probabilities renormalised over the two chosen experts, computed before dropping (GShard;
  DeepSpeed renormalises over the kept choices instead, which differs only for tokens that lost
  one choice);
* auxiliary load-balancing loss: ``E * sum_e mean_t(gates[t, e]) * mean_t(top1_mask[t, e])``, with
  the first-choice mask taken before dropping (1.0 when the load is perfectly balanced).

The output is ``GateOutput(l_aux, combine_weights, dispatch_mask)`` with ``combine_weights``
[T, E, C] float32 and ``dispatch_mask`` [T, E, C] bool: the layout DeepSpeed's ``TopKGate`` returns.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from graphsched.errors import ConfigError


class GateOutput(NamedTuple):
    l_aux: torch.Tensor  # scalar, float32
    combine_weights: torch.Tensor  # [T, E, C] float32; 0 where nothing is combined
    dispatch_mask: torch.Tensor  # [T, E, C] bool; True where token t fills slot c of expert e


def compute_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int = 4
) -> int:
    """Slots per expert: ``max(min_capacity, ceil(top_k * tokens * capacity_factor / experts))``.

    The result is also capped at ``num_tokens``: an expert never receives more than one choice per
    token, so slots beyond that could only stay empty (the cap changes no routing decision).
    """
    # Rounding first keeps float noise from adding a slot (20 * 1.1 / 2 is 11.000000000000002).
    # Plain float arithmetic: this runs inside torch.compile's trace, which cannot trace Fraction.
    exact = round(top_k * num_tokens * float(capacity_factor) / num_experts, 9)
    return min(num_tokens, max(min_capacity, math.ceil(exact)))


def _one_hot(index: torch.Tensor, num_classes: int) -> torch.Tensor:
    # A comparison instead of F.one_hot: the latter validates index ranges with a host sync.
    classes = torch.arange(num_classes, device=index.device)
    return (index.unsqueeze(-1) == classes).to(torch.int64)


def load_balancing_loss(gates: torch.Tensor, top1_mask: torch.Tensor) -> torch.Tensor:
    """``E * sum_e mean(gates[:, e]) * mean(top1_mask[:, e])`` (GShard / Switch auxiliary loss)."""
    num_experts = gates.shape[1]
    mean_gates = gates.mean(dim=0)
    mean_mask = top1_mask.to(gates.dtype).mean(dim=0)
    return (mean_gates * mean_mask).sum() * num_experts


class Routing(NamedTuple):
    """Where each token's choices go, without any dense [T, E, C] tensor.

    ``slots[t, k]`` is the flat slot ``expert * capacity + position`` of choice k of token t,
    ``kept[t, k]`` whether that choice found room (a dropped choice's slot is
    ``expert * capacity``, never used: ``kept`` masks it), ``weights[t, k]`` its combine weight
    (float32, 0 where dropped). A token's choices go to distinct experts, so no two choices of
    one token share a slot, and no two kept choices of any tokens do.
    """

    l_aux: torch.Tensor  # scalar, float32
    capacity: int
    num_experts: int
    slots: torch.Tensor  # [T, k] int64
    kept: torch.Tensor  # [T, k] bool
    weights: torch.Tensor  # [T, k] float32

    def dense(self, dtype: torch.dtype | None = None) -> GateOutput:
        """The dense ``GateOutput``: float32 weights and a bool mask, or both in ``dtype``.

        Built by one scatter each into a zero [T, E * C] buffer (the dense one-hot products
        ``weight * expert_one_hot * slot_one_hot`` give the same values, in many more passes);
        the weights' backward is then a gather of two values per token. Out of place on purpose:
        graphsched's chunking rewrites the Dynamo graph, where an in-place ``scatter_`` on the
        zero buffer lost its parity (tests/test_chunking.py, the custom-op model).
        """
        num_tokens = self.slots.shape[0]
        width = self.num_experts * self.capacity
        weight_dtype = torch.float32 if dtype is None else dtype
        mask_dtype = torch.bool if dtype is None else dtype
        values = self.weights.to(weight_dtype)
        combine = torch.zeros(num_tokens, width, dtype=weight_dtype, device=values.device)
        combine = combine.scatter(1, self.slots, values)
        mask = torch.zeros(num_tokens, width, dtype=mask_dtype, device=values.device)
        mask = mask.scatter(1, self.slots, self.kept.to(mask_dtype))
        shape = (num_tokens, self.num_experts, self.capacity)
        return GateOutput(self.l_aux, combine.view(shape), mask.view(shape))


def _place(
    index: torch.Tensor, mask: torch.Tensor, locations: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat slot [T], kept [T]) of the choices ``index`` [T] with one-hot ``mask`` [T, E]."""
    location = (locations * mask).sum(dim=1)  # the chosen expert's queue position
    kept = location < capacity
    slot = index * capacity + torch.where(kept, location, torch.zeros_like(location))
    return slot, kept


def top1_routing(logits: torch.Tensor, capacity_factor: float, min_capacity: int = 4) -> Routing:
    """Switch-style top-1 routing of ``logits`` [T, E]; see the module docstring."""
    num_tokens, num_experts = logits.shape
    capacity = compute_capacity(num_tokens, num_experts, 1, capacity_factor, min_capacity)
    gates = F.softmax(logits.float(), dim=1)

    index1 = torch.argmax(gates, dim=1)
    mask1 = _one_hot(index1, num_experts)
    l_aux = load_balancing_loss(gates, mask1)

    locations1 = torch.cumsum(mask1, dim=0) - 1
    slot1, kept1 = _place(index1, mask1, locations1, capacity)
    gate1 = gates.gather(1, index1.unsqueeze(1)).squeeze(1)
    weight1 = torch.where(kept1, gate1, torch.zeros_like(gate1))
    return Routing(
        l_aux, capacity, num_experts, slot1.unsqueeze(1), kept1.unsqueeze(1), weight1.unsqueeze(1)
    )


def top2_routing(logits: torch.Tensor, capacity_factor: float, min_capacity: int = 4) -> Routing:
    """GShard-style top-2 routing of ``logits`` [T, E]; see the module docstring."""
    num_tokens, num_experts = logits.shape
    capacity = compute_capacity(num_tokens, num_experts, 2, capacity_factor, min_capacity)
    gates = F.softmax(logits.float(), dim=1)

    index1 = torch.argmax(gates, dim=1)
    mask1 = _one_hot(index1, num_experts)
    # Gates are >= 0, so -1 excludes the first choice from the second argmax.
    gates_except1 = gates.masked_fill(mask1.bool(), -1.0)
    index2 = torch.argmax(gates_except1, dim=1)
    mask2 = _one_hot(index2, num_experts)
    l_aux = load_balancing_loss(gates, mask1)

    locations1 = torch.cumsum(mask1, dim=0) - 1
    # Second choices queue behind every first choice of the same expert.
    locations2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)

    gate1 = gates.gather(1, index1.unsqueeze(1)).squeeze(1)
    gate2 = gates.gather(1, index2.unsqueeze(1)).squeeze(1)
    # Softmax outputs can underflow to 0 for extreme logits; eps keeps the division finite.
    denom = torch.clamp(gate1 + gate2, min=torch.finfo(gates.dtype).eps)
    gate1 = gate1 / denom
    gate2 = gate2 / denom

    slot1, kept1 = _place(index1, mask1, locations1, capacity)
    slot2, kept2 = _place(index2, mask2, locations2, capacity)
    kept = torch.stack([kept1, kept2], dim=1)
    weights = torch.stack([gate1, gate2], dim=1)
    weights = torch.where(kept, weights, torch.zeros_like(weights))
    return Routing(l_aux, capacity, num_experts, torch.stack([slot1, slot2], dim=1), kept, weights)


def top1gating(logits: torch.Tensor, capacity_factor: float, min_capacity: int = 4) -> GateOutput:
    """Switch-style top-1 routing of ``logits`` [T, E] as dense [T, E, C] tensors."""
    return top1_routing(logits, capacity_factor, min_capacity).dense()


def top2gating(logits: torch.Tensor, capacity_factor: float, min_capacity: int = 4) -> GateOutput:
    """GShard-style top-2 routing of ``logits`` [T, E] as dense [T, E, C] tensors."""
    return top2_routing(logits, capacity_factor, min_capacity).dense()


class TopKGate(nn.Module):
    """Linear router (no bias) followed by top-1 or top-2 capacity routing, in float32."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float = 1.0,
        min_capacity: int = 4,
    ) -> None:
        super().__init__()
        if top_k not in (1, 2):
            raise ConfigError(f"top_k={top_k!r} is not supported; use 1 or 2.")
        if not capacity_factor > 0:
            raise ConfigError(
                f"capacity_factor={capacity_factor!r} must be > 0 (e.g. 1.0 or 1.25)."
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.wg = nn.Linear(d_model, num_experts, bias=False)

    def capacity(self, num_tokens: int) -> int:
        return compute_capacity(
            num_tokens, self.num_experts, self.top_k, self.capacity_factor, self.min_capacity
        )

    def route(self, x: torch.Tensor) -> Routing:
        """Route ``x`` [T, d_model]: the sparse ``Routing`` (no dense [T, E, C] tensor)."""
        # Routing decisions in bf16 flip on rounding; float32 logits as DeepSpeed does.
        logits = F.linear(x.float(), self.wg.weight.float())
        if self.top_k == 1:
            return top1_routing(logits, self.capacity_factor, self.min_capacity)
        return top2_routing(logits, self.capacity_factor, self.min_capacity)

    def forward(
        self, x: torch.Tensor, dtype: torch.dtype | None = None, sparse: bool = False
    ) -> GateOutput | Routing:
        """Route ``x`` [T, d_model]; a ``GateOutput`` (float32 weights, bool mask; both in
        ``dtype`` when given), or the ``Routing`` itself with ``sparse=True``."""
        routing = self.route(x)
        return routing if sparse else routing.dense(dtype)
