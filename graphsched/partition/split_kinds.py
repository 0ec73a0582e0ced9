"""The kinds of split rule: how one family of ops propagates a spec from one tensor to the others.

A rule answers, for one node: given the spec of one of its tensors (an operand or its output),
what are the specs of all the others, or ``None`` when the node cannot run chunk by chunk under
that cut (specs: ``split_specs.py``). Which op uses which kind is the table in ``split_rules.py``.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from graphsched.partition.split_specs import (
    OUT,
    PARTIAL,
    Assignment,
    ChunkCall,
    Cut,
    OpShapes,
    Partial,
    Slot,
    Spec,
    operands,
)

aten = torch.ops.aten


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class SplitRule:
    """Base class: ``assign`` propagates a spec; ``chunk_call`` adapts shape-carrying arguments."""

    #: Matmul-like ops: a region is trimmed to the span between such ops and collectives.
    anchor = False
    #: A collective: its transfer runs on the communication stream.
    collective = False
    #: Moves no data (reshape, transpose, wait): costs nothing in the pipeline model.
    free = False
    #: Waits for a collective: the only op that may read a collective's result.
    wait = False

    def assign(self, node: fx.Node, shapes: OpShapes, slot: Slot, spec: Spec) -> Assignment | None:
        raise NotImplementedError

    def chunk_call(
        self,
        node: fx.Node,
        args: tuple,
        kwargs: dict,
        in_shapes: Sequence[tuple[int, ...]],
        out_shape: tuple[int, ...],
    ) -> ChunkCall:
        """The call of one chunk's copy, its tensor arguments already replaced by ``args``."""
        return ChunkCall(node.op, node.target, args, kwargs)


class Elementwise(SplitRule):
    """Elementwise ops with broadcasting; ``linear`` says which of them pass a PARTIAL through.

    ``"add"``: all tensor operands partial (a sum of sums), no scalar operand (it would be added k
    times); ``"scale"``: one operand partial, the others whole (mul, and div's numerator);
    ``"unary"``: one operand (neg, wait_tensor); ``None``: never.
    """

    def __init__(self, linear: str | None = None, free: bool = False) -> None:
        self.linear = linear
        self.free = free

    def assign(self, node: fx.Node, shapes: OpShapes, slot: Slot, spec: Spec) -> Assignment | None:
        if spec is None:
            return None
        n_in = len(shapes.inputs)
        if isinstance(spec, Partial):
            return self._partial(node, shapes, slot)
        out = shapes.output
        if slot == OUT:
            out_dim = spec.dim
        else:
            in_shape = shapes.inputs[slot]
            out_dim = spec.dim + len(out) - len(in_shape)
            if in_shape[spec.dim] != out[out_dim]:
                return None  # a broadcast operand cannot be cut
        if not (0 <= out_dim < len(out)) or out[out_dim] != spec.size():
            return None
        result: Assignment = {OUT: spec.moved(out_dim)}
        for j in range(n_in):
            in_shape = shapes.inputs[j]
            d = out_dim - (len(out) - len(in_shape))
            if d < 0 or in_shape[d] == 1 and out[out_dim] != 1:
                result[j] = None
            elif in_shape[d] == out[out_dim]:
                result[j] = spec.moved(d)
            else:
                return None
        return result

    def _partial(self, node: fx.Node, shapes: OpShapes, slot: Slot) -> Assignment | None:
        n_in = len(shapes.inputs)
        if self.linear == "unary" and n_in == 1:
            return {OUT: PARTIAL, 0: PARTIAL}
        if self.linear == "add":
            scalars = [a for a in node.args if not isinstance(a, fx.Node)]
            if scalars or n_in < 1 or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
                return None
            return {OUT: PARTIAL, **{j: PARTIAL for j in range(n_in)}}
        if self.linear == "scale" and slot != OUT and n_in >= 1:
            if _is_division(node) and slot != 0:
                return None  # 1 / (a + b) is not 1 / a + 1 / b
            if node.kwargs.get("rounding_mode") is not None:
                return None
            if len(set(operands(node))) != n_in:
                return None  # x * x is not linear in x
            return {OUT: PARTIAL, **{j: (PARTIAL if j == slot else None) for j in range(n_in)}}
        return None


class Wait(Elementwise):
    """A collective's wait: passes any spec through, moves no data."""

    wait = True

    def __init__(self) -> None:
        super().__init__("unary", free=True)


