"""Checks that the emulated link behaves like a NIC: it takes the asked time and costs no compute.

``overlap_check`` times a bf16 matmul loop alone, a chain of emulated all-to-alls alone, and both
issued together (the all-to-alls asynchronous, waited for at the end). If the copy engine runs
beside the SMs, the pair takes ``max(compute, comm)``, not their sum: ``slowdown`` (pair time over
that max) near 1.0 is what makes the emulated figures meaningful.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch
import torch.distributed as dist

from graphsched.analysis.device_timer import time_once
from graphsched.testing.emulated.group import EmulatedProcessGroup


def _time(fn: Callable[[], None], repeats: int = 3) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        samples.append(time_once(fn, torch.device("cuda")) * 1e3)
    return float(statistics.median(samples))


def overlap_check(
    group: EmulatedProcessGroup,
    device: torch.device,
    matmul_size: int = 8192,
    matmuls: int = 8,
    message_bytes: int = 64 << 20,
) -> dict[str, Any]:
    """Compute alone, communication alone, both together (ms), on ``device`` and ``group``."""
    a = torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16)
    inp = torch.randn(message_bytes // 2, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(inp)

    def compute() -> None:
        for _ in range(matmuls):
            torch.mm(a, b)

    t_compute = _time(compute)
    one = _time(lambda: dist.all_to_all_single(out, inp, group=group))
    # As many all-to-alls as fit in the compute time: the pair should then take about either.
    count = max(1, round(t_compute / max(one, 1e-3)))

    def comm_async() -> list[Any]:
        return [dist.all_to_all_single(out, inp, group=group, async_op=True) for _ in range(count)]

    def comm() -> None:
        for work in comm_async():
            work.wait()

    def both() -> None:
        works = comm_async()
        compute()
        for work in works:
            work.wait()

    t_comm = _time(comm)
    t_both = _time(both)
    flops = 2.0 * matmul_size**3 * matmuls
    return {
        "matmul_tflops": flops / (t_compute * 1e-3) / 1e12,
        "compute_ms": t_compute,
        "comm_ms": t_comm,
        "all_to_all_count": count,
        "message_bytes": message_bytes,
        "both_ms": t_both,
        "sum_ms": t_compute + t_comm,
        "slowdown_over_max": t_both / max(t_compute, t_comm),
    }
