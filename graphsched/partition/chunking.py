"""Micro-chunking: cut the work around each all-to-all into k chunks so that chunk i's all-to-all
overlaps chunk i+1's compute; k chosen per region.

``make_graph_transform(config)`` returns the hook ``GraphschedBackend`` applies to the Dynamo graph
before AOTAutograd (so the backward is chunked too, consistently, by differentiation):

1. find the regions (``regions.find_regions``);
2. choose k per region: ``chunks=k`` takes k (at most the region's cut extent; ordered by the
   list schedule); ``chunks="auto"`` predicts the step time of the region for every k in
   {1, 2, 4, 8} up to ``max_chunks`` and keeps the fastest: each k's pipeline (per-chunk stage
   costs at the chunked shapes, plus the cost of splitting and joining) is a two-resource
   ``ScheduleProblem`` solved by ``schedule.solve``, so the ILP picks the order for each k and
   the k by comparing makespans. A k whose extra buffers exceed ``memory_limit_bytes`` is
   rejected. Identical regions (every layer of a model) are solved once;
3. rank 0's choices are broadcast (collectives must be issued identically everywhere);
4. cut each region (``rewrite.rewrite_region``), emitting its copies in the solved order, so even
   ``schedule="identity"`` runs the pipeline.

Costs: compute nodes are run on meta tensors of the chunk shapes under a dispatch mode that
prices every aten kernel at ``launch + max(flops / peak, bytes / bandwidth)`` (the analytic model
of ``analysis.costmodel``), so a small chunk pays its launch and re-reads its weights; with
``cost_model="measured"`` they are timed on the device instead. All-to-alls come from the
communication model (alpha + beta * bytes). The backward of a stage is priced at
``backward_factor`` (2) times its forward compute and the same communication.

The decision per region is recorded in ``gm.meta["graphsched_chunks"]`` (JSON-able).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.fx as fx
from torch.utils import flop_counter

from graphsched.analysis.commmodel import CommModel
from graphsched.analysis.costmodel import DeviceSpec, device_of, flat_tensors, footprint_bytes
from graphsched.compat import TorchDispatchMode
from graphsched.config import GraphschedConfig
from graphsched.errors import ConfigError, GraphschedError, GraphschedFallbackWarning
from graphsched.partition.regions import Region, find_regions
from graphsched.partition.rewrite import CHUNK_TAG, chunk_sizes, rewrite_region, shape_in_chunk
from graphsched.partition.waits import inline_wait_functions, unwaited_collectives
from graphsched.partition.split_rules import (
    ChunkCall,
    Cut,
    Partial,
    SplitRules,
    default_rules,
    example_value,
    is_tensor_node,
    operands,
    run_call,
)
from graphsched.schedule.ilp import solve
from graphsched.schedule.list_schedule import list_schedule
from graphsched.schedule.problem import COLLECTIVE, COMM, COMPUTE, SchedTask, Schedule, ScheduleProblem

log = logging.getLogger("graphsched.partition")

GraphTransform = Callable[[fx.GraphModule, Sequence[Any]], fx.GraphModule]
#: Chunk counts "auto" tries (Tutel's degrees; above 8 almost never helps).
AUTO_CANDIDATES = (1, 2, 4, 8)
META_KEY = "graphsched_chunks"
#: Seconds each candidate's solve may take. The list schedule is the incumbent and on these
#: chain-shaped pipelines the ILP rarely beats it, while proving optimality for k >= 4 can take
#: many seconds: a short limit bounds the compile time and loses little.
SOLVE_LIMIT_S = 1.0
#: "auto" chunks a region only when that is predicted to save at least this fraction of its time:
#: measured costs carry a few percent of noise, and each chunk adds launches and buffers.
MIN_GAIN = 0.02


# -- the pipeline model ----------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """Nodes of one chunk that run back to back on one resource."""

    name: str
    resource: str
    deps: tuple[str, ...] = ()


@dataclass
class PipelineCosts:
    """Costs of a region cut into ``len(stage)`` chunks."""

    #: Per chunk: stage name -> forward seconds.
    stage: list[dict[str, float]]
    #: Seconds to split the inputs and to join the outputs (0 for one chunk).
    split: float = 0.0
    join: float = 0.0
    #: Bytes of buffers chunking adds (split copies, joined outputs, partial sums).
    extra_bytes: int = 0


@dataclass
class RegionPipeline:
    """What the chooser needs of a region: its stages and their costs for given chunk sizes."""

    name: str
    stages: list[Stage]
    extent: int
    costs: Callable[[list[int]], PipelineCosts]
    #: Backward compute seconds per forward compute second (dX and dW: two matmuls per matmul).
    backward_factor: float = 2.0


@dataclass
class Prediction:
    k: int
    sizes: list[int]
    forward: Schedule
    backward: Schedule
    extra_bytes: int

    @property
    def total(self) -> float:
        return self.forward.makespan + self.backward.makespan


@dataclass
class ChunkChoice:
    k: int
    sizes: list[int]
    #: Predicted forward + backward seconds of the region for each k tried.
    predicted: dict[int, float]
    #: k -> why it was not tried (memory limit, extent).
    rejected: dict[int, str]
    #: The chosen k's forward issue order (task ids ``<stage>@c<i>``, ``split``, ``join``).
    order: list[str]
    forward_s: float = 0.0
    backward_s: float = 0.0


def _sinks(stages: Sequence[Stage]) -> list[str]:
    used = {d for s in stages for d in s.deps}
    return [s.name for s in stages if s.name not in used]


def pipeline_problem(pipeline: RegionPipeline, costs: PipelineCosts, backward: bool = False) -> ScheduleProblem:
    """The two-resource problem of one pass (forward, or the mirrored backward) over k chunks.

    Chunk i's stages depend on each other as in the region; every chunk starts after the split and
    the join waits for every chunk. In the backward the dependencies are reversed, compute costs
    are scaled by ``backward_factor`` and the collectives keep their forward cost.
    """
    k = len(costs.stage)
    stages = pipeline.stages
    deps = {s.name: list(s.deps) for s in stages}
    if backward:
        deps = {s.name: [t.name for t in stages if s.name in t.deps] for s in stages}
    prefix = "bwd:" if backward else ""
    first, last = f"{prefix}split", f"{prefix}join"
    tails = [s.name for s in stages if not any(s.name in deps[t.name] for t in stages)]
    tasks: list[SchedTask] = []
    if k > 1:
        tasks.append(SchedTask(first, COMPUTE, costs.join if backward else costs.split))
    for i in range(k):
        for s in stages:
            cost = costs.stage[i].get(s.name, 0.0)
            if s.resource == COMPUTE and backward:
                cost *= pipeline.backward_factor
            d = [f"{prefix}{x}@c{i}" for x in deps[s.name]]
            if not d and k > 1:
                d = [first]
            tags = {COLLECTIVE} if s.resource == COMM else set()
            tasks.append(SchedTask(f"{prefix}{s.name}@c{i}", s.resource, cost, tuple(d), frozenset(tags)))
    if k > 1:
        ends = tuple(f"{prefix}{t}@c{i}" for i in range(k) for t in tails)
        tasks.append(SchedTask(last, COMPUTE, costs.split if backward else costs.join, ends))
    return ScheduleProblem(tasks)


def predict(
    pipeline: RegionPipeline,
    sizes: list[int],
    time_limit_s: float = SOLVE_LIMIT_S,
    costs: PipelineCosts | None = None,
    exact: bool = True,
) -> Prediction:
    """Order the forward and backward pipelines of ``len(sizes)`` chunks and time them.

    ``exact``: ``schedule.solve`` (list schedule, then the ILP within ``time_limit_s``);
    otherwise the list schedule alone.
    """
    costs = costs or pipeline.costs(sizes)

    def order(problem: ScheduleProblem) -> Schedule:
        return solve(problem, time_limit_s=time_limit_s) if exact else list_schedule(problem)

    fwd = order(pipeline_problem(pipeline, costs))
    bwd = order(pipeline_problem(pipeline, costs, backward=True))
    return Prediction(len(sizes), list(sizes), fwd, bwd, costs.extra_bytes)


def issue_order(pipeline: RegionPipeline, schedule: Schedule) -> list[str]:
    """The schedule's tasks by start time, a collective before compute starting with it.

    Same simulated times as the solver's order, but every all-to-all is issued as soon as it can
    start: the runtime issues collectives asynchronously, so issuing early never delays compute
    and lets the transfer begin before the compute issued beside it.
    """
    comm = {s.name for s in pipeline.stages if s.resource == COMM}
    position = {t: i for i, t in enumerate(schedule.order)}

    def key(tid: str) -> tuple:
        return (schedule.start[tid], tid.split("@")[0] not in comm, position[tid])

    return sorted(schedule.order, key=key)


def choose_chunks(
    pipeline: RegionPipeline,
    candidates: Sequence[int] = AUTO_CANDIDATES,
    memory_limit_bytes: int | None = None,
    time_limit_s: float = SOLVE_LIMIT_S,
    min_gain: float = MIN_GAIN,
) -> ChunkChoice:
    """The k of ``candidates`` with the least predicted forward + backward time (ties: smaller k).

    k = 1 is always a candidate and wins unless the best k saves at least ``min_gain`` of its
    predicted time (chunking must pay for itself beyond the noise of measured costs); a k above
    the region's extent or whose extra buffers exceed ``memory_limit_bytes`` is rejected.
    """
    predicted: dict[int, float] = {}
    rejected: dict[int, str] = {}
    best: Prediction | None = None
    one: Prediction | None = None
    for k in sorted(set(candidates) | {1}):
        if k > pipeline.extent:
            rejected[k] = f"the cut factor has only {pipeline.extent} slices"
            continue
        sizes = chunk_sizes(pipeline.extent, k)
        costs = pipeline.costs(sizes)
        if k > 1 and memory_limit_bytes is not None and costs.extra_bytes > memory_limit_bytes:
            rejected[k] = f"needs {costs.extra_bytes} extra bytes > memory_limit_bytes={memory_limit_bytes}"
            continue
        p = predict(pipeline, sizes, time_limit_s, costs)
        predicted[k] = p.total
        if k == 1:
            one = p
        # A relative margin keeps float noise from choosing a larger k for nothing.
        if best is None or p.total < best.total * (1 - 1e-9):
            best = p
    assert best is not None and one is not None  # k = 1 always fits
    if best.k > 1 and best.total > one.total * (1 - min_gain):
        best = one
    return ChunkChoice(best.k, best.sizes, predicted, rejected, issue_order(pipeline, best.forward),
                       best.forward.makespan, best.backward.makespan)


def fixed_chunks(
    pipeline: RegionPipeline,
    k: int,
    memory_limit_bytes: int | None = None,
    time_limit_s: float = SOLVE_LIMIT_S,
) -> ChunkChoice:
    """k chunks as asked (Tutel-style), or the largest k' < k whose extra buffers fit the memory
    limit; the prediction of k = 1 is recorded beside it for comparison. Nothing is chosen, so
    the orders come from the list schedule (no solver time)."""
    k = min(k, pipeline.extent)
    rejected: dict[int, str] = {}
    while k > 1:
        extra = pipeline.costs(chunk_sizes(pipeline.extent, k)).extra_bytes
        if memory_limit_bytes is None or extra <= memory_limit_bytes:
            break
        rejected[k] = f"needs {extra} extra bytes > memory_limit_bytes={memory_limit_bytes}"
        k -= 1
    one = predict(pipeline, [pipeline.extent], time_limit_s, exact=False)
    chosen = one if k == 1 else predict(pipeline, chunk_sizes(pipeline.extent, k), time_limit_s, exact=False)
    return ChunkChoice(k, chosen.sizes, {1: one.total, k: chosen.total}, rejected,
                       issue_order(pipeline, chosen.forward), chosen.forward.makespan, chosen.backward.makespan)


# -- costs of nodes at chunk shapes ----------------------------------------------------------


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


# -- from a region to its pipeline -----------------------------------------------------------


def region_stages(region: Region, rules: SplitRules) -> tuple[list[Stage], dict[fx.Node, str]]:
    """Stages of a region and each node's stage.

    A node's level is the number of collectives on the longest path (inside the region) ending at
    it; compute nodes of one level form stage ``compute<l>``, collectives of one level
    ``comm<l>``. Edges only go from lower to higher (level, kind), so the stages form a DAG.
    """
    level: dict[fx.Node, int] = {}
    stage_of: dict[fx.Node, str] = {}
    deps: dict[str, set[str]] = {}
    resource: dict[str, str] = {}
    stage_level: dict[str, int] = {}
    for n in region.nodes:
        is_comm = bool(getattr(rules.lookup(n), "collective", False))
        preds = [a for a in n.all_input_nodes if a in region]
        level[n] = max((level[a] for a in preds), default=0) + (1 if is_comm else 0)
        name = f"{'comm' if is_comm else 'compute'}{level[n]}"
        stage_of[n] = name
        resource[name] = COMM if is_comm else COMPUTE
        stage_level[name] = level[n]
        deps.setdefault(name, set())
        for a in preds:
            if stage_of[a] != name:
                deps[name].add(stage_of[a])
    # Comm of level l runs before the compute of level l, which runs before comm of level l + 1.
    rank = {name: (lvl, resource[name] == COMPUTE) for name, lvl in stage_level.items()}
    names = sorted(deps, key=rank.__getitem__)
    return [Stage(s, resource[s], tuple(sorted(deps[s], key=rank.__getitem__))) for s in names], stage_of


def _nbytes(node: fx.Node, spec: Any, part: int) -> int:
    v = example_value(node)
    numel = 1
    for s in shape_in_chunk(node, spec, part):
        numel *= s
    return numel * v.element_size()


def _meta_call(node: fx.Node, region: Region, rules: SplitRules, part: int) -> ChunkCall:
    use_specs = iter(region.operand_specs(node))

    def value(a: fx.Node) -> Any:
        if is_tensor_node(a):
            v = example_value(a)
            shape = shape_in_chunk(a, next(use_specs), part)
            return torch.empty(shape, dtype=v.dtype, device="meta")
        return example_value(a)

    rule = rules.lookup(node)
    assert rule is not None
    args = fx.map_arg(node.args, value)
    kwargs = fx.map_arg(node.kwargs, value)
    in_shapes = [shape_in_chunk(a, s, part) for a, s in zip(operands(node), region.operand_specs(node))]
    out_shape = shape_in_chunk(node, region.specs[node], part)
    return rule.chunk_call(node, tuple(args), dict(kwargs), in_shapes, out_shape)


def region_pipeline(region: Region, rules: SplitRules, coster: RegionCoster) -> tuple[RegionPipeline, dict[fx.Node, str]]:
    """The region's stages priced by ``coster`` at the chunk shapes of any chunk sizes."""
    stages, stage_of = region_stages(region, rules)
    cache: dict[tuple[fx.Node, int], float] = {}
    spec = coster.spec

    def node_cost(n: fx.Node, part: int) -> float:
        if (n, part) not in cache:
            rule = rules.lookup(n)
            if getattr(rule, "collective", False):
                cost = coster.comm(_nbytes(operands(n)[0], region.operand_specs(n)[0], part))
            elif getattr(rule, "free", False):
                cost = 0.0
            else:
                cost = coster.compute(_meta_call(n, region, rules, part))
            cache[(n, part)] = cost
        return cache[(n, part)]

    def copy_cost(nbytes: int) -> float:
        return spec.launch_overhead_s + 2 * nbytes / spec.memory_bandwidth

    def costs(sizes: list[int]) -> PipelineCosts:
        k = len(sizes)
        per_chunk = []
        for part in sizes:
            stage_cost: dict[str, float] = {}
            for n in region.nodes:
                stage_cost[stage_of[n]] = stage_cost.get(stage_of[n], 0.0) + node_cost(n, part)
            per_chunk.append(stage_cost)
        if k == 1:
            return PipelineCosts(per_chunk)
        split = join = 0.0
        extra = 0
        for u in region.inputs():
            cut = region.specs[u]
            assert isinstance(cut, Cut)
            if cut.outer != 1 or cut.inner != 1:  # a strided slice is copied into each chunk
                split += sum(copy_cost(_nbytes(u, cut, p)) for p in sizes)
                extra += _nbytes(u, None, 0)
        for v in region.outputs():
            full = _nbytes(v, None, 0)
            if isinstance(region.specs[v], Partial):
                join += (k - 1) * (spec.launch_overhead_s + 3 * full / spec.memory_bandwidth)
                extra += k * full
            else:
                join += copy_cost(full)
                extra += full
        return PipelineCosts(per_chunk, split, join, extra)

    return RegionPipeline(region.module or region.id, stages, region.extent, costs), stage_of