def _is_division(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket is aten.div
    return target in (operator.truediv, torch.div, "div")


def map_cut_through_reshape(
    in_shape: Sequence[int], out_shape: Sequence[int], cut: Cut
) -> Cut | None:
    """Where the cut factor of ``in_shape`` lands after a row-major reshape to ``out_shape``.

    The factor keeps its element stride; it must fit inside one output dimension, else ``None``.
    """
    stride = cut.inner * math.prod(in_shape[cut.dim + 1:])
    span = stride * cut.extent
    for j, size in enumerate(out_shape):
        if size <= 1:
            continue
        lo = math.prod(out_shape[j + 1:])
        hi = lo * size
        if lo <= stride and span <= hi and stride % lo == 0 and hi % span == 0:
            return Cut(j, cut.extent, outer=hi // span, inner=stride // lo)
    return None


class ReshapeLike(SplitRule):
    """reshape / view / flatten / squeeze / unsqueeze: any row-major re-shaping of one operand.

    A chunk's copy is always emitted as ``reshape`` to its own shape: a chunk may be a
    non-contiguous slice where ``view`` would fail.
    """

    free = True

    def __init__(self, aten_target: Any = None) -> None:
        self.aten_target = aten_target

    def assign(self, node: fx.Node, shapes: OpShapes, slot: Slot, spec: Spec) -> Assignment | None:
        if spec is None or len(shapes.inputs) != 1:
            return None
        (in_shape,) = shapes.inputs
        if isinstance(spec, Partial):
            return {OUT: PARTIAL, 0: PARTIAL}
        if slot == OUT:
            mapped = map_cut_through_reshape(shapes.output, in_shape, spec)
            return None if mapped is None else {OUT: spec, 0: mapped}
        mapped = map_cut_through_reshape(in_shape, shapes.output, spec)
        return None if mapped is None else {OUT: mapped, 0: spec}

    def chunk_call(self, node, args, kwargs, in_shapes, out_shape) -> ChunkCall:
        source = next(a for a in args if isinstance(a, (fx.Node, torch.Tensor)))
        if self.aten_target is not None:
            return ChunkCall("call_function", self.aten_target, (source, list(out_shape)), {})
        return ChunkCall("call_method", "reshape", (source, *out_shape), {})


class Permute(SplitRule):
    """transpose / permute / t: the cut moves with its dimension."""

    free = True

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "transpose", "permute" or "t"

    def _perm(self, node: fx.Node, ndim: int) -> list[int] | None:
        if self.kind == "t":
            return [1, 0] if ndim == 2 else list(range(ndim))
        if self.kind == "transpose":
            d0 = _arg(node, 1, "dim0")
            d1 = _arg(node, 2, "dim1")
            if not isinstance(d0, int) or not isinstance(d1, int):
                return None
            perm = list(range(ndim))
            a, b = _norm_dim(d0, ndim), _norm_dim(d1, ndim)
            perm[a], perm[b] = perm[b], perm[a]
            return perm
        dims = list(node.args[1:]) or node.kwargs.get("dims")
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = list(dims[0])
        if not dims or not all(isinstance(d, int) for d in dims) or len(dims) != ndim:
            return None
        return [_norm_dim(d, ndim) for d in dims]

    def assign(self, node: fx.Node, shapes: OpShapes, slot: Slot, spec: Spec) -> Assignment | None:
        if spec is None or len(shapes.inputs) != 1:
            return None
        if isinstance(spec, Partial):
            return {OUT: PARTIAL, 0: PARTIAL}
        perm = self._perm(node, len(shapes.inputs[0]))
        if perm is None:
            return None
        if slot == OUT:
            return {OUT: spec, 0: spec.moved(perm[spec.dim])}
        return {OUT: spec.moved(perm.index(spec.dim)), 0: spec}


def parse_einsum(equation: str, ranks: Sequence[int]) -> tuple[list[str], str] | None:
    """(operand subscripts, output subscripts) of an einsum without ``...``; None otherwise."""
    eq = equation.replace(" ", "")
    if "." in eq:
        return None
    lhs, arrow, rhs = eq.partition("->")
    ins = lhs.split(",")
    if not arrow:
        letters = "".join(ins)
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(ins) != len(ranks) or any(len(s) != r for s, r in zip(ins, ranks)):
        return None
    if any(len(set(s)) != len(s) for s in ins + [rhs]):
        return None  # a repeated letter in one operand is a diagonal, not a batch dimension
    return ins, rhs


class Contraction(SplitRule):
    """einsum, bmm, mm, matmul and linear, through their einsum subscripts.

    A letter kept in the output is batch-like: every operand holding it and the output are cut the
    same way. A summed letter makes the output PARTIAL (each chunk adds its share of the sum).
    """

    anchor = True

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "einsum", "bmm", "mm", "matmul", "linear"

    def _subscripts(self, node: fx.Node, shapes: OpShapes) -> tuple[list[str], str] | None:
        ranks = [len(s) for s in shapes.inputs]
        if self.kind == "einsum":
            eq = node.args[0] if node.args else node.kwargs.get("equation")
            if not isinstance(eq, str):
                return None
            return parse_einsum(eq, ranks)
        if self.kind == "bmm":
            return (["bij", "bjk"], "bik") if ranks == [3, 3] else None
        if self.kind == "mm":
            return (["ij", "jk"], "ik") if ranks == [2, 2] else None
        if self.kind == "matmul":
            if len(ranks) != 2 or min(ranks) < 2:
                return None
            a, b = shapes.inputs
            if len(b) == 2:
                batch = "ABCDEFGH"[: len(a) - 2]
                return [batch + "ij", "jk"], batch + "ik"
            if len(a) == len(b) and a[:-2] == b[:-2]:
                batch = "ABCDEFGH"[: len(a) - 2]
                return [batch + "ij", batch + "jk"], batch + "ik"
            return None
        if self.kind == "linear":
            if len(ranks) not in (2, 3) or ranks[1] != 2 or ranks[0] < 1:
                return None
            batch = "ABCDEFGH"[: ranks[0] - 1]
            subs = [batch + "i", "oi"] + (["o"] if len(ranks) == 3 else [])
            if len(ranks) == 3 and ranks[2] != 1:
                return None
            return subs, batch + "o"
        return None

    def assign(self, node: fx.Node, shapes: OpShapes, slot: Slot, spec: Spec) -> Assignment | None:
        if not isinstance(spec, Cut):
            return None
        parsed = self._subscripts(node, shapes)
        if parsed is None:
            return None
        ins, out = parsed
        letter = out[spec.dim] if slot == OUT else ins[slot][spec.dim]
        sizes = {shapes.inputs[j][s.index(letter)] for j, s in enumerate(ins) if letter in s}
        if letter in out:
            sizes.add(shapes.output[out.index(letter)])
        if sizes != {spec.size()}:
            return None  # broadcast along the letter: not a clean cut
        result: Assignment = {j: (spec.moved(s.index(letter)) if letter in s else None) for j, s in enumerate(ins)}
        if letter in out:
            result[OUT] = spec.moved(out.index(letter))
        else:
            if self.kind == "linear" and len(ins) == 3:
                return None  # the bias would be added once per chunk
            result[OUT] = PARTIAL
        return result


class AllToAll(SplitRule):
    """``_c10d_functional.all_to_all_single(x, out_splits, in_splits, group)`` with even splits.

    Rows (dim 0) are sent in W contiguous blocks, one per rank. A cut of a later dimension moves
    with the rows. A cut of dim 0 is batch-like only when every rank's block holds the same share
    of the cut factor, i.e. the rank factor lies outside the cut: ``outer % W == 0``. Each chunk's
    all-to-all then carries, for every destination rank, exactly that rank's slice of the chunk,
    and the received rows (source rank major) have the same factor structure.
    """

    collective = True

    def world(self, node: fx.Node) -> int | None:
        out_splits, in_splits = _arg(node, 1, "output_split_sizes"), _arg(node, 2, "input_split_sizes")
        for splits in (out_splits, in_splits):
            if splits is not None:
                if not isinstance(splits, (list, tuple)) or not splits:
                    return None
                if not all(isinstance(s, int) for s in splits) or len(set(splits)) != 1:
                    return None  # uneven or symbolic splits: no rule
        for splits in (out_splits, in_splits):
            if splits is not None:
                return len(splits)
        group = _arg(node, 3, "group_name")
        try:
            from graphsched.compat import resolve_process_group

            return resolve_process_group(group).size()
        except Exception:  # noqa: BLE001 - an unknown group means no rule, not a failure
            return None

    def assign(self, node: fx.Node, shapes: OpShapes, slot: Slot, spec: Spec) -> Assignment | None:
        # A partial would move k full-size tensors: never worth it, so no rule.
        if not isinstance(spec, Cut) or len(shapes.inputs) != 1:
            return None
        world = self.world(node)
        if world is None or shapes.inputs[0][0] % world:
            return None
        if spec.dim == 0 and spec.outer % world:
            return None
        return {0: spec, OUT: spec}

    def chunk_call(self, node, args, kwargs, in_shapes, out_shape) -> ChunkCall:
        world = self.world(node)
        assert world is not None
        rows = in_shapes[0][0] // world
        new_args = list(args)
        for index, name in ((1, "output_split_sizes"), (2, "input_split_sizes")):
            if len(new_args) > index:
                if new_args[index] is not None:
                    new_args[index] = [rows] * world
            elif kwargs.get(name) is not None:
                kwargs = {**kwargs, name: [rows] * world}
        return ChunkCall(node.op, node.target, tuple(new_args), kwargs)


class SameDims(SplitRule):
    """Ops whose leading operands share the output's dimensions, cut only along ``allowed`` dims.

    ``follow``: how many leading operands have exactly the output's shape layout; the remaining
    operands (weights, biases) are used whole. ``allowed(node, ndim)`` lists the output dims that
    are batch-like (e.g. all but the normalised ones of layer_norm).
    """

    def __init__(self, follow: int, allowed: Callable[[fx.Node, int], set[int] | None]) -> None:
        self.follow = follow
        self.allowed = allowed

    def assign(self, node: fx.Node, shapes: OpShapes, slot: Slot, spec: Spec) -> Assignment | None:
        if not isinstance(spec, Cut):
            return None
        if slot != OUT and slot >= self.follow:
            return None
        out = shapes.output
        allowed = self.allowed(node, len(out))
        if allowed is None or spec.dim not in allowed or out[spec.dim] != spec.size():
            return None
        result: Assignment = {OUT: spec}
        for j, in_shape in enumerate(shapes.inputs):
            if j < self.follow:
                if len(in_shape) != len(out) or in_shape[spec.dim] != spec.size():
                    return None
                result[j] = spec
            else:
                result[j] = None
        return result


class Reduce(SplitRule):
    """sum / mean / amax / argmax ... over ``dim``: other dims batch-like; ``sum`` over the cut
    dimension gives a PARTIAL."""

    def __init__(self, sums: bool) -> None:
        self.sums = sums

    def _dims(self, node: fx.Node, ndim: int) -> tuple[set[int], bool] | None:
        dim = _arg(node, 1, "dim")
        keep = bool(_arg(node, 2, "keepdim", False))
        if dim is None:
            if len(node.args) > 1 or "dim" in node.kwargs:
                return None
            return set(range(ndim)), False
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (list, tuple)) else None
        if dims is None or not all(isinstance(d, int) for d in dims):
            return None
        return {_norm_dim(d, ndim) for d in dims}, keep

    def assign(self, node: fx.Node, shapes: OpShapes, slot: Slot, spec: Spec) -> Assignment | None:
        if not isinstance(spec, Cut) or len(shapes.inputs) != 1 or node.kwargs.get("dtype") is not None:
            return None
        (in_shape,) = shapes.inputs
        parsed = self._dims(node, len(in_shape))
        if parsed is None:
            return None
        reduced, keep = parsed
        kept = [d for d in range(len(in_shape)) if d not in reduced or keep]
        if slot == OUT:
            if spec.dim >= len(kept) or kept[spec.dim] in reduced:
                return None
            return {OUT: spec, 0: spec.moved(kept[spec.dim])}
        if spec.dim in reduced:
            return {OUT: PARTIAL, 0: spec} if self.sums else None
        return {OUT: spec.moved(kept.index(spec.dim)), 0: spec}


def all_but_dim(index: int, name: str) -> Callable[[fx.Node, int], set[int] | None]:
    def allowed(node: fx.Node, ndim: int) -> set[int] | None:
        dim = _arg(node, index, name)
        if not isinstance(dim, int):
            return None
        return set(range(ndim)) - {_norm_dim(dim, ndim)}

    return allowed


def layer_norm_dims(node: fx.Node, ndim: int) -> set[int] | None:
    normalized = _arg(node, 1, "normalized_shape")
    if isinstance(normalized, int):
        normalized = [normalized]
    if not isinstance(normalized, (list, tuple)):
        return None
    return set(range(ndim - len(normalized)))


def attention_dims(node: fx.Node, ndim: int) -> set[int] | None:
    if _arg(node, 3, "attn_mask") is not None or ndim < 3:
        return None
    return set(range(ndim - 2))  # batch and heads; the sequence dims mix under attention


def _embedding_dims(node: fx.Node, ndim: int) -> set[int] | None:
    return set(range(ndim - 1))  # the index dims; the weight is used whole


class Embedding(SameDims):
    """``F.embedding(indices, weight, ...)``: cut along the index dims; the table is used whole."""

    def __init__(self) -> None:
        super().__init__(follow=1, allowed=_embedding_dims)

    def assign(self, node, shapes, slot, spec):
        if not isinstance(spec, Cut) or len(shapes.inputs) < 2:
            return None
        idx_shape = shapes.inputs[0]
        if slot == 0 or slot == OUT:
            if spec.dim >= len(idx_shape) or idx_shape[spec.dim] != spec.size():
                return None
            return {OUT: spec, 0: spec, **{j: None for j in range(1, len(shapes.inputs))}}
        return None
