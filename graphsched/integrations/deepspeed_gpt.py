"""The reference MoE GPT with DeepSpeed MoE feed-forward layers, for training under DeepSpeed.

DeepSpeed's engine treats parameters as expert-parallel only when the model holds its own
``deepspeed.moe.layer.MoE`` layers: that is what makes it reduce expert gradients over the
expert-data-parallel group instead of averaging them over every rank, and save one checkpoint file
per expert. ``graphsched.models.MoEGPT`` has its own MoE layer, which DeepSpeed does not recognise,
so :func:`build_deepspeed_moe_gpt` builds the same GPT (embeddings, attention blocks, loss: the
reference code) with each MoE feed-forward being a DeepSpeed ``MoE`` of the same shape: ``num_experts``
experts ``Linear(d_model, d_ff) -> GELU -> Linear(d_ff, d_model)``, top-k capacity gating with the
config's ``top_k``, ``capacity_factor`` and ``min_capacity``, tokens over capacity dropped.

Gating is deterministic (``use_rts=False``, ``top2_2nd_expert_sampling=False``, no noise), so two
builds from the same seed train identically, wrapped by graphsched or not.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from deepspeed.moe.layer import MoE

from graphsched.models import MoEGPT, MoEGPTConfig
from graphsched.models.gpt import INIT_STD

__all__ = ["DeepSpeedMoEFeedForward", "build_deepspeed_moe_gpt"]


class DeepSpeedMoEFeedForward(nn.Module):
    """A DeepSpeed ``MoE`` behind the reference feed-forward contract: ``x -> (y, l_aux)``."""

    def __init__(self, config: MoEGPTConfig, ep_size: int) -> None:
        super().__init__()
        expert = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff), nn.GELU(), nn.Linear(config.d_ff, config.d_model)
        )
        self.moe = MoE(
            config.d_model,
            expert,
            num_experts=config.num_experts,
            ep_size=ep_size,
            k=config.top_k,
            capacity_factor=config.capacity_factor,
            eval_capacity_factor=config.capacity_factor,
            min_capacity=config.min_capacity,
            drop_tokens=True,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        # DeepSpeed tags its expert parameters (allreduce=False); the reference model's tag too, so
        # MoEGPT.expert_parameters() / non_expert_parameters() keep working.
        for p in self.moe.parameters():
            if getattr(p, "allreduce", True) is False:
                p.expert_parallel = True

    @torch.no_grad()
    def reset_parameters(self, out_std: float, expert_seed: int) -> None:
        """Gate from the global RNG (equal on all ranks); experts from ``expert_seed`` + index.

        DeepSpeed builds the local experts as copies of one module; distinct seeds break that
        symmetry. Replicas of an expert on other expert-data-parallel ranks are overwritten by
        DeepSpeed's broadcast at ``deepspeed.initialize``.
        """
        gate = self.moe.deepspeed_moe.gate.wg
        gate.weight.copy_(torch.randn(gate.weight.shape) * INIT_STD)
        for local, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
            gen = torch.Generator().manual_seed(expert_seed + local)
            fc1, fc2 = expert[0], expert[2]
            fc1.weight.copy_(torch.randn(fc1.weight.shape, generator=gen) * INIT_STD)
            fc2.weight.copy_(torch.randn(fc2.weight.shape, generator=gen) * out_std)
            fc1.bias.zero_()
            fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, l_aux, _ = self.moe(x)
        return y, l_aux.float()


def build_deepspeed_moe_gpt(config: MoEGPTConfig, ep_size: int, seed: int = 0) -> MoEGPT:
    """The reference GPT with DeepSpeed MoE feed-forward layers over ``ep_size`` ranks.

    Call after ``torch.distributed`` is initialised and before ``deepspeed.initialize`` (which
    creates the expert-parallel groups). Every rank must pass the same ``seed``.
    """
    torch.manual_seed(seed)
    # The reference constructor builds its own MoE layers; build them as small as allowed (top_k
    # experts, no group) since they are replaced right away.
    model = MoEGPT(config.replace(num_experts=config.top_k), process_group=None)
    model.config = config
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    out_std = INIT_STD / math.sqrt(2 * config.n_layers)
    for layer, block in enumerate(model.blocks):
        if not block.is_moe:
            continue
        ffn = DeepSpeedMoEFeedForward(config, ep_size)
        # One seed per (layer, rank): drawn from the global RNG so it follows ``seed``.
        base = int(torch.randint(0, 2**40, ()).item())
        ffn.reset_parameters(out_std, base + 7919 * (layer * 4096 + rank) * config.num_experts)
        block.ffn = ffn
    return model.to(config.torch_dtype)
