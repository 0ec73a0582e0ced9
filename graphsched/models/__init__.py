"""Reference model: a GPT-style decoder with expert-parallel MoE feed-forward layers."""

from graphsched.models.config import DTYPES, PRESETS, MoEGPTConfig, get_preset
from graphsched.models.gating import (
    GateOutput,
    TopKGate,
    compute_capacity,
    load_balancing_loss,
    top1gating,
    top2gating,
)
from graphsched.models.gpt import MoEGPT, make_batch
from graphsched.models.moe import Experts, MoELayer

__all__ = [
    "DTYPES",
    "PRESETS",
    "Experts",
    "GateOutput",
    "MoEGPT",
    "MoEGPTConfig",
    "MoELayer",
    "TopKGate",
    "compute_capacity",
    "get_preset",
    "load_balancing_loss",
    "make_batch",
    "top1gating",
    "top2gating",
]
