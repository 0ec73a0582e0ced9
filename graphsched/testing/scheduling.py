"""Distributed bodies for the scheduler tests: ILP plans, plan agreement, plan files."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

import graphsched
from graphsched.analysis.costmodel import CostModel, DeviceSpec, is_collective_node
from graphsched.analysis.labels import GraphKind, NodeKind, Phase
from graphsched.compat import dynamo_reset
from graphsched.errors import PlanMismatchError
from graphsched.schedule.planner import collective_windows
from graphsched.schedule.plans import simple_plan


class CommHeavyCosts:
    """Analytic compute costs, and collectives that take ``comm_s`` each (a slow link).

    ``scale`` multiplies every number: ranks given different scales hold different raw
    measurements, as real ranks do. ``spec`` prices compute (default: one CPU thread); on a GPU
    pass the GPU's spec, else compute is priced in CPU seconds and dwarfs any ``comm_s``.
    """

    def __init__(self, comm_s: float = 2e-4, scale: float = 1.0, spec: DeviceSpec | None = None) -> None:
        self.model = CostModel(spec if spec is not None else DeviceSpec.cpu(num_threads=1))
        self.comm_s = comm_s
        self.scale = scale

    def __call__(self, node: fx.Node) -> float:
        if is_collective_node(node):
            return self.comm_s * self.scale
        return self.model.node_cost(node) * self.scale


def window_report(model: torch.nn.Module) -> dict[str, Any]:
    """For the backward plan: which weight-gradient tasks sit inside which all-to-all window, and
    which windows had a candidate dW task (independent, dependencies issued before) but got none."""
    out: dict[str, Any] = {"windows": 0, "dw_in_windows": 0, "unfilled_with_candidates": []}
    for g in graphsched.api.state_of(model).capture.graphs:
        if g.kind != GraphKind.BACKWARD or g.plan is None:
            continue
        a, plan = g.analysis, g.plan
        position = {n: i for i, t in enumerate(plan.tasks) for n in t.nodes}
        dag = a.dag
        by_issue = {c.issue: c for c in a.collectives}
        for lo, hi in collective_windows(plan):
            c = by_issue[plan.tasks[lo].nodes[0]]
            out["windows"] += 1
            inside = [t for t in plan.tasks[lo + 1 : hi] if t.phase == Phase.WEIGHT_GRAD.value]
            out["dw_in_windows"] += len(inside)
            independent = set(c.independent)
            candidates = []
            for i, t in enumerate(plan.tasks):
                if t.phase != Phase.WEIGHT_GRAD.value or not set(t.nodes) <= independent:
                    continue
                deps_ready = all(
                    position[p] < lo
                    for n in t.nodes
                    for p in dag.predecessors(n)
                    if p in position and p not in t.nodes
                )
                if deps_ready and a.node(t.nodes[0]).kind == NodeKind.COMPUTE:
                    candidates.append(t.name)
            other_compute = sum(
                a.node(n).cost for t in plan.tasks[lo + 1 : hi] for n in t.nodes
            )
            if candidates and not inside and other_compute < c.cost:
                out["unfilled_with_candidates"].append((c.issue, candidates[:3]))
    return out


def ilp_schedule_checks(rank: int, world_size: int, cache_dir: str) -> dict[str, Any]:
    from graphsched.testing.parity import ParitySpec, run_parity

    # Parity (bitwise) of the ILP plan, with the slow-link costs so that work really moves.
    spec = ParitySpec(
        model_overrides={"top_k": 2, "capacity_factor": 0.75},
        steps=3,
        wrap_options={"schedule": "ilp", "cache_dir": cache_dir, "cost_model": "analytic"},
        check_inference=False,
    )
    parity = run_parity(rank, world_size, spec, cost_fn=CommHeavyCosts())
    return {"parity": parity}


def plan_agreement_checks(rank: int, world_size: int, cache_dir: str) -> dict[str, Any]:
    """Different raw costs per rank still give one plan; window placement with those costs."""
    from graphsched.models import MoEGPT, get_preset, make_batch

    config = get_preset("tiny").replace(top_k=2, capacity_factor=0.75)
    torch.manual_seed(0)
    model = MoEGPT(config, process_group=dist.group.WORLD)
    graphsched.wrap(
        model, schedule="ilp", cache_dir=f"{cache_dir}/rank{rank}",
        cost_fn=CommHeavyCosts(scale=1.0 + 0.37 * rank),
    )
    idx, targets = make_batch(config, 2, seed=rank)
    model(idx, targets).backward()
    plans = graphsched.captured_plans(model)
    return {
        "hashes": {k: p.content_hash() for k, p in plans.items()},
        "options": {k: p.options for k, p in plans.items()},
        "predicted": {k: p.predicted_time for k, p in plans.items()},
        "windows": window_report(model),
        "explain": graphsched.explain(model, file=None),
    }


def mismatched_plan(rank: int, world_size: int) -> dict[str, Any]:
    """Rank 1 deliberately runs another valid order: the first step must fail fast on every rank."""
    from graphsched.models import MoEGPT, get_preset, make_batch

    config = get_preset("tiny")
    torch.manual_seed(0)
    model = MoEGPT(config, process_group=dist.group.WORLD)
    schedule = "identity" if rank == 0 else "reverse_independent"
    graphsched.wrap(model, planner=lambda analysis, gm: simple_plan(analysis, gm, schedule))
    idx, targets = make_batch(config, 2, seed=rank)
    start = time.perf_counter()
    try:
        model(idx, targets).backward()
        error = ""
    except PlanMismatchError as exc:
        error = str(exc)
    return {"error": error, "seconds": time.perf_counter() - start}


def plan_file_checks(rank: int, world_size: int, cache_dir: str, plan_path: str) -> dict[str, Any]:
    """Plans saved by one run are used as they are by the next; a stale file is refused."""
    from graphsched.errors import ConfigError
    from graphsched.models import MoEGPT, get_preset, make_batch

    config = get_preset("tiny")
    idx, targets = make_batch(config, 2, seed=rank)

    def build(**options: Any) -> torch.nn.Module:
        torch.manual_seed(0)
        return graphsched.wrap(MoEGPT(config, process_group=dist.group.WORLD), **options)

    first = build(schedule="ilp", cache_dir=cache_dir, cost_model="analytic")
    first(idx, targets).backward()
    if rank == 0:
        graphsched.save_plans(first, plan_path)
    dist.barrier()
    hashes_first = {k: p.content_hash() for k, p in graphsched.captured_plans(first).items()}

    dynamo_reset()
    second = build(schedule="ilp", plan_file=plan_path)
    second(idx, targets).backward()
    hashes_second = {k: p.content_hash() for k, p in graphsched.captured_plans(second).items()}

    dynamo_reset()
    stale = build(schedule="ilp", plan_file=plan_path)
    stale_error = ""
    try:
        longer_idx, longer_targets = make_batch(config, 3, seed=rank)  # another shape: another graph
        stale(longer_idx, longer_targets)
    except ConfigError as exc:
        stale_error = f"ConfigError: {exc}"
    except Exception as exc:  # noqa: BLE001 - dynamo may wrap the error; keep its text
        stale_error = f"{type(exc).__name__}: {exc}"
    return {"first": hashes_first, "second": hashes_second, "stale_error": stale_error}


def measured_costs_checks(rank: int, world_size: int, cache_dir: str) -> Any:
    """Measured costs (node profiling, the collective sweep at wrap, each graph's collectives timed
    at its sizes) with chunks chosen from them. Also returns the (bytes, seconds) that were timed
    and the (bytes, seconds) each graph's collective nodes were priced at."""
    from graphsched.analysis.cost_source import MeasuredCosts
    from graphsched.analysis.costmodel import collective_bytes
    from graphsched.testing.parity import ParitySpec, run_parity

    seen: dict[str, set] = {"timed": set(), "planned": set()}
    original = MeasuredCosts.prepare

    def prepare(self: MeasuredCosts, gm: fx.GraphModule) -> None:
        original(self, gm)
        seen["timed"] |= {(key[2], seconds) for key, seconds in self.timed_collectives.items()}
        seen["planned"] |= {(collective_bytes(n), self(n)) for n in gm.graph.nodes if is_collective_node(n)}

    MeasuredCosts.prepare = prepare  # type: ignore[method-assign]
    try:
        spec = ParitySpec(
            model_overrides={"top_k": 2, "capacity_factor": 0.75},
            steps=2,
            wrap_options={"schedule": "ilp", "cost_model": "measured", "chunks": "auto", "cache_dir": cache_dir},
            check_inference=False,
        )
        result = run_parity(rank, world_size, spec)
    finally:
        MeasuredCosts.prepare = original  # type: ignore[method-assign]
    return result, seen
