"""Distributed body for the micro-batch tests: ``wrap(model, micro_batches=2)`` against eager run
on the same micro-batches, with the aten executor and with inductor code generation, and the
order in which the plan (and the generated code) issues the two micro-batches' all-to-alls.
"""

from __future__ import annotations

from typing import Any

import torch

import graphsched
from graphsched.analysis.labels import GraphKind
from graphsched.codegen.compiler import inductor_oracle_backend
from graphsched.microbatch import micro_batched
from graphsched.testing.twins import compare_step, parameters_equal, train_side_by_side, twin_models


def _collective_orders(model: torch.nn.Module) -> dict[str, dict[str, list[str]]]:
    """Per graph: the all-to-all issues as captured, as planned, and as the code launches them."""
    out = {}
    for g in graphsched.api.state_of(model).capture.graphs:
        if g.analysis is None or g.plan is None:
            continue
        issues = [c.issue for c in g.analysis.collectives]
        planned = [n for t in g.plan.tasks for n in t.nodes if n in set(issues)]
        out[g.name] = {
            "kind": g.kind.value if isinstance(g.kind, GraphKind) else str(g.kind),
            "captured": issues,
            "planned": planned,
            "emitted": list((g.inductor_report or {}).get("collective_order", [])),
        }
    return out


def _twin_models() -> tuple[Any, torch.nn.Module, torch.nn.Module]:
    """The tiny one-layer reference model twice from one seed: (config, eager, to be wrapped)."""
    from graphsched.models import get_preset

    config = get_preset("tiny").replace(n_layers=1, top_k=1, capacity_factor=0.5)
    return (config, *twin_models(config))


def micro_batch_run(rank: int, codegen: str, cache_dir: str, steps: int) -> dict[str, Any]:
    from graphsched.models import make_batch
    from graphsched.testing.scheduling import CommHeavyCosts

    config, eager, model = _twin_models()
    oracle: Any = micro_batched(eager, 2)
    if codegen == "inductor":
        oracle = torch.compile(oracle, backend=inductor_oracle_backend(), dynamic=False)
    # A slow link: overlapping one micro-batch's all-to-all with the other's compute pays.
    graphsched.wrap(model, schedule="ilp", codegen=codegen, micro_batches=2, cache_dir=cache_dir,
                    cost_fn=CommHeavyCosts(comm_s=2e-3))
    batches = (make_batch(config, 4, seed=100 * step + rank) for step in range(steps))
    rows = train_side_by_side(oracle, eager, model, batches)
    graphs = graphsched.api.state_of(model).capture.graphs
    return {
        "steps": rows,
        "params_bitwise_equal_after": parameters_equal(eager, model),
        "codegen": {g.name: g.codegen for g in graphs},
        "fallbacks": {g.name: g.fallback_reason for g in graphs if g.fallback_reason},
        "orders": _collective_orders(model),
    }


def auto_run(rank: int, cache_dir: str) -> dict[str, Any]:
    """micro_batches="auto" (aten executor): every call against eager on the micro-batches that
    call ran (the choice alternates k = 1, 2 while it measures), then the decision."""
    from graphsched.models import make_batch
    from graphsched.runtime.measured_choice import MeasuredChoice

    config, eager, model = _twin_models()
    graphsched.wrap(model, schedule="ilp", codegen="aten", micro_batches="auto", cache_dir=cache_dir)
    deciding = MeasuredChoice.calls_to_decide()
    rows = []
    for call in range(deciding + 2):
        idx, tgt = make_batch(config, 4, seed=call + 10 * rank)
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        loss_m = model(idx, tgt)
        loss_m.backward()
        state = graphsched.api.state_of(model)
        ran = (1, 2)[call % 2] if call < deciding else int(state.micro_batch_choice.chosen)
        loss_e = micro_batched(eager, ran)(idx, tgt)
        loss_e.backward()
        rows.append({"k": ran, **compare_step(loss_e, loss_m, eager, model)})
    record = graphsched.api.state_of(model).micro_batch_choice
    return {"steps": rows, "chosen": record.chosen, "timed": {k: len(v) for k, v in record.samples.items()},
            "explain": graphsched.explain(model, file=None)}


def micro_batch_checks(rank: int, world_size: int, cache_dir: str, steps: int = 2) -> dict[str, Any]:
    out: dict[str, Any] = {codegen: micro_batch_run(rank, codegen, f"{cache_dir}/{codegen}", steps)
                           for codegen in ("aten", "inductor")}
    out["auto"] = auto_run(rank, f"{cache_dir}/auto")
    return out
