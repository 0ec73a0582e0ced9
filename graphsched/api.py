"""The public entry points: ``wrap``, ``unwrap`` and ``explain``.

``wrap`` compiles the model in place (like ``nn.Module.compile``): the object, its parameters and
its ``state_dict`` keys stay the same, so any optimizer, checkpoint or training loop keeps working;
only ``model(...)`` now runs graphsched's captured and scheduled graphs.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from graphsched.analysis.graph import CostFn, GraphAnalysis
from graphsched.analysis.report import render_report
from graphsched.capture import CaptureLog, GraphschedBackend, Planner
from graphsched.codegen.compiler import describe_codegen
from graphsched.config import GraphschedConfig
from graphsched.errors import ConfigError, GraphschedError, GraphschedFallbackWarning, graphsched_cause
from graphsched.microbatch import AUTO_CANDIDATES, MicroBatchChoice, micro_batched
from graphsched.plan import ModelPlan, Plan
from graphsched.replan import ProfileGuidance, describe_costs
from graphsched.runtime.recorder import StepRecorder
from graphsched.runtime.groups import GroupFingerprint, check_same_groups, fingerprint, group_slots

_STATE_ATTR = "_graphsched"


@dataclass
class GraphschedState:
    """What graphsched keeps on a wrapped model."""

    config: GraphschedConfig
    capture: CaptureLog
    groups: GroupFingerprint
    group_slots: list
    compiled: Callable[..., Any]
    #: Calls of the wrapped model so far.
    calls: int = 0
    #: With micro_batches="auto": what the choice measured and decided (once decided).
    micro_batch_choice: Any = None


class _GuardedCall:
    """Checks the process groups, then runs the compiled call (installed as ``_compiled_call_impl``)."""

    def __init__(self, state: GraphschedState) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.state.config.check_process_groups:
            check_same_groups(self.state.groups, fingerprint(self.state.group_slots))
        self.state.calls += 1
        try:
            out = self.state.compiled(*args, **kwargs)
        except Exception as exc:
            # Dynamo wraps graphsched's errors in BackendCompilerFailed with its bug-report advice.
            cause = graphsched_cause(exc)
            if cause is None or cause is exc:
                raise
            raise cause from None
        if self.state.calls == 1 and self.state.capture.dynamo_graphs == 0:
            from graphsched.reasons import nothing_to_schedule

            warnings.warn(nothing_to_schedule(self.state) or "", GraphschedFallbackWarning, stacklevel=2)
        return out


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")




def make_planner(config: GraphschedConfig) -> Planner:
    from graphsched.schedule.plans import simple_plan

    if config.schedule in ("identity", "reverse_independent"):
        return lambda analysis, gm: simple_plan(analysis, gm, config.schedule)
    if config.schedule == "ilp":
        from graphsched.schedule.planner import IlpPlanner

        return IlpPlanner.from_config(config)
    raise ConfigError(f"schedule={config.schedule!r} has no planner; use one of identity, ilp.")


def wrap(
    model: nn.Module,
    config: GraphschedConfig | None = None,
    *,
    planner: Planner | None = None,
    cost_fn: CostFn | None = None,
    **options: Any,
) -> nn.Module:
    """Make ``model`` run its forward and backward as graphsched-scheduled graphs.

    Returns the same module object (compiled in place). Options are GraphschedConfig fields, e.g.
    ``wrap(model, schedule="identity")``; ``planner`` and ``cost_fn`` replace the planning and cost
    steps (for experiments and tests).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"graphsched.wrap expects a torch.nn.Module, got {type(model).__name__}.")
    if config is not None and not isinstance(config, GraphschedConfig):
        raise ConfigError(
            f"graphsched.wrap's second argument is a GraphschedConfig, not {config!r}; pass options "
            f"by name, e.g. graphsched.wrap(model, schedule={config!r})."
        )
    if config is None:
        config = GraphschedConfig.from_options(**options)
    elif options:
        config = config.replace(**options)
    from graphsched.integrations import inner_module, prepare_for_capture

    target = inner_module(model)  # a DeepSpeed engine: wrap the module it trains
    if target is not model:
        wrap(target, config, planner=planner, cost_fn=cost_fn)
        return model
    if getattr(model, _STATE_ATTR, None) is not None:
        unwrap(model)
    from graphsched.fingerprint import check_same_options

    check_same_options(config)  # first, so every later exchange is made alike on every rank
    # DeepSpeed MoE layers get a capturable all-to-all (per instance; nothing global changes).
    # Random gating is accepted only where nothing is reordered.
    prepare_for_capture(model, allow_random_gating=config.schedule == "identity")
    from graphsched.analysis.cost_source import make_cost_fn, measure_comm_model
    from graphsched.codegen.settings import resolve_codegen
    from graphsched.partition.chunking import make_graph_transform

    device = _model_device(model)
    # The collective sweep is measured here, where every rank runs the same code in order (a
    # graph's own collectives are timed at its analysis, after the ranks agree on them).
    needs_comm = cost_fn is None or config.chunks != 1
    comm = measure_comm_model(config.cost_model, device) if needs_comm else None
    cost = cost_fn or make_cost_fn(config.cost_model, device, comm, config.cache_dir,
                                   fused=resolve_codegen(config.codegen, device) == "inductor")
    chunking = make_graph_transform(config, comm)
    guidance = _profile_guidance(config, device)

    def compile_call(count: int, log: CaptureLog) -> Callable[..., Any]:
        backend = GraphschedBackend(config, planner or make_planner(config), cost, log,
                                    graph_rewrite=None if chunking is None else chunking.rewrite,
                                    guidance=guidance)
        # With micro-batches the split and the join are inside the compiled call: one graph holds
        # every micro-batch, so the plan can overlap one's compute with another's collectives.
        # dynamic=False: a new input shape recompiles into new static-shape graphs, which the
        # cost model and planner can reason about, instead of symbolic-shape graphs.
        return torch.compile(micro_batched(model._call_impl, count), backend=backend,
                             fullgraph=config.fullgraph, dynamic=False)

    slots = group_slots(model)
    if config.micro_batches == "auto":
        logs = {k: CaptureLog() for k in AUTO_CANDIDATES}
        calls = {k: compile_call(k, logs[k]) for k in AUTO_CANDIDATES}
        state = GraphschedState(config, logs[1], fingerprint(slots), slots, calls[1])
        state.compiled = _micro_batch_choice(state, calls, logs, device)
    else:
        log = CaptureLog()
        state = GraphschedState(config, log, fingerprint(slots), slots, compile_call(config.micro_batches, log))
    setattr(model, _STATE_ATTR, state)
    model._compiled_call_impl = _GuardedCall(state)  # the hook nn.Module.compile uses
    return model


