"""Timing of one training step: warm-up, then the median of repeated steps.

On CUDA each step is bracketed by CUDA events on the current stream and synchronised before the
next one starts (a step begins on an idle GPU, as after a data loader); on CPU a wall clock is used.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.samples_ms))

    @property
    def min_ms(self) -> float:
        return float(min(self.samples_ms))

    @property
    def max_ms(self) -> float:
        return float(max(self.samples_ms))

    def to_dict(self) -> dict[str, object]:
        return {
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "samples_ms": [round(s, 4) for s in self.samples_ms],
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], None],
    device: torch.device,
    warmup: int,
    steps: int,
    before: Callable[[], None] | None = None,
) -> Timing:
    """Run ``warmup`` untimed steps, then time ``steps`` steps; ``before`` runs untimed each time."""
    for _ in range(warmup):
        if before is not None:
            before()
        step()
    synchronize(device)
    samples: list[float] = []
    for _ in range(steps):
        if before is not None:
            before()
        synchronize(device)
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(samples)
