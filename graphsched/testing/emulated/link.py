"""The emulated link: options, wire bytes per collective, the copy engine that spends the time.

``wire_bytes`` says what one rank of an N-rank group sends for a collective; ``EmulatedLink`` is
the copy stream and staging buffers that spend that time on a CUDA device, and measures the
device-to-host copy rate the emulation scales against (its calibration); ``CollectiveStats``
counts what went over it. See the package doc (``graphsched.testing.emulated``).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from graphsched.errors import ConfigError, GraphschedError

GB = 1e9
MIB = 1 << 20


@dataclass(frozen=True)
class EmulationOptions:
    """How an emulated group behaves; pass as ``pg_options`` to ``init_process_group``/``new_group``.

    ``bandwidth_gbps``: bytes this rank sends to its peers per second, in GB/s (1e9 bytes), e.g. 25
    for a PCIe-class link, 12.5 for 100 Gb/s; ``math.inf`` moves nothing (compute-only).
    ``latency_us``: fixed cost of each collective (0 by default). ``copy_bandwidth_gbps``: the
    device-to-host copy rate the emulation scales against; None measures it once on the first CUDA
    device used (on CPU, None means no scaling: copied bytes = wire bytes).
    ``staging_mib``: size of the device and pinned host buffers the copies cycle through.
    """

    bandwidth_gbps: float = 25.0
    latency_us: float = 0.0
    copy_bandwidth_gbps: float | None = None
    staging_mib: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.bandwidth_gbps, (int, float)) or not self.bandwidth_gbps > 0:
            raise ConfigError(
                f"bandwidth_gbps={self.bandwidth_gbps!r} must be a number > 0 (GB/s, e.g. 25 for "
                "PCIe-class, 12.5 for 100 Gb/s; math.inf for no communication time)."
            )
        if not isinstance(self.latency_us, (int, float)) or not self.latency_us >= 0:
            raise ConfigError(
                f"latency_us={self.latency_us!r} must be a number >= 0 (microseconds, e.g. 0 or 20)."
            )
        if self.copy_bandwidth_gbps is not None and not (
            isinstance(self.copy_bandwidth_gbps, (int, float))
            and 0 < self.copy_bandwidth_gbps < math.inf
        ):
            raise ConfigError(
                f"copy_bandwidth_gbps={self.copy_bandwidth_gbps!r} must be a finite number > 0 "
                "(GB/s) or None to measure it."
            )
        if not isinstance(self.staging_mib, int) or not 1 <= self.staging_mib <= 4096:
            raise ConfigError(
                f"staging_mib={self.staging_mib!r} must be an integer in 1..4096 (64 is a good size)."
            )

    @property
    def moves_bytes(self) -> bool:
        return math.isfinite(self.bandwidth_gbps)


@dataclass(frozen=True)
class CollectiveCall:
    """One collective as a rank issued it: enough to replay it on buffers of the same shape."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    #: bytes of the input buffer handed to the collective (the per-rank shard for an all-gather)
    input_bytes: int
    #: bytes a rank of the N-rank group would send to its peers
    wire_bytes: int
    #: bytes the copy engine moved to emulate them (0 on CPU or with infinite bandwidth)
    copied_bytes: int


@dataclass
class CollectiveStats:
    """Totals over a group's life (or since :meth:`EmulatedProcessGroup.reset_stats`)."""

    calls: dict[str, int] = field(default_factory=dict)
    input_bytes: dict[str, int] = field(default_factory=dict)
    wire_bytes: dict[str, int] = field(default_factory=dict)
    #: bytes that a copy engine really moved (CUDA only)
    copied_bytes: int = 0
    #: bytes the emulation stands for at the copy rate (also counted on CPU, where nothing is copied)
    emulated_bytes: int = 0

    def add(self, call: CollectiveCall, emulated: int) -> None:
        self.calls[call.kind] = self.calls.get(call.kind, 0) + 1
        self.input_bytes[call.kind] = self.input_bytes.get(call.kind, 0) + call.input_bytes
        self.wire_bytes[call.kind] = self.wire_bytes.get(call.kind, 0) + call.wire_bytes
        self.copied_bytes += call.copied_bytes
        self.emulated_bytes += emulated

    @property
    def total_wire_bytes(self) -> int:
        return sum(self.wire_bytes.values())


