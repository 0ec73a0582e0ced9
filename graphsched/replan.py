"""Profile-guided planning: plan again from what the compiled step really cost.

``ProfileGuidance`` (made by ``wrap`` when ``profile_steps`` resolves to more than 0) is what the
capture backend asks, per graph it plans:

* before planning, :meth:`ProfileGuidance.cached_costs`: rank 0 looks for the graph's profiled
  costs on disk and shares what it found; with them the graph is planned from those numbers
  and nothing is profiled;
* after compiling, :meth:`ProfileGuidance.guard`: the compiled function is wrapped in a
  ``ProfiledGraph`` (``runtime/profiled_graph.py``) whose first calls are profiled and whose
  decision is a :class:`Replanner`.

``Replanner`` runs inside the graph's first call after the profiled ones, on every rank at the
same point: rank 0 attributes its samples to per-node costs (``analysis/step_costs.py``) and
shares them through the store (every rank then plans from rank 0's numbers, as the planner's own
cost agreement would have them); the planner plans again (rank 0 solves and broadcasts, as at
compile time); the costs are cached for the next run; and only when the plan's content changed is
the graph compiled again (the aten executor rebuilt, or ``compile_plan`` for inductor), its plan
checked across ranks before its first run (``verify_same_plan``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.fx as fx

from graphsched.agreement import keeps_alive, share_from_rank0, world_is_distributed
from graphsched.analysis.cost_cache import CachedCosts, StepCostCache, cost_key
from graphsched.analysis.graph import GraphAnalysis
from graphsched.analysis.profiler import device_label
from graphsched.analysis.provenance import describe_sources
from graphsched.analysis.step_costs import StepCosts, collective_call_costs, kernel_step_costs, task_step_costs
from graphsched.analysis.trace_events import call_trace
from graphsched.codegen.launches import compiled_source, launch_sites
from graphsched.plan import Plan
from graphsched.runtime.executor import GraphExecutor
from graphsched.runtime.profiled_graph import CallProfiler, CallSample, ProfiledGraph, ProfileSchedule

if TYPE_CHECKING:
    from graphsched.capture import CapturedGraph

log = logging.getLogger(__name__)

#: (analysis, gm) -> Plan, as the capture backend's planner.
Planner = Callable[[GraphAnalysis, fx.GraphModule], Plan]
#: plan -> (the graph's log entry for it, the function that runs it).
Rebuild = Callable[[Plan], "tuple[CapturedGraph, Callable[[list[Any]], Any]]"]
#: Plan options the planner does not make but that belong to the graph (kept on a new plan).
_GRAPH_OPTIONS = ("chunks", "chunk_choice")
#: A new plan that predicts its own time must beat the profiled plan, under the same profiled
#: costs, by this fraction to be compiled: a recompile (inductor's kernels renamed in the new
#: order are compiled again) costs far more than a gain inside the prediction's noise.
MIN_GAIN = 0.01


def is_rank0() -> bool:
    return not world_is_distributed() or torch.distributed.get_rank() == 0


def describe_costs(info: dict[str, Any]) -> str:
    """One ``explain`` line on where a plan's costs came from (``Plan.options["costs"]``)."""
    origin = info.get("from")
    if origin == "cache":
        head = f"planned from cached profiled costs ({info.get('calls', '?')} profiled calls)"
    elif origin == "profiled":
        changed = info.get("plan_changed")
        head = (f"re-planned from {info.get('calls', '?')} profiled calls "
                + ("(plan changed: recompiled)" if changed else "(plan unchanged)"))
    else:
        head = f"profiled, kept its plan ({info.get('reason', 'nothing measured')})"
    summary = info.get("summary")
    return head + (f"; costs {describe_sources(summary)}" if summary else "")


