"""``comm-only``: the collectives of one eager step, recorded and replayed back to back on buffers
of the same shapes (communication alone)."""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from benchmarks.context import (
    BenchContext,
    Skip,
    VariantResult,
    build_reference,
    free_device_memory,
    record_per_step,
    wire_totals,
)
from benchmarks.timing import synchronize, time_steps
from graphsched.testing.emulated.group import EmulatedProcessGroup
from graphsched.testing.emulated.link import CollectiveCall


def record_step_calls(
    ctx: BenchContext, model: nn.Module, group: EmulatedProcessGroup
) -> list[CollectiveCall]:
    idx, targets = ctx.batch
    with group.recording() as calls:
        model(idx, targets).backward()
    synchronize(ctx.device)
    for p in model.parameters():
        p.grad = None
    return list(calls)


def run_comm_only(ctx: BenchContext, result: VariantResult) -> None:
    if ctx.step_calls is None:
        model = build_reference(ctx, ctx.world)
        model(*ctx.batch).backward()  # warm-up: first-call allocations stay out of the record
        ctx.step_calls = record_step_calls(ctx, model, ctx.world)
        del model
        free_device_memory(ctx.device)
    calls = ctx.step_calls
    if not calls:
        raise Skip("one eager step issued no collective")
    ops = replay_ops(calls, ctx.world, ctx.device)
    result.notes.append(
        f"{len(calls)} collectives of one eager step, back to back: "
        + ", ".join(f"{k} x{sum(1 for c in calls if c.kind == k)}" for k in sorted({c.kind for c in calls}))
    )

    def step() -> None:
        for op in ops:
            op()

    t0 = time.perf_counter()
    for _ in range(max(1, ctx.preset.warmup)):
        step()
    synchronize(ctx.device)
    result.setup_s = time.perf_counter() - t0
    before = wire_totals([ctx.world])
    result.timing = time_steps(step, ctx.device, warmup=0, steps=ctx.preset.steps)
    record_per_step(result, before, wire_totals([ctx.world]), ctx.preset.steps)
    result.status = "ok"


def _filled(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, device=device).to(dtype)
    return torch.ones(shape, dtype=dtype, device=device)


def replay_ops(
    calls: list[CollectiveCall], group: EmulatedProcessGroup, device: torch.device
) -> list[Callable[[], None]]:
    """One closure per recorded collective, on buffers of the recorded shapes (shared per shape)."""
    buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    ops: list[Callable[[], None]] = []
    n = group.size()
    for call in calls:
        key = (call.kind, call.shape, call.dtype)
        if key not in buffers:
            inp = _filled(call.shape, call.dtype, device)
            if call.kind == "all_gather":
                out = torch.empty((n * inp.numel(),), dtype=inp.dtype, device=device)
            elif call.kind == "reduce_scatter":
                out = torch.empty((inp.numel() // n,), dtype=inp.dtype, device=device)
            else:
                out = torch.empty_like(inp)
            buffers[key] = (inp, out)
        inp, out = buffers[key]
        # MAX for reductions: the same bytes as SUM, and values that stay finite over repeats.
        if call.kind == "all_to_all":
            ops.append(lambda o=out, i=inp: dist.all_to_all_single(o, i, group=group))
        elif call.kind == "all_reduce":
            ops.append(lambda i=inp: dist.all_reduce(i, op=dist.ReduceOp.MAX, group=group))
        elif call.kind == "all_gather":
            ops.append(lambda o=out, i=inp: dist.all_gather_into_tensor(o, i.reshape(-1), group=group))
        elif call.kind == "reduce_scatter":
            ops.append(
                lambda o=out, i=inp: dist.reduce_scatter_tensor(
                    o, i.reshape(-1), op=dist.ReduceOp.MAX, group=group
                )
            )
        elif call.kind == "broadcast":
            ops.append(lambda i=inp: dist.broadcast(i, src=0, group=group))
    return ops
