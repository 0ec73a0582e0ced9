"""The emulated process group: one rank of an N-rank group whose peers are replicas of it.

Every collective accounts its bytes (``link.py``), moves the data as the package doc says and, on
CUDA, spends the emulated time on the link's copy stream before its ``dist.Work`` completes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from graphsched.compat import create_work_from_future, process_group_names
from graphsched.errors import GraphschedError
from graphsched.testing.emulated.link import (
    GB,
    CollectiveCall,
    CollectiveStats,
    EmulatedLink,
    EmulationOptions,
    nbytes,
    wire_bytes,
)

#: The name the backend is registered under (``dist.init_process_group(backend=BACKEND_NAME)``).
BACKEND_NAME = "graphsched_emulated"


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

    def times_collectives(self, device: torch.device) -> bool:
        """Whether a collective on ``device`` takes the link's time: on CUDA only (on the host the
        data are copied and the bytes counted, nothing waits). graphsched's cost measurement asks
        this before timing a group (``graphsched.analysis.collective_calls.times_collectives``)."""
        return device.type == "cuda"

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
        in_bytes = nbytes(reference)
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
            latency_bytes = self._options.latency_us * 1e-6 * copy_bw * GB
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
            row = nbytes(input) // max(1, input.shape[0]) if input.dim() else 0
            own = input_split_sizes[self._rank] if self._rank < len(input_split_sizes) else 0
            wire = nbytes(input) - own * row

        def move() -> None:
            _fill_from(output, input)

        return self._run("all_to_all", input, [output], move, wire)

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor], opts: Any = None) -> Any:
        ref = input_tensors[0]
        total = sum(nbytes(t) for t in input_tensors)
        own = nbytes(input_tensors[self._rank]) if self._rank < len(input_tensors) else 0

        def move() -> None:
            for out, inp in zip(output_tensors, input_tensors):
                _fill_from(out, inp)

        return self._run("all_to_all", ref, list(output_tensors), move, total - own)

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Any:
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        ref = tensors[0]
        wire = sum(wire_bytes("all_reduce", nbytes(t), self._size) for t in tensors)

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
        wire = sum(wire_bytes("all_gather", nbytes(t), self._size) for t in inputs)

        def move() -> None:
            for out, inp in zip(outputs, inputs):
                out.view(self._size, -1).copy_(inp.reshape(1, -1).expand(self._size, -1))

        return self._run("all_gather", inputs[0], list(outputs), move, wire)

    def allgather(
        self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor], opts: Any = None
    ) -> Any:
        ref = input_tensors[0]
        flat_out = [t for group in output_tensors for t in group]
        wire = sum(wire_bytes("all_gather", nbytes(t), self._size) for t in input_tensors)

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
        wire = sum(wire_bytes("reduce_scatter", nbytes(t), self._size) for t in inputs)

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
            wire_bytes("reduce_scatter", sum(nbytes(t) for t in group), self._size)
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
        wire = sum(wire_bytes("broadcast", nbytes(t), self._size) for t in tensors)
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
