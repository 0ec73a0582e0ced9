"""Collective waits that Dynamo records as autograd functions, made plain nodes again.

Up to torch 2.12, ``funcol.all_to_all_single_autograd`` returns ``_FromTorchTensor.apply(t)``, an
``autograd.Function`` whose forward is ``wait_tensor(t)`` and whose backward is the identity.
Dynamo records it as ``higher_order.autograd_function_apply(fwd_body, bwd_body, t)`` followed by
``getitem(..., 0)``: an op no split rule knows. Regions then stopped right after the collective's
issue, and chunking joined the chunks' *unwaited* all-to-all outputs (``torch.cat`` of buffers the
transfer was still writing): wrong numbers on CUDA, where NCCL writes them on its own stream.
(torch 2.13 records ``_c10d_functional.wait_tensor`` directly.)

``inline_wait_functions`` replaces every such pair by one call of :func:`wait_collective`, which
has the same forward (``wait_tensor``) and backward (identity), so the split rules see an ordinary
wait on every torch version and AOTAutograd traces the same aten ops as before.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from graphsched.compat import C_SET_GRAD_ENABLED

_WAIT = torch.ops._c10d_functional.wait_tensor
_GRAD_MODE = (C_SET_GRAD_ENABLED,)


class _DifferentiableWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        return _WAIT(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        return grad


def wait_collective(x: torch.Tensor) -> torch.Tensor:
    """Wait for a functional collective's result; gradients pass through unchanged."""
    return _DifferentiableWait.apply(x)


def _calls(body: fx.GraphModule) -> list[fx.Node]:
    return [n for n in body.graph.nodes if n.op in ("call_function", "call_method", "call_module")
            and n.target not in _GRAD_MODE]


def _output_values(body: fx.GraphModule) -> list[Any]:
    out = next(n for n in body.graph.nodes if n.op == "output")
    flat: list[Any] = []

    def visit(a: Any) -> None:
        if isinstance(a, (tuple, list)):
            for x in a:
                visit(x)
        else:
            flat.append(a)

    visit(out.args[0])
    return flat


def _body(gm: fx.GraphModule, node: Any) -> fx.GraphModule | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    body = getattr(gm, str(node.target), None)
    return body if isinstance(body, fx.GraphModule) else None


def is_wait_function(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` is ``autograd_function_apply`` of a forward that only waits on its one input and
    a backward that returns its gradient unchanged."""
    hop = getattr(torch.ops.higher_order, "autograd_function_apply", None)
    if hop is None or node.op != "call_function" or node.target is not hop or len(node.args) != 3:
        return False
    fwd, bwd = _body(gm, node.args[0]), _body(gm, node.args[1])
    if fwd is None or bwd is None:
        return False
    fwd_inputs = [n for n in fwd.graph.nodes if n.op == "placeholder"]
    calls = _calls(fwd)
    if len(fwd_inputs) != 1 or len(calls) != 1:
        return False
    wait = calls[0]
    if getattr(wait.target, "overloadpacket", wait.target) is not _WAIT or wait.args[:1] != (fwd_inputs[0],):
        return False
    if _output_values(fwd) != [wait]:
        return False
    bwd_inputs = [n for n in bwd.graph.nodes if n.op == "placeholder"]
    return not _calls(bwd) and len(bwd_inputs) == 1 and _output_values(bwd) == bwd_inputs


def inline_wait_functions(gm: fx.GraphModule) -> int:
    """Replace each wait recorded as an autograd function by a :func:`wait_collective` call, in
    place; returns how many were replaced. Every other node stays as it was."""
    graph = gm.graph
    replaced = 0
    for node in list(graph.nodes):
        if not is_wait_function(gm, node):
            continue
        users = list(node.users)
        if not users or not all(u.op == "call_function" and u.target is operator.getitem
                                and u.args[1:] == (0,) for u in users):
            continue
        with graph.inserting_after(node):
            plain = graph.call_function(wait_collective, (node.args[2],))
        plain.meta.update(users[0].meta)
        for u in users:
            u.replace_all_uses_with(plain)
            graph.erase_node(u)
        bodies = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        graph.erase_node(node)
        for b in bodies:
            if not b.users:
                graph.erase_node(b)
        replaced += 1
    if replaced:
        graph.lint()
        gm.recompile()
    return replaced


def unwaited_collectives(graph: fx.Graph, is_collective: Any, is_wait: Any, only: Any = None) -> list[fx.Node]:
    """Collectives (``is_collective(node)``) whose result some node other than a wait reads.

    A functional collective's output may be read only after its wait; anything else reads a
    buffer the transfer may still be writing. ``only(node)`` limits the check (e.g. to nodes a
    rewrite created).
    """
    bad = []
    for n in graph.nodes:
        if (only is None or only(n)) and is_collective(n) and any(not is_wait(u) for u in n.users):
            bad.append(n)
    return bad


__all__ = ["inline_wait_functions", "is_wait_function", "unwaited_collectives", "wait_collective"]
