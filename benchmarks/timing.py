"""Timing of one training step: warm-up, then the median of repeated steps.

On CUDA each step is bracketed by CUDA events on the current stream and synchronised before the
next one starts (a step begins on an idle GPU, as after a data loader); on CPU a wall clock is used.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from graphsched.analysis.device_timer import time_once


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
        samples.append(time_once(step, device) * 1e3)
    return Timing(samples)
