"""The variants the harness compares, each measured the same way on the same emulated group.

Every variant is the reference MoE GPT (``graphsched.models.MoEGPT``) built from the same seed on
the same emulated expert-parallel group, fed the same batch; a step is forward + backward (and an
optimizer step with ``--optimizer``). What differs is how the step is run:

* ``eager``: the model as written;
* ``inductor``: ``torch.compile`` (inductor), default settings;
* ``inductor-reorder``: inductor with its compute/communication reordering passes
  (``reorder_for_compute_comm_overlap`` and the passes torch's config recommends);
* ``inductor-classic``: the same with inductor's original passes ``sink_waits``, ``raise_comms``,
  ``reorder_compute_for_overlap`` (the fastest peer measured so far);
* ``inductor-overlap``: inductor with its ATen-level overlap scheduler
  (``aten_distributed_optimizations.enable_overlap_scheduling``), where this torch version has it;
* ``deepspeed``: the same GPT whose MoE layers are DeepSpeed's ``deepspeed.moe.layer.MoE`` (eager);
  ``deepspeed+graphsched``: that model made capturable and wrapped by graphsched (ILP), what a
  DeepSpeed user runs; skipped ("deepspeed not installed") where deepspeed does not import;
* ``graphsched-identity``: graphsched's runtime replaying the captured order (no scheduling: the
  runtime's own cost);
* ``graphsched-ilp``: ``graphsched.wrap(schedule="ilp")``: weight-gradient scheduling;
* ``graphsched-chunks2`` / ``-chunks4``: ILP plus regions cut into 2 / 4 micro-chunks, and
  ``graphsched-full``: ILP plus ``chunks="auto"`` (skipped while GraphschedConfig has no ``chunks``);
* ``graphsched-inductor``: ILP with ``codegen="inductor"`` (skipped while GraphschedConfig has no
  ``codegen``);
* ``compute-only`` (and ``-inductor`` / ``-deepspeed``): the same step on a twin group that moves
  no bytes (infinite bandwidth): compute alone, the step of each family without communication;
* ``comm-only``: the collectives of one eager step, replayed back to back on buffers of the same
  shapes: communication alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import traceback
from typing import Any, Callable

import torch
import torch.nn as nn

from benchmarks.comm_replay import record_step_calls, run_comm_only
from benchmarks.context import (
    BenchContext,
    MicroBatched,
    Skip,
    VariantResult,
    build_reference,
    free_device_memory,
    measure_model,
)
from benchmarks.deepspeed_variants import deepspeed_model, deepspeed_ready
from benchmarks.variant_names import family_of, micro_batches_of


def run_eager(ctx: BenchContext, result: VariantResult, compute_only: bool = False,
              micro_batches: int = 1) -> None:
    group = ctx.compute_only if compute_only else ctx.world
    model: nn.Module = build_reference(ctx, group)
    if micro_batches > 1:
        model = MicroBatched(model, micro_batches)
    measure_model(ctx, result, model, [group])
    if not compute_only and ctx.step_calls is None and micro_batches == 1:
        ctx.step_calls = record_step_calls(ctx, model, group)


#: inductor's original compute/communication passes (torch/_inductor/comms.py, 2.11-2.13), in order.
CLASSIC_PASSES = ("sink_waits", "raise_comms", "reorder_compute_for_overlap")


def inductor_patches(kind: str) -> dict[str, Any]:
    """Inductor config for ``kind`` ("plain", "reorder", "classic", "overlap"), from the names this
    torch has ("classic": CLASSIC_PASSES, the fastest peer measured on an H200 with torch 2.11)."""
    cfg = torch._inductor.config
    if kind == "plain":
        return {}
    if kind == "reorder":
        from torch._inductor import comms

        wanted = (
            # The sequence torch's config recommends, where this version has those passes ...
            ["reorder_communication_preserving_peak_memory", "sink_waits_iterative",
             "reorder_communication_preserving_peak_memory"]
            if hasattr(comms, "sink_waits_iterative")
            and hasattr(comms, "reorder_communication_preserving_peak_memory")
            # ... else the original three.
            else ["sink_waits", "raise_comms", "reorder_compute_for_overlap"]
        )
        passes = [p for p in wanted if hasattr(comms, p)]
        if not hasattr(cfg, "reorder_for_compute_comm_overlap"):
            raise Skip("this torch has no torch._inductor.config.reorder_for_compute_comm_overlap")
        return {
            "reorder_for_compute_comm_overlap": True,
            "reorder_for_compute_comm_overlap_passes": passes,
        }
    if kind == "classic":
        from torch._inductor import comms

        if not hasattr(cfg, "reorder_for_compute_comm_overlap"):
            raise Skip("this torch has no torch._inductor.config.reorder_for_compute_comm_overlap")
        passes = [p for p in CLASSIC_PASSES if hasattr(comms, p)]
        if not passes:
            raise Skip(f"this torch's torch._inductor.comms has none of {list(CLASSIC_PASSES)}")
        return {
            "reorder_for_compute_comm_overlap": True,
            "reorder_for_compute_comm_overlap_passes": passes,
        }
    if kind == "overlap":
        section = getattr(cfg, "aten_distributed_optimizations", None)
        if section is None or not hasattr(section, "enable_overlap_scheduling"):
            raise Skip(
                "this torch has no torch._inductor.config.aten_distributed_optimizations."
                "enable_overlap_scheduling"
            )
        if importlib.util.find_spec("triton") is None:
            raise Skip("inductor's overlap scheduler benchmarks kernels with triton, not installed")
        return {"aten_distributed_optimizations.enable_overlap_scheduling": True}
    raise ValueError(kind)


def run_inductor(ctx: BenchContext, result: VariantResult, kind: str, compute_only: bool = False,
                 micro_batches: int = 1) -> None:
    patches = inductor_patches(kind)
    if patches:
        result.notes.append("inductor config: " + ", ".join(f"{k}={v}" for k, v in patches.items()))
        missing = [p for p in CLASSIC_PASSES if p not in patches.get(
            "reorder_for_compute_comm_overlap_passes", CLASSIC_PASSES)]
        if kind == "classic" and missing:
            result.notes.append(f"this torch lacks the passes {missing}: run without them")
    group = ctx.compute_only if compute_only else ctx.world
    model: nn.Module = build_reference(ctx, group)
    if micro_batches > 1:
        model = MicroBatched(model, micro_batches)
    compiled = torch.compile(model)

    def around() -> contextlib.AbstractContextManager:
        return torch._inductor.config.patch(patches) if patches else contextlib.nullcontext()

    measure_model(ctx, result, compiled, [group], around)


def run_deepspeed(
    ctx: BenchContext, result: VariantResult, compute_only: bool = False, graphsched_kind: str | None = None
) -> None:
    deepspeed = deepspeed_ready(ctx.device, ctx.world)
    model, groups = deepspeed_model(
        ctx.preset, ctx.world, ctx.seed, ctx.compute_only if compute_only else None
    )
    model = model.to(ctx.device)
    if graphsched_kind is None:
        result.notes.append(f"deepspeed {deepspeed.__version__}: MoE(ep_size={ctx.world.size()}), eager")
    else:
        # What a DeepSpeed user runs: the DeepSpeed model, made capturable and wrapped.
        import graphsched
        from graphsched.integrations.deepspeed_moe import make_capturable

        options = graphsched_options(graphsched_kind)
        options["solver_time_limit_s"] = ctx.preset.solver_time_limit_s
        if ctx.preset.profile_steps:
            options["profile_steps"] = ctx.preset.profile_steps
        result.notes.append(
            f"deepspeed {deepspeed.__version__}: MoE(ep_size={ctx.world.size()}), graphsched "
            + ", ".join(f"{k}={v}" for k, v in options.items())
        )
        make_capturable(model)
        graphsched.wrap(model, **options)
        replan_before_timing(ctx, model, options)
    measure_model(ctx, result, model, groups)
    if graphsched_kind is not None:
        _note_plans(result, model)
    if graphsched_kind is not None and ctx.profile_dir is not None:
        _dump_plans(os.path.join(ctx.profile_dir, f"{ctx.preset.name}_{result.name}.plans.json"), model)


def replan_before_timing(ctx: BenchContext, model: nn.Module, options: dict[str, Any]) -> None:
    """Run the steps profile-guided planning profiles (``profile_steps``, when it is on), so that
    its re-planning step (and any recompile) falls in the warm-up, not in
    the timed steps. (With a measured choice, its steps cover these.)"""
    from graphsched.config import GraphschedConfig

    profiled = GraphschedConfig(**options).profiled_steps(ctx.device.type)
    for _ in range(profiled + 1 if profiled else 0):  # the compiling step, then the profiled ones
        model(*ctx.batch).backward()
        model.zero_grad(set_to_none=True)


def graphsched_options(kind: str) -> dict[str, Any]:
    from graphsched.config import GraphschedConfig

    fields = {f.name for f in dataclasses.fields(GraphschedConfig)}
    options: dict[str, Any]
    if kind.endswith("-mbauto"):
        if "micro_batches" not in fields:
            raise Skip("GraphschedConfig has no 'micro_batches' option in this version of graphsched")
        options = graphsched_options(kind[: -len("-mbauto")])
        options["micro_batches"] = "auto"
        return options
    micro = micro_batches_of(kind)
    if micro > 1:
        if "micro_batches" not in fields:
            raise Skip("GraphschedConfig has no 'micro_batches' option in this version of graphsched")
        options = graphsched_options(kind.rpartition("-mb")[0])
        options["micro_batches"] = micro
        return options
    # The aten executor unless the variant names inductor (codegen="auto" picks inductor on CUDA).
    aten = {"codegen": "aten"} if "codegen" in fields else {}
    if kind == "identity":
        options = {"schedule": "identity", **aten}
    elif kind == "ilp":
        options = {"schedule": "ilp", **aten}
    elif kind in ("chunks2", "chunks4", "full"):
        if "chunks" not in fields:
            raise Skip("GraphschedConfig has no 'chunks' option in this version of graphsched")
        chunks: Any = {"chunks2": 2, "chunks4": 4, "full": "auto"}[kind]
        options = {"schedule": "ilp", "chunks": chunks, **aten}
    elif kind.startswith("inductor"):
        # inductor[-chunks2|-chunks4|-auto][-fusefree]: fusefree lets inductor fuse across the
        # plan's collective boundaries (the ablation of fusion_within_segments).
        if "codegen" not in fields:
            raise Skip("GraphschedConfig has no 'codegen' option in this version of graphsched")
        options = {"schedule": "ilp", "codegen": "inductor"}
        base, _, tail = kind.partition("-fusefree")
        if tail or base not in ("inductor", "inductor-chunks2", "inductor-chunks4", "inductor-auto"):
            raise ValueError(kind)
        if base != "inductor":
            options["chunks"] = {"inductor-chunks2": 2, "inductor-chunks4": 4}.get(base, "auto")
        if kind.endswith("-fusefree"):
            if "fusion_within_segments" not in fields:
                raise Skip("GraphschedConfig has no 'fusion_within_segments' option in this version")
            options["fusion_within_segments"] = False
    else:
        raise ValueError(kind)
    try:
        GraphschedConfig(**options)
    except Exception as exc:  # noqa: BLE001 - an option value this version refuses
        raise Skip(f"GraphschedConfig refuses {options}: {exc}") from None
    return options


def _dump_plans(path: str, model: nn.Module) -> None:
    """Each graph's plan (task order, options) and, under inductor, its kernel order with the
    tasks every kernel holds: the plan side of a --profile-dir trace."""
    import json

    from graphsched.api import state_of

    out: dict[str, Any] = {}
    for g in state_of(model).capture.graphs:
        report = g.inductor_report or {}
        kernel_tasks = report.get("kernel_tasks", {})
        out[g.name] = {
            "tasks": [[t.name, t.kind, t.phase] for t in g.plan.tasks] if g.plan else None,
            "options": {k: v for k, v in (g.plan.options if g.plan else {}).items() if k != "inductor"},
            "kernel_order": [[k, kernel_tasks.get(k)] for k in report.get("kernel_order", [])],
            "fallback": g.fallback_reason,
            "predicted_costs_ms": _cost_breakdown(g),
        }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)


def _cost_breakdown(g: Any) -> dict[str, float] | None:
    """The graph's planned costs in ms: matmul-class nodes, the rest of compute, collectives."""
    if g.analysis is None:
        return None
    from graphsched.analysis.costmodel import is_collective_node, node_flops

    nodes = {n.name: n for n in g.gm.graph.nodes}
    out = {"matmul": 0.0, "other_compute": 0.0, "collectives": 0.0}
    for name, cost in g.analysis.node_costs().items():
        node = nodes.get(name)
        if node is None:
            continue
        key = ("collectives" if is_collective_node(node)
               else "matmul" if node_flops(node) > 0 else "other_compute")
        out[key] += cost * 1e3
    return {k: round(v, 3) for k, v in out.items()}