def wire_bytes(kind: str, input_bytes: int, group_size: int) -> int:
    """Bytes one rank sends to its peers in a ``kind`` collective of ``input_bytes`` per rank.

    Pairwise all-to-all and ring algorithms (what NCCL uses on a flat network): all-to-all and
    reduce-scatter ``(N-1)/N`` of the input, all-reduce ``2(N-1)/N``, all-gather ``N-1`` shards,
    broadcast the whole buffer (pipelined), barrier nothing.
    """
    n = group_size
    if n <= 1 or input_bytes <= 0:
        return 0
    if kind in ("all_to_all", "reduce_scatter"):
        return input_bytes * (n - 1) // n
    if kind == "all_reduce":
        return 2 * input_bytes * (n - 1) // n
    if kind == "all_gather":
        return input_bytes * (n - 1)
    if kind == "broadcast":
        return input_bytes
    if kind == "barrier":
        return 0
    raise ConfigError(
        f"no wire-byte rule for collective kind {kind!r}; use one of all_to_all, reduce_scatter, "
        "all_reduce, all_gather, broadcast, barrier."
    )


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class EmulatedLink:
    """The interconnect of the emulated rank: a copy stream per CUDA device and staging buffers.

    ``transfer(nbytes, device)`` queues ``nbytes`` of device -> pinned-host copies on the link's copy
    stream; ``copy_bandwidth_gbps(device)`` measures that rate once (the median over chains of
    back-to-back copies of the staging buffer).
    """

    def __init__(self, staging_mib: int = 64, copy_bandwidth_gbps: float | None = None) -> None:
        self.staging_bytes = staging_mib * MIB
        self._fixed_copy_bandwidth = copy_bandwidth_gbps
        self._measured: dict[int, float] = {}
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._device_buf: dict[int, torch.Tensor] = {}
        self._host_buf: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def stream(self, device: torch.device) -> "torch.cuda.Stream":
        index = _device_index(device)
        with self._lock:
            if index not in self._streams:
                self._streams[index] = torch.cuda.Stream(device=index)
            return self._streams[index]

    def _buffers(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if index not in self._device_buf:
                # Filled with a pattern (not zeros): copy speed must not depend on the content.
                dev = torch.randint(0, 256, (self.staging_bytes,), dtype=torch.uint8, device=index)
                self._device_buf[index] = dev
                self._host_buf[index] = torch.empty(
                    self.staging_bytes, dtype=torch.uint8, pin_memory=True
                )
            return self._device_buf[index], self._host_buf[index]

    def copy_bandwidth_gbps(self, device: torch.device | None = None) -> float:
        """Device-to-pinned-host copy rate in GB/s (given, or measured once per device)."""
        if self._fixed_copy_bandwidth is not None:
            return float(self._fixed_copy_bandwidth)
        if device is None or device.type != "cuda":
            raise GraphschedError(
                "the copy bandwidth is measured on a CUDA device; pass copy_bandwidth_gbps in "
                "EmulationOptions on a machine without one."
            )
        index = _device_index(device)
        if index not in self._measured:
            self._measured[index] = self._measure(index)
        return self._measured[index]

    def _measure(self, index: int, repeats: int = 7, chain: int = 4) -> float:
        # Chains of back-to-back copies, as a long collective issues them: the sustained rate
        # (a single copy's figure runs a few percent under it).
        dev, host = self._buffers(index)
        stream = self.stream(torch.device("cuda", index))
        torch.cuda.synchronize(index)
        times = []
        with torch.cuda.stream(stream):
            for i in range(repeats + 1):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                for _ in range(chain):
                    host.copy_(dev, non_blocking=True)
                end.record(stream)
                end.synchronize()
                if i >= 1:  # the first chain warms up the path
                    times.append(start.elapsed_time(end) / 1e3)
        times.sort()
        return chain * self.staging_bytes / times[len(times) // 2] / GB

    def transfer(self, nbytes: int, device: torch.device) -> int:
        """Queue ``nbytes`` of device -> host copies on the current stream (the link's copy stream)."""
        if nbytes <= 0:
            return 0
        dev, host = self._buffers(_device_index(device))
        left = nbytes
        while left > 0:
            n = min(left, self.staging_bytes)
            host[:n].copy_(dev[:n], non_blocking=True)
            left -= n
        return nbytes

    def synchronize(self) -> None:
        for stream in list(self._streams.values()):
            stream.synchronize()


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
