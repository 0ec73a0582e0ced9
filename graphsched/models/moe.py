"""Expert-parallel MoE feed-forward layer: gate, dispatch all-to-all, batched experts, combine.

With an expert-parallel group of size W, rank r holds the experts ``r*E_local .. (r+1)*E_local - 1``
(``E_local = num_experts / W``). The layer runs

    gate -> dispatch [E, C, d] -> all-to-all -> experts (bmm over [E_local, W*C, d])
         -> all-to-all back -> combine [T, d]

``dispatch="index"`` (``MoEGPTConfig.moe_dispatch``, the default) moves tokens to slots and back by
gathers, as DeepSpeed's MOELayer does; ``dispatch="einsum"`` uses the two einsums of GShard and
Tutel's reference code instead: the same slots and values, but a dense [T, E, C] mask and weights and
T * E * C * d multiply-adds per einsum (at gpu-smoke's sizes as many as the experts'). graphsched's
micro-chunking cuts both forms along C: the einsum form's combine as a partial sum, the index form's
region ending at the combine all-to-all's wait (the combine gather then reads the joined slots).

Both all-to-alls are ``_functional_collectives.all_to_all_single_autograd`` with even splits, so a
captured graph shows each one as an issue node followed by a wait node, in the forward and the
backward graph. The dispatched tensor is ordered by global expert index, so splitting its first dim
evenly over W ranks sends each rank exactly the slots of its own experts.

Without a group (``process_group=None``) or with a group of size 1 there is no collective: the layer
holds every expert and is a plain single-process MoE.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from graphsched.compat import funcol
from graphsched.errors import ConfigError
from graphsched.models.gating import TopKGate

#: How an MoE layer moves tokens to expert slots and back (MoEGPTConfig.moe_dispatch).
DISPATCH_MODES = ("einsum", "index")


def group_size_and_rank(process_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(size, rank in group) of an expert-parallel group; (1, 0) for no group."""
    if process_group is None:
        return 1, 0
    return dist.get_world_size(process_group), dist.get_rank(process_group)


def check_expert_split(num_experts: int, ep_size: int) -> None:
    if num_experts % ep_size != 0:
        raise ConfigError(
            f"num_experts={num_experts} cannot be split over an expert-parallel group of "
            f"{ep_size} ranks; choose num_experts a multiple of the world size (e.g. "
            f"{ep_size * max(1, num_experts // ep_size)})."
        )


