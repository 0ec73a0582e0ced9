"""DeepSpeed MoE layers made capturable by graphsched (``deepspeed.moe.layer.MoE``).

DeepSpeed's ``MOELayer`` runs its two all-to-alls through ``_AllToAll``, an autograd Function around
an in-place ``dist.all_to_all_single``. :func:`make_capturable` switches every ``MOELayer`` of a
model, instance by instance, to :class:`CapturableMOELayer`: DeepSpeed's own forward code, run with
``_AllToAll`` replaced by the differentiable functional collective
``all_to_all_single_autograd`` (same even split of dim 0, same values, same gradient: the transposed
all-to-all). graphsched's capture then sees every all-to-all as an issue node and a wait node, in
the forward and in the backward graph, and can schedule them.

Its gate switches to :class:`CapturableTopKGate`: the same routing computation, but the capacity it
hands to the layer is the Python int DeepSpeed's ``_capacity`` computes (replicated exactly in
float32, from static shapes) instead of a 0-d tensor. The layer turns that tensor into an int with
``int(C)``, which ``torch.compile`` can only trace as a data-dependent scalar: without the swap the
layer's graph breaks in two there unless ``fullgraph=True``. (The capacity is a function of static
shapes; graphsched compiles with ``dynamic=False``.)

Without the swap, ``torch.compile`` does trace ``_AllToAll`` (Dynamo rewrites the in-place
``dist.all_to_all_single`` into a functional collective followed by a copy into a fresh buffer),
but only while DeepSpeed's communication wrapper stays traceable (its comms logger and profilers
are not), and every wait is then read by an extra copy.

Nothing global changes: the DeepSpeed modules keep their code, other ``MOELayer`` instances run
as before, parameters and ``state_dict`` keys are untouched (``isinstance(layer, MOELayer)`` still
holds, so the DeepSpeed engine, its expert groups and its checkpoints see the same model), and
:func:`restore` switches the layers back.

Supported (checked with DeepSpeed 0.19.8, 2 gloo ranks, ZeRO stage 1: losses and parameters after 3
training steps bitwise equal to the unwrapped model, each layer's two all-to-alls captured in one
forward and one backward graph):

* ``deepspeed.moe.layer.MoE`` with ``k=1``, ``k=2`` or ``k>2`` (DeepSpeed's top-k gating),
  ``drop_tokens=True``, any ``capacity_factor`` / ``eval_capacity_factor`` / ``min_capacity``,
  any ``ep_size`` dividing the world size (``ep_size=1`` captures too, with nothing to overlap),
  ``use_residual``, train and eval mode;
* random gating (``use_rts=True``, ``noisy_gate_policy="Jitter"`` or ``"RSample"``,
  ``top2_2nd_expert_sampling=True``) only with ``allow_random_gating=True``, which
  :func:`wrap_deepspeed_moe` passes for ``schedule="identity"``. Captured random ops draw from the
  generator exactly as eager does, but they have no data inputs, so a schedule that reorders
  independent nodes may swap two draws (measured: two draws in one layer under
  ``schedule="reverse_independent"`` changed the loss at step 1) and the run no longer matches eager.

Refused with :class:`~graphsched.errors.ConfigError` (each message names the fix):

* random gating without ``allow_random_gating`` (fix: ``use_rts=False``, ``noisy_gate_policy=None``,
  ``top2_2nd_expert_sampling=False``, or ``schedule="identity"``);
* ``drop_tokens=False``: the capacity is the largest expert load all-reduced over the
  expert-parallel group, a data-dependent shape (measured: the model splits into 11 graphs);
* ``use_tutel=True`` with Tutel installed: Tutel's dispatch kernels are opaque to capture;
* tensor parallelism (``groups.mpu`` with a tensor-parallel size above 1,
  ``enable_expert_tensor_parallelism=True``): its token drop/gather collectives are not supported;
* ``"wall_clock_breakdown": true`` in the DeepSpeed config: the engine turns on timers in every MoE
  layer, which synchronise inside the forward (measured: 8 graphs instead of 1);
* subclasses of ``MOELayer`` or ``TopKGate`` with their own code, and DeepSpeed versions whose
  ``MOELayer.forward`` does not call ``_AllToAll``.

Under ``deepspeed.initialize`` keep ``fullgraph=False`` (graphsched's default): the engine's forward
hooks (host timers) cannot be traced, so with ``fullgraph=False`` they run eagerly around the
model's graph, which is still captured whole; :func:`wrap_deepspeed_moe` refuses
``fullgraph=True`` on an engine's model. Without an engine, ``fullgraph=True`` works, except for
random gating on the very first call: DeepSpeed then fills its module-level caches of random
distributions, a side effect ``fullgraph=True`` cannot trace.

DeepSpeed's AutoEP layers (``deepspeed.module_inject.auto_ep_layer``) are a different code path and
are left alone.

Usage, after ``deepspeed.initialize`` (which creates the expert-parallel groups)::

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=..., config=...)
    wrap_deepspeed_moe(engine)        # = make_capturable(engine.module) + graphsched.wrap(...)
    loss = engine(batch); engine.backward(loss); engine.step()
"""