# -- the transform ---------------------------------------------------------------------------


def _agree(decisions: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's decisions on every rank (the chunked graphs must issue identical collectives).

    Shared through the process group's store, not a collective: this runs while compiling, when
    collectives of the eager part of the step may still be queued on the group.
    """
    from graphsched.runtime.agreement import share_from_rank0

    return share_from_rank0(decisions, "chunks")


@dataclass
class ChunkingTransform:
    """The graph transform; ``records`` lists what it decided for each graph it was handed."""

    config: GraphschedConfig
    rules: SplitRules = field(default_factory=default_rules)
    #: Builds the cost source for a device (default: analytic or measured per ``config``).
    coster_factory: Callable[[torch.device], RegionCoster] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    #: The measured CommModel made by ``wrap`` (None: analytic costs).
    comm: Any = None
    #: One cost source per device, kept across graphs.
    _costers: dict[str, RegionCoster] = field(default_factory=dict, repr=False)

    def _coster(self, device: torch.device) -> RegionCoster:
        if str(device) not in self._costers:
            factory = self.coster_factory or (lambda d: default_coster(self.config, d, self.comm))
            self._costers[str(device)] = factory(device)
        return self._costers[str(device)]

    def _decide(self, region: Region, coster: RegionCoster, seen: dict[str, ChunkChoice]) -> dict[str, Any]:
        chunks = self.config.chunks
        if chunks == "auto":
            candidates = [k for k in AUTO_CANDIDATES if k <= self.config.max_chunks]
        else:
            assert isinstance(chunks, int)
            candidates = [min(chunks, region.extent)]
        limit = min(SOLVE_LIMIT_S, self.config.solver_time_limit_s)
        pipeline, _ = region_pipeline(region, self.rules, coster)
        # Identical layers give identical pipelines: solve each distinct one once.
        tried = sorted({1, *candidates} & set(range(1, region.extent + 1)))
        signature = json.dumps(
            [[(st.name, st.resource, st.deps) for st in pipeline.stages], pipeline.extent, chunks,
             self.config.memory_limit_bytes,
             [dataclasses.asdict(pipeline.costs(chunk_sizes(pipeline.extent, k))) for k in tried]],
            sort_keys=True,
        )
        choice = seen.get(signature)
        if choice is None:
            if chunks == "auto":
                choice = choose_chunks(pipeline, candidates, self.config.memory_limit_bytes, limit)
            else:
                choice = fixed_chunks(pipeline, candidates[0], self.config.memory_limit_bytes, limit)
            seen[signature] = choice
        record: dict[str, Any] = region.describe(self.rules)
        record.update(
            mode="auto" if chunks == "auto" else "fixed",
            k=choice.k,
            sizes=choice.sizes,
            predicted_s={str(k): v for k, v in sorted(choice.predicted.items())},
            rejected={str(k): v for k, v in sorted(choice.rejected.items())},
            order=choice.order,
            forward_s=choice.forward_s,
            backward_s=choice.backward_s,
        )
        return record

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
        # torch <= 2.12 records the all-to-all's wait as an autograd function: make it a plain
        # wait first, so that every region holds its collectives' waits (see waits.py).
        inline_wait_functions(gm)
        regions = find_regions(gm, self.rules)
        decisions: dict[str, Any] = {}
        if regions:
            try:
                coster = self._coster(device_of(example_inputs))
                seen: dict[str, ChunkChoice] = {}
                for region in regions:
                    decisions[region.id] = self._decide(region, coster, seen)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed estimate means "do not chunk"
                log.warning("chunking: choosing chunk counts failed (%s); regions stay whole", exc)
                decisions = {r.id: {**r.describe(self.rules), "k": 1, "error": repr(exc)} for r in regions}
            decisions = _agree(decisions)
        original = gm.graph
        try:
            self._rewrite(gm, regions, decisions)
        except Exception as exc:  # noqa: BLE001 - the unchunked graph is always correct
            gm.graph = original
            gm.recompile()
            for d in decisions.values():
                d["k"] = 1
                d["error"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"graphsched: chunking failed ({type(exc).__name__}: {exc}); the regions run "
                "unchunked (same results, less overlap). Please report the model; chunks=1 "
                "silences this.",
                GraphschedFallbackWarning,
                stacklevel=2,
            )
        gm.meta[META_KEY] = {rid: {k: v for k, v in d.items() if k != "order"} for rid, d in decisions.items()}
        self.records.append(gm.meta[META_KEY])
        for rid, d in decisions.items():
            log.info("chunking %s (%s): k=%s %s", rid, d.get("module"), d.get("k"), d.get("predicted_s", {}))
        return gm

    def _rewrite(self, gm: fx.GraphModule, regions: list[Region], decisions: dict[str, Any]) -> None:
        pending = list(regions)
        while pending:
            region = pending.pop(0)
            d = decisions.get(region.id, {})
            k = int(d.get("k", 1))
            if k <= 1:
                continue
            _, stage_of = region_stages(region, self.rules)
            position = {tid: i for i, tid in enumerate(d.get("order", []))}
            index = {n: i for i, n in enumerate(region.nodes)}

            def key(n: fx.Node, i: int, stage_of=stage_of, position=position, index=index) -> tuple:
                return (position.get(f"{stage_of[n]}@c{i}", len(position)), index[n], i)

            env = rewrite_region(gm, region, d["sizes"], self.rules, key)
            pending = [r.remapped(env) for r in pending]
        # Never a wrong answer: a chunk's collective read before its wait would read a buffer
        # still in transfer (found on CUDA, where NCCL writes on its own stream).
        unwaited = unwaited_collectives(
            gm.graph,
            lambda n: bool(getattr(self.rules.lookup(n), "collective", False)),
            lambda n: getattr(self.rules.lookup(n), "wait", False),
            only=lambda n: CHUNK_TAG in (n.meta.get("custom") or {}),
        )
        if unwaited:
            raise GraphschedError(
                f"chunked collectives {[n.name for n in unwaited]} are read before their wait"
            )


def make_graph_transform(config: GraphschedConfig, comm: Any = None) -> GraphTransform | None:
    """The chunking transform for ``GraphschedBackend(graph_transform=...)``; None when
    ``config.chunks == 1`` (nothing to do). ``comm``: the measured CommModel, if any."""
    if config.chunks == 1:
        return None
    return ChunkingTransform(config, comm=comm)
