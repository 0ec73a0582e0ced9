"""What every rank must share before planning: its options, and each graph it is about to compile.

``check_same_options`` runs in ``wrap`` and ``check_same_graph`` before each graph is handed to
the planner; both are the first store exchange of their stage, made by every rank whatever its
options, so ranks that differ stop there with a :class:`PlanMismatchError` naming the difference
(never a hang in a later exchange that only some ranks make).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any, Sequence

import torch
import torch.fx as fx

from graphsched.agreement import exchange, set_timeout
from graphsched.errors import PlanMismatchError

#: Options that may differ between ranks: they change nothing another rank could notice.
_RANK_LOCAL_OPTIONS = ("cache_dir", "agreement_timeout_s")


def _plan_file_fingerprint(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f"a file with sha256 {hashlib.sha256(f.read()).hexdigest()[:12]}"
    except OSError:
        return f"an unreadable file ({os.path.basename(path)})"


def options_fingerprint(config: Any) -> dict[str, Any]:
    """The options every rank must agree on, as JSON-able values."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in _RANK_LOCAL_OPTIONS:
            continue
        value = getattr(config, f.name)
        if f.name == "plan_file":
            value = _plan_file_fingerprint(value)
        elif not isinstance(value, (str, int, float, bool, type(None))):
            value = repr(value)
        out[f.name] = value
    return out


def _ranks_by_value(gathered: list[Any]) -> str:
    return ", ".join(f"rank {r}: {value!r}" for r, value in enumerate(gathered))


def check_same_options(config: Any) -> None:
    """Raise PlanMismatchError on every rank unless all ranks were wrapped with the same options."""
    set_timeout(getattr(config, "agreement_timeout_s", 60.0))
    mine = options_fingerprint(config)
    gathered = exchange(mine, "options")
    names = sorted({k for g in gathered for k in g})
    differ = [k for k in names if len({repr(g.get(k)) for g in gathered}) > 1]
    if not differ:
        return
    lines = "\n".join(f"  {k}: {_ranks_by_value([g.get(k) for g in gathered])}" for k in differ)
    raise PlanMismatchError(
        f"graphsched: the ranks were wrapped with different options ({', '.join(differ)}):\n{lines}\n"
        "Every rank compiles and agrees on one plan with the others, so every rank must call "
        "graphsched.wrap with the same options (and the same plan_file, or none on every rank)."
    )


def _describe_input(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return type(x).__name__


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)
    return re.sub(r" at 0x[0-9a-f]+", "", str(name))  # addresses differ between processes


def graph_fingerprint(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, Any]:
    """Node count, a hash of the ops in order, and the input shapes of a graph about to compile."""
    ops = "\n".join(f"{n.op}:{_target_name(n.target)}" for n in gm.graph.nodes)
    return {
        "nodes": len(gm.graph.nodes),
        "ops": hashlib.sha256(ops.encode()).hexdigest()[:16],
        "inputs": [_describe_input(x) for x in example_inputs],
    }


def check_same_graph(name: str, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Raise PlanMismatchError on every rank unless all ranks are about to compile this graph."""
    mine = graph_fingerprint(gm, example_inputs)
    gathered = exchange(mine, f"graph {name}")
    if all(g == mine for g in gathered):
        return
    inputs = [g["inputs"] for g in gathered]
    if len({repr(i) for i in inputs}) > 1:
        n = max(len(i) for i in inputs)
        first = next(k for k in range(n) if len({repr(i[k] if k < len(i) else None) for i in inputs}) > 1)
        what = f"different input shapes (input {first}: " + _ranks_by_value(
            [i[first] if first < len(i) else None for i in inputs]) + ")"
    else:
        what = "different graphs (" + _ranks_by_value([f"{g['nodes']} nodes, ops {g['ops']}" for g in gathered]) + ")"
    raise PlanMismatchError(
        f"graphsched: graph {name} was captured on the ranks with {what}. The ranks must run the "
        "same model on inputs of the same shapes: their collectives are matched by issue order. "
        "Give every rank batches of one shape (pad or drop the last batch), the same model and the "
        "same options."
    )
