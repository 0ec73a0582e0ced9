"""Choose where a wrapped model's node costs come from (``GraphschedConfig.cost_model``).

``analytic``: FLOPs and bytes against the device's peak rates, collectives from the device spec's
interconnect numbers. ``measured``: every compute node timed on the device with its real shapes
(cached on disk, so a second run measures nothing), collectives from a microbenchmark of the process
group run once, the first time a graph with a collective is analysed (every rank analyses the same
graphs in the same order, so the benchmark's collectives line up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.fx as fx

from graphsched.analysis.commmodel import CommModel, benchmark_collectives
from graphsched.analysis.costmodel import (
    CostModel,
    DeviceSpec,
    analytic_cost,
    collective_bytes,
    collective_kind,
    is_collective_node,
    is_compute_node,
)
from graphsched.analysis.profiler import NodeProfiler, is_profilable

log = logging.getLogger("graphsched.analysis")

CostFn = Callable[[fx.Node], float]


def resolve_mode(mode: str, device: torch.device) -> str:
    if mode == "auto":
        return "measured" if device.type == "cuda" else "analytic"
    return mode


@dataclass
class MeasuredCosts:
    """A cost function that profiles compute nodes and benchmarks collectives on first use."""

    device: torch.device
    cache_dir: str | None = None
    spec: DeviceSpec = field(init=False)
    _profiler: NodeProfiler | None = field(default=None, init=False)
    _comm: CommModel | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.spec = DeviceSpec.detect(self.device)

    def comm_model(self) -> CommModel:
        if self._comm is None:
            if dist.is_available() and dist.is_initialized():
                log.info("benchmarking the process group's collectives for the cost model")
                self._comm = benchmark_collectives()
            else:
                self._comm = CostModel(self.spec).comm_model()
        return self._comm

    def __call__(self, node: fx.Node) -> float:
        if is_collective_node(node):
            return self.comm_model().time(collective_kind(node), collective_bytes(node))
        if not is_compute_node(node):
            return 0.0
        if is_profilable(node):
            if self._profiler is None:
                self._profiler = NodeProfiler(self.device, cache_dir=self.cache_dir)
            try:
                return self._profiler.measure(node)
            except Exception as exc:  # noqa: BLE001 - an op that cannot run alone is estimated
                log.debug("cannot time %s (%s); using the analytic estimate", node.name, exc)
        return analytic_cost(node, self.spec)


def make_cost_fn(mode: str, device: torch.device, cache_dir: str | None = None) -> CostFn:
    mode = resolve_mode(mode, device)
    if mode == "analytic":
        return CostModel(DeviceSpec.detect(device)).node_cost
    if mode == "measured":
        return MeasuredCosts(device, cache_dir)
    raise ValueError(f"unknown cost model {mode!r}")
