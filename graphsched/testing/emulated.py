"""An emulated interconnect: one process on one device plays one rank of an N-rank group.

``init_emulated_process_group(virtual_size=8, bandwidth_gbps=25)`` initialises ``torch.distributed``
with graphsched's own backend, ``"graphsched_emulated"``, written in Python
(:class:`EmulatedProcessGroup`, a ``dist.ProcessGroup`` subclass). The group reports
``size() == virtual_size`` and ``rank() == 0``, so a model built on it is the model of one rank of an
N-way expert-parallel group (``MoEGPT`` holds ``num_experts / N`` local experts, its reshapes see N,
DeepSpeed's ``MoE(ep_size=N)`` builds its groups as on a real cluster), and every collective goes
through the same entry points as NCCL's: functional collectives (what ``torch.compile``, inductor's
compute/communication reordering and graphsched capture) and plain ``torch.distributed`` calls (what
DeepSpeed makes).

What a collective does:

* **Data.** The peers are replicas of this rank: every "peer" contributes this rank's own input. An
  all-to-all returns its input (the right shape, and finite values), an all-gather N copies, a SUM
  all-reduce N times the input (MAX/MIN/AVG leave it unchanged). Numerics are not the point: every
  figure taken on this backend is an emulation and must be labelled so.
* **Time.** A rank of an N-way group sends ``wire_bytes`` to its peers: ``(N-1)/N`` of the buffer
  for an all-to-all or reduce-scatter, ``2(N-1)/N`` for a ring all-reduce, ``(N-1)`` shards for an
  all-gather. On CUDA that time, ``wire_bytes / bandwidth + latency``, is spent by the GPU's copy
  engine: on a copy stream of the group's own, ``wire_bytes * copy_bandwidth / bandwidth`` bytes
  are copied device -> pinned host, where ``copy_bandwidth`` is the device-to-host rate measured
  once at start-up. Copy engines run beside the SMs (a matmul loop and a device-to-host copy do not
  slow each other), so the emulated link costs no compute, like a NIC, and the collective completes
  after the right time. ``bandwidth_gbps=math.inf`` moves no byte: the same step with communication
  removed (the compute-only limit).
* **Completion.** Each call returns a ``dist.Work`` wrapping a CUDA-aware future completed on the
  copy stream; ``wait()`` (``wait_tensor`` for a functional collective) makes the caller's current
  stream wait for it, without blocking the host: the semantics of NCCL's asynchronous collectives.

On CPU nothing is timed: the data are copied and the emulated bytes only counted (there is no copy
engine to run beside the compute). Every group keeps :class:`CollectiveStats` (calls, wire bytes,
copied bytes by kind) and can record the calls of a step (:meth:`EmulatedProcessGroup.recording`),
so a benchmark can replay the step's communication alone.

Groups made later with ``dist.new_group`` (DeepSpeed's expert-parallel groups) are emulated groups
too; they share the world group's :class:`EmulatedLink` (one rank has one link: their transfers
queue on the same copy stream) and its bandwidth, unless ``pg_options=EmulationOptions(...)`` says
otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from graphsched.compat import create_work_from_future, default_group, process_group_names
from graphsched.errors import ConfigError, GraphschedError

#: The name the backend is registered under (``dist.init_process_group(backend=BACKEND_NAME)``).
BACKEND_NAME = "graphsched_emulated"

_GB = 1e9
_MIB = 1 << 20


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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class EmulatedLink:
    """The interconnect of the emulated rank: a copy stream per CUDA device and staging buffers.

    ``transfer(nbytes, device)`` queues ``nbytes`` of device -> pinned-host copies on the link's copy
    stream; ``copy_bandwidth_gbps(device)`` measures that rate once (the median over chains of
    back-to-back copies of the staging buffer).
    """

    def __init__(self, staging_mib: int = 64, copy_bandwidth_gbps: float | None = None) -> None:
        self.staging_bytes = staging_mib * _MIB
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
        return chain * self.staging_bytes / times[len(times) // 2] / _GB

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


def _completed_work(value: list[torch.Tensor]) -> Any:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return create_work_from_future(fut)


_SUM_LIKE = ("SUM",)
_UNCHANGED = ("MAX", "MIN", "AVG", "BAND", "BOR")


def _reduce_op_name(op: Any) -> str:
    # ReduceOp objects compare equal to ReduceOp.RedOpType members; their str varies by version.
    for name in ("SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR", "PREMUL_SUM"):
        member = getattr(dist.ReduceOp, name, None)
        if member is not None and op == member:
            return name
    return str(op)


class EmulatedProcessGroup(dist.ProcessGroup):
    """One rank (``rank``) of a group of ``size`` ranks whose peers are emulated; see the module doc."""

    def __init__(
        self,
        rank: int,
        size: int,
        options: EmulationOptions,
        link: EmulatedLink,
        name: str = "",
    ) -> None:
        super().__init__(rank, size)
        self._rank = rank
        self._size = size
        self._options = options
        self._link = link
        self._name = name
        self._stats = CollectiveStats()
        self._recording: list[CollectiveCall] | None = None

    # ---- identity ------------------------------------------------------------------------------

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND_NAME

    @property
    def group_name(self) -> str:
        # Functional collectives resolve a group by name; a Python group must answer it itself.
        if self._name:
            return self._name
        return process_group_names()[self]

    @property
    def options(self) -> EmulationOptions:
        return self._options

    @property
    def link(self) -> EmulatedLink:
        return self._link

    @property
    def stats(self) -> CollectiveStats:
        return self._stats

    def reset_stats(self) -> None:
        self._stats = CollectiveStats()

    def __repr__(self) -> str:
        return (
            f"EmulatedProcessGroup(rank={self._rank}, size={self._size}, "
            f"bandwidth_gbps={self._options.bandwidth_gbps}, name={self._name!r})"
        )

    def copy_scale(self, device: torch.device) -> float:
        """Copied bytes per wire byte: ``copy_bandwidth / bandwidth`` (0 with infinite bandwidth)."""
        if not self._options.moves_bytes:
            return 0.0
        if device.type != "cuda" and self._options.copy_bandwidth_gbps is None:
            return 1.0
        return self._link.copy_bandwidth_gbps(device) / self._options.bandwidth_gbps

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[CollectiveCall]]:
        """Collect every collective issued on this group inside the block, in issue order."""
        calls: list[CollectiveCall] = []
        previous, self._recording = self._recording, calls
        try:
            yield calls
        finally:
            self._recording = previous

    # ---- the emulation -------------------------------------------------------------------------

    def _run(
        self,
        kind: str,
        reference: torch.Tensor,
        outputs: list[torch.Tensor],
        move_data: Any,
        wire: int | None = None,
    ) -> Any:
        """Account, then run ``move_data()`` and the emulated transfer; return a dist.Work."""
        device = reference.device
        in_bytes = _nbytes(reference)
        if wire is None:
            wire = wire_bytes(kind, in_bytes, self._size)
        scale = self.copy_scale(device)
        latency_bytes = 0.0
        if self._options.moves_bytes and self._options.latency_us > 0:
            copy_bw = (
                self._link.copy_bandwidth_gbps(device)
                if device.type == "cuda" or self._options.copy_bandwidth_gbps is not None
                else self._options.bandwidth_gbps
            )
            latency_bytes = self._options.latency_us * 1e-6 * copy_bw * _GB
        emulated = int(round(wire * scale + latency_bytes))
        copied = emulated if device.type == "cuda" else 0
        call = CollectiveCall(
            kind, tuple(reference.shape), reference.dtype, str(device), in_bytes, wire, copied
        )
        self._stats.add(call, emulated)
        if self._recording is not None:
            self._recording.append(call)

        if device.type != "cuda":
            move_data()
            return _completed_work(outputs)

        caller = torch.cuda.current_stream(device)
        stream = self._link.stream(device)
        stream.wait_stream(caller)  # the inputs are written on the caller's stream
        with torch.cuda.stream(stream):
            move_data()
            self._link.transfer(copied, device)
            # Completed on the copy stream: wait() makes the waiter's stream wait for it.
            fut: torch.futures.Future = torch.futures.Future(devices=[device])
            fut.set_result(outputs)
        for t in outputs + [reference]:
            # The caller may free these before the copy stream is done with them.
            t.record_stream(stream)
        return create_work_from_future(fut)

    def _reduce_in_place(self, t: torch.Tensor, op: Any) -> None:
        name = _reduce_op_name(op)
        if name in _SUM_LIKE:
            if t.dtype == torch.bool:
                return
            t.mul_(self._size)
        elif name == "PRODUCT":
            if t.dtype != torch.bool:
                t.pow_(self._size)
        elif name in _UNCHANGED or name == "BXOR":
            if name == "BXOR" and self._size % 2 == 0:
                t.zero_()
        else:
            raise GraphschedError(
                f"the emulated backend does not implement reduce op {name}; use SUM, AVG, MAX, MIN, "
                "PRODUCT or a bitwise op."
            )

    # ---- collectives ---------------------------------------------------------------------------

    def alltoall_base(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: Any = None,
    ) -> Any:
        wire = None
        if input_split_sizes:
            # Uneven splits: the rank keeps its own split and sends the others.
            row = _nbytes(input) // max(1, input.shape[0]) if input.dim() else 0
            own = input_split_sizes[self._rank] if self._rank < len(input_split_sizes) else 0
            wire = _nbytes(input) - own * row

        def move() -> None:
            _fill_from(output, input)

        return self._run("all_to_all", input, [output], move, wire)

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor], opts: Any = None) -> Any:
        ref = input_tensors[0]
        total = sum(_nbytes(t) for t in input_tensors)
        own = _nbytes(input_tensors[self._rank]) if self._rank < len(input_tensors) else 0

        def move() -> None:
            for out, inp in zip(output_tensors, input_tensors):
                _fill_from(out, inp)

        return self._run("all_to_all", ref, list(output_tensors), move, total - own)

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        ref = tensors[0]
        wire = sum(wire_bytes("all_reduce", _nbytes(t), self._size) for t in tensors)

        def move() -> None:
            for t in tensors:
                self._reduce_in_place(t, op)

        return self._run("all_reduce", ref, list(tensors), move, wire)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        return self.allreduce(tensors, opts)

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        def move() -> None:
            output.view(self._size, -1).copy_(input.reshape(1, -1).expand(self._size, -1))

        return self._run("all_gather", input, [output], move)

    def allgather_into_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        wire = sum(wire_bytes("all_gather", _nbytes(t), self._size) for t in inputs)

        def move() -> None:
            for out, inp in zip(outputs, inputs):
                out.view(self._size, -1).copy_(inp.reshape(1, -1).expand(self._size, -1))

        return self._run("all_gather", inputs[0], list(outputs), move, wire)

    def allgather(
        self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor], opts: Any = None
    ) -> Any:
        ref = input_tensors[0]
        flat_out = [t for group in output_tensors for t in group]
        wire = sum(wire_bytes("all_gather", _nbytes(t), self._size) for t in input_tensors)

        def move() -> None:
            for group, inp in zip(output_tensors, input_tensors):
                for out in group:
                    out.copy_(inp)

        return self._run("all_gather", ref, flat_out, move, wire)

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM

        def move() -> None:
            shard = input.reshape(self._size, -1)[self._rank]
            output.view(-1).copy_(shard)
            self._reduce_in_place(output, op)

        return self._run("reduce_scatter", input, [output], move)

    def reduce_scatter_tensor_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        wire = sum(wire_bytes("reduce_scatter", _nbytes(t), self._size) for t in inputs)

        def move() -> None:
            for out, inp in zip(outputs, inputs):
                out.view(-1).copy_(inp.reshape(self._size, -1)[self._rank])
                self._reduce_in_place(out, op)

        return self._run("reduce_scatter", inputs[0], list(outputs), move, wire)

    def reduce_scatter(
        self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]], opts: Any = None
    ) -> Any:
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        ref = output_tensors[0]
        wire = sum(
            wire_bytes("reduce_scatter", sum(_nbytes(t) for t in group), self._size)
            for group in input_tensors
        )

        def move() -> None:
            for out, group in zip(output_tensors, input_tensors):
                out.copy_(group[self._rank])
                self._reduce_in_place(out, op)

        return self._run("reduce_scatter", ref, list(output_tensors), move, wire)

    # Newer torch versions route the plain torch.distributed calls through these names; older ones
    # (and the functional collectives) through the underscored ones above.

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: Any = None,
    ) -> Any:
        return self.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        return self._allgather_base(output, input, opts)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Any:
        return self._reduce_scatter_base(output, input, opts)

    def all_gather_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        return self.allgather_into_tensor_coalesced(outputs, inputs, opts)

    def reduce_scatter_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Any:
        return self.reduce_scatter_tensor_coalesced(outputs, inputs, opts)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        # The root's data is this rank's (every peer is a replica): nothing changes.
        wire = sum(wire_bytes("broadcast", _nbytes(t), self._size) for t in tensors)
        return self._run("broadcast", tensors[0], list(tensors), lambda: None, wire)

    def barrier(self, opts: Any = None) -> Any:
        # Every transfer queued so far has arrived once the barrier returns.
        self._link.synchronize()
        self._stats.calls["barrier"] = self._stats.calls.get("barrier", 0) + 1
        return _completed_work([])


def _fill_from(output: torch.Tensor, input: torch.Tensor) -> None:
    """Copy ``input`` into ``output`` (same shape), or its flat bytes as far as they go (uneven)."""
    if output.shape == input.shape:
        output.copy_(input)
        return
    out, inp = output.reshape(-1), input.reshape(-1)
    if inp.numel() == 0:
        out.zero_()
        return
    done = 0
    while done < out.numel():
        n = min(inp.numel(), out.numel() - done)
        out[done:done + n].copy_(inp[:n])
        done += n


# ---- registration and set-up -------------------------------------------------------------------


def _create_group(common: Any, backend_options: Any) -> EmulatedProcessGroup:
    """The backend's creator (torch's extended API): called by init_process_group and new_group."""
    parent: EmulatedProcessGroup | None = None
    if dist.is_initialized():
        default = default_group()
        if isinstance(default, EmulatedProcessGroup):
            parent = default
    if backend_options is None:
        if parent is None:
            options = EmulationOptions()
        else:
            options = parent.options
    elif isinstance(backend_options, EmulationOptions):
        options = backend_options
    else:
        raise ConfigError(
            f"the {BACKEND_NAME} backend takes pg_options=EmulationOptions(...), got "
            f"{type(backend_options).__name__}."
        )
    if parent is not None and options.staging_mib == parent.options.staging_mib and (
        options.copy_bandwidth_gbps in (None, parent.options.copy_bandwidth_gbps)
    ):
        link = parent.link  # one rank, one link: subgroups queue on the same copy stream
    else:
        link = EmulatedLink(options.staging_mib, options.copy_bandwidth_gbps)
    name = str(getattr(common, "group_id", "") or "")
    return EmulatedProcessGroup(common.group_rank, common.group_size, options, link, name)


def register_backend() -> None:
    """Register ``"graphsched_emulated"`` with torch.distributed (once per process; idempotent)."""
    if BACKEND_NAME.upper() in getattr(dist.Backend, "_plugins", {}) or hasattr(
        dist.Backend, BACKEND_NAME.upper()
    ):
        return
    dist.Backend.register_backend(
        BACKEND_NAME, _create_group, extended_api=True, devices=["cuda", "cpu"]
    )


def init_emulated_process_group(
    virtual_size: int,
    bandwidth_gbps: float = 25.0,
    *,
    latency_us: float = 0.0,
    copy_bandwidth_gbps: float | None = None,
    staging_mib: int = 64,
    device: torch.device | str | None = None,
    timeout: timedelta | None = None,
) -> EmulatedProcessGroup:
    """Initialise torch.distributed as rank 0 of an emulated group of ``virtual_size`` ranks.

    Returns the world group. With a CUDA ``device`` the copy bandwidth is measured now (not inside
    the first timed step). Call ``dist.destroy_process_group()`` to tear it down.
    """
    if not isinstance(virtual_size, int) or isinstance(virtual_size, bool) or virtual_size < 1:
        raise ConfigError(
            f"virtual_size={virtual_size!r} must be an integer >= 1 (the expert-parallel group size "
            "to emulate, e.g. 8)."
        )
    if dist.is_initialized():
        raise GraphschedError(
            "torch.distributed is already initialised; call dist.destroy_process_group() before "
            "init_emulated_process_group (the emulated group must be the world group)."
        )
    options = EmulationOptions(bandwidth_gbps, latency_us, copy_bandwidth_gbps, staging_mib)
    register_backend()
    kwargs: dict[str, Any] = {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    dist.init_process_group(
        backend=BACKEND_NAME,
        store=dist.HashStore(),
        rank=0,
        world_size=virtual_size,
        pg_options=options,
        **kwargs,
    )
    group = default_group()
    if not isinstance(group, EmulatedProcessGroup):
        raise GraphschedError(
            f"torch.distributed made a {type(group).__name__} instead of an EmulatedProcessGroup; "
            "this torch version does not hand Python process groups through; use torch 2.11+."
        )
    if device is not None and torch.device(device).type == "cuda":
        group.link.copy_bandwidth_gbps(torch.device(device))
    return group


def new_emulated_group(
    bandwidth_gbps: float | None = None, **changes: Any
) -> EmulatedProcessGroup:
    """A second group over all ranks of the emulated world with other options (same link).

    ``new_emulated_group(math.inf)`` is the compute-only twin of the world group: same size, same
    data movement, no time on the wire.
    """
    world = default_group()
    if not isinstance(world, EmulatedProcessGroup):
        raise GraphschedError(
            "new_emulated_group needs the emulated world group; call init_emulated_process_group "
            "first."
        )
    if bandwidth_gbps is not None:
        changes["bandwidth_gbps"] = bandwidth_gbps
    options = dataclasses.replace(world.options, **changes)
    group = dist.new_group(list(range(world.size())), pg_options=options)
    if not isinstance(group, EmulatedProcessGroup):
        raise GraphschedError(f"dist.new_group made a {type(group).__name__}, not an emulated group.")
    return group


__all__ = [
    "BACKEND_NAME",
    "CollectiveCall",
    "CollectiveStats",
    "EmulatedLink",
    "EmulatedProcessGroup",
    "EmulationOptions",
    "init_emulated_process_group",
    "new_emulated_group",
    "register_backend",
    "wire_bytes",
]