def _profile_guidance(config: GraphschedConfig, device: torch.device) -> ProfileGuidance | None:
    """Profile-guided planning for ``config`` on ``device`` (None when ``profile_steps`` is off)."""
    steps = config.profiled_steps(device.type)
    if steps <= 0:
        return None
    from graphsched.analysis.cost_cache import StepCostCache
    from graphsched.config import default_cache_dir

    return ProfileGuidance(steps, StepCostCache(config.cache_dir or default_cache_dir()), device)


def _micro_batch_choice(state: GraphschedState, calls: dict[int, Callable[..., Any]],
                        logs: dict[int, CaptureLog], device: torch.device) -> Callable[..., Any]:
    """micro_batches="auto": the compiled calls measured against each other (MicroBatchChoice);
    the chosen count's capture log becomes the model's."""
    from graphsched.agreement import share_from_rank0, world_is_distributed
    from graphsched.runtime.measured_choice import MeasuredChoice

    def on_decided(chosen: str, record: Any) -> None:
        state.capture = logs[int(chosen)]
        state.micro_batch_choice = record

    variants = {str(k): (lambda packed, call=call: call(*packed[0], **packed[1])) for k, call in calls.items()}
    rank0 = not world_is_distributed() or torch.distributed.get_rank() == 0
    choice = MeasuredChoice(
        variants, "1", device,
        share=lambda chosen: share_from_rank0(chosen, "micro-batch-choice"),
        on_decided=on_decided, is_rank0=rank0,
    )
    return MicroBatchChoice(choice, calls[1], tuple(k for k in calls if k > 1))


def unwrap(model: nn.Module) -> nn.Module:
    """Undo ``wrap``: the model runs eagerly again."""
    if getattr(model, _STATE_ATTR, None) is None:
        return model
    model._compiled_call_impl = None
    setattr(model, _STATE_ATTR, None)
    return model


def state_of(model: nn.Module) -> GraphschedState:
    # DeepSpeed's engine and DDP keep the wrapped model as .module.
    inner = model
    while getattr(inner, _STATE_ATTR, None) is None and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    state = getattr(inner, _STATE_ATTR, None)
    if state is None:
        raise GraphschedError(
            "this model is not wrapped by graphsched; call graphsched.wrap(model) first."
        )
    return state


