"""Cost of one node of an aten-level FX graph: analytic (roofline) or measured, plus communication.

Nodes come from AOTAutograd: ``node.target`` is an ``OpOverload`` and ``node.meta["val"]`` holds
the fake tensor(s) the node produces. From those shapes:

- ``node_flops``: torch's own flop formulas (``torch.utils.flop_counter``'s registry);
- ``node_bytes``: bytes read by the inputs plus bytes written by the outputs (0 for views);
- ``analytic_cost``: ``launch + max(flops / peak, bytes / bandwidth)`` seconds on a ``DeviceSpec``;
- ``collective_kind`` / ``collective_bytes``: what a functional collective moves, for ``CommModel``.

``CostModel`` bundles a device spec, measured node times (see ``NodeProfiler``) and a communication
model, and is plain JSON so a plan can record the numbers it was chosen from.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch.utils import flop_counter

from graphsched.analysis.commmodel import CommModel
from graphsched.errors import ConfigError, GraphschedError

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# Device description


def _dtype_key(dtype: torch.dtype | str | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "default"


@dataclass
class DeviceSpec:
    """Peak numbers of one accelerator (or CPU) for the roofline estimate.

    ``peak_flops`` is one number or a dict keyed by dtype name (``"bfloat16"``, ``"float32"``, ...)
    with an optional ``"default"`` entry for dtypes not listed.
    """

    name: str
    peak_flops: float | dict[str, float]
    #: bytes per second
    memory_bandwidth: float
    #: per-node fixed cost: kernel launch plus the interpreter's dispatch
    launch_overhead_s: float
    #: link used by collectives when no measured CommModel is given (bytes per second)
    interconnect_bandwidth: float = 25e9
    interconnect_latency_s: float = 20e-6

    def __post_init__(self) -> None:
        peaks = self.peak_flops.values() if isinstance(self.peak_flops, dict) else [self.peak_flops]
        if not peaks or any(not (p > 0) for p in peaks):
            raise ConfigError(
                f"DeviceSpec {self.name!r}: peak_flops must be positive (got {self.peak_flops!r})."
            )
        if not (self.memory_bandwidth > 0) or not (self.interconnect_bandwidth > 0):
            raise ConfigError(
                f"DeviceSpec {self.name!r}: memory_bandwidth and interconnect_bandwidth must be "
                "positive bytes per second."
            )
        if not (self.launch_overhead_s >= 0) or not (self.interconnect_latency_s >= 0):
            raise ConfigError(
                f"DeviceSpec {self.name!r}: launch_overhead_s and interconnect_latency_s must be "
                ">= 0 seconds."
            )

    def flops_for(self, dtype: torch.dtype | str | None) -> float:
        """Peak flop/s for arithmetic in ``dtype``."""
        if not isinstance(self.peak_flops, dict):
            return float(self.peak_flops)
        key = _dtype_key(dtype)
        if key in self.peak_flops:
            return float(self.peak_flops[key])
        if "default" in self.peak_flops:
            return float(self.peak_flops["default"])
        # Unknown dtype and no default: assume the slowest listed path rather than the fastest.
        return float(min(self.peak_flops.values()))

    @classmethod
    def cpu(cls, num_threads: int | None = None) -> "DeviceSpec":
        """A rough x86 CPU: about 50 GFLOP/s fp32 per thread, 20 GB/s memory, gloo on loopback."""
        threads = num_threads if num_threads is not None else torch.get_num_threads()
        return cls(
            name=f"cpu-{threads}t",
            peak_flops={"default": 50e9 * threads},
            memory_bandwidth=20e9,
            launch_overhead_s=10e-6,
            interconnect_bandwidth=2e9,
            interconnect_latency_s=50e-6,
        )

    @classmethod
    def h100(cls) -> "DeviceSpec":
        """NVIDIA H100 SXM (dense tensor-core peaks; fp32 without TF32), NVLink 4."""
        return cls(
            name="h100",
            peak_flops={
                "float64": 67e12,
                "float32": 67e12,
                "tfloat32": 494.7e12,
                "bfloat16": 989.4e12,
                "float16": 989.4e12,
                "float8_e4m3fn": 1978.9e12,
                "float8_e5m2": 1978.9e12,
                "default": 67e12,
            },
            memory_bandwidth=3.35e12,
            launch_overhead_s=5e-6,
            # An 8-GPU all-to-all moved 294 MB in 0.65 ms: about 450 GB/s per direction.
            interconnect_bandwidth=450e9,
            interconnect_latency_s=15e-6,
        )

    @classmethod
    def h200(cls) -> "DeviceSpec":
        """NVIDIA H200 SXM: the H100's compute with 4.8 TB/s HBM3e."""
        return dataclasses.replace(cls.h100(), name="h200", memory_bandwidth=4.8e12)

    @classmethod
    def detect(cls, device: torch.device | str | None = None) -> "DeviceSpec":
        """The spec of ``device`` (default: the current CUDA device if any, else the CPU)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cpu":
            return cls.cpu()
        if device.type != "cuda":
            raise ConfigError(
                f"DeviceSpec.detect does not know device type {device.type!r}; build a "
                "DeviceSpec(name, peak_flops, memory_bandwidth, launch_overhead_s) by hand."
            )
        name = torch.cuda.get_device_name(device)
        upper = name.upper()
        if "H200" in upper:
            return dataclasses.replace(cls.h200(), name=name)
        if "H100" in upper:
            spec = dataclasses.replace(cls.h100(), name=name)
            if "PCIE" in upper:
                # PCIe card: lower clocks (756 vs 989 TFLOP/s bf16), HBM2e, no NVLink switch.
                scale = 756.0 / 989.4
                assert isinstance(spec.peak_flops, dict)
                spec = dataclasses.replace(
                    spec,
                    peak_flops={k: v * scale for k, v in spec.peak_flops.items()},
                    memory_bandwidth=2.0e12,
                    interconnect_bandwidth=25e9,
                )
            return spec
        warnings.warn(
            f"no preset for GPU {name!r}: using rough numbers (100 TFLOP/s, 1 TB/s); measure node "
            "costs with NodeProfiler for real estimates.",
            stacklevel=2,
        )
        return cls(
            name=name,
            peak_flops={"default": 100e12, "float32": 20e12},
            memory_bandwidth=1e12,
            launch_overhead_s=5e-6,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeviceSpec":
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Node classification

_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd")

_COLLECTIVE_KIND_OF = {
    "all_to_all_single": "all_to_all",
    "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_reduce_coalesced_": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "broadcast": "broadcast",
    "broadcast_": "broadcast",
    "wait_tensor": "wait",
}

# Ops that only change metadata but are not flagged as views by their schema (``_unsafe_view``
# returns a fresh alias-free tensor by contract; the in-place view ops write the self argument).
_VIEW_LIKE_PACKETS = frozenset(
    getattr(aten, n)
    for n in (
        "_unsafe_view", "t_", "transpose_", "squeeze_", "unsqueeze_", "as_strided_", "detach_",
        "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride", "numel",
        "dim",
    )
    if hasattr(aten, n)
)

# Plain Python callables FX records for tuple indexing and symbolic-size arithmetic.
_PYTHON_MODULES = ("_operator", "operator", "builtins", "math")
_SYM_FUNCTIONS = frozenset(
    getattr(torch, n)
    for n in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_sum", "sym_ite")
    if hasattr(torch, n)
)


def _is_op_overload(target: object) -> bool:
    return isinstance(target, torch._ops.OpOverload)


def _op_ns_name(target: torch._ops.OpOverload) -> tuple[str, str]:
    ns, _, name = target._schema.name.partition("::")
    return ns, name


def collective_kind(node: fx.Node) -> str:
    """``"all_to_all"``, ``"all_reduce"``, ``"all_gather"``, ``"reduce_scatter"``, ``"broadcast"``
    for a functional collective's issue node, ``"wait"`` for ``wait_tensor``, ``""`` otherwise.

    Other ops of the functional-collective namespaces return their op name.
    """
    if node.op != "call_function" or not _is_op_overload(node.target):
        return ""
    ns, name = _op_ns_name(node.target)
    if ns not in _COLLECTIVE_NAMESPACES:
        return ""
    return _COLLECTIVE_KIND_OF.get(name, name)


def is_collective_node(node: fx.Node) -> bool:
    """True for a collective's issue node (not for its wait)."""
    kind = collective_kind(node)
    return kind not in ("", "wait")