from __future__ import annotations

import math
import struct
import types
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from deepspeed.moe import sharded_moe
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, TopKGate
from deepspeed.utils import groups as ds_groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

from graphsched.compat import funcol
from graphsched.config import GraphschedConfig
from graphsched.errors import ConfigError, GraphschedError

__all__ = [
    "CapturableMOELayer",
    "CapturableTopKGate",
    "check_supported",
    "find_moe_layers",
    "make_capturable",
    "restore",
    "static_capacity",
    "unsupported_options",
    "wrap_deepspeed_moe",
]


class _FunctionalAllToAll:
    """Stands in for DeepSpeed's ``_AllToAll`` (same call: ``apply(group, input)``)."""

    @staticmethod
    def apply(group: Any, input: torch.Tensor) -> torch.Tensor:
        # _AllToAll makes the input contiguous and splits dim 0 evenly over the group; its backward
        # is the same all-to-all of the gradient. all_to_all_single_autograd with no split sizes
        # does exactly that, as a functional collective torch.compile captures.
        if group is None:
            group = dist.group.WORLD
        return funcol.all_to_all_single_autograd(input.contiguous(), None, None, group)


def _forward_with_functional_all_to_all() -> types.FunctionType:
    """``MOELayer.forward``'s own code, resolving ``_AllToAll`` to :class:`_FunctionalAllToAll`."""
    forward = MOELayer.forward
    if "_AllToAll" not in forward.__code__.co_names:
        raise GraphschedError(
            "this DeepSpeed version's MOELayer.forward does not call _AllToAll, so graphsched cannot "
            "make it capturable; use DeepSpeed 0.19.x (tested with 0.19.8) or report the version."
        )
    # A copy of the module's namespace, not the module itself: DeepSpeed's module stays untouched.
    # The copy has no __name__ so that torch.compile guards these globals through this dict instead
    # of re-reading them from the deepspeed module (where _AllToAll is the original).
    namespace = {k: v for k, v in vars(sharded_moe).items() if k != "__name__"}
    namespace["_AllToAll"] = _FunctionalAllToAll
    fn = types.FunctionType(forward.__code__, namespace, forward.__name__, forward.__defaults__,
                            forward.__closure__)
    fn.__kwdefaults__ = forward.__kwdefaults__
    fn.__doc__ = "DeepSpeed's MOELayer.forward with the all-to-alls as functional collectives."
    fn.__module__ = __name__
    fn.__qualname__ = "CapturableMOELayer.forward"
    return fn


class CapturableMOELayer(MOELayer):
    """A DeepSpeed ``MOELayer`` whose all-to-alls are functional collectives (same numerics).

    Instances are made by :func:`make_capturable` switching an existing layer's class; never
    constructed directly.
    """

    forward = _forward_with_functional_all_to_all()


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def static_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """The expert capacity DeepSpeed's ``_capacity`` computes, as a Python int.

    DeepSpeed computes ``ceil((num_tokens / num_experts) * tensor(capacity_factor))`` on a float32
    CPU tensor: both operands are rounded to float32 and multiplied in float32. The product of two
    float32 numbers is exact in a Python float, so rounding it once to float32 reproduces the
    float32 multiplication bit for bit.
    """
    product = _float32(_float32(num_tokens / num_experts) * _float32(capacity_factor))
    return max(int(math.ceil(product)), int(min_capacity))


