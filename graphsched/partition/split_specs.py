"""The vocabulary of split rules: specs (how a tensor is cut) and what a rule sees of a node.

A *cut* takes one factor of one dimension of a tensor and gives every chunk a slice of it. The
dimension need not be cut whole: ``Cut(dim, extent, outer, inner)`` says that dimension ``dim`` of
size ``outer * extent * inner`` is read as ``[outer, extent, inner]`` (row-major) and the chunks
split the middle factor. That is what keeps a cut through a reshape exact: the MoE dispatch tensor
``[E, C, d]`` cut along capacity ``C`` becomes, once flattened to ``[E*C, d]`` for the all-to-all,
``Cut(0, extent=C, outer=E)``: every chunk holds ``C/k`` slots of every expert.

Specs are a :class:`Cut` (each chunk holds a slice), :data:`PARTIAL` (each chunk holds an addend
of the full value: a reduction over the cut dimension; the chunks' results are summed, so float
summation order changes) or ``None`` (every chunk uses the whole tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence, Union

import torch
import torch.fx as fx


# -- specs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Dimension ``dim`` (size ``outer * extent * inner``) is cut along its ``extent`` factor."""

    dim: int
    extent: int
    outer: int = 1
    inner: int = 1

    def size(self) -> int:
        return self.outer * self.extent * self.inner

    def chunk_size(self, part: int) -> int:
        """Size of dimension ``dim`` in a chunk holding ``part`` of the ``extent`` slices."""
        return self.outer * part * self.inner

    def chunk_shape(self, shape: Sequence[int], part: int) -> tuple[int, ...]:
        out = list(shape)
        out[self.dim] = self.chunk_size(part)
        return tuple(out)

    def moved(self, dim: int) -> "Cut":
        return replace(self, dim=dim)

    def describe(self) -> str:
        parts = [f"dim {self.dim}", f"extent {self.extent}"]
        if self.outer != 1:
            parts.append(f"outer {self.outer}")
        if self.inner != 1:
            parts.append(f"inner {self.inner}")
        return "cut(" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class Partial:
    """Each chunk holds an addend; the full value is the sum over chunks."""

    def describe(self) -> str:
        return "partial"


PARTIAL = Partial()
Spec = Union[Cut, Partial, None]
#: An operand position (int) or the node's output (``OUT``).
Slot = Union[int, str]
OUT = "out"
Assignment = dict  # Slot -> Spec


# -- what a rule sees ------------------------------------------------------------------------


def example_value(node: Any) -> Any:
    """The (fake) value a node stands for: Dynamo's ``example_value`` or AOTAutograd's ``val``."""
    if not isinstance(node, fx.Node):
        return node
    val = node.meta.get("example_value")
    return node.meta.get("val") if val is None else val


def is_tensor_node(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(example_value(node), torch.Tensor)


def operands(node: fx.Node) -> list[fx.Node]:
    """The tensor-valued Node arguments of ``node``, in argument order (repeats kept)."""
    found: list[fx.Node] = []

    def visit(a: Any) -> Any:
        if is_tensor_node(a):
            found.append(a)
        return a

    fx.map_arg((node.args, node.kwargs), visit)
    return found


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


@dataclass(frozen=True)
class OpShapes:
    """Shapes of a node's tensor operands (see :func:`operands`) and of its output."""

    inputs: tuple[tuple[int, ...], ...]
    output: tuple[int, ...]

    @classmethod
    def of(cls, node: fx.Node) -> "OpShapes | None":
        out = example_value(node)
        if not isinstance(out, torch.Tensor):
            return None
        try:
            return cls(tuple(_shape(example_value(a)) for a in operands(node)), _shape(out))
        except (TypeError, ValueError):  # symbolic sizes without a hint
            return None


@dataclass
class ChunkCall:
    """How one chunk's copy of a node is called (``op`` is ``call_function`` or ``call_method``)."""

    op: str
    target: Any
    args: tuple
    kwargs: dict


def run_call(call: ChunkCall) -> Any:
    if call.op == "call_method":
        return getattr(call.args[0], call.target)(*call.args[1:], **call.kwargs)
    return call.target(*call.args, **call.kwargs)
