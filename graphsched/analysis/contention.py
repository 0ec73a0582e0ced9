"""How much a collective in flight slows the compute beside it: the scheduler's contention factor.

A transfer shares the device with the compute stream (NCCL's kernels take SMs and memory
bandwidth; a copy engine takes memory bandwidth), so a matmul that overlaps a collective runs
slower than alone. The scheduler's simulator (``graphsched/schedule/simulate.py``) stretches a
compute task by a factor for the part of it that runs while a collective is in flight; this
module measures that factor as the benchmark harness' overlap check does: a matmul loop alone,
then the same loop issued while a chain of collectives is in flight. Measured on CUDA only, with
the collective benchmark in ``wrap``; elsewhere the factor is 1.0.

If the loop takes ``t`` alone and ``t'`` beside the chain, and the chain was in flight for the
first ``x`` seconds of it, the loop did ``x / c`` of its work inside and ``t' - x`` outside, so
``c = x / (t - t' + x)``; with the chain covering the whole loop (it is issued to last about
twice as long), ``c = t' / t``.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from graphsched.analysis.collective_calls import barrier, collective_call, median_time
from graphsched.analysis.device_timer import time_once

log = logging.getLogger(__name__)

#: Bounds on the chain's length and the loop's matmul count, so the check stays short.
MAX_COLLECTIVES = 512
MAX_MATMULS = 256


@dataclass
class ContentionCheck:
    """What the check measured (seconds, medians) and the factor it implies."""

    compute_s: float
    #: the same loop while the chain of collectives is in flight
    compute_beside_comm_s: float
    #: how long the chain stayed in flight after the loop started (median)
    comm_in_flight_s: float
    comm_s: float
    collectives: int
    message_bytes: int
    matmuls: int
    factor: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stretch_factor(alone_s: float, beside_s: float, in_flight_s: float) -> float:
    """The factor that turns ``alone_s`` of compute into ``beside_s`` when a collective is in
    flight for its first ``in_flight_s`` seconds (never below 1.0: faster beside is noise)."""
    inside = min(in_flight_s, beside_s)
    work_inside = alone_s - (beside_s - inside)
    if inside <= 0 or work_inside <= 0:
        return 1.0
    return max(1.0, inside / work_inside)


def _matmul_loop(device: torch.device, size: int, target_s: float) -> tuple[Callable[[], None], int]:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    torch.mm(a, b, out=c)  # warm-up (library handles, kernel selection)
    one = time_once(lambda: torch.mm(a, b, out=c), device)
    count = int(min(MAX_MATMULS, max(1, math.ceil(target_s / max(one, 1e-6)))))

    def loop() -> None:
        for _ in range(count):
            torch.mm(a, b, out=c)

    return loop, count


def _agreed_count(count: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """The largest of the ranks' chain lengths: every rank must issue as many collectives."""
    value = torch.tensor([float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return int(value.item())


def _beside(
    loop: Callable[[], None], issue: Callable[[], Any], count: int,
    group: dist.ProcessGroup | None, device: torch.device,
) -> tuple[float, float]:
    """One sample: (the loop's seconds, the chain's seconds in flight after the loop started)."""
    barrier(group, device)
    side = torch.cuda.Stream(device=device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    comm_done = torch.cuda.Event(enable_timing=True)
    works = [issue() for _ in range(count)]
    start.record()
    loop()
    end.record()
    # The chain's end is marked on a stream of its own, so it does not wait for the loop.
    with torch.cuda.stream(side):
        for work in works:
            work.wait()
        comm_done.record(side)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3, start.elapsed_time(comm_done) / 1e3


def measure_contention(
    group: dist.ProcessGroup | None,
    device: torch.device,
    kind: str = "all_to_all",
    *,
    matmul_size: int = 4096,
    compute_s: float = 5e-3,
    message_bytes: int = 16 << 20,
    repeats: int = 3,
) -> ContentionCheck:
    """The contention check on ``device`` (CUDA) with ``kind`` collectives of ``group``.

    Every rank of ``group`` must call it with the same arguments (its collectives are matched by
    issue order; the chain's length is agreed first). About ``repeats * 3 * 2 * compute_s``.
    """
    loop, matmuls = _matmul_loop(device, matmul_size, compute_s)
    numel = message_bytes // 2
    one, _ = collective_call(kind, numel, group, device, torch.bfloat16)
    issue, nbytes = collective_call(kind, numel, group, device, torch.bfloat16, async_op=True)
    t_compute = median_time(loop, group, device, repeats, warmup=1)
    t_one = median_time(one, group, device, repeats, warmup=1)
    # The chain lasts about twice the loop, so it is still in flight when the loop ends.
    count = int(min(MAX_COLLECTIVES, max(1, math.ceil(2 * t_compute / max(t_one, 1e-6)))))
    count = _agreed_count(count, group, device)

    def chain() -> None:
        for work in [issue() for _ in range(count)]:
            work.wait()

    t_comm = median_time(chain, group, device, repeats, warmup=1)
    samples = [_beside(loop, issue, count, group, device) for _ in range(repeats)]
    beside = statistics.median(s[0] for s in samples)
    in_flight = statistics.median(s[1] for s in samples)
    factor = statistics.median(stretch_factor(t_compute, b, x) for b, x in samples)
    check = ContentionCheck(t_compute, beside, in_flight, t_comm, count, nbytes, matmuls, factor)
    log.info(
        "contention: %d matmuls %.3f ms alone, %.3f ms beside %d %s of %d bytes (in flight "
        "%.3f ms): factor %.3f", matmuls, t_compute * 1e3, beside * 1e3, count, kind, nbytes,
        in_flight * 1e3, factor,
    )
    return check