def _note_plans(result: VariantResult, model: nn.Module) -> None:
    from graphsched.api import state_of

    choice = state_of(model).micro_batch_choice
    if choice is not None:
        result.notes.append(f"micro_batches=auto: {choice.describe()}")
    for g in state_of(model).capture.graphs:
        if g.fallback_reason:
            result.notes.append(f"{g.name}: ran UNSCHEDULED ({g.fallback_reason})")
        elif g.plan is not None:
            result.notes.append(f"{g.name}: scheduled, {len(g.plan.tasks)} tasks")
            if "chunks" in g.plan.options:
                result.notes.append(f"{g.name}: chunks {g.plan.options['chunks']}")
            costs = g.plan.options.get("costs")
            if isinstance(costs, dict) and costs.get("from"):
                # profile_steps: whether the profiled costs changed the plan (or were read from the cache).
                result.notes.append(f"{g.name}: costs from {costs['from']}, plan changed {costs.get('plan_changed')}"
                                    + (f" ({costs['kept_profiled_plan']})" if costs.get("kept_profiled_plan") else ""))
            if "chunk_choice" in g.plan.options:
                # chunks="auto": which graph the first steps' timing kept, and what it measured.
                result.notes.append(f"{g.name}: chunk choice {g.plan.options['chunk_choice']}")