def captured_analyses(model: nn.Module) -> list[GraphAnalysis]:
    return [g.analysis for g in state_of(model).capture.graphs if g.analysis is not None]


def captured_plans(model: nn.Module) -> dict[str, Plan]:
    return {g.name: g.plan for g in state_of(model).capture.graphs if g.plan is not None}


def captured_graphs(model: nn.Module) -> dict[str, fx.GraphModule]:
    return {g.name: g.gm for g in state_of(model).capture.graphs}


@contextlib.contextmanager
def record(model: nn.Module, rank: int | None = None) -> Iterator[StepRecorder]:
    """Record every scheduled task's start and end while the block runs (one or more steps).

    ``with graphsched.record(model) as rec: step()`` then ``rec.finish()`` lists TaskTimings and
    ``rec.plans`` holds the plans they were recorded under (for ``Timeline.from_timings``). Graphs
    compiled inside the block are recorded from their first run on.
    """
    state = state_of(model)
    if rank is None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    recorder = StepRecorder(rank=rank)
    # Taken before and after the block: a measured choice may drop a variant's graphs meanwhile.
    recorder.plans = captured_plans(model)
    state.capture.recorder = recorder
    try:
        for g in state.capture.graphs:
            if g.executor is not None:
                g.executor.recorder = recorder
        yield recorder
    finally:
        for g in state.capture.graphs:
            if g.executor is not None:
                g.executor.recorder = None
        state.capture.recorder = None
        recorder.plans.update(captured_plans(model))
        recorder.finish()


def save_plans(model: nn.Module, path: str) -> ModelPlan:
    """Write the plans of every scheduled graph to ``path`` (reuse with ``wrap(..., schedule="ilp", plan_file=path)``)."""
    plans = ModelPlan(plans=captured_plans(model))
    from graphsched.reasons import nothing_to_schedule

    reason = nothing_to_schedule(state_of(model))
    if not plans.plans and reason:
        raise GraphschedError(f"no plan to save. {reason}")
    graphs = state_of(model).capture.graphs
    if not plans.plans and graphs:
        raise GraphschedError(
            "no scheduled graph to save: every captured graph runs unscheduled ("
            + "; ".join(f"{g.name}: {g.fallback_reason}" for g in graphs) + ")."
        )
    if not plans.plans:
        raise GraphschedError(
            "no scheduled graph to save: run one training step of the wrapped model first."
        )
    with open(path, "w") as f:
        f.write(plans.to_json())
    return plans


def _chunk_choice_line(name: str, choice: dict) -> str:
    medians = ", ".join(f"{v} {t * 1e3:.2f} ms" for v, t in choice.get("median_step_s", {}).items())
    return f"\n  {name}: chunking measured against the unchunked graph ({medians}): runs {choice.get('chosen')}"


def explain(model: nn.Module, file: IO[str] | None = sys.stdout) -> str:
    """Print (and return) what graphsched captured: node labels, collectives, overlap regions."""
    state = state_of(model)
    graphs = state.capture.graphs
    from graphsched.reasons import describe_solve, nothing_to_schedule

    reason = nothing_to_schedule(state)
    if not graphs and reason:
        if file is not None:
            print(reason, file=file)
        return reason
    if not graphs:
        raise GraphschedError(
            "graphsched has not captured anything yet: run one forward (and backward) step of the "
            "wrapped model, then call graphsched.explain(model)."
        )
    header = (
        f"graphsched: {len(graphs)} graph(s) captured, schedule={state.config.schedule!r}"
        + ("\n" + reason if reason else
           "".join(f"\n  {g.name}: runs unscheduled ({g.fallback_reason})" for g in graphs if g.fallback_reason))
        + "".join(f"\n  {g.name}: {describe_solve(g.plan.options)}" for g in graphs
                  if g.plan is not None and describe_solve(g.plan.options))
        + "".join(_chunk_choice_line(g.name, g.plan.options["chunk_choice"]) for g in graphs
                  if g.plan is not None and "chunk_choice" in g.plan.options)
        + "".join(f"\n  {g.name}: {describe_codegen(g.plan)}" for g in graphs if g.codegen == "inductor" and g.plan)
        + "".join(f"\n  {g.name}: {describe_costs(g.plan.options['costs'])}" for g in graphs
                  if g.plan is not None and "costs" in g.plan.options)
        + (f"\n  micro_batches=\"auto\": {state.micro_batch_choice.describe()} micro-batch(es)"
           if state.micro_batch_choice is not None else "")
    )
    text = render_report([g.analysis for g in graphs if g.analysis is not None], header)
    if file is not None:
        print(text, file=file)
    return text
