"""Configuration of the reference MoE GPT: one validated dataclass and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from graphsched.errors import ConfigError

#: Parameter dtypes the model accepts, by name (names keep configs JSON-friendly).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class MoEGPTConfig:
    vocab_size: int = 128
    seq_len: int = 16
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 64
    num_experts: int = 4
    #: Experts each token is sent to: 1 (Switch) or 2 (GShard).
    top_k: int = 1
    #: Expert capacity = ceil(top_k * tokens * capacity_factor / num_experts), see gating.py.
    capacity_factor: float = 1.0
    #: Lower bound of the capacity (small batches would otherwise get a capacity of 1 or 2).
    min_capacity: int = 4
    #: Layer i is an MoE layer when (i + 1) % moe_every == 0: 1 = every layer, 2 = every other
    #: layer starting with the second (as Switch Transformer); the others use a dense MLP.
    moe_every: int = 1
    aux_loss_coef: float = 0.01
    tie_embeddings: bool = False
    #: Parameter dtype, a key of DTYPES; routing and the loss are always computed in float32.
    dtype: str = "float32"
    #: How MoE layers move tokens to expert slots and back: "index" (gathers, as DeepSpeed's
    #: MOELayer) or "einsum" (dense [T, E, C] mask and weights, as GShard / Tutel's reference
    #: code): the same routing and values. "index" is the default: on an H200 (gpu-smoke) its
    #: step's compute is 21.6 ms eager against the einsums' 26.6 (DeepSpeed's 20.8).
    moe_dispatch: str = "index"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "d_ff", "num_experts"
        ):
            if not _is_int(getattr(self, name), minimum=1):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer.")
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; choose "
                "n_heads dividing d_model (e.g. head size 64 or 8)."
            )
        if self.top_k not in (1, 2):
            raise ConfigError(
                f"top_k={self.top_k!r} is not supported; use 1 (Switch) or 2 (GShard)."
            )
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"top_k={self.top_k} needs at least {self.top_k} experts but num_experts="
                f"{self.num_experts}; raise num_experts or use top_k=1."
            )
        if not _is_number(self.capacity_factor) or not self.capacity_factor > 0:
            raise ConfigError(
                f"capacity_factor={self.capacity_factor!r} must be a number > 0 (1.0 or 1.25 are "
                "usual)."
            )
        if not _is_int(self.min_capacity, minimum=1):
            raise ConfigError(
                f"min_capacity={self.min_capacity!r} must be an integer >= 1 (e.g. 4)."
            )
        if not _is_int(self.moe_every, minimum=1):
            raise ConfigError(
                f"moe_every={self.moe_every!r} must be an integer >= 1 (1 = every layer is MoE, "
                "2 = every other layer)."
            )
        if self.moe_every > self.n_layers:
            raise ConfigError(
                f"moe_every={self.moe_every} with n_layers={self.n_layers} leaves no MoE layer; "
                "use moe_every <= n_layers."
            )
        if not _is_number(self.aux_loss_coef) or not self.aux_loss_coef >= 0:
            raise ConfigError(
                f"aux_loss_coef={self.aux_loss_coef!r} must be a number >= 0 (0.01 is usual)."
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"tie_embeddings={self.tie_embeddings!r} must be True or False.")
        if self.moe_dispatch not in ("einsum", "index"):
            raise ConfigError(
                f"moe_dispatch={self.moe_dispatch!r} is not known; use 'einsum' or 'index'."
            )
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"dtype={self.dtype!r} is not known; use one of {', '.join(DTYPES)}."
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        return (layer + 1) % self.moe_every == 0

    def replace(self, **changes: object) -> "MoEGPTConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls) -> "MoEGPTConfig":
        """Unit tests on CPU: forward + backward in milliseconds."""
        return cls()

    @classmethod
    def small(cls) -> "MoEGPTConfig":
        """A CPU demo: big enough that the all-to-alls and expert matmuls show in a timeline."""
        return cls(
            vocab_size=2048, seq_len=128, d_model=128, n_heads=4, n_layers=4, d_ff=512,
            num_experts=8, top_k=2, capacity_factor=1.25,
        )

    @classmethod
    def gpu_medium(cls) -> "MoEGPTConfig":
        """One GPU up to 8: 8 experts (divides 1, 2, 4, 8 ranks), bf16."""
        return cls(
            vocab_size=32768, seq_len=1024, d_model=1024, n_heads=16, n_layers=4, d_ff=4096,
            num_experts=8, top_k=2, capacity_factor=1.25, dtype="bfloat16",
        )

    @classmethod
    def gpu_large(cls) -> "MoEGPTConfig":
        """The block measured in DESIGN.md (d 2048, ffn 8192, top-2, cf 1.25), 16 experts, bf16."""
        return cls(
            vocab_size=32768, seq_len=2048, d_model=2048, n_heads=16, n_layers=4, d_ff=8192,
            num_experts=16, top_k=2, capacity_factor=1.25, dtype="bfloat16",
        )


#: Preset name -> factory. Read-only by convention; get_preset returns a fresh config each call.
PRESETS = {
    "tiny": MoEGPTConfig.tiny,
    "small": MoEGPTConfig.small,
    "gpu_medium": MoEGPTConfig.gpu_medium,
    "gpu_large": MoEGPTConfig.gpu_large,
}


def get_preset(name: str) -> MoEGPTConfig:
    """The named preset as a new MoEGPTConfig; ConfigError lists the valid names."""
    try:
        factory = PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown model preset {name!r}; use one of {', '.join(PRESETS)}."
        ) from None
    return factory()
