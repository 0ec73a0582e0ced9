"""Compile a graph with inductor: as planned (``compile_plan``), or in inductor's own order (the oracle).

``compile_plan`` installs the order pass (``codegen/order.py``) and the fusion guard
(``codegen/fusion.py``) for one compile and checks the pass ran; ``inductor_oracle_backend`` is
the same compile without them, what graphsched-on-inductor is compared with. See
``docs/inductor.md``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch.fx as fx

from graphsched.analysis.graph import GraphAnalysis
from graphsched.analysis.labels import GraphKind
from graphsched.codegen.fusion import PlanSegments, plan_choices
from graphsched.codegen.order import InductorPlanOrder, summary
from graphsched.codegen.settings import (
    inductor_aot_options,
    inductor_deterministic,
    inductor_settings,
    partition_fn_for,
)
from graphsched.plan import Plan


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    kind: GraphKind,
    order_pass: Callable[[list[Any]], list[Any]] | None = None,
    fusion_guard: "PlanSegments | None" = None,
    kernel_profile: bool = False,
) -> Callable[[list[Any]], Any]:
    """Compile one AOTAutograd graph with inductor (what ``torch.compile``'s compilers call).

    Returns inductor's boxed callable. ``gm`` is left untouched: inductor's post-grad passes
    rewrite the graph in place, so a copy (same node names) is what inductor gets.
    ``fusion_guard``: fusions that would join work of two plan segments are refused.
    ``kernel_profile``: C++ kernels record themselves for torch.profiler (profile-guided planning
    on CPU; the kernels compute the same).
    """
    import contextlib

    from graphsched.compat import inductor_config as ic
    from graphsched.compat import compile_fx_inner

    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    choices = contextlib.nullcontext() if fusion_guard is None else plan_choices(fusion_guard)
    with ic.patch(inductor_settings(order_pass, kernel_profile)), choices:
        return compile_fx_inner(
            copied,
            list(example_inputs),
            is_backward=kind == GraphKind.BACKWARD,
            is_inference=kind == GraphKind.INFERENCE,
        )


def inductor_oracle_backend() -> Callable[..., Any]:
    """A ``torch.compile`` backend: inductor in its own order, through graphsched's AOTAutograd.

    The same partitioner as graphsched-on-inductor (``partition_fn_for("inductor")``: torch.compile's)
    and the same inductor settings, but no order pass: what graphsched-on-inductor must match
    bitwise where only the order of kernels differs. ``torch.compile(backend="inductor")``
    differs from it only by those settings (``reorder_for_compute_comm_overlap`` changes two
    lowerings).
    """
    from functools import partial

    from graphsched.compat import aot_autograd

    def compiler(kind: GraphKind, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        return compile_graph(gm, example_inputs, kind, None)

    return aot_autograd(
        fw_compiler=partial(compiler, GraphKind.FORWARD),
        bw_compiler=partial(compiler, GraphKind.BACKWARD),
        inference_compiler=partial(compiler, GraphKind.INFERENCE),
        partition_fn=partition_fn_for("inductor"),
        **inductor_aot_options("inductor"),
    )


class _VerifyOnFirstCall:
    """Inductor's compiled graph, with the cross-rank plan check before its first run."""

    def __init__(self, compiled: Callable[[list[Any]], Any], plan: Plan, verify: Callable[[Plan], None] | None):
        # Instance attribute: AOTAutograd copies __dict__ (functools.wraps), not class attributes.
        self._boxed_call = True
        self.compiled = compiled
        self.plan = plan
        self._verify = verify

    def __call__(self, args: list[Any]) -> Any:
        if self._verify is not None:
            verify, self._verify = self._verify, None
            verify(self.plan)
        return self.compiled(args)


def compile_plan(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    kind: GraphKind,
    plan: Plan,
    analysis: GraphAnalysis | None,
    verify_plan: Callable[[Plan], None] | None = None,
    deterministic: bool | None = None,
    fusion_within_segments: bool = True,
    kernel_profile: bool = False,
) -> tuple[Callable[[list[Any]], Any], InductorPlanOrder]:
    """Compile ``gm`` with inductor, its kernels emitted in ``plan``'s order.

    Raises when inductor fails, when its deterministic mode would skip the order pass, or when the
    pass was not called or failed: the caller then runs the plan on the aten executor.
    ``deterministic``: inductor's deterministic flag as the user's thread sees it (inductor's
    config is thread-local and the backward may compile on autograd's thread); None reads it here.
    ``fusion_within_segments``: refuse fusions across a collective's issue or wait (PlanSegments).
    ``kernel_profile``: see :func:`compile_graph`.
    """
    if deterministic is None:
        deterministic = inductor_deterministic()
    if deterministic:
        raise RuntimeError(
            "torch._inductor.config.deterministic is on, and inductor then skips the reordering "
            "passes graphsched's order runs in"
        )
    order = InductorPlanOrder(plan, analysis)
    guard = PlanSegments(plan) if fusion_within_segments else None
    compiled = compile_graph(gm, example_inputs, kind, order, guard, kernel_profile)
    if guard is not None:
        order.report["fusions_refused"] = guard.refused
    if not order.called:
        raise RuntimeError("inductor never called graphsched's order pass (a cached or changed compile path)")
    if "error" in order.report:
        raise RuntimeError(f"the order pass failed: {order.report['error']}")
    plan.options = {**plan.options, "codegen": "inductor", "inductor": summary(order.report)}
    return _VerifyOnFirstCall(compiled, plan, verify_plan), order


def describe_codegen(plan: Plan) -> str:
    """One line for ``graphsched.explain``: what inductor made of a plan."""
    info = plan.options.get("inductor") or {}
    pulled = info.get("weight_grad_tasks_pulled_out", [])
    text = (
        f"inductor code, {info.get('kernels', '?')} kernels for {len(plan.tasks)} tasks "
        f"({info.get('kernels_spanning_tasks', 0)} kernels fuse ops of several tasks); "
        f"{info.get('weight_grad_tasks_planned_in_windows', 0)} weight-gradient tasks planned in "
        f"all-to-all windows, {len(pulled)} pulled out by fusion"
    )
    if pulled:
        text += f" ({', '.join(pulled[:6])}{', ...' if len(pulled) > 6 else ''})"
    if info.get("predicted_time") is not None and plan.predicted_time is not None:
        text += (f"; predicted {info['predicted_time'] * 1e3:.3f} ms as kernels "
                 f"(plan: {plan.predicted_time * 1e3:.3f} ms)")
    return text