def is_wait_node(node: fx.Node) -> bool:
    return collective_kind(node) == "wait"


def is_view_node(node: fx.Node) -> bool:
    """True for nodes that move no data: views, metadata queries, tuple indexing, size math."""
    if node.op != "call_function":
        return False
    target = node.target
    if target is operator.getitem:
        return True
    if _is_op_overload(target):
        return bool(target.is_view) or target.overloadpacket in _VIEW_LIKE_PACKETS
    return target in _SYM_FUNCTIONS or getattr(target, "__module__", None) in _PYTHON_MODULES


def is_compute_node(node: fx.Node) -> bool:
    """A node that runs a kernel on the compute stream (not a view, collective, wait, in/out)."""
    return (
        node.op == "call_function"
        and not is_view_node(node)
        and collective_kind(node) == ""
    )


# ---------------------------------------------------------------------------------------------
# Shapes from meta


def _concrete_int(x: Any) -> int:
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        if hint is None:
            raise GraphschedError(
                f"symbolic size {x} has no concrete hint; compile with dynamic=False so node "
                "shapes are static."
            )
        return int(hint)
    return int(x)


def _meta_value(x: Any) -> Any:
    """The value an argument stands for: a Node's ``meta["val"]``, recursively for containers."""
    if isinstance(x, fx.Node):
        return x.meta.get("val")
    if isinstance(x, (list, tuple)):
        return type(x)(_meta_value(a) for a in x)
    if isinstance(x, dict):
        return {k: _meta_value(v) for k, v in x.items()}
    return x


