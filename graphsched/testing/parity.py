"""Train the reference model eagerly and wrapped, side by side, and compare every step.

This is the oracle check behind ``graphsched demo`` and the parity tests: two models built from the
same seed on each rank, the same batches, the same optimizer; after every backward the losses and
every parameter gradient are compared, then both optimizers step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from graphsched.testing.twins import build_model, parameters_equal


@dataclass
class ParitySpec:
    preset: str = "tiny"
    #: MoEGPTConfig fields to override (e.g. {"top_k": 2, "capacity_factor": 0.5}).
    model_overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 3
    batch_size: int = 2
    lr: float = 1e-3
    seed: int = 1234
    #: graphsched.wrap options (e.g. {"schedule": "reverse_independent"}).
    wrap_options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    #: Also run one forward under torch.no_grad() + eval() and compare logits.
    check_inference: bool = True
    #: Collect graphsched.explain's text and the plans on rank 0.
    collect_report: bool = True
    #: Record the last step's wrapped forward and backward with graphsched.record (ParityResult.timings).
    record_last_step: bool = False


@dataclass
class StepResult:
    eager_loss: float
    wrapped_loss: float
    max_grad_diff: float
    grads_bitwise_equal: bool


@dataclass
class ParityResult:
    rank: int
    steps: list[StepResult]
    inference_max_diff: float | None = None
    params_bitwise_equal_after: bool = True
    report: str | None = None
    plans_json: dict[str, str] = field(default_factory=dict)
    #: Per-graph counts: name -> {"collectives": n, "weight_grad": n, ...}.
    graph_stats: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped_tokens: int = 0
    #: Violations of the phase-label rules in backward graphs (empty when labels are right).
    label_problems: list[str] = field(default_factory=list)
    #: TaskTimings of the last step's wrapped forward and backward (with ParitySpec.record_last_step).
    timings: list[Any] = field(default_factory=list)

    @property
    def losses_bitwise_equal(self) -> bool:
        return all(s.eager_loss == s.wrapped_loss for s in self.steps)

    @property
    def bitwise_equal(self) -> bool:
        return self.losses_bitwise_equal and all(s.grads_bitwise_equal for s in self.steps)

    @property
    def max_grad_diff(self) -> float:
        return max((s.max_grad_diff for s in self.steps), default=0.0)

    @property
    def max_loss_diff(self) -> float:
        return max((abs(s.eager_loss - s.wrapped_loss) for s in self.steps), default=0.0)


def _count_dropped(model: torch.nn.Module, idx: torch.Tensor) -> int:
    """Tokens the first MoE layer drops on this batch (to prove the tests exercise dropping)."""
    from graphsched.models import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        return 0
    captured: dict[str, torch.Tensor] = {}

    def hook(_mod: Any, inputs: tuple, _out: Any) -> None:
        captured["x"] = inputs[0]

    handle = layers[0].register_forward_hook(hook)
    with torch.no_grad():
        model(idx)
    handle.remove()
    tokens = captured["x"].reshape(-1, captured["x"].shape[-1])
    gate_out = layers[0].gate(tokens)
    routed = gate_out[2].reshape(tokens.shape[0], -1).any(dim=1)
    return int((~routed).sum())


def run_parity(
    rank: int, world_size: int, spec: ParitySpec, cost_fn: Any = None
) -> ParityResult:
    """Per-rank body (for graphsched.testing.run_distributed)."""
    import graphsched
    from graphsched.analysis.labels import GraphKind, NodeKind, Phase
    from graphsched.codegen.compiler import inductor_oracle_backend
    from graphsched.codegen.settings import resolve_codegen
    from graphsched.microbatch import micro_batched
    from graphsched.testing.checks import phase_label_violations
    from graphsched.models import get_preset, make_batch

    device = torch.device(spec.device if spec.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    config = get_preset(spec.preset).replace(**spec.model_overrides)
    group = dist.group.WORLD if dist.is_initialized() else None
    eager = build_model(config, spec.seed, group, device)
    wrapped = build_model(config, spec.seed, group, device)
    # Each mode against its own oracle: eager for the aten executor, torch.compile with inductor
    # (graphsched's partitioner and inductor settings, inductor's order) for codegen="inductor".
    options = {"codegen": "aten", **spec.wrap_options}
    # With micro-batches the oracle runs the same micro-batches (gradient accumulation).
    oracle: Any = micro_batched(eager, options.get("micro_batches", 1))
    if resolve_codegen(options["codegen"], device) == "inductor":
        oracle = torch.compile(oracle, backend=inductor_oracle_backend(), dynamic=False)
    graphsched.wrap(wrapped, cost_fn=cost_fn, **options)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=spec.lr)
    opt_w = torch.optim.AdamW(wrapped.parameters(), lr=spec.lr)

    steps: list[StepResult] = []
    recorded: list[Any] = []
    for step in range(spec.steps):
        idx, targets = make_batch(config, spec.batch_size, seed=spec.seed + 1000 * step + rank, device=device)
        opt_e.zero_grad(set_to_none=True)
        opt_w.zero_grad(set_to_none=True)
        loss_e = oracle(idx, targets)
        loss_e.backward()
        if spec.record_last_step and step == spec.steps - 1:
            with graphsched.record(wrapped, rank=rank) as recorder:
                loss_w = wrapped(idx, targets)
                loss_w.backward()
            recorded = list(recorder.timings)
        else:
            loss_w = wrapped(idx, targets)
            loss_w.backward()
        diff, equal = 0.0, True
        for (name, pe), pw in zip(eager.named_parameters(), wrapped.parameters()):
            if pe.grad is None and pw.grad is None:
                continue
            if pe.grad is None or pw.grad is None:
                raise AssertionError(f"parameter {name}: gradient missing on one side")
            d = (pe.grad.float() - pw.grad.float()).abs().max().item()
            diff = max(diff, d)
            equal = equal and torch.equal(pe.grad, pw.grad)
        steps.append(StepResult(loss_e.item(), loss_w.item(), diff, equal))
        opt_e.step()
        opt_w.step()

    result = ParityResult(rank=rank, steps=steps, timings=recorded)
    result.params_bitwise_equal_after = parameters_equal(eager, wrapped)
    idx, _ = make_batch(config, spec.batch_size, seed=spec.seed + 99 + rank, device=device)
    result.dropped_tokens = _count_dropped(eager, idx)
    if spec.check_inference:
        eager.eval()
        wrapped.eval()
        with torch.no_grad():
            result.inference_max_diff = (oracle(idx).float() - wrapped(idx).float()).abs().max().item()
        eager.train()
        wrapped.train()

    for g in graphsched.api.state_of(wrapped).capture.graphs:
        if g.analysis is None:
            continue
        kinds = [g.analysis.node(n).kind for n in g.analysis.order]
        phases = [g.analysis.node(n).phase for n in g.analysis.order]
        result.graph_stats[g.name] = {
            "collective_issue": kinds.count(NodeKind.COLLECTIVE_ISSUE),
            "collective_wait": kinds.count(NodeKind.COLLECTIVE_WAIT),
            "weight_grad": phases.count(Phase.WEIGHT_GRAD),
            "input_grad": phases.count(Phase.INPUT_GRAD),
            "scheduled": int(g.plan is not None),
        }
        if g.analysis.graph_kind == GraphKind.BACKWARD and g.param_grad_positions is not None:
            result.label_problems += phase_label_violations(g.analysis, g.gm, set(g.param_grad_positions))
    if spec.collect_report and rank == 0:
        result.report = graphsched.explain(wrapped, file=None)
        result.plans_json = {name: p.to_json() for name, p in graphsched.captured_plans(wrapped).items()}
    return result


def run_parity_many(rank: int, world_size: int, specs: list[ParitySpec]) -> list[ParityResult]:
    """Several parity runs in one set of processes (process start-up dominates small runs)."""
    return [run_parity(rank, world_size, spec) for spec in specs]