def run_graphsched(ctx: BenchContext, result: VariantResult, kind: str) -> None:
    import graphsched

    options = graphsched_options(kind)
    options["solver_time_limit_s"] = ctx.preset.solver_time_limit_s
    if ctx.preset.profile_steps:
        options["profile_steps"] = ctx.preset.profile_steps
    result.notes.append("graphsched options: " + ", ".join(f"{k}={v}" for k, v in options.items()))
    model = build_reference(ctx, ctx.world)
    # graphsched costs the model itself: on CUDA it times the emulated link's collectives.
    graphsched.wrap(model, **options)
    if options.get("chunks") == "auto" or options.get("micro_batches") == "auto":
        # chunks="auto" (micro_batches="auto") times the chunked and the unchunked graph (k = 1
        # and 2 micro-batches) over the first steps (runtime/measured_choice.py): run them
        # before the timed steps, which see the choice.
        from graphsched.runtime.measured_choice import MeasuredChoice

        for _ in range(MeasuredChoice.calls_to_decide()):
            model(*ctx.batch).backward()
            model.zero_grad(set_to_none=True)
    else:
        replan_before_timing(ctx, model, options)
    measure_model(ctx, result, model, [ctx.world])
    _note_plans(result, model)
    if ctx.profile_dir is not None:
        _dump_plans(os.path.join(ctx.profile_dir, f"{ctx.preset.name}_{result.name}.plans.json"), model)
    if ctx.timeline_dir is not None:
        os.makedirs(ctx.timeline_dir, exist_ok=True)
        timelines = graphsched.timeline(model, step_fn=lambda: model(*ctx.batch).backward())
        base = os.path.join(ctx.timeline_dir, f"timeline_{ctx.preset.name}_{result.name}")
        timelines.write_png(base + ".png")
        timelines.write_trace(base + ".trace.json")
        result.notes.append(f"timeline: {base}.png; " + timelines.summary().splitlines()[0])


