"""A GPT-style decoder whose feed-forward layers are expert-parallel MoE layers.

Pre-norm blocks: ``x + attn(ln1(x))`` then ``x + ffn(ln2(x))``, where ffn is an MoELayer (or a dense
MLP on the layers ``config.is_moe_layer`` rejects). No dropout and no random routing, so two runs of
the same model on the same batch agree bitwise.

Initialisation draws from torch's global RNG only, in a fixed order, so two models built after the
same ``torch.manual_seed`` are equal, and ranks of an expert-parallel group share every non-expert
weight; expert g's weights depend on g alone (see ``Experts.reset_parameters``).

The model does not all-reduce gradients: non-expert gradients are per rank (data parallelism, e.g.
DDP or DeepSpeed, averages them); expert gradients already sum the tokens of every rank of the
expert-parallel group through the backward all-to-all.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from graphsched.errors import ConfigError
from graphsched.models.config import MoEGPTConfig
from graphsched.models.moe import (
    Experts,
    MoELayer,
    check_expert_split,
    group_size_and_rank,
    normal_on_cpu_,
)

#: Standard deviation of the normal initialisation (GPT-2); residual outputs are scaled further.
INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    def __init__(self, config: MoEGPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.proj.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).split(d_model, dim=2)
        q, k, v = (t.reshape(batch, seq, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, d_model))


class MLP(nn.Module):
    """Dense feed-forward of the non-MoE layers; returns (y, 0) like MoELayer."""

    def __init__(self, config: MoEGPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.fc2.residual_out = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc2(F.gelu(self.fc1(x)))
        return y, torch.zeros((), dtype=torch.float32, device=x.device)


class Block(nn.Module):
    def __init__(
        self, config: MoEGPTConfig, layer: int, process_group: dist.ProcessGroup | None
    ) -> None:
        super().__init__()
        self.is_moe = config.is_moe_layer(layer)
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.ffn: nn.Module
        if self.is_moe:
            self.ffn = MoELayer(
                config.d_model,
                config.d_ff,
                config.num_experts,
                config.top_k,
                config.capacity_factor,
                config.min_capacity,
                process_group,
                dispatch=config.moe_dispatch,
            )
        else:
            self.ffn = MLP(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x))
        y, l_aux = self.ffn(self.ln2(x))
        return x + y, l_aux


class MoEGPT(nn.Module):
    """GPT decoder with MoE feed-forward layers, expert-parallel over ``process_group``.

    ``process_group=None`` builds a single-process model holding every expert; pass a group (e.g.
    ``dist.group.WORLD``) to split the experts over its ranks.
    """

    def __init__(
        self, config: MoEGPTConfig, process_group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.process_group = process_group
        self.ep_size, self.ep_rank = group_size_and_rank(process_group)
        check_expert_split(config.num_experts, self.ep_size)

        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i, process_group) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()
        self.to(config.torch_dtype)

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Every draw comes from the CPU global RNG in float32, so the weights do not depend on the
        # device or dtype the model is built with.
        out_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if module is self.lm_head and self.config.tie_embeddings:
                continue  # shares wte's weight, initialised as an embedding
            if isinstance(module, nn.Linear):
                std = out_std if getattr(module, "residual_out", False) else INIT_STD
                normal_on_cpu_(module.weight, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                normal_on_cpu_(module.weight, INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, Experts):
                module.reset_parameters(INIT_STD, out_std)

    def moe_layers(self) -> list[MoELayer]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the local experts (tagged ``expert_parallel``), not averaged over ranks."""
        return (p for p in self.parameters() if getattr(p, "expert_parallel", False))

    def non_expert_parameters(self) -> Iterator[nn.Parameter]:
        """Every other parameter: replicated on all ranks of the expert-parallel group."""
        return (p for p in self.parameters() if not getattr(p, "expert_parallel", False))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``idx`` [B, S] token ids -> logits [B, S, vocab], or the scalar loss given ``targets``.

        The loss is ``cross_entropy + aux_loss_coef * sum of the MoE layers' auxiliary losses``,
        computed in float32.
        """
        batch, seq = idx.shape
        if seq > self.config.seq_len:
            raise ConfigError(
                f"sequence of {seq} tokens is longer than seq_len={self.config.seq_len}; feed at "
                "most seq_len tokens or build the model with a larger seq_len."
            )
        positions = torch.arange(seq, device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        aux_total = torch.zeros((), dtype=torch.float32, device=idx.device)
        for block in self.blocks:
            x, l_aux = block(x)
            aux_total = aux_total + l_aux
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        ce = F.cross_entropy(logits.float().reshape(batch * seq, -1), targets.reshape(-1))
        return ce + self.config.aux_loss_coef * aux_total


def make_batch(
    config: MoEGPTConfig, batch_size: int, seed: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch ``(idx, targets)`` of shape [batch_size, seq_len]; targets are idx shifted.

    Drawn from a CPU generator seeded by ``seed`` alone (the global RNG is untouched), so each rank
    can draw its own tokens with ``seed + rank``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be >= 1.")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.seq_len + 1), generator=gen)
    idx = tokens[:, :-1].contiguous()
    targets = tokens[:, 1:].contiguous()
    if device is not None:
        idx, targets = idx.to(device), targets.to(device)
    return idx, targets
