"""Costs graphsched plans with on an emulated group: measured compute, a fitted emulated link.

graphsched's ``cost_model="measured"`` times every compute node on the device and benchmarks the
process group's collectives; its collective benchmark picks CUDA buffers only for NCCL groups, so
on the emulated backend it would time host buffers, which cross no emulated link. The harness
therefore times the emulated all-to-all on device buffers itself (doubling sizes, median of
repeats), fits ``time = alpha + beta * bytes`` and hands graphsched a cost function that uses this
fit for collective nodes and graphsched's own measured costs for everything else. The fit doubles
as a check of the emulation: ``1 / beta`` must come out near ``bandwidth * N / (N - 1)`` (the
all-to-all sends (N-1)/N of its input).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from graphsched.analysis.commmodel import COLLECTIVE_KINDS, AlphaBeta, CommModel, fit_alpha_beta
from graphsched.testing.emulated.group import EmulatedProcessGroup
from graphsched.testing.emulated.link import wire_bytes

#: Doubling all-to-all sizes timed for the fit: 1 MiB .. 64 MiB per rank.
FIT_SIZES = tuple(2**k for k in range(20, 27))


@dataclass
class LinkFit:
    comm: CommModel
    sizes: list[int]
    times_s: list[float]

    def to_dict(self) -> dict[str, Any]:
        ab = self.comm.per_kind["all_to_all"]
        return {
            "all_to_all_alpha_us": ab.alpha_s * 1e6,
            "all_to_all_input_gbps": (1.0 / ab.beta_s_per_byte / 1e9) if ab.beta_s_per_byte > 0 else None,
            "rel_error": ab.rel_error,
            "sizes_bytes": self.sizes,
            "times_ms": [t * 1e3 for t in self.times_s],
        }


def fit_emulated_link(
    group: EmulatedProcessGroup, device: torch.device, repeats: int = 5
) -> LinkFit:
    """Time ``dist.all_to_all_single`` on ``group`` with device buffers and fit an alpha-beta model."""
    sizes, medians = [], []
    for size in FIT_SIZES:
        inp = torch.randn(size // 4, device=device)
        out = torch.empty_like(inp)
        dist.all_to_all_single(out, inp, group=group)  # warm-up
        samples = []
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_to_all_single(out, inp, group=group)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        sizes.append(size)
        medians.append(statistics.median(samples))
    a2a = fit_alpha_beta(sizes, medians)
    n = group.size()
    a2a_factor = wire_bytes("all_to_all", 1 << 30, n) / (1 << 30) or 1.0
    per_kind = {"all_to_all": a2a}
    for kind in COLLECTIVE_KINDS:
        if kind == "all_to_all":
            continue
        factor = wire_bytes(kind, 1 << 30, n) / (1 << 30)
        per_kind[kind] = AlphaBeta(a2a.alpha_s, a2a.beta_s_per_byte * factor / a2a_factor, a2a.rel_error)
    per_kind["default"] = a2a
    return LinkFit(CommModel(per_kind), sizes, medians)


def graphsched_cost_fn(
    comm: CommModel, device: torch.device, cache_dir: str | None = None, fused: bool = False
) -> Callable[[Any], float]:
    """graphsched's measured node costs, with collectives costed by ``comm`` (``fused``: for
    graphs that run as inductor's code, as ``wrap`` chooses for them)."""
    from graphsched.analysis.cost_source import make_cost_fn

    return make_cost_fn("measured", device, comm, cache_dir, fused=fused)
