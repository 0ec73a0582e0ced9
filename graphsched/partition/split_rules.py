"""Which ops of a Dynamo (torch-level) FX graph can run chunk by chunk, and how: the rule table.

Each row of :func:`_rows` names some ops and the rule kind that says how they split (the kinds are
in ``split_kinds.py``, the specs they pass around in ``split_specs.py``). An op without a row ends a
region; correctness never depends on a rule being present.

Ops are keyed as Dynamo records them: a Python function (``torch.add``, ``operator.add``, ``F.gelu``),
an aten overload packet (``aten.add``; an OpOverload such as ``aten.add.Tensor`` is looked up by its
packet), or ``("method", name)`` for a tensor method (``x.reshape(...)``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphsched.partition.split_kinds import (
    AllToAll,
    Contraction,
    Elementwise,
    Embedding,
    Permute,
    Reduce,
    ReshapeLike,
    SameDims,
    SplitRule,
    Wait,
    all_but_dim,
    attention_dims,
    layer_norm_dims,
)
from graphsched.partition.split_specs import Assignment, Cut, OpShapes, Spec, operands
from graphsched.partition.waits import wait_collective

aten = torch.ops.aten

#: One row of the table: the ops, and the rule every one of them uses.
Row = tuple[tuple[Any, ...], SplitRule]


def _methods(*names: str) -> tuple[tuple[str, str], ...]:
    return tuple(("method", n) for n in names)


#: Pointwise ops that never pass a PARTIAL through (they are not linear).
_POINTWISE_FUNCTIONS = (
    operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne,
    operator.and_, operator.or_, operator.xor, operator.invert, operator.pow, operator.mod,
    operator.floordiv, operator.abs,
    torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne, torch.where, torch.abs,
    torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.tanh, torch.sigmoid, torch.relu,
    torch.erf, torch.clamp, torch.maximum, torch.minimum, torch.pow, torch.masked_fill,
    torch.logical_and, torch.logical_or, torch.logical_not,
    F.gelu, F.relu, F.silu, F.sigmoid, F.tanh, F.leaky_relu,
)
_POINTWISE_METHODS = _methods(
    "float", "half", "bfloat16", "double", "int", "long", "bool", "to", "contiguous", "clone",
    "relu", "sigmoid", "tanh", "exp", "sqrt", "rsqrt", "abs", "masked_fill", "clamp", "pow",
    "lt", "le", "gt", "ge", "eq", "ne", "logical_not",
)
_POINTWISE_ATEN = (
    aten.gelu, aten.relu, aten.silu, aten.sigmoid, aten.tanh, aten.exp, aten.clone, aten._to_copy,
    aten.gt, aten.lt, aten.ge, aten.le, aten.eq, aten.ne, aten.where,
)


def _all_to_alls() -> tuple[Any, ...]:
    """The functional all-to-all, and its differentiable twin where this torch has one."""
    autograd_ns = getattr(torch.ops, "_c10d_functional_autograd", None)
    if autograd_ns is not None and hasattr(autograd_ns, "all_to_all_single"):
        return (torch.ops._c10d_functional.all_to_all_single, autograd_ns.all_to_all_single)
    return (torch.ops._c10d_functional.all_to_all_single,)


def _rows() -> list[Row]:
    """The table: ops -> how they split. Built per call (the torch.ops lookups stay lazy)."""
    return [
        # Elementwise: "add" passes a PARTIAL through all operands, "scale" through one,
        # "unary" through its only one; plain pointwise ops never.
        ((operator.add, operator.sub, torch.add, torch.sub, *_methods("add", "sub"), aten.add, aten.sub), Elementwise("add")),
        ((operator.mul, operator.truediv, torch.mul, torch.div, *_methods("mul", "div"), aten.mul, aten.div), Elementwise("scale")),
        ((operator.neg, torch.neg, *_methods("neg"), aten.neg), Elementwise("unary")),
        ((*_POINTWISE_FUNCTIONS, *_POINTWISE_METHODS, *_POINTWISE_ATEN), Elementwise()),
        # Re-shaping: the cut factor moves to wherever its elements land.
        ((torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten,
          *_methods("reshape", "view", "flatten", "squeeze", "unsqueeze", "unflatten")), ReshapeLike()),
        ((aten.view, aten.reshape, aten._unsafe_view, aten.squeeze, aten.unsqueeze), ReshapeLike(aten.reshape.default)),
        ((torch.transpose, *_methods("transpose"), aten.transpose), Permute("transpose")),
        ((torch.permute, *_methods("permute"), aten.permute), Permute("permute")),
        ((torch.t, *_methods("t"), aten.t), Permute("t")),
        # Contractions: batch-like letters cut every operand, summed letters give a PARTIAL.
        ((torch.einsum, aten.einsum), Contraction("einsum")),
        ((torch.bmm, *_methods("bmm"), aten.bmm), Contraction("bmm")),
        ((torch.mm, *_methods("mm"), aten.mm), Contraction("mm")),
        ((torch.matmul, operator.matmul, *_methods("matmul"), aten.matmul), Contraction("matmul")),
        ((F.linear, aten.linear), Contraction("linear")),
        # Collectives and their waits (wait_collective: waits Dynamo recorded as autograd functions).
        (_all_to_alls(), AllToAll()),
        ((torch.ops._c10d_functional.wait_tensor, wait_collective), Wait()),
        # Ops that mix some dims: cut only along the others.
        ((F.layer_norm, torch.layer_norm), SameDims(1, layer_norm_dims)),
        ((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, *_methods("softmax", "log_softmax"),
          torch.cumsum, *_methods("cumsum")), SameDims(1, all_but_dim(1, "dim"))),
        ((F.scaled_dot_product_attention,), SameDims(3, attention_dims)),
        ((F.embedding,), Embedding()),
        # Reductions: a sum over the cut dim gives a PARTIAL; mean / max / arg* over it: no rule.
        ((torch.sum, *_methods("sum")), Reduce(sums=True)),
        ((torch.mean, *_methods("mean"), torch.amax, *_methods("amax"), torch.amin, *_methods("amin"),
          torch.argmax, *_methods("argmax"), torch.argmin, *_methods("argmin")), Reduce(sums=False)),
    ]


def _key(node: fx.Node) -> Any:
    if node.op == "call_method":
        return ("method", node.target)
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return target.overloadpacket
        return target
    return None


@dataclass
class SplitRules:
    """Op -> rule. ``default_rules()`` builds the standard table; ``without`` drops entries."""

    table: dict[Any, SplitRule]

    def lookup(self, node: fx.Node) -> SplitRule | None:
        key = _key(node)
        if key is None:
            return None
        try:
            return self.table.get(key)
        except TypeError:  # an unhashable target
            return None

    def without(self, *keys: Any) -> "SplitRules":
        """A copy without the given targets (functions, ops or ``("method", name)`` pairs)."""
        return SplitRules({k: v for k, v in self.table.items() if k not in keys})

    def assign(self, node: fx.Node, known: dict) -> Assignment | None:
        """A full assignment of ``node``'s slots consistent with every spec in ``known``, or None.

        ``known`` maps slots to specs. Operands that are the same Node must get the same spec.
        """
        rule = self.lookup(node)
        shapes = OpShapes.of(node)
        if rule is None or shapes is None or not known:
            return None
        # Start from a cut if there is one: a PARTIAL alone is often ambiguous.
        slot = next((s for s, v in known.items() if isinstance(v, Cut)), next(iter(known)))
        try:
            result = rule.assign(node, shapes, slot, known[slot])
        except (IndexError, KeyError, TypeError, ValueError, AttributeError):
            return None  # odd arguments: treat as no rule
        if result is None:
            return None
        if any(result.get(s) != v for s, v in known.items()):
            return None
        ops = operands(node)
        seen: dict[fx.Node, Spec] = {}
        for j, a in enumerate(ops):
            if a in seen and seen[a] != result.get(j):
                return None
            seen[a] = result.get(j)
        return result


def default_rules() -> SplitRules:
    """The rules for the ops of transformer blocks as Dynamo records them (plus their aten ops).

    An op listed in two rows would silently take the later row's rule, so that is refused.
    """
    table: dict[Any, SplitRule] = {}
    for ops, rule in _rows():
        for op in ops:
            if op in table:
                raise AssertionError(f"split rule table lists {op!r} twice")
            table[op] = rule
    return SplitRules(table)
