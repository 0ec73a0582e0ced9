"""What a region's nodes cost at chunk shapes: roofline prices on meta tensors, or device timings.

``default_coster`` picks one from the config: measured when ``wrap`` measured the link
(``cost_model="measured"``), analytic otherwise. No collective runs here: costers are called while
compiling.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils import flop_counter

from graphsched.analysis.commmodel import CommModel
from graphsched.analysis.costmodel import DeviceSpec, flat_tensors, footprint_bytes
from graphsched.compat import TorchDispatchMode
from graphsched.config import GraphschedConfig
from graphsched.partition.split_specs import ChunkCall, run_call


class RegionCoster(Protocol):
    spec: DeviceSpec

    def compute(self, call: ChunkCall) -> float: ...

    def comm(self, nbytes: int) -> float: ...


_NOT_KERNELS = {torch.ops.aten._unsafe_view, torch.ops.aten.alias, torch.ops.aten.detach, torch.ops.aten.lift_fresh}


class _Roofline(TorchDispatchMode):
    """Prices every aten kernel run under it: ``launch + max(flops / peak, bytes / bandwidth)``."""

    def __init__(self, spec: DeviceSpec) -> None:
        super().__init__()
        self.spec = spec
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.overloadpacket in _NOT_KERNELS:
            return out
        formula = flop_counter.flop_registry.get(func.overloadpacket)
        flops = 0.0
        if formula is not None:
            try:
                flops = float(formula(*args, **kwargs, out_val=out))
            except Exception:  # noqa: BLE001 - no flop count: memory traffic only
                flops = 0.0
        ins = flat_tensors((args, kwargs))
        nbytes = sum(footprint_bytes(t) for t in ins) + sum(footprint_bytes(t) for t in flat_tensors(out))
        dtype = next((t.dtype for t in ins if t.dtype.is_floating_point), None)
        self.seconds += self.spec.launch_overhead_s + max(
            flops / self.spec.flops_for(dtype), nbytes / self.spec.memory_bandwidth
        )
        return out


@dataclass
class AnalyticCoster:
    """Roofline prices of the aten kernels a torch-level call runs (on meta tensors)."""

    spec: DeviceSpec
    comm_model: CommModel

    def compute(self, call: ChunkCall) -> float:
        mode = _Roofline(self.spec)
        try:
            with mode:
                run_call(call)
        except Exception:  # noqa: BLE001 - an op without meta kernels: price its traffic only
            nbytes = sum(footprint_bytes(t) for t in flat_tensors((call.args, call.kwargs)))
            return self.spec.launch_overhead_s + 2 * nbytes / self.spec.memory_bandwidth
        return mode.seconds

    def comm(self, nbytes: int) -> float:
        return self.comm_model.time("all_to_all", nbytes)


def _materialise(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point:
            return torch.randn(tuple(x.shape), dtype=x.dtype, device=device)
        return torch.zeros(tuple(x.shape), dtype=x.dtype, device=device)
    if isinstance(x, (list, tuple)):
        return type(x)(_materialise(a, device) for a in x)
    if isinstance(x, dict):
        return {k: _materialise(v, device) for k, v in x.items()}
    return x


@dataclass
class MeasuredCoster(AnalyticCoster):
    """Times each call on the device (median of ``repeats`` after a warm-up), cached per shape."""

    device: torch.device = torch.device("cpu")
    repeats: int = 5
    _cache: dict[str, float] = field(default_factory=dict)

    def compute(self, call: ChunkCall) -> float:
        key = repr((call.op, call.target, [(tuple(t.shape), t.dtype) for t in flat_tensors(call.args)], call.kwargs))
        if key not in self._cache:
            try:
                real = ChunkCall(call.op, call.target, _materialise(call.args, self.device),
                                 _materialise(call.kwargs, self.device))
                self._cache[key] = self._time(real)
            except Exception:  # noqa: BLE001 - an op that cannot run alone is estimated
                self._cache[key] = super().compute(call)
        return self._cache[key]

    def _time(self, call: ChunkCall) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        run_call(call)
        samples = []
        for _ in range(self.repeats):
            sync()
            t0 = time.perf_counter()
            run_call(call)
            sync()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)


def default_coster(config: GraphschedConfig, device: torch.device, comm: Any = None) -> RegionCoster:
    """Measured chunk costs when ``comm`` (the measured CommModel ``wrap`` made) is given, else
    analytic ones. No collective runs here: this is called while compiling."""
    from graphsched.analysis.cost_source import resolve_mode
    from graphsched.analysis.costmodel import CostModel

    spec = DeviceSpec.detect(device)
    if comm is not None and resolve_mode(config.cost_model, device) == "measured":
        return MeasuredCoster(spec, comm, device)
    return AnalyticCoster(spec, CostModel(spec).comm_model())