class CapturableTopKGate(TopKGate):
    """DeepSpeed's ``TopKGate`` returning the capacity as a Python int (routing unchanged)."""

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None,  # type: ignore[override]
                sparse_routes: bool = False, use_tutel: bool = False) -> Any:
        out = TopKGate.forward(self, input, used_token, sparse_routes, use_tutel)
        if not (sparse_routes and self.drop_tokens):
            return out
        # The gates scale capacity_factor by k (top1gating: cf, top2gating: cf * 2, topk: cf * k).
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k > 1:
            factor = factor * self.k
        capacity = static_capacity(input.shape[0], self.wg.weight.shape[0], factor, self.min_capacity)
        return (out[0], capacity) + tuple(out[2:])


def find_moe_layers(model: nn.Module) -> list[tuple[str, MOELayer]]:
    """Every DeepSpeed ``MOELayer`` inside ``model`` (capturable or not), with its dotted name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MOELayer)]


def _tensor_parallel_size() -> int:
    return bwc_tensor_model_parallel_world_size(ds_groups.mpu)


def _random_gating(gate: TopKGate) -> list[str]:
    """The options that make ``gate`` draw random numbers (in training, some also in eval)."""
    found = []
    if gate.k == 1 and gate.use_rts:
        found.append("use_rts=True")
    if gate.noisy_gate_policy in ("Jitter", "RSample"):
        found.append(f"noisy_gate_policy={gate.noisy_gate_policy!r}")
    if gate.k == 2 and gate.top2_2nd_expert_sampling:
        found.append("top2_2nd_expert_sampling=True")
    return found


def unsupported_options(
    name: str, layer: MOELayer, wrapper: MoE | None = None, allow_random_gating: bool = False
) -> list[str]:
    """Why ``layer`` cannot be made capturable: one message per problem, each naming the fix."""
    where = f"DeepSpeed MoE layer {name or '<root>'!r}"
    problems: list[str] = []
    if type(layer) not in (MOELayer, CapturableMOELayer):
        problems.append(
            f"{where} is a {type(layer).__name__}, a subclass of MOELayer with its own code; "
            "graphsched only converts DeepSpeed's MOELayer itself. Fix: use deepspeed.moe.layer.MoE."
        )
    gate = layer.gate
    if type(gate) not in (TopKGate, CapturableTopKGate):
        problems.append(
            f"{where} uses the gate {type(gate).__name__}; graphsched supports DeepSpeed's TopKGate "
            "only. Fix: build the layer with deepspeed.moe.layer.MoE."
        )
    else:
        if not gate.drop_tokens:
            problems.append(
                f"{where} has drop_tokens=False: its capacity is the largest expert load all-reduced "
                "over the expert-parallel group, a data-dependent shape that cannot be captured. "
                "Fix: MoE(..., drop_tokens=True) with a capacity_factor large enough for your load "
                "(e.g. 1.25 to 2.0)."
            )
        random = _random_gating(gate)
        if random and not allow_random_gating:
            problems.append(
                f"{where} draws random numbers in its gating ({', '.join(random)}); a schedule that "
                "reorders independent nodes may swap random draws, so the run would no longer match "
                "eager. Fix: MoE(..., use_rts=False, noisy_gate_policy=None, "
                "top2_2nd_expert_sampling=False), or wrap with schedule='identity'."
            )
    if getattr(layer, "use_tutel", False):
        problems.append(
            f"{where} uses Tutel (use_tutel=True with tutel installed), whose dispatch kernels "
            "cannot be captured. Fix: MoE(..., use_tutel=False)."
        )
    if getattr(layer, "wall_clock_breakdown", False) or getattr(gate, "wall_clock_breakdown", False):
        problems.append(
            f"{where} has wall_clock_breakdown timers on, which synchronise inside the forward. "
            "Fix: set \"wall_clock_breakdown\": false in the DeepSpeed config."
        )
    if wrapper is not None and getattr(wrapper, "enable_expert_tensor_parallelism", False):
        problems.append(
            f"{where} has enable_expert_tensor_parallelism=True, which graphsched does not support. "
            "Fix: MoE(..., enable_expert_tensor_parallelism=False)."
        )
    return problems


def check_supported(model: nn.Module, allow_random_gating: bool = False) -> None:
    """Raise ConfigError listing every DeepSpeed MoE option in ``model`` graphsched cannot capture."""
    wrappers = {id(m.deepspeed_moe): m for m in model.modules() if isinstance(m, MoE)}
    problems: list[str] = []
    layers = find_moe_layers(model)
    for name, layer in layers:
        problems += unsupported_options(name, layer, wrappers.get(id(layer)), allow_random_gating)
    tp = _tensor_parallel_size()
    if layers and tp > 1:
        problems.append(
            f"DeepSpeed runs with tensor parallelism of size {tp} (groups.mpu); the MoE layers' "
            "token drop/gather collectives are not supported by graphsched. Fix: train without "
            "tensor parallelism, or leave the model unwrapped."
        )
    if problems:
        raise ConfigError(
            "graphsched cannot capture this model's DeepSpeed MoE layers:\n  - " + "\n  - ".join(problems)
        )


def make_capturable(model: nn.Module, *, allow_random_gating: bool = False) -> int:
    """Switch every DeepSpeed ``MOELayer`` in ``model`` to its capturable form; return how many.

    Idempotent. Raises ConfigError, before changing anything, when a layer uses an option graphsched
    cannot capture. ``allow_random_gating``: accept gates that draw random numbers; pass True only
    when the schedule keeps nodes in captured order (``schedule="identity"``). Works before or after
    ``deepspeed.initialize``, but options the engine sets on the layers (timers) are only seen
    after it; the layers' expert-parallel group must be set (``deepspeed.initialize`` does it)
    before the first forward.
    """
    check_supported(model, allow_random_gating)
    layers = find_moe_layers(model)
    for _, layer in layers:
        layer.__class__ = CapturableMOELayer
        layer.gate.__class__ = CapturableTopKGate
    return len(layers)


def restore(model: nn.Module) -> int:
    """Undo :func:`make_capturable`: the layers run DeepSpeed's own code again; return how many."""
    count = 0
    for _, layer in find_moe_layers(model):
        if type(layer) is CapturableMOELayer:
            layer.__class__ = MOELayer
            count += 1
        if type(layer.gate) is CapturableTopKGate:
            layer.gate.__class__ = TopKGate
    return count


