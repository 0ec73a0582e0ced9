"""Distributed bodies for the codegen="inductor" tests: numerics against the inductor oracle, the
plan's order found in the generated code, fusion never moving weight gradients silently.

One run per rank compiles both models once (CPU inductor compiles C++: slow) and returns everything
the tests assert on.
"""

from __future__ import annotations

import re
from typing import Any

import torch

import graphsched
from graphsched.analysis.labels import GraphKind
from graphsched.codegen.compiler import inductor_oracle_backend
from graphsched.plan import Phase
from graphsched.testing.twins import compare_step, parameters_equal, twin_models


def _generated_code(fn: Any) -> tuple[Any, list[str]]:
    from graphsched.compat import run_and_get_code

    value, code = run_and_get_code(fn)
    return value, list(code)


def _first_line(lines: list[str], pattern: re.Pattern[str]) -> int | None:
    for i, line in enumerate(lines):
        if pattern.search(line):
            return i
    return None


def defining_line(lines: list[str], buffer: str) -> int | None:
    """The first line of the generated wrapper that makes ``buffer`` (allocation, reuse or call)."""
    return _first_line(lines, re.compile(rf"^\s*{re.escape(buffer)} = "))


def windows_in_code(code: str) -> list[dict[str, Any]]:
    """Every ``all_to_all_single`` of the wrapper with the line of its ``wait_tensor``."""
    lines = code.splitlines()
    out = []
    issue = re.compile(r"^\s*(buf\d+) = torch\.ops\._c10d_functional\.all_to_all_single\.default\(")
    for i, line in enumerate(lines):
        m = issue.search(line)
        if not m:
            continue
        buf = m.group(1)
        wait = _first_line(lines, re.compile(
            rf"torch\.ops\._c10d_functional\.wait_tensor\.default\({buf}\)"))
        out.append({"buffer": buf, "issue_line": i, "wait_line": wait})
    return out


def dw_kernels_in_code_windows(code: str, report: dict[str, Any], plan: Any) -> dict[str, Any]:
    """Where the generated code puts the kernels of the plan's weight-gradient tasks.

    ``inside``: dW kernels whose defining line lies between an all-to-all and its wait in the code.
    """
    lines = code.splitlines()
    windows = [w for w in windows_in_code(code) if w["wait_line"] is not None]
    dw_tasks = {t.name for t in plan.tasks if t.phase == Phase.WEIGHT_GRAD}
    inside: list[str] = []
    located = 0
    for task, kernels in report["task_kernels"].items():
        if task not in dw_tasks:
            continue
        for k in kernels:
            for buf in report["kernel_buffers"].get(k, []):
                line = defining_line(lines, buf)
                if line is None:
                    continue
                located += 1
                if any(w["issue_line"] < line < w["wait_line"] for w in windows):
                    inside.append(f"{task}:{k}:{buf}")
                break
    return {"windows": len(windows), "dw_kernels_located": located, "dw_kernels_inside": inside}


def inductor_parity_checks(rank: int, world_size: int, cache_dir: str, steps: int = 3) -> dict[str, Any]:
    """graphsched codegen="inductor" (ILP plan, slow-link costs so that dW work moves) against the
    inductor oracle (same AOTAutograd partitioner and inductor settings, inductor's own order)."""
    from graphsched.models import get_preset, make_batch
    from graphsched.testing.scheduling import CommHeavyCosts

    config = get_preset("tiny").replace(n_layers=1, top_k=2, capacity_factor=0.75)
    oracle, model = twin_models(config)
    oracle_step = torch.compile(oracle, backend=inductor_oracle_backend(), fullgraph=True, dynamic=False)
    graphsched.wrap(
        model, schedule="ilp", codegen="inductor", cost_model="analytic", cache_dir=cache_dir,
        cost_fn=CommHeavyCosts(),
    )
    opt_o = torch.optim.SGD(oracle.parameters(), lr=0.1)
    opt_m = torch.optim.SGD(model.parameters(), lr=0.1)
    out: dict[str, Any] = {"steps": []}
    for step in range(steps):
        idx, tgt = make_batch(config, 2, seed=100 * step + rank)
        opt_o.zero_grad(set_to_none=True)
        opt_m.zero_grad(set_to_none=True)

        def run_oracle() -> torch.Tensor:
            loss = oracle_step(idx, tgt)
            loss.backward()
            return loss

        def run_model() -> torch.Tensor:
            loss = model(idx, tgt)
            loss.backward()
            return loss

        if step == 0:
            # The first step compiles: keep the generated wrappers (forward, backward).
            loss_o, code_o = _generated_code(run_oracle)
            loss_m, code_m = _generated_code(run_model)
        else:
            loss_o, loss_m = run_oracle(), run_model()
        out["steps"].append(compare_step(loss_o, loss_m, oracle, model))
        opt_o.step()
        opt_m.step()
    out["params_bitwise_equal_after"] = parameters_equal(oracle, model)
    graphs = graphsched.api.state_of(model).capture.graphs
    out["codegen"] = {g.name: g.codegen for g in graphs}
    backward = next(g for g in graphs if g.kind == GraphKind.BACKWARD)
    report = backward.inductor_report or {}
    out["backward_options"] = backward.plan.options if backward.plan else {}
    out["backward_predicted"] = backward.plan.predicted_time if backward.plan else None
    out["backward_report"] = {k: v for k, v in report.items() if k != "kernel_costs"}
    out["kernel_costs"] = report.get("kernel_costs", {})
    # The backward wrapper is the one with the most all-to-alls after the forward's.
    bw_code_m = [c for c in code_m if "all_to_all_single" in c]
    bw_code_o = [c for c in code_o if "all_to_all_single" in c]
    out["code_counts"] = (len(code_m), len(code_o))
    if report and bw_code_m and bw_code_o:
        # Compiled in order forward, backward: the last wrapper with collectives is the backward.
        out["windows_graphsched"] = dw_kernels_in_code_windows(bw_code_m[-1], report, backward.plan)
        out["windows_oracle"] = dw_kernels_in_code_windows(bw_code_o[-1], report, backward.plan)
        out["explain"] = graphsched.explain(model, file=None)
    # In the same processes (one spawn, one import of torch): the fallback when inductor can't reorder.
    out["fallback"] = fallback_checks(rank, world_size)
    return out


def fallback_checks(rank: int, world_size: int) -> dict[str, Any]:
    """codegen="inductor" where inductor cannot run the order pass (its deterministic mode): one
    GraphschedFallbackWarning, and the plans run on the aten executor with eager's losses."""
    import warnings

    from graphsched.errors import GraphschedFallbackWarning
    from graphsched.models import get_preset, make_batch

    config = get_preset("tiny").replace(n_layers=1)
    eager, model = twin_models(config)
    graphsched.wrap(model, codegen="inductor")
    idx, tgt = make_batch(config, 2, seed=rank)
    # Set, not patched: patches are thread-local and the backward may compile on autograd's thread.
    from graphsched.compat import inductor_config

    inductor_config.deterministic = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model(idx, tgt)
        loss.backward()
    inductor_config.deterministic = False
    graphs = graphsched.api.state_of(model).capture.graphs
    return {
        "warnings": [str(w.message) for w in caught if issubclass(w.category, GraphschedFallbackWarning)],
        "codegen": {g.name: g.codegen for g in graphs},
        "executors": {g.name: g.executor is not None for g in graphs},
        "reasons": {g.name: g.fallback_reason for g in graphs},
        "loss_close": abs(loss.item() - eager(idx, tgt).item()) < 1e-5,
    }
