"""The pipeline model of a region cut into k chunks, and the choice of k.

A region becomes a few *stages* (compute or communication, in dependency order), each priced per
chunk by a coster (``costers.py``) at the chunk's shapes. For each k, the forward pass and the
mirrored backward are two-resource ``ScheduleProblem``s solved by ``schedule.solve``; the k with
the least predicted forward + backward time wins, if it saves enough over k = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from graphsched.partition.costers import RegionCoster
from graphsched.partition.regions import Region
from graphsched.partition.rewrite import chunk_sizes, shape_in_chunk
from graphsched.partition.split_rules import SplitRules
from graphsched.partition.split_specs import ChunkCall, Cut, Partial, example_value, is_tensor_node, operands
from graphsched.schedule.ilp import solve
from graphsched.schedule.list_schedule import list_schedule
from graphsched.schedule.problem import COLLECTIVE, COMM, COMPUTE, SchedTask, Schedule, ScheduleProblem

#: Chunk counts "auto" tries (Tutel's degrees; above 8 almost never helps).
AUTO_CANDIDATES = (1, 2, 4, 8)
#: Seconds each candidate's solve may take. The list schedule is the incumbent and on these
#: chain-shaped pipelines the ILP rarely beats it, while proving optimality for k >= 4 can take
#: many seconds: a short limit bounds the compile time and loses little.
SOLVE_LIMIT_S = 1.0
#: "auto" chunks a region only when that is predicted to save at least this fraction of its time:
#: measured costs carry a few percent of noise, and each chunk adds launches and buffers.
MIN_GAIN = 0.02


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
    #: How much slower compute runs beside a transfer (``ScheduleProblem.contention``): chunking
    #: puts more compute beside transfers, so a predicted gain must survive it.
    contention: float = 1.0


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
    return ScheduleProblem(tasks, contention=pipeline.contention)


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

    # The factor measured with the collectives (1.0 for analytic costs or a cost model without it).
    contention = getattr(getattr(coster, "comm_model", None), "contention", 1.0)
    return RegionPipeline(region.module or region.id, stages, region.extent, costs, contention=contention), stage_of
