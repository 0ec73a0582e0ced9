"""Integrations with training frameworks (DeepSpeed).

Importing this package does not import DeepSpeed. :func:`prepare_for_capture` is the single entry
point ``graphsched.wrap`` can call on any model: it converts DeepSpeed MoE layers to their
capturable form when the model holds some, and does nothing (without importing DeepSpeed) otherwise.
The DeepSpeed specifics live in :mod:`graphsched.integrations.deepspeed_moe` (needs ``deepspeed``).
"""

from __future__ import annotations

import sys

import torch.nn as nn

__all__ = ["inner_module", "prepare_for_capture"]

#: The module defining DeepSpeed's MOELayer. A model can only hold one if it has been imported.
_DEEPSPEED_MOE_MODULE = "deepspeed.moe.sharded_moe"
_DEEPSPEED_ENGINE_MODULE = "deepspeed.runtime.engine"


def prepare_for_capture(model: nn.Module, *, allow_random_gating: bool = False) -> int:
    """Make the DeepSpeed MoE layers of ``model`` capturable; return how many were found.

    Raises graphsched.errors.ConfigError when one uses an option graphsched cannot capture (see
    :mod:`graphsched.integrations.deepspeed_moe`). ``allow_random_gating``: accept gates drawing
    random numbers; pass True only for a schedule that keeps the captured node order
    (``schedule="identity"``). Returns 0 at once when DeepSpeed's MoE module was never imported.
    """
    if _DEEPSPEED_MOE_MODULE not in sys.modules:
        return 0
    from graphsched.integrations.deepspeed_moe import make_capturable

    return make_capturable(model, allow_random_gating=allow_random_gating)


def inner_module(model: nn.Module) -> nn.Module:
    """The module to wrap: a DeepSpeedEngine's ``.module``, else ``model`` itself.

    Wrapping the engine would put its forward bookkeeping (timers, hooks) inside the captured graph.
    """
    if _DEEPSPEED_ENGINE_MODULE not in sys.modules:
        return model
    from deepspeed.runtime.engine import DeepSpeedEngine

    return model.module if isinstance(model, DeepSpeedEngine) else model
