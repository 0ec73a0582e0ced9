"""What every variant shares: the run's context, a variant's result, the reference model built
from the run's seed, and the one way a model's steps are measured (``measure_model``)."""

from __future__ import annotations

import contextlib
import gc
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from benchmarks.presets import BenchPreset
from benchmarks.timing import Timing, synchronize, time_steps
from graphsched.models import MoEGPT
from graphsched.testing.emulated.group import EmulatedProcessGroup
from graphsched.testing.emulated.link import CollectiveCall


@dataclass
class BenchContext:
    """What every variant shares within one run."""

    preset: BenchPreset
    device: torch.device
    world: EmulatedProcessGroup
    #: the world group's twin with infinite bandwidth (same size, same data, no time on the wire)
    compute_only: EmulatedProcessGroup
    batch: tuple[torch.Tensor, torch.Tensor]
    seed: int = 0
    optimizer: str = "none"
    #: the collectives of one eager step (filled by the eager variant, replayed by comm-only)
    step_calls: list[CollectiveCall] | None = None
    #: where graphsched variants write the predicted and measured timeline of one step
    timeline_dir: str | None = None
    profile_dir: str | None = None


@dataclass
class VariantResult:
    name: str
    family: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    timing: Timing | None = None
    setup_s: float = 0.0
    #: bytes a real rank would send per step, and bytes the copy engine moved per step
    wire_bytes_per_step: float = 0.0
    copied_bytes_per_step: float = 0.0
    #: copied bytes the emulation stands for (also counted on CPU, where nothing is copied)
    emulated_bytes_per_step: float = 0.0
    collectives_per_step: float = 0.0
    peak_memory_gb: float | None = None
    final_loss: float | None = None
    #: the loss of every step run (warm-up steps first), for the check against the reference
    losses: list[float] = field(default_factory=list)
    #: the largest deviation from the reference's losses found by report.check_losses
    loss_error: float | None = None
    notes: list[str] = field(default_factory=list)
    #: with --profile-dir: what the streams did in one profiled step (benchmarks.stream_profile)
    stream_profile: dict[str, Any] | None = None

    @property
    def median_ms(self) -> float | None:
        return self.timing.median_ms if self.timing is not None else None


class Skip(Exception):
    """A variant that cannot run here (a missing package or option); the reason is reported."""


def build_reference(ctx: BenchContext, group: dist.ProcessGroup) -> MoEGPT:
    torch.manual_seed(ctx.seed)
    if ctx.preset.model_family == "swiglu":
        from graphsched.models.swiglu_moe import SwiGLUMoEGPT

        return SwiGLUMoEGPT(ctx.preset.model, process_group=group).to(ctx.device)
    model = MoEGPT(ctx.preset.model, process_group=group)
    return model.to(ctx.device)


def _make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer | None:
    if kind == "none":
        return None
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-4)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    raise ValueError(f"unknown optimizer {kind!r}; use none, sgd or adamw")


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def wire_totals(groups: list[EmulatedProcessGroup]) -> tuple[int, int, int, int]:
    wire = sum(g.stats.total_wire_bytes for g in groups)
    copied = sum(g.stats.copied_bytes for g in groups)
    calls = sum(n for g in groups for k, n in g.stats.calls.items() if k != "barrier")
    emulated = sum(g.stats.emulated_bytes for g in groups)
    return wire, copied, calls, emulated


def record_per_step(result: VariantResult, before: tuple, after: tuple, steps: int) -> None:
    result.wire_bytes_per_step = (after[0] - before[0]) / steps
    result.copied_bytes_per_step = (after[1] - before[1]) / steps
    result.collectives_per_step = (after[2] - before[2]) / steps
    result.emulated_bytes_per_step = (after[3] - before[3]) / steps


def measure_model(
    ctx: BenchContext,
    result: VariantResult,
    model: nn.Module,
    groups: list[EmulatedProcessGroup],
    around: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> nn.Module:
    """Warm up and time ``model`` on the context's batch; fill ``result``. Returns the model."""
    idx, targets = ctx.batch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(ctx.optimizer, model)
    losses: list[torch.Tensor] = []  # detached: read once at the end, no sync while timing

    def zero_grads() -> None:
        for p in params:
            p.grad = None

    def step() -> None:
        with around():
            loss = model(idx, targets)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
        losses.append(loss.detach())

    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        for _ in range(max(1, ctx.preset.warmup)):
            zero_grads()
            step()
        synchronize(ctx.device)
        result.setup_s = time.perf_counter() - t0
    seen = set()
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if "graphsched" in text.lower() and text not in seen:
            seen.add(text)
            result.notes.append(text[:400])
    before = wire_totals(groups)
    result.timing = time_steps(step, ctx.device, warmup=0, steps=ctx.preset.steps, before=zero_grads)
    record_per_step(result, before, wire_totals(groups), ctx.preset.steps)
    if ctx.profile_dir is not None and ctx.device.type == "cuda":
        from benchmarks.stream_profile import profile_one_step

        zero_grads()
        path = os.path.join(ctx.profile_dir, f"{ctx.preset.name}_{result.name}.trace.json")
        result.stream_profile = profile_one_step(step, path)
        losses.pop()
    if ctx.device.type == "cuda":
        result.peak_memory_gb = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    if losses:
        result.losses = [float(v) for v in torch.stack([v.float() for v in losses]).cpu()]
        result.final_loss = result.losses[-1]
    result.status = "ok"
    return model


class MicroBatched(nn.Module):
    """``model`` run on micro-batches of each call (graphsched.microbatch's split and join), so
    peers and the eager oracle see the step graphsched's ``micro_batches`` option runs."""

    def __init__(self, model: nn.Module, count: int) -> None:
        super().__init__()
        self.model = model
        self.count = count

    def forward(self, *args: Any) -> Any:
        from graphsched.microbatch import micro_batched

        return micro_batched(self.model, self.count)(*args)
