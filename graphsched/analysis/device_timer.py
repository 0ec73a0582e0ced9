"""Time one call on a device: CUDA events on GPU (the call's own stream time), a wall clock on CPU."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one ``fn()`` takes on ``device``."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
