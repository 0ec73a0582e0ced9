"""Checks that the emulated link behaves like a NIC: it takes the asked time and costs no compute.

``fit_emulated_link`` times the emulated all-to-all on device buffers at doubling sizes and fits
``alpha + beta * bytes``: ``1 / beta`` must come out near ``bandwidth * N / (N - 1)`` (an
all-to-all sends (N-1)/N of its input). The harness keeps it in every GPU record as a check of the
emulation, and ``benchmarks.commcheck`` compares graphsched's own costing of the link with it.

``overlap_check`` times a bf16 matmul loop alone, a chain of emulated all-to-alls alone, and both
issued together (the all-to-alls asynchronous, waited for at the end). If the copy engine runs
beside the SMs, the pair takes ``max(compute, comm)``, not their sum: ``slowdown`` (pair time over
that max) near 1.0 is what makes the emulated figures meaningful.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from graphsched.analysis.commmodel import AlphaBeta, fit_alpha_beta
from graphsched.analysis.device_timer import time_once
from graphsched.testing.emulated.group import EmulatedProcessGroup

#: Doubling all-to-all sizes timed for the fit: 1 MiB .. 64 MiB per rank.
FIT_SIZES = tuple(2**k for k in range(20, 27))


@dataclass
class LinkFit:
    """The emulated all-to-all's fit, and the medians it was fitted to."""

    all_to_all: AlphaBeta
    sizes: list[int]
    times_s: list[float]

    def to_dict(self) -> dict[str, Any]:
        ab = self.all_to_all
        return {
            "all_to_all_alpha_us": ab.alpha_s * 1e6,
            "all_to_all_input_gbps": (1.0 / ab.beta_s_per_byte / 1e9) if ab.beta_s_per_byte > 0 else None,
            "rel_error": ab.rel_error,
            "sizes_bytes": self.sizes,
            "times_ms": [t * 1e3 for t in self.times_s],
        }


def fit_emulated_link(
    group: EmulatedProcessGroup, device: torch.device, repeats: int = 5,
    sizes: tuple[int, ...] = FIT_SIZES,
) -> LinkFit:
    """Time ``dist.all_to_all_single`` on ``group`` with ``device`` buffers; fit alpha-beta."""
    medians = []
    for size in sizes:
        inp = torch.randn(size // 4, device=device)
        out = torch.empty_like(inp)
        dist.all_to_all_single(out, inp, group=group)  # warm-up
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time_once(lambda: dist.all_to_all_single(out, inp, group=group), device))
        medians.append(statistics.median(samples))
    return LinkFit(fit_alpha_beta(list(sizes), medians), list(sizes), medians)


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
