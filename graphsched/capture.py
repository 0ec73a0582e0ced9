"""Capture: turn a module's forward and backward into aten FX graphs and hand them to graphsched.

``torch.compile`` (Dynamo) captures the Python forward; AOTAutograd splits it into a forward and a
backward graph in aten IR, with functional collectives as separate issue (``all_to_all_single``)
and wait (``wait_tensor``) nodes. graphsched is the AOTAutograd "compiler": for every graph it
analyses, plans and returns a :class:`GraphExecutor` that runs the graph in the plan's order.

For the aten executor the default partitioner is used (every intermediate the backward needs is
saved, nothing is recomputed), so the backward runs exactly the ops eager autograd would; graphs
for inductor are partitioned as torch.compile does (``codegen.settings.partition_fn_for``).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from graphsched.agreement import keeps_alive, verify_same_plan
from graphsched.analysis.costmodel import device_of
from graphsched.analysis.graph import CostFn, GraphAnalysis, analyse_graph
from graphsched.analysis.labels import GraphKind
from graphsched.codegen.compiler import compile_graph, compile_plan
from graphsched.codegen.settings import (
    inductor_aot_options,
    inductor_deterministic,
    partition_fn_for,
    resolve_codegen,
)
from graphsched.compat import aot_autograd, unset_fake_temporarily
from graphsched.config import GraphschedConfig
from graphsched.errors import ConfigError, GraphschedFallbackWarning, PlanMismatchError, UnwaitedCollectiveError
from graphsched.plan import Plan
from graphsched.fingerprint import check_same_graph
from graphsched.replan import ProfileGuidance
from graphsched.runtime.executor import GraphExecutor

log = logging.getLogger(__name__)

#: Chooses the plan of one analysed graph: (analysis, graph module) -> Plan.
Planner = Callable[[GraphAnalysis, fx.GraphModule], Plan]
#: Rewrites the Dynamo graph (torch-level IR) before AOTAutograd: (gm, example inputs) -> (gm,
#: decisions). The graph must keep its inputs (order and meaning) and outputs; the decisions
#: (JSON-able, falsy when there is nothing to say) go into the options of every plan of the graph.
GraphRewrite = Callable[[fx.GraphModule, Sequence[Any]], tuple[fx.GraphModule, Any]]


@dataclass
class CapturedGraph:
    """One graph graphsched was handed, what it learnt about it and how it runs it."""

    name: str
    kind: GraphKind
    gm: fx.GraphModule
    analysis: GraphAnalysis | None
    plan: Plan | None
    #: Why the graph runs unscheduled (None when it runs under a plan).
    fallback_reason: str | None = None
    #: Backward graphs: the output positions that are parameter gradients.
    param_grad_positions: list[int] | None = None
    #: The executor running the plan (None when the graph runs unscheduled or on inductor).
    executor: GraphExecutor | None = None
    #: What runs the graph: "aten" (the executor or the captured graph) or "inductor".
    codegen: str = "aten"
    #: codegen="inductor": what the order pass did (kernel order, task -> kernels, windows).
    inductor_report: dict[str, Any] | None = None
    #: profile_steps > 0: the ProfiledGraph AOTAutograd calls (profiles, then re-plans once).
    runner: Any = None
    #: profile_steps > 0: the graph's Replanner (its ``install(plan)`` compiles another plan).
    replanner: Any = None
    #: The plan whose steps were profiled, once the graph was re-planned from them.
    profiled_plan: Plan | None = None


@dataclass
class CaptureLog:
    """Every graph captured for one wrapped model, in capture order."""

    graphs: list[CapturedGraph] = field(default_factory=list)
    dynamo_graphs: int = 0
    #: A StepRecorder while ``graphsched.record`` is active: executors made meanwhile record too.
    recorder: Any = None

    def latest(self, kind: GraphKind) -> CapturedGraph | None:
        for g in reversed(self.graphs):
            if g.kind == kind:
                return g
        return None


def _boxed(gm: fx.GraphModule) -> Callable[[list[Any]], Any]:
    def run(args: list[Any]) -> Any:
        values = list(args)
        args.clear()
        return gm(*values)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _output_count(gm: fx.GraphModule) -> int:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    args = out.args[0]
    return len(args) if isinstance(args, (tuple, list)) else 1


class GraphschedBackend:
    """The torch.compile backend: AOTAutograd with graphsched compiling every graph it produces."""

    def __init__(
        self,
        config: GraphschedConfig,
        planner: Planner,
        cost_fn: CostFn,
        log_: CaptureLog,
        graph_rewrite: GraphRewrite | None = None,
        guidance: ProfileGuidance | None = None,
    ) -> None:
        self.config = config
        self.planner = planner
        self.cost_fn = cost_fn
        self.log = log_
        self.graph_rewrite = graph_rewrite
        #: Profile-guided planning (None: plans come from the cost function alone).
        self.guidance = guidance
        self._warned = False
        self._warned_inductor = False
        self._inductor_deterministic = False

    @keeps_alive
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        gid = self.log.dynamo_graphs
        self.log.dynamo_graphs += 1
        check_same_graph(f"g{gid}", gm, example_inputs)
        # AOTAutograd's flat inputs are the graph module's own parameters and buffers, then the
        # example inputs; the backward returns one gradient per flat input, in the same order.
        n_params = sum(1 for _ in gm.parameters())
        n_buffers = sum(1 for _ in gm.buffers())
        param_mask = [True] * n_params + [False] * n_buffers + [
            isinstance(x, torch.nn.Parameter) for x in example_inputs
        ]
        device = device_of(example_inputs)
        # Read in the user's thread: inductor's config is thread-local, and AOTAutograd may compile
        # the backward on autograd's thread.
        self._inductor_deterministic = inductor_deterministic()
        if self.graph_rewrite is None:
            return self._aot(gm, example_inputs, f"g{gid}", param_mask, device, None)
        from graphsched.partition.waits import inline_wait_functions

        # The graph as captured (waits made plain: the same ops), kept beside the rewrite, which
        # builds a new fx.Graph and leaves this one as it is.
        inline_wait_functions(gm)
        unchanged = fx.GraphModule(gm, gm.graph)
        unchanged.meta = dict(gm.meta)
        # Rewrites before differentiation (e.g. micro-chunking) get their backward from
        # AOTAutograd, so forward and backward stay consistent by construction. What the rewrite
        # decided (e.g. chunks per region) comes back with it and goes into every plan's options.
        gm, decisions = self.graph_rewrite(gm, example_inputs)
        chunked = any(int(d.get("k", 1)) > 1 for d in (decisions or {}).values())
        if not (chunked and self.config.chunks == "auto" and self.config.measure_chunks):
            return self._aot(gm, example_inputs, f"g{gid}", param_mask, device, decisions)
        # A predicted gain is checked against the clock: both graphs are compiled and the first
        # steps run each in turn (runtime/measured_choice.py).
        variants = {
            "chunked": self._aot(gm, example_inputs, f"g{gid}", param_mask, device, decisions),
            "unchunked": self._aot(unchanged, example_inputs, f"g{gid}u", param_mask, device, None),
        }
        from graphsched.agreement import share_from_rank0, world_is_distributed
        from graphsched.runtime.measured_choice import MeasuredChoice

        rank0 = not world_is_distributed() or torch.distributed.get_rank() == 0
        return MeasuredChoice(
            variants, "unchunked", device,
            share=lambda choice: share_from_rank0(choice, "chunk-choice"),
            on_decided=partial(self._keep_variant, gid),
            is_rank0=rank0,
        )

    def _aot(self, gm: fx.GraphModule, example_inputs: Sequence[Any], name: str, param_mask: list[bool],
             device: torch.device, decisions: Any) -> Callable[..., Any]:
        compile_ = partial(self._compile, name, param_mask, device, decisions)
        codegen = resolve_codegen(self.config.codegen, device)
        backend = aot_autograd(
            fw_compiler=partial(compile_, GraphKind.FORWARD),
            bw_compiler=partial(compile_, GraphKind.BACKWARD),
            inference_compiler=partial(compile_, GraphKind.INFERENCE),
            # Inductor gets torch.compile's partitioner and decompositions: torch.compile's graphs.
            partition_fn=partition_fn_for(codegen),
            **inductor_aot_options(codegen),
        )
        return backend(gm, example_inputs)

    def _keep_variant(self, gid: int, chosen: str, record: Any) -> None:
        """After a measured choice: the losing variant's graphs leave the log; the winner's plans
        record what was measured."""
        keep = f"g{gid}." if chosen == "chunked" else f"g{gid}u."
        drop = f"g{gid}u." if chosen == "chunked" else f"g{gid}."
        self.log.graphs = [g for g in self.log.graphs if not g.name.startswith(drop)]
        summary = {"chosen": chosen, "median_step_s": record.medians(), "samples_s": record.samples}
        for g in self.log.graphs:
            if g.name.startswith(keep) and g.plan is not None:
                g.plan.options = {**g.plan.options, "chunk_choice": summary}
        log.info("g%d: %s", gid, record.describe())

    @keeps_alive
    def _compile(
        self,
        prefix: str,
        param_mask: list[bool],
        device: torch.device,
        decisions: Any,
        kind: GraphKind,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
    ) -> Callable[[list[Any]], Any]:
        name = f"{prefix}.{kind.value}"
        positions: list[int] | None = None
        if kind == GraphKind.BACKWARD:
            if _output_count(gm) == len(param_mask):
                positions = [i for i, is_param in enumerate(param_mask) if is_param]
            else:
                log.info("%s: cannot line up backward outputs with parameters; no dW labels", name)
        try:
            # Compilers run inside AOTAutograd's fake-tensor mode; measuring costs and planning
            # (which talks to the other ranks) need real tensors.
            with unset_fake_temporarily():
                analysis = analyse_graph(gm, name, kind, self.cost_fn, positions)
        except UnwaitedCollectiveError:
            raise  # running the graph as captured would be just as wrong: no fallback
        except Exception as exc:  # noqa: BLE001 - any analysis failure falls back, never crashes
            return self._fallback(name, kind, gm, None, f"analysis failed ({type(exc).__name__}: {exc})")
        codegen = resolve_codegen(self.config.codegen, device)
        if not analysis.collectives:
            # Nothing to overlap: run the graph as captured (or inductor's code), no interpretation.
            graph = CapturedGraph(name, kind, gm, analysis, None, "no collectives", positions)
            self.log.graphs.append(graph)
            if codegen == "inductor":
                try:
                    compiled = compile_graph(gm, example_inputs, kind)
                    graph.codegen = "inductor"
                    return compiled
                except Exception as exc:  # noqa: BLE001
                    self._warn_inductor(name, exc)
            return _boxed(gm)
        guided = self.guidance is not None and self.guidance.steps > 0
        cost_info: dict[str, Any] | None = None
        try:
            t0 = time.perf_counter()
            with unset_fake_temporarily():
                if guided:
                    assert self.guidance is not None
                    cached = self.guidance.cached_costs(analysis, codegen)
                    if cached is not None:
                        cost_info = self.guidance.apply_cached(analysis, cached)
                plan = self.planner(analysis, gm)
            if decisions:
                plan.options = {**plan.options, "chunks": decisions}
            if cost_info is not None:
                plan.options["costs"] = {**cost_info, "plan_s": time.perf_counter() - t0}
            build = partial(self._build, name, kind, gm, example_inputs, analysis, positions, device, codegen)
            # On CPU inductor's C++ kernels are host functions: they must record themselves to be profiled.
            graph, runnable = build(plan, kernel_profile=guided and cost_info is None and device.type == "cpu")
        except (ConfigError, PlanMismatchError):
            raise  # the user asked for something impossible: say so, do not silently fall back
        except Exception as exc:  # noqa: BLE001
            return self._fallback(name, kind, gm, analysis, f"planning failed ({type(exc).__name__}: {exc})")
        self.log.graphs.append(graph)
        log.info("%s: %d nodes, %d collectives, %d tasks (%s, %s)", name, len(analysis.order),
                 len(analysis.collectives), len(plan.tasks), plan.options.get("schedule"), graph.codegen)
        if guided:
            assert self.guidance is not None
            return self.guidance.guard(graph, runnable, gm, self.planner, partial(build, kernel_profile=False),
                                       codegen, profile=cost_info is None)
        return runnable

    def _build(
        self, name: str, kind: GraphKind, gm: fx.GraphModule, example_inputs: Sequence[Any],
        analysis: GraphAnalysis, positions: list[int] | None, device: torch.device, codegen: str,
        plan: Plan, kernel_profile: bool = False,
    ) -> tuple[CapturedGraph, Callable[[list[Any]], Any]]:
        """The graph's log entry for ``plan`` and what runs it: inductor's code, or the aten
        executor (also where inductor cannot run the plan). ``kernel_profile``: inductor's C++
        kernels record themselves for the profiler (CPU profile-guided planning)."""
        if codegen == "inductor":
            compiled = self._compile_inductor(name, kind, gm, example_inputs, analysis, plan, kernel_profile)
            if compiled is not None:
                fn, report = compiled
                return CapturedGraph(name, kind, gm, analysis, plan, None, positions, None, "inductor", report), fn
        executor = GraphExecutor(
            gm,
            plan,
            device=device,
            use_comm_stream=self.config.use_comm_stream,
            free_after_last_use=self.config.free_after_last_use,
            verify_plan=verify_same_plan,
        )
        executor.recorder = self.log.recorder
        return CapturedGraph(name, kind, gm, analysis, plan, None, positions, executor), executor

    def _compile_inductor(
        self, name: str, kind: GraphKind, gm: fx.GraphModule, example_inputs: Sequence[Any],
        analysis: GraphAnalysis, plan: Plan, kernel_profile: bool = False,
    ) -> tuple[Callable[[list[Any]], Any], dict[str, Any]] | None:
        """The plan as inductor's code and the order pass's report; None (after one warning) when
        inductor cannot do it."""
        try:
            compiled, order = compile_plan(
                gm, example_inputs, kind, plan, analysis, verify_same_plan, self._inductor_deterministic,
                fusion_within_segments=self.config.fusion_within_segments,
                kernel_profile=kernel_profile,
            )
        except Exception as exc:  # noqa: BLE001 - the aten executor runs the same plan
            self._warn_inductor(name, exc)
            return None
        info = plan.options["inductor"]
        log.info("%s: inductor, %d kernels, %d dW tasks planned in windows, %d pulled out by fusion",
                 name, info["kernels"], info["weight_grad_tasks_planned_in_windows"],
                 info["weight_grad_tasks_pulled_out_count"])
        return compiled, order.report

    def _warn_inductor(self, name: str, exc: BaseException) -> None:
        log.info("%s: inductor failed: %s: %s", name, type(exc).__name__, exc)
        if not self._warned_inductor:
            self._warned_inductor = True
            warnings.warn(
                f"graphsched: codegen='inductor' failed for graph {name} ({type(exc).__name__}: "
                f"{exc}); its plan runs on the aten executor instead (eager-speed kernels, same "
                "order). Pass codegen='aten' to silence this, or report the model.",
                GraphschedFallbackWarning,
                stacklevel=3,
            )

    def _fallback(
        self, name: str, kind: GraphKind, gm: fx.GraphModule, analysis: GraphAnalysis | None, reason: str
    ) -> Callable[[list[Any]], Any]:
        self.log.graphs.append(CapturedGraph(name, kind, gm, analysis, None, reason))
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"graphsched: graph {name} runs unscheduled (same results as eager, no overlap): "
                f"{reason}. Please report the model if you expected it to be scheduled.",
                GraphschedFallbackWarning,
                stacklevel=2,
            )
        return _boxed(gm)