def device_of(example_inputs: Sequence[Any]) -> torch.device:
    """The device of the first tensor among ``example_inputs`` (CPU when there is none)."""
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def flat_tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor inside ``x`` (nested lists, tuples and dicts), in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for a in x for t in flat_tensors(a)]
    if isinstance(x, dict):
        return [t for a in x.values() for t in flat_tensors(a)]
    return []


def _to_meta(x: Any) -> Any:
    """Replace fake tensors (possibly with symbolic sizes) by concrete ``meta`` tensors."""
    if isinstance(x, torch.Tensor):
        size = [_concrete_int(s) for s in x.shape]
        stride = [_concrete_int(s) for s in x.stride()]
        return torch.empty_strided(size, stride, dtype=x.dtype, device="meta")
    if isinstance(x, torch.SymInt):
        return _concrete_int(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(a) for a in x)
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    return x


def footprint_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a strided tensor touches (a broadcast dimension, stride 0, counts once)."""
    elems = 1
    for size, stride in zip(t.shape, t.stride()):
        size = _concrete_int(size)
        if size == 0:
            return 0
        if _concrete_int(stride) != 0:
            elems *= size
    return elems * t.element_size()


def _logical_bytes(t: torch.Tensor) -> int:
    numel = 1
    for s in t.shape:
        numel *= _concrete_int(s)
    return numel * t.element_size()


# ---------------------------------------------------------------------------------------------
# Analytic cost


def _flop_formula(target: torch._ops.OpOverload) -> Any:
    registry = flop_counter.flop_registry
    packet = target.overloadpacket
    if packet in registry:
        return registry[packet]
    # The CPU flash-attention kernels take (query, key, value, ...) like the CUDA ones, so torch's
    # formulas for those apply unchanged.
    name = _op_ns_name(target)[1]
    if name == "_scaled_dot_product_flash_attention_for_cpu":
        return registry.get(aten._scaled_dot_product_flash_attention)
    if name == "_scaled_dot_product_flash_attention_for_cpu_backward":
        return registry.get(aten._scaled_dot_product_flash_attention_backward)
    return None


def node_flops(node: fx.Node) -> float:
    """Floating-point operations of a node, from torch's flop formulas (0 for ops without one)."""
    if node.op != "call_function" or not _is_op_overload(node.target):
        return 0.0
    formula = _flop_formula(node.target)
    if formula is None:
        return 0.0
    try:
        args = _to_meta(_meta_value(tuple(node.args)))
        kwargs = _to_meta(_meta_value(dict(node.kwargs)))
        out = _to_meta(node.meta.get("val"))
        return float(formula(*args, **kwargs, out_val=out))
    except Exception as exc:  # noqa: BLE001 - a formula failing must not stop planning
        warnings.warn(
            f"could not count flops of node {node.name} ({node.target}): {exc}; its analytic cost "
            "counts memory traffic only (measure it with NodeProfiler for a real number).",
            stacklevel=2,
        )
        return 0.0


def node_bytes(node: fx.Node) -> float:
    """Bytes read (distinct input nodes) plus bytes written (outputs); 0 for views and waits."""
    if node.op != "call_function" or is_view_node(node) or is_wait_node(node):
        return 0.0
    total = 0
    for inp in node.all_input_nodes:
        total += sum(footprint_bytes(t) for t in flat_tensors(inp.meta.get("val")))
    total += sum(footprint_bytes(t) for t in flat_tensors(node.meta.get("val")))
    return float(total)


def _through_views(nodes: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]) -> list[fx.Node]:
    """``nodes`` with every view replaced by what it views (``step``: inputs) or what reads it
    (``step``: users), transitively: the nodes that own or consume the memory."""
    out: list[fx.Node] = []
    stack = list(nodes)
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_view_node(n):
            stack.extend(step(n))
        else:
            out.append(n)
    return out


