"""A second MoE model, unlike the reference one in norm, experts and gating.

Every scheduling or chunking choice is checked on this model beside ``MoEGPT``: a choice that
helps one model can hurt another. It differs from the reference where MoE models differ in
practice:

* RMSNorm instead of LayerNorm;
* SwiGLU experts (``silu(x @ w_gate) * (x @ w_up) @ w_down``, no biases), three batched matmuls;
* a shared expert (a dense SwiGLU MLP every token goes through, added to the routed output);
* top-1 (Switch) gating, whatever ``config.top_k`` says.

Same construction rules as ``MoEGPT``: weights from the global CPU RNG in a fixed order, expert g's
weights depend on g alone, so eager and wrapped copies built after one seed are equal.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from graphsched.models.config import MoEGPTConfig
from graphsched.models.gpt import INIT_STD, MoEGPT
from graphsched.models.moe import Experts, MoELayer, normal_on_cpu_


class SwiGLUExperts(Experts):
    """Local SwiGLU experts as batched weights; reuses ``Experts``' seeding per global expert."""

    def __init__(self, num_local: int, d_model: int, d_ff: int, first_expert: int, num_experts: int) -> None:
        nn.Module.__init__(self)
        self.num_local = num_local
        self.first_expert = first_expert
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.empty(num_local, d_model, d_ff))
        self.w_up = nn.Parameter(torch.empty(num_local, d_model, d_ff))
        self.w_down = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        for p in self.parameters():
            p.expert_parallel = True

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        seeds = torch.randint(0, 2**62, (3, self.num_experts), device="cpu")
        for local in range(self.num_local):
            g = self.first_expert + local
            for weight, row, scale in ((self.w_gate, 0, std), (self.w_up, 1, std), (self.w_down, 2, out_std)):
                gen = torch.Generator(device="cpu").manual_seed(int(seeds[row, g]))
                normal_on_cpu_(weight[local], scale, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(torch.bmm(x, self.w_gate)) * torch.bmm(x, self.w_up)
        return torch.bmm(h, self.w_down)


class SharedSwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.down.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class SharedExpertMoELayer(MoELayer):
    """Routed SwiGLU experts plus one shared expert every token passes through."""

    def __init__(self, config: MoEGPTConfig, process_group: dist.ProcessGroup | None) -> None:
        super().__init__(config.d_model, config.d_ff, config.num_experts, 1, config.capacity_factor,
                         config.min_capacity, process_group)
        first = self.experts.first_expert
        self.experts = SwiGLUExperts(self.num_local_experts, config.d_model, config.d_ff, first, config.num_experts)
        self.shared = SharedSwiGLU(config.d_model, config.d_ff)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        routed, l_aux = super().forward(x)
        return routed + self.shared(x), l_aux


class SwiGLUMoEGPT(MoEGPT):
    """``MoEGPT`` with RMSNorm, SwiGLU experts, a shared expert and top-1 gating."""

    def __init__(self, config: MoEGPTConfig, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(config, process_group)
        for block in self.blocks:
            block.ln1 = nn.RMSNorm(config.d_model)
            block.ln2 = nn.RMSNorm(config.d_model)
            if block.is_moe:
                block.ffn = SharedExpertMoELayer(config, process_group)
        self.ln_f = nn.RMSNorm(config.d_model)
        self._init_weights()
        self.to(config.torch_dtype)

    @torch.no_grad()
    def _init_weights(self) -> None:
        super()._init_weights()
        out_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, SharedSwiGLU):
                for lin in (module.gate, module.up, module.down):
                    normal_on_cpu_(lin.weight, out_std if lin is module.down else INIT_STD)


__all__ = ["SharedExpertMoELayer", "SwiGLUExperts", "SwiGLUMoEGPT"]