@dataclass
class ProfileGuidance:
    """Profile-guided planning for every graph of one wrapped model (see the module doc)."""

    steps: int
    cache: StepCostCache | None
    device: torch.device

    def key(self, analysis: GraphAnalysis, codegen: str) -> str:
        return cost_key(analysis.graph_hash, codegen, device_label(self.device))

    @keeps_alive
    def cached_costs(self, analysis: GraphAnalysis, codegen: str) -> CachedCosts | None:
        """Rank 0's cached costs of this graph (every rank calls this, in the same order)."""
        found = None
        if is_rank0() and self.cache is not None:
            entry = self.cache.load(self.key(analysis, codegen))
            found = entry.to_dict() if entry is not None else None
        shared = share_from_rank0(found, f"cached step costs {analysis.name}")
        return CachedCosts.from_dict(shared) if shared is not None else None

    def apply_cached(self, analysis: GraphAnalysis, entry: CachedCosts) -> dict[str, Any]:
        """Plan ``analysis`` from ``entry``; returns what ``Plan.options["costs"]`` records."""
        analysis.set_costs(entry.costs, entry.sources)
        return {"from": "cache", "calls": entry.calls, "summary": analysis.cost_summary()}

    def guard(
        self,
        graph: "CapturedGraph",
        runnable: Callable[[list[Any]], Any],
        gm: fx.GraphModule,
        planner: Planner,
        rebuild: Rebuild,
        codegen: str,
        profile: bool = True,
    ) -> ProfiledGraph:
        """``runnable`` profiled over its first calls and re-planned after them (``profile=False``:
        its costs came from the cache; it only runs, and can be timed or given another plan).
        ``codegen``: the codegen the graph was meant for (the cache key's, even where inductor
        fell back to the aten executor)."""
        aten = graph.executor is not None
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        profiler = CallProfiler(
            self.device,
            record_tasks=aten,
            # The aten executor's tasks are timed by its recorder; on a GPU the trace adds the
            # collectives' real transfer times (the recorder only bounds a hidden one).
            trace=not aten or self.device.type == "cuda",
            rank=rank,
        )
        replanner = Replanner(graph, gm, planner, rebuild, self, codegen, runnable)
        runner = ProfiledGraph(graph.name, runnable, ProfileSchedule(self.steps), profiler,
                               replanner if profile else None)
        replanner.runner = runner
        graph.runner, graph.replanner = runner, replanner
        return runner