def fused_node_bytes(node: fx.Node, is_fusable: Callable[[fx.Node], bool]) -> float:
    """Bytes ``node`` moves when inductor fuses it with its fusable neighbours.

    Inside a fused kernel an intermediate stays in registers; only values crossing the kernel's
    edge touch memory: inputs made by a node that is not fusable (a placeholder, a library matmul,
    a collective's wait) and outputs read by one. Perfect fusion is assumed: a lower bound, closer
    to what runs than timing every aten op alone (measured on an H200: those timings priced the
    non-matmul work of gpu-smoke's step at 16 ms, where the whole compiled step computes 13 ms).
    """
    if node.op != "call_function" or is_view_node(node) or is_wait_node(node):
        return 0.0
    total = 0
    for inp in node.all_input_nodes:
        if not all(is_fusable(p) for p in _through_views([inp], lambda n: n.all_input_nodes)):
            total += sum(footprint_bytes(t) for t in flat_tensors(inp.meta.get("val")))
    if not all(is_fusable(u) for u in _through_views(node.users, lambda n: n.users)):
        total += sum(footprint_bytes(t) for t in flat_tensors(node.meta.get("val")))
    return float(total)


def _compute_dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype the arithmetic runs in: the first floating-point input, else the output's."""
    for inp in node.all_input_nodes:
        for t in flat_tensors(inp.meta.get("val")):
            if t.dtype.is_floating_point:
                return t.dtype
    outs = flat_tensors(node.meta.get("val"))
    return outs[0].dtype if outs else None


def analytic_cost(node: fx.Node, spec: DeviceSpec) -> float:
    """Roofline seconds of a compute node: ``launch + max(flops / peak, bytes / bandwidth)``.

    Placeholders, outputs, views, collectives (their time is communication, see ``CommModel``)
    and waits cost 0.
    """
    if not is_compute_node(node):
        return 0.0
    flops = node_flops(node)
    nbytes = node_bytes(node)
    return spec.launch_overhead_s + max(
        flops / spec.flops_for(_compute_dtype(node)), nbytes / spec.memory_bandwidth
    )


def collective_inputs(node: fx.Node) -> list[torch.Tensor]:
    """The (meta) tensors one rank hands to a collective issue node; [] for other nodes."""
    if not is_collective_node(node):
        return []
    first = node.args[0] if node.args else None
    tensors = flat_tensors(_meta_value(first))
    if not tensors:
        # No meta on the input: an all-reduce / all-to-all output has the input's size.
        tensors = flat_tensors(node.meta.get("val"))
    return tensors


def collective_bytes(node: fx.Node) -> int:
    """Bytes one rank hands to a collective issue node (its input buffers); 0 for other nodes."""
    return int(sum(_logical_bytes(t) for t in collective_inputs(node)))


# ---------------------------------------------------------------------------------------------
# The bundle


@dataclass
class CostModel:
    """Costs of graph nodes in seconds: measured > analytic for compute, CommModel for collectives.

    ``measured`` is keyed by node name, so one CostModel describes one graph (forward and backward
    graphs reuse names).
    """

    spec: DeviceSpec
    measured: dict[str, float] = field(default_factory=dict)
    comm: CommModel | None = None

    def comm_model(self) -> CommModel:
        """The measured communication model, else one from the spec's interconnect numbers."""
        if self.comm is not None:
            return self.comm
        spec = self.spec
        return CommModel.analytic(spec.interconnect_bandwidth, spec.interconnect_latency_s)

    def node_cost(self, node: fx.Node) -> float:
        if is_collective_node(node):
            return self.comm_model().time(collective_kind(node), collective_bytes(node))
        if node.name in self.measured:
            return float(self.measured[node.name])
        return analytic_cost(node, self.spec)

    def costs(self, nodes: Iterable[fx.Node] | fx.Graph | fx.GraphModule) -> dict[str, float]:
        """``{node name: seconds}`` for every node of a graph (or of an iterable of nodes)."""
        if isinstance(nodes, fx.GraphModule):
            nodes = nodes.graph
        if isinstance(nodes, fx.Graph):
            nodes = nodes.nodes
        return {n.name: self.node_cost(n) for n in nodes}

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "measured": {k: float(v) for k, v in sorted(self.measured.items())},
            "comm": None if self.comm is None else self.comm.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CostModel":
        comm = data.get("comm")
        return cls(
            spec=DeviceSpec.from_dict(data["spec"]),
            measured={k: float(v) for k, v in data.get("measured", {}).items()},
            comm=None if comm is None else CommModel.from_dict(comm),
        )