@torch.no_grad()
def normal_on_cpu_(
    tensor: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> None:
    """Fill ``tensor`` with N(0, std) drawn in float32 on a CPU generator (the global one if None).

    Drawing on the CPU whatever the tensor's device or dtype gives the same weights whether the
    model is built on the CPU, under ``with torch.device("cuda")``, or in bfloat16.
    """
    if tensor.device.type == "cpu" and tensor.dtype == torch.float32:
        tensor.normal_(0.0, std, generator=generator)
    else:
        values = torch.empty(tensor.shape, dtype=torch.float32, device="cpu")
        tensor.copy_(values.normal_(0.0, std, generator=generator))


class Experts(nn.Module):
    """The local experts as batched weights: ``gelu(x @ w1 + b1) @ w2 + b2`` per expert.

    Every parameter carries ``expert_parallel = True``: it lives on one rank of the expert-parallel
    group only and must not be averaged over that group (optimiser groups / DeepSpeed use this tag).
    """

    def __init__(
        self, num_local: int, d_model: int, d_ff: int, first_expert: int, num_experts: int
    ) -> None:
        super().__init__()
        self.num_local = num_local
        self.first_expert = first_expert
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_local, d_model, d_ff))
        self.b1 = nn.Parameter(torch.empty(num_local, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        self.b2 = nn.Parameter(torch.empty(num_local, d_model))
        for p in self.parameters():
            p.expert_parallel = True

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal weights, zero biases; expert g's weights depend only on g and the global RNG.

        One seed per (weight, global expert) is drawn from torch's global RNG on every rank,
        whatever the group size, so the global RNG advances identically everywhere and the union of
        the experts of all ranks equals the experts of a single-process model built after the same
        seed.
        """
        seeds = torch.randint(0, 2**62, (2, self.num_experts), device="cpu")
        for local in range(self.num_local):
            g = self.first_expert + local
            for weight, row, scale in ((self.w1, 0, std), (self.w2, 1, out_std)):
                gen = torch.Generator(device="cpu").manual_seed(int(seeds[row, g]))
                normal_on_cpu_(weight[local], scale, gen)
        self.b1.zero_()
        self.b2.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [E_local, N, d_model] -> [E_local, N, d_model]."""
        h = torch.bmm(x, self.w1) + self.b1.unsqueeze(1)
        h = F.gelu(h)
        return torch.bmm(h, self.w2) + self.b2.unsqueeze(1)


class MoELayer(nn.Module):
    """Top-k capacity-routed experts, expert-parallel over ``process_group``; returns (y, l_aux)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float = 1.0,
        min_capacity: int = 4,
        process_group: dist.ProcessGroup | None = None,
        dispatch: str = "einsum",
    ) -> None:
        super().__init__()
        if dispatch not in DISPATCH_MODES:
            raise ConfigError(f"dispatch={dispatch!r} is not known; use one of {DISPATCH_MODES}.")
        self.dispatch = dispatch
        self.ep_size, self.ep_rank = group_size_and_rank(process_group)
        check_expert_split(num_experts, self.ep_size)
        self.process_group = process_group
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.gate = TopKGate(d_model, num_experts, top_k, capacity_factor, min_capacity)
        first_expert = self.ep_rank * self.num_local_experts
        self.experts = Experts(self.num_local_experts, d_model, d_ff, first_expert, num_experts)

    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.all_to_all_single_autograd(x, None, None, self.process_group)

    def _exchange(self, dispatched: torch.Tensor) -> torch.Tensor:
        """[E, C, d] slots by global expert -> the experts' outputs, same layout."""
        num_experts, capacity, d_model = dispatched.shape
        # Any group, even of one rank, goes through the all-to-all: the graph then holds the same
        # collectives whatever the world size (a one-GPU run exercises the communication path).
        if self.process_group is None:
            return self.experts(dispatched)
        world, local = self.ep_size, self.num_local_experts
        received = self._all_to_all(dispatched.reshape(num_experts * capacity, d_model))
        # Received rows are [source rank, local expert, slot]; each expert takes all sources.
        expert_in = (
            received.reshape(world, local, capacity, d_model)
            .transpose(0, 1)
            .reshape(local, world * capacity, d_model)
        )
        expert_out = self.experts(expert_in)
        outgoing = (
            expert_out.reshape(local, world, capacity, d_model)
            .transpose(0, 1)
            .reshape(num_experts * capacity, d_model)
        )
        return self._all_to_all(outgoing).reshape(num_experts, capacity, d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [..., d_model] -> (output of the same shape, auxiliary loss scalar)."""
        shape = x.shape
        d_model = shape[-1]
        tokens = x.reshape(-1, d_model)
        if self.dispatch == "index":
            combined, l_aux = self._forward_index(tokens)
            return combined.reshape(shape), l_aux
        # The gate builds its mask and weights in the compute dtype (routing itself in float32).
        l_aux, combine_weights, dispatch_mask = self.gate(tokens, dtype=x.dtype)
        dispatched = torch.einsum("sec,sm->ecm", dispatch_mask, tokens)  # [E, C, d]
        expert_out = self._exchange(dispatched)
        combined = torch.einsum("sec,ecm->sm", combine_weights, expert_out)
        return combined.reshape(shape), l_aux

    def _forward_index(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch by a gather and combine by a gather: no dense [T, E, C] tensor, the same
        routing, slots and values as the einsums (a slot holds at most one token)."""
        routing = self.gate(tokens, sparse=True)
        num_tokens, d_model = tokens.shape
        width = routing.num_experts * routing.capacity
        # Dropped choices park on a scratch slot ``width`` that the gathers below never return.
        slots = torch.where(routing.kept, routing.slots, torch.full_like(routing.slots, width))
        token_ids = torch.arange(num_tokens, device=tokens.device).unsqueeze(1).expand_as(slots)
        # The token of every slot; empty slots read the zero row ``num_tokens``.
        source = torch.full((width + 1,), num_tokens, dtype=torch.long, device=tokens.device)
        source = source.scatter(0, slots.reshape(-1), token_ids.reshape(-1))
        padded = torch.cat([tokens, tokens.new_zeros(1, d_model)])
        dispatched = padded.index_select(0, source[:width]).view(
            routing.num_experts, routing.capacity, d_model
        )
        expert_out = self._exchange(dispatched)
        padded_out = torch.cat([expert_out.reshape(width, d_model), expert_out.new_zeros(1, d_model)])
        routed = padded_out.index_select(0, slots.t().reshape(-1)).view(-1, num_tokens, d_model)
        # Products and the sum over choices in float32, as the einsum's matmul accumulates.
        weights = routing.weights.to(tokens.dtype).float().t().unsqueeze(-1)
        return (routed.float() * weights).sum(dim=0).to(tokens.dtype), routing.l_aux