@dataclass
class Replanner:
    """The decision of one profiled graph (see the module doc): ``samples -> new function | None``."""

    graph: "CapturedGraph"
    gm: fx.GraphModule
    planner: Planner
    rebuild: Rebuild
    guidance: ProfileGuidance
    #: the codegen the graph was meant for (what its cache key names)
    codegen: str
    #: what runs the graph now (whose code the samples profiled)
    current: Callable[[list[Any]], Any]
    runner: ProfiledGraph | None = None
    #: the attribution rank 0 shared, once made
    step_costs: StepCosts | None = field(default=None, init=False)
    #: what was profiled, kept for inspection: the samples, the plan and what ran it, the
    #: inductor report of that code (benchmarks.prediction re-attributes from them)
    samples: list[CallSample] = field(default_factory=list, init=False)
    profiled: tuple[Plan, Callable[[list[Any]], Any], dict[str, Any] | None] | None = field(default=None, init=False)

    def attribute(
        self,
        samples: Sequence[CallSample],
        plan: Plan,
        runnable: Callable[[list[Any]], Any],
        report: dict[str, Any] | None,
        fold_gaps: bool = True,
    ) -> StepCosts:
        """Per-node costs from this rank's ``samples`` of ``plan`` run by ``runnable`` (the aten
        executor, or inductor's code with its order-pass ``report``)."""
        analysis = self.graph.analysis
        assert analysis is not None
        estimates = analysis.node_costs()
        issues = {c.issue for c in analysis.collectives}
        if isinstance(runnable, GraphExecutor):  # its recorder timed the tasks
            ops = {n: analysis.node(n).op for n in issues}
            calls, collectives = [], []
            for s in samples:
                timings = s.timings()
                if timings is None:
                    continue
                calls.append(timings)
                trace = call_trace(s.trace, s.label) if s.trace else None
                measured = collective_call_costs(trace, plan, ops, estimates) if trace is not None else {}
                collectives.append(measured if issues <= set(measured) else None)
            return task_step_costs(calls, plan, estimates, collectives, fold_gaps)
        source = compiled_source(runnable)
        if source is None:
            raise RuntimeError("the compiled graph exposes no wrapper source to map its kernels to tasks")
        report = report or {}
        sites = launch_sites(source, set(plan.node_order()), report.get("kernel_buffers"),
                             report.get("kernel_origins"), report.get("kernel_order"))
        traces = [t for s in samples if s.trace for t in [call_trace(s.trace, s.label)] if t is not None]
        step = kernel_step_costs(traces, sites, estimates, issues, fold_gaps)
        step.details["launches"] = float(len(sites))
        step.details["unmapped_launches"] = float(sum(1 for s in sites if not s.nodes))
        return step

    @keeps_alive
    def __call__(self, samples: list[CallSample]) -> Callable[[list[Any]], Any] | None:
        graph = self.graph
        analysis, old = graph.analysis, graph.plan
        assert analysis is not None and old is not None
        payload: dict[str, Any] | None = None
        reason = "nothing measured"
        self.samples = list(samples)
        self.profiled = (old, self.current, graph.inductor_report)
        if is_rank0():
            try:
                step = self.attribute(samples, *self.profiled)
                if step.measured:
                    payload = step.to_dict()
            except Exception as exc:  # noqa: BLE001 - the plan stays; training goes on
                reason = f"attribution failed: {type(exc).__name__}: {exc}"
                log.warning("%s: %s; the plan stays as it is", graph.name, reason)
        # Every rank plans from rank 0's numbers (or keeps its plan with everyone else).
        payload = share_from_rank0(payload, f"step costs {graph.name}")
        if payload is None:
            old.options = {**old.options, "costs": {"from": "kept", "reason": reason}}
            return None
        step = StepCosts.from_dict(payload)
        self.step_costs = step
        graph.profiled_plan = old
        analysis.set_costs(step.costs, step.sources())
        t0 = time.perf_counter()
        replanning = getattr(self.planner, "for_replanning", None)
        planner = replanning() if callable(replanning) else self.planner
        plan = planner(analysis, self.gm)
        plan_s = time.perf_counter() - t0
        plan.options = {**{k: old.options[k] for k in _GRAPH_OPTIONS if k in old.options}, **plan.options}
        if is_rank0() and self.guidance.cache is not None:
            entry = CachedCosts(analysis.node_costs(), analysis.cost_sources(), step.calls)
            self.guidance.cache.store(self.guidance.key(analysis, self.codegen), entry)
        changed = plan.content_hash() != old.content_hash()
        kept_reason = None
        if changed and plan.predicted_time is not None:
            from graphsched.schedule.predict import with_predictions

            again = with_predictions(old, analysis)
            if again.predicted_time is not None and again.predicted_time <= plan.predicted_time * (1 + MIN_GAIN):
                kept_reason = (f"the new plan is predicted {again.predicted_time * 1e3:.3f} -> "
                               f"{plan.predicted_time * 1e3:.3f} ms, under {MIN_GAIN:.0%} faster")
                again.options = {**old.options, **{k: v for k, v in plan.options.items() if k not in old.options}}
                plan, changed = again, False
                remember = getattr(self.planner, "remember", None)
                if callable(remember):
                    remember(analysis, plan)
        plan.options["costs"] = {
            "from": "profiled", "calls": step.calls, "summary": analysis.cost_summary(),
            "details": step.details, "plan_changed": changed, "plan_s": plan_s,
            "profiled_plan_predicted_time": old.predicted_time,
        }
        if kept_reason is not None:
            plan.options["costs"]["kept_profiled_plan"] = kept_reason
        log.info("%s: re-planned from %d profiled calls (%s); predicted %.3f ms, plan %s", graph.name,
                 step.calls, describe_sources(plan.options["costs"]["summary"]),
                 (plan.predicted_time or 0.0) * 1e3, "changed" if changed else "unchanged")
        if not changed:
            if "inductor" in old.options:
                plan.options["inductor"] = old.options["inductor"]
                plan.options["codegen"] = old.options.get("codegen", "inductor")
            graph.plan = plan
            return None
        return self.install(plan)

    def install(self, plan: Plan) -> Callable[[list[Any]], Any]:
        """Compile ``plan`` for this graph and make it the graph's plan; returns what runs it."""
        fresh, runnable = self.rebuild(plan)
        graph = self.graph
        graph.plan, graph.executor = fresh.plan, fresh.executor
        graph.codegen, graph.inductor_report = fresh.codegen, fresh.inductor_report
        self.current = runnable
        if self.runner is not None and self.runner.decided:
            self.runner.install(runnable)
        return runnable