def _engine_forward_hooks(module: nn.Module) -> int:
    """How many forward hooks a DeepSpeedEngine put on ``module`` (host timers, profilers)."""
    hooks = list(module._forward_pre_hooks.values()) + list(module._forward_hooks.values())
    return sum(1 for h in hooks if getattr(h, "__qualname__", "").startswith("DeepSpeedEngine."))


def wrap_deepspeed_moe(model: nn.Module, config: GraphschedConfig | None = None, **options: Any) -> nn.Module:
    """``make_capturable`` then ``graphsched.wrap``; returns ``model`` (an engine stays an engine).

    ``model`` is a module holding DeepSpeed MoE layers or a ``DeepSpeedEngine`` (its ``.module`` is
    wrapped in place, so ``engine(batch)`` runs the captured graphs). Options are graphsched's
    (``GraphschedConfig`` fields). Call it after ``deepspeed.initialize``, so that the options the
    engine sets on the layers are checked too. Random gating is accepted with
    ``schedule="identity"`` only (see the module docstring).
    """
    from graphsched.api import wrap
    from graphsched.integrations import inner_module

    inner = inner_module(model)
    if config is None:
        config = GraphschedConfig.from_options(**options)
    elif options:
        config = config.replace(**options)
    if config.fullgraph and _engine_forward_hooks(inner):
        raise ConfigError(
            "fullgraph=True cannot capture the forward hooks the DeepSpeed engine puts on the model "
            "(host timers). Fix: leave fullgraph=False (the default): the hooks then run eagerly "
            "around the model's graph, and the model itself is still captured whole."
        )
    make_capturable(inner, allow_random_gating=config.schedule == "identity")
    wrap(inner, config)
    return model
