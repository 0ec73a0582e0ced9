"""Where each task runs: CUDA streams with events between them, or the host in issue order.

On CUDA the compute stream is the caller's current stream (so autograd and the optimizer see the
results in order) and the communication stream is a dedicated one. On CPU there is one host
thread; collectives are still asynchronous (gloo runs them on its own threads and ``wait_tensor``
blocks), so issue order alone decides what overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graphsched.plan import COMM_STREAM, COMPUTE_STREAM


@dataclass
class StreamSet:
    device: torch.device
    streams: dict[str, "torch.cuda.Stream"] = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def for_device(cls, device: torch.device, comm_stream: "torch.cuda.Stream | None" = None) -> "StreamSet":
        if device.type != "cuda":
            return cls(device=device)
        compute = torch.cuda.current_stream(device)
        comm = comm_stream if comm_stream is not None else torch.cuda.Stream(device=device)
        return cls(device=device, streams={COMPUTE_STREAM: compute, COMM_STREAM: comm})

    def refresh_compute(self) -> None:
        """Follow the caller's current stream (it may differ between calls, e.g. under a context)."""
        if self.is_cuda:
            self.streams[COMPUTE_STREAM] = torch.cuda.current_stream(self.device)
