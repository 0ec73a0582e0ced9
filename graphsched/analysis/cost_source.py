"""Choose where a wrapped model's node costs come from (``GraphschedConfig.cost_model``).

``analytic``: FLOPs and bytes against the device's peak rates, collectives from the device spec's
interconnect numbers. ``measured``: every compute node timed on the device with its real shapes
(cached on disk, so a second run measures nothing); collectives priced by the process group itself,
on the device buffers its collectives use:

* in ``wrap`` (:func:`measure_comm_model`), a sweep of doubling sizes on the world group, fitted to
  ``alpha + beta * bytes`` per kind, and on CUDA the contention factor (how much a collective in
  flight slows compute, ``contention.py``), agreed across ranks;
* before each graph is costed (:meth:`MeasuredCosts.prepare`), the graph's own collectives at their
  sizes, dtypes and groups (``graph_collectives.py``, which says how the ranks stay matched while
  compiling); the fit prices what is not timed there.

A group whose collectives take no link time on their device (the emulated link on the host) is not
timed at all: its collectives are priced by the analytic model, and a log line says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.fx as fx

from graphsched.analysis.collective_calls import group_backend, group_device, times_collectives
from graphsched.analysis.commmodel import CommModel, benchmark_collectives
from graphsched.analysis.costmodel import (
    CostModel,
    DeviceSpec,
    analytic_cost,
    collective_bytes,
    collective_kind,
    is_collective_node,
    is_compute_node,
    fused_node_bytes,
    node_flops,
)
from graphsched.analysis.graph import CostFn
from graphsched.analysis.graph_collectives import CollectiveKey, collective_key, measure_graph_collectives
from graphsched.analysis.profiler import NodeProfiler, is_profilable
from graphsched.analysis.provenance import CostSource

log = logging.getLogger("graphsched.analysis")


def resolve_mode(mode: str, device: torch.device) -> str:
    if mode == "auto":
        return "measured" if device.type == "cuda" else "analytic"
    return mode


def analytic_comm_model(device: torch.device) -> CommModel:
    """The device spec's interconnect numbers for the world's size (no measurement)."""
    spec = DeviceSpec.detect(device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 2
    return CommModel.analytic(spec.interconnect_bandwidth, spec.interconnect_latency_s, world)


def measure_comm_model(mode: str, device: torch.device) -> CommModel | None:
    """The measured communication model for ``mode`` (None when costs are analytic).

    ``device``: the model's. Call it where every rank runs the same code in the same order
    (``wrap``), not while compiling.
    """
    if resolve_mode(mode, device) != "measured":
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return analytic_comm_model(device)
    bench = group_device(None, device)
    backend = group_backend(None)
    if not times_collectives(None, bench):
        model = analytic_comm_model(device)
        ab = model.per_kind["all_to_all"]
        log.info(
            "the process group (%s) takes no link time on %s, so its collectives are not timed; "
            "they are priced by the analytic model (%.3g GB/s, %.0f us per collective)",
            backend, bench, ab.bandwidth_bytes_s / 1e9, ab.alpha_s * 1e6,
        )
        return model
    log.info("benchmarking the process group's collectives (%s, buffers on %s) for the cost "
             "model", backend, bench)
    return benchmark_collectives(device=device)


@dataclass
class MeasuredCosts:
    """A cost function that profiles compute nodes and prices collectives as the graph runs them.

    Collectives: the time :meth:`prepare` measured for the graph's own collective, else ``comm``'s
    fit. ``contention`` (``comm``'s) goes with the costs to the scheduler.

    ``fused``: the graph runs as inductor's code. Its matmul-class nodes (those with a FLOP count:
    mm, bmm, addmm, convolutions, attention) run as the same library kernels as in eager and are
    timed alone; every other node becomes part of a fused Triton kernel, so timing it alone (a
    launch and a round trip through memory per aten op) prices what does not run. Those are
    priced by the bytes that cross their fused kernel's edge (:func:`fused_node_bytes`) at the
    device's memory bandwidth, with no launch overhead.
    Measured on an H200 (gpu-smoke): eager-style costs made a backward look twice as long as
    inductor's, so the planner saw no idle time in the all-to-all windows and left the
    weight-gradient matmuls at the end.
    """

    device: torch.device
    comm: CommModel
    cache_dir: str | None = None
    fused: bool = False
    spec: DeviceSpec = field(init=False)
    _profiler: NodeProfiler | None = field(default=None, init=False)
    _flops: dict[fx.Node, float] = field(default_factory=dict, init=False)
    #: The graphs' own collectives timed so far (agreed across ranks).
    _collectives: dict[CollectiveKey, float] = field(default_factory=dict, init=False)
    #: What each priced node's number is (read by the analysis through ``cost_source``).
    _sources: dict[fx.Node, CostSource] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.spec = DeviceSpec.detect(self.device)

    @property
    def contention(self) -> float:
        """The scheduler's contention factor (``CommModel.contention``)."""
        return self.comm.contention

    @property
    def timed_collectives(self) -> dict[CollectiveKey, float]:
        """Seconds of every graph collective timed so far, by (group, kind, bytes, dtype, device)."""
        return dict(self._collectives)

    def prepare(self, gm: fx.GraphModule) -> None:
        """Time ``gm``'s collectives at their own sizes (``analyse_graph`` calls this first)."""
        if dist.is_available() and dist.is_initialized():
            self._collectives.update(measure_graph_collectives(gm, self._collectives))

    def __call__(self, node: fx.Node) -> float:
        # Collectives come from the process group's microbenchmark (or a fit of the link).
        source = CostSource.MEASURED_ALONE if is_collective_node(node) else CostSource.ESTIMATED
        self._sources[node] = source
        if is_collective_node(node):
            timed = self._collectives.get(collective_key(node))  # type: ignore[arg-type]
            if timed is not None:
                return timed
            return self.comm.time(collective_kind(node), collective_bytes(node))
        if not is_compute_node(node):
            return 0.0
        if self.fused and not self._library_kernel(node):
            return fused_node_bytes(node, self._fusable) / self.spec.memory_bandwidth
        if is_profilable(node):
            if self._profiler is None:
                self._profiler = NodeProfiler(self.device, cache_dir=self.cache_dir)
            try:
                cost = self._profiler.measure(node)
                self._sources[node] = CostSource.MEASURED_ALONE
                return cost
            except Exception as exc:  # noqa: BLE001 - an op that cannot run alone is estimated
                log.debug("cannot time %s (%s); using the analytic estimate", node.name, exc)
        return analytic_cost(node, self.spec)

    def cost_source(self, node: fx.Node) -> CostSource:
        """Where the number the last call gave for ``node`` came from."""
        return self._sources.get(node, CostSource.ESTIMATED)


    def _library_kernel(self, node: fx.Node) -> bool:
        """A matmul-class node (it has a FLOP count): a library kernel, also under inductor."""
        if node not in self._flops:
            self._flops[node] = node_flops(node)
        return self._flops[node] > 0

    def _fusable(self, node: fx.Node) -> bool:
        return is_compute_node(node) and not self._library_kernel(node)


def make_cost_fn(
    mode: str, device: torch.device, comm: CommModel | None, cache_dir: str | None = None,
    fused: bool = False,
) -> CostFn:
    """Node costs for ``mode``; ``comm`` is :func:`measure_comm_model`'s result for it; ``fused``:
    the graphs run as inductor's fused kernels (see :class:`MeasuredCosts`)."""
    mode = resolve_mode(mode, device)
    if mode == "analytic":
        return CostModel(DeviceSpec.detect(device)).node_cost
    if mode == "measured":
        assert comm is not None, "measured costs need measure_comm_model's result"
        return MeasuredCosts(device, comm, cache_dir, fused=fused)
    raise ValueError(f"unknown cost model {mode!r}")
