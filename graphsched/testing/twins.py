"""A wrapped model and its oracle twin, built alike and compared after each step.

The distributed checks (inductor, micro-batches, profile-guided planning) each train a wrapped model
beside its oracle (eager, eager on the same micro-batches, or ``torch.compile`` with inductor's own
order) and compare every loss and gradient. This is the part they share: twins from one seed, and
one comparison row per step, so that every check reads "equal" the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from graphsched.compat import dynamo_reset


def build_model(config: Any, seed: int, group: Any, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The reference model from ``seed``: the same parameters wherever it is built with that seed."""
    from graphsched.models import MoEGPT

    torch.manual_seed(seed)
    return MoEGPT(config, process_group=group).to(device)


def twin_models(config: Any, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The reference model twice from one seed on the world group: (oracle's model, to be wrapped)."""
    dynamo_reset()
    return build_model(config, seed, dist.group.WORLD), build_model(config, seed, dist.group.WORLD)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare_step(
    loss_o: torch.Tensor, loss_m: torch.Tensor, oracle: torch.nn.Module, model: torch.nn.Module
) -> dict[str, Any]:
    """One step's comparison, after both backwards: losses, whether they and every gradient are
    bitwise equal, and the largest gradient difference."""
    go, gm = grads(oracle), grads(model)
    same_names = sorted(go) == sorted(gm)
    return {
        "losses": (loss_o.item(), loss_m.item()),
        "losses_equal": bool(torch.equal(loss_o.detach(), loss_m.detach())),
        "grads_same_names": same_names,
        "grads_bitwise_equal": same_names and all(torch.equal(go[n], gm[n]) for n in go),
        "max_grad_diff": max(((go[n] - gm[n]).abs().max().item() for n in go if n in gm), default=0.0),
    }


def step_is_bitwise_equal(row: dict[str, Any]) -> bool:
    return bool(row["losses_equal"] and row["grads_bitwise_equal"])


def parameters_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))


def train_side_by_side(
    oracle_step: Callable[..., torch.Tensor], oracle: torch.nn.Module, model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], lr: float = 0.1,
) -> list[dict[str, Any]]:
    """Per batch: zero both, ``oracle_step`` (the oracle's loss: ``oracle`` itself, compiled, or on
    micro-batches) and ``model`` forward and backward, compare (``compare_step``), one SGD step each."""
    opt_o = torch.optim.SGD(oracle.parameters(), lr=lr)
    opt_m = torch.optim.SGD(model.parameters(), lr=lr)
    rows = []
    for idx, tgt in batches:
        opt_o.zero_grad(set_to_none=True)
        opt_m.zero_grad(set_to_none=True)
        loss_o = oracle_step(idx, tgt)
        loss_o.backward()
        loss_m = model(idx, tgt)
        loss_m.backward()
        rows.append(compare_step(loss_o, loss_m, oracle, model))
        opt_o.step()
        opt_m.step()
    return rows