def run_rewrite_on_inductor_classic(ctx: BenchContext, result: VariantResult) -> None:
    """Ablation: graphsched's chunk rewrite (chunks="auto", decided as graphsched-inductor-auto
    decides) compiled by plain inductor in inductor-classic's order, not graphsched's plan: what
    graphsched's own order adds beside its rewrite."""
    from torch._inductor.compile_fx import compile_fx

    from graphsched.config import GraphschedConfig
    from graphsched.partition.chunking import make_graph_transform

    patches = inductor_patches("classic")
    transform = make_graph_transform(GraphschedConfig(chunks="auto", cost_model="analytic",
                                                      solver_time_limit_s=ctx.preset.solver_time_limit_s))
    assert transform is not None

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        gm, decisions = transform.rewrite(gm, example_inputs)
        decided = {rid: d.get("k") for rid, d in decisions.items()}
        result.notes.append(f"chunks per region: {decided}")
        with torch._inductor.config.patch(patches):
            return compile_fx(gm, example_inputs)

    model = build_reference(ctx, ctx.world)
    compiled = torch.compile(model, backend=backend)
    measure_model(ctx, result, compiled, [ctx.world], lambda: torch._inductor.config.patch(patches))


#: variant name -> runner(ctx, result)
RUNNERS: dict[str, Callable[[BenchContext, VariantResult], None]] = {
    "eager": lambda c, r: run_eager(c, r),
    "compute-only": lambda c, r: run_eager(c, r, compute_only=True),
    "comm-only": run_comm_only,
    "inductor": lambda c, r: run_inductor(c, r, "plain"),
    "compute-only-inductor": lambda c, r: run_inductor(c, r, "plain", compute_only=True),
    "inductor-reorder": lambda c, r: run_inductor(c, r, "reorder"),
    "inductor-classic": lambda c, r: run_inductor(c, r, "classic"),
    "inductor-overlap": lambda c, r: run_inductor(c, r, "overlap"),
    "deepspeed": lambda c, r: run_deepspeed(c, r),
    "compute-only-deepspeed": lambda c, r: run_deepspeed(c, r, compute_only=True),
    "deepspeed+graphsched": lambda c, r: run_deepspeed(c, r, graphsched_kind="ilp"),
    "graphsched-identity": lambda c, r: run_graphsched(c, r, "identity"),
    "graphsched-ilp": lambda c, r: run_graphsched(c, r, "ilp"),
    "graphsched-chunks2": lambda c, r: run_graphsched(c, r, "chunks2"),
    "graphsched-chunks4": lambda c, r: run_graphsched(c, r, "chunks4"),
    "graphsched-full": lambda c, r: run_graphsched(c, r, "full"),
    "graphsched-inductor": lambda c, r: run_graphsched(c, r, "inductor"),
    "graphsched-inductor-fusefree": lambda c, r: run_graphsched(c, r, "inductor-fusefree"),
    "graphsched-inductor-chunks2": lambda c, r: run_graphsched(c, r, "inductor-chunks2"),
    "graphsched-inductor-chunks2-fusefree": lambda c, r: run_graphsched(c, r, "inductor-chunks2-fusefree"),
    "graphsched-inductor-chunks4": lambda c, r: run_graphsched(c, r, "inductor-chunks4"),
    "graphsched-inductor-auto": lambda c, r: run_graphsched(c, r, "inductor-auto"),
    "graphsched-rewrite+inductor-classic": run_rewrite_on_inductor_classic,
    "eager-mb2": lambda c, r: run_eager(c, r, micro_batches=2),
    "compute-only-inductor-mb2": lambda c, r: run_inductor(c, r, "plain", compute_only=True, micro_batches=2),
    "inductor-classic-mb2": lambda c, r: run_inductor(c, r, "classic", micro_batches=2),
    "graphsched-inductor-mb2": lambda c, r: run_graphsched(c, r, "inductor-mb2"),
    "graphsched-inductor-chunks2-mb2": lambda c, r: run_graphsched(c, r, "inductor-chunks2-mb2"),
    "graphsched-inductor-chunks4-mb2": lambda c, r: run_graphsched(c, r, "inductor-chunks4-mb2"),
    "graphsched-inductor-mbauto": lambda c, r: run_graphsched(c, r, "inductor-mbauto"),
    # Four micro-batches: finer interleaving against twice the collective calls of -mb2.
    "eager-mb4": lambda c, r: run_eager(c, r, micro_batches=4),
    "compute-only-inductor-mb4": lambda c, r: run_inductor(c, r, "plain", compute_only=True, micro_batches=4),
    "inductor-classic-mb4": lambda c, r: run_inductor(c, r, "classic", micro_batches=4),
    "graphsched-inductor-mb4": lambda c, r: run_graphsched(c, r, "inductor-mb4"),
}


def run_variant(ctx: BenchContext, name: str) -> VariantResult:
    """Run one variant in isolation: fresh compile caches, memory freed afterwards, errors caught."""
    result = VariantResult(name=name, family=family_of(name), status="failed")
    torch._dynamo.reset()
    free_device_memory(ctx.device)
    try:
        RUNNERS[name](ctx, result)
    except Skip as exc:
        result.status, result.reason = "skipped", str(exc)
    except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
        result.status = "failed"
        result.reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:2000]
        result.notes.append(traceback.format_exc(limit=8)[-3000:])
    finally:
        torch._dynamo.reset()
        free_device_memory(ctx.device)
    return result
