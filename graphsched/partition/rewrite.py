"""Cut a region of an FX graph into k chunks: split its inputs, replicate its nodes, join outputs.

The graph is rebuilt in one pass. Nodes outside the region keep their names, order and meta; the
region's nodes are replaced, at the position of its last node, by a block:

* every boundary input cut by the region is split once (``torch.split`` along the cut dimension,
  after a reshape that exposes the cut factor when the dimension is a merged one);
* every region node is copied once per chunk, its shape-carrying arguments (reshape sizes, the
  all-to-all's split sizes) adapted by its split rule, named ``<node>_c<i>``;
* every region node used outside is joined: ``torch.cat`` of the chunks, or the sum of the
  chunks' partials (left to right: ``((p0 + p1) + p2) + ...``).

The block is emitted in ``order_key`` order (a pipelined order from the scheduler), which is
always completed into a topological one. Outside nodes that depend on the region and came before
its last node are moved right after the block (the region is convex, so nothing it needs moves).

Copies keep their original's meta (stack trace, module stack: so plans still name modules), get a
fresh ``example_value`` from fake-tensor propagation (checked against the expected chunk shape),
and carry ``meta["custom"]["graphsched_chunk"] = "<region>.c<i>"`` (``.split`` / ``.join`` for the
added nodes), which AOTAutograd copies onto the aten nodes it traces from them.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from graphsched.analysis.graph import ordered_topological_sort
from graphsched.errors import GraphschedError
from graphsched.partition.regions import Region
from graphsched.partition.split_rules import SplitRules, default_rules
from graphsched.partition.split_specs import (
    ChunkCall,
    Cut,
    Partial,
    example_value,
    is_tensor_node,
    operands,
    run_call,
)

CHUNK_TAG = "graphsched_chunk"
#: order_key(node, chunk) -> sortable; smaller goes first (subject to dependencies).
OrderKey = Callable[[fx.Node, int], Any]


def chunk_sizes(extent: int, k: int) -> list[int]:
    """``extent`` slices over ``k`` chunks, as even as possible, larger chunks first."""
    if not 1 <= k <= extent:
        raise GraphschedError(
            f"cannot cut a factor of {extent} slices into {k} chunks; use 1 <= chunks <= {extent}."
        )
    base, extra = divmod(extent, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in example_value(node).shape)


def shape_in_chunk(node: fx.Node, spec: Any, part: int) -> tuple[int, ...]:
    """Shape of ``node``'s value in a chunk holding ``part`` slices of the cut factor."""
    shape = _shape(node)
    return spec.chunk_shape(shape, part) if isinstance(spec, Cut) else shape


def _factor_shape(shape: Sequence[int], cut: Cut, part: int) -> list[int]:
    """``shape`` with the cut dimension expanded into ``[outer, part, inner]``."""
    d = cut.dim
    return [*shape[:d], cut.outer, part, cut.inner, *shape[d + 1:]]


def _plain(cut: Cut) -> bool:
    return cut.outer == 1 and cut.inner == 1


class _Builder:
    """Builds the new graph; keeps track of the meta to give each new node."""

    def __init__(self, old: fx.Graph, tag_prefix: str) -> None:
        self.graph = fx.Graph(tracer_cls=old._tracer_cls, tracer_extras=getattr(old, "_tracer_extras", None))
        self.graph._codegen = old._codegen
        self.tag_prefix = tag_prefix
        #: new node -> expected shape (checked after fake propagation)
        self.expected: dict[fx.Node, tuple[int, ...]] = {}
        self.created: list[fx.Node] = []

    def create(
        self,
        call: ChunkCall,
        name: str,
        like: fx.Node,
        tag: str,
        expected: tuple[int, ...] | None,
    ) -> fx.Node:
        node = self.graph.create_node(call.op, call.target, tuple(call.args), dict(call.kwargs), name=name)
        meta = {k: v for k, v in like.meta.items() if k not in ("example_value", "val", "tensor_meta")}
        custom = dict(meta.get("custom") or {})
        custom[CHUNK_TAG] = f"{self.tag_prefix}.{tag}"
        meta["custom"] = custom
        node.meta.update(meta)
        if expected is not None:
            self.expected[node] = expected
        self.created.append(node)
        return node


def _fake_mode_of(graph: fx.Graph) -> Any:
    for n in graph.nodes:
        val = example_value(n)
        mode = getattr(val, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _as_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and not hasattr(value, "fake_mode"):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return value


def _propagate(builder: _Builder, fake_mode: Any) -> None:
    """Give every new node an ``example_value`` and check it has the shape the cut predicts."""
    if fake_mode is not None:
        ctx: Any = fake_mode
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        for node in builder.created:
            args = fx.map_arg(node.args, lambda a: _as_meta(example_value(a)) if fake_mode is None else example_value(a))
            kwargs = fx.map_arg(node.kwargs, lambda a: _as_meta(example_value(a)) if fake_mode is None else example_value(a))
            value = run_call(ChunkCall(node.op, node.target, tuple(args), dict(kwargs)))
            node.meta["example_value"] = value
            want = builder.expected.get(node)
            if want is not None:
                got = tuple(int(s) for s in value.shape)
                if got != want:
                    raise GraphschedError(
                        f"chunked node {node.name} has shape {got} but the cut predicts {want}; "
                        "the split rule of its op is wrong (please report it); run with chunks=1 "
                        "meanwhile."
                    )


def rewrite_region(
    gm: fx.GraphModule,
    region: Region,
    sizes: Sequence[int],
    rules: SplitRules | None = None,
    order_key: OrderKey | None = None,
) -> dict[fx.Node, fx.Node]:
    """Cut ``region`` of ``gm`` into ``len(sizes)`` chunks (``sizes``: slices of the cut factor
    per chunk) in place, and recompile. Returns old node -> new node for the nodes outside the
    region and for the region's joined outputs."""
    rules = rules or default_rules()
    sizes = list(sizes)
    if sum(sizes) != region.extent or any(s < 1 for s in sizes):
        raise GraphschedError(
            f"chunk sizes {sizes} do not cover region {region.id}'s {region.extent} slices; use "
            "chunk_sizes(extent, k)."
        )
    k = len(sizes)
    old = gm.graph
    nodes = list(old.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    members = set(region.nodes)
    last = max(region.nodes, key=index.__getitem__)
    below: set[fx.Node] = set()
    stack = [u for n in region.nodes for u in n.users if u not in members]
    while stack:
        n = stack.pop()
        if n not in below:
            below.add(n)
            stack.extend(n.users)
    order_key = order_key or (lambda n, i: (index[n], i))

    b = _Builder(old, region.id)
    env: dict[fx.Node, fx.Node] = {}
    copies: dict[fx.Node, list[fx.Node]] = {}
    pieces: dict[fx.Node, list[fx.Node]] = {}

    def copy_outside(n: fx.Node) -> None:
        new = b.graph.node_copy(n, lambda a: env[a])
        # Attributes set on nodes by their producer (Dynamo's placeholders carry _dynamo_source,
        # which AOTAutograd reads) travel with the node.
        for attr, value in vars(n).items():
            setattr(new, attr, value)
        env[n] = new

    def split(u: fx.Node, cut: Cut) -> None:
        src = env[u]
        shape = _shape(u)
        dim = cut.dim
        if not _plain(cut):
            src = b.create(
                ChunkCall("call_method", "reshape", (src, *_factor_shape(shape, cut, cut.extent)), {}),
                f"{u.name}_factor", u, "split", None,
            )
            dim = cut.dim + 1
        parts = b.create(ChunkCall("call_function", torch.split, (src, sizes, dim), {}), f"{u.name}_split", u, "split", None)
        pieces[u] = []
        for i, part in enumerate(sizes):
            piece = b.create(ChunkCall("call_function", operator.getitem, (parts, i), {}), f"{u.name}_s{i}", u, "split", None)
            if not _plain(cut):
                piece = b.create(
                    ChunkCall("call_method", "reshape", (piece, *cut.chunk_shape(shape, part)), {}),
                    f"{u.name}_s{i}r", u, "split", cut.chunk_shape(shape, part),
                )
            pieces[u].append(piece)

    def chunk_arg(n: fx.Node, i: int) -> Callable[[fx.Node], fx.Node]:
        # Operands are visited in the order split_specs.operands lists them, so the k-th tensor
        # operand met here has the k-th operand spec.
        use_specs = iter(region.operand_specs(n))

        def get(a: fx.Node) -> fx.Node:
            spec = next(use_specs) if is_tensor_node(a) else None
            if a in members:
                return copies[a][i]
            if spec is not None:
                return pieces[a][i]
            return env[a]

        return get

    def copy_chunk(n: fx.Node, i: int) -> None:
        rule = rules.lookup(n)
        if rule is None:
            raise GraphschedError(f"region {region.id}: node {n.name} has no split rule")
        get = chunk_arg(n, i)
        args = fx.map_arg(n.args, get)
        kwargs = fx.map_arg(n.kwargs, get)
        in_shapes = [shape_in_chunk(a, s, sizes[i]) for a, s in zip(operands(n), region.operand_specs(n))]
        out_shape = shape_in_chunk(n, region.specs[n], sizes[i])
        call = rule.chunk_call(n, tuple(args), dict(kwargs), in_shapes, out_shape)
        copies.setdefault(n, []).append(b.create(call, f"{n.name}_c{i}", n, f"c{i}", out_shape))

    def join(v: fx.Node) -> fx.Node:
        spec = region.specs[v]
        parts = copies[v]
        if isinstance(spec, Partial):
            dtype = example_value(v).dtype
            # Half-precision partials are added in float32 and rounded once, as the unchunked
            # reduction (which accumulates in float32) rounds once.
            widen = dtype in (torch.bfloat16, torch.float16)
            if widen:
                parts = [b.create(ChunkCall("call_method", "float", (p,), {}), f"{v.name}_w{j}", v, "join", _shape(v))
                         for j, p in enumerate(parts)]
            total = parts[0]
            for j, p in enumerate(parts[1:], start=1):
                name = v.name if j == len(parts) - 1 and not widen else f"{v.name}_sum{j}"
                total = b.create(ChunkCall("call_function", operator.add, (total, p), {}), name, v, "join", _shape(v))
            if widen:
                total = b.create(ChunkCall("call_method", "to", (total, dtype), {}), v.name, v, "join", _shape(v))
            return total
        assert isinstance(spec, Cut)
        if _plain(spec):
            return b.create(ChunkCall("call_function", torch.cat, (list(parts), spec.dim), {}), v.name, v, "join", _shape(v))
        shaped = [
            b.create(
                ChunkCall("call_method", "reshape", (p, *_factor_shape(_shape(v), spec, part)), {}),
                f"{v.name}_j{i}", v, "join", None,
            )
            for i, (p, part) in enumerate(zip(parts, sizes))
        ]
        cat = b.create(ChunkCall("call_function", torch.cat, (shaped, spec.dim + 1), {}), f"{v.name}_cat", v, "join", None)
        return b.create(ChunkCall("call_method", "reshape", (cat, *_shape(v)), {}), v.name, v, "join", _shape(v))

    def emit_block() -> None:
        for u in region.inputs():
            split(u, region.specs[u])
        # The (node, chunk) copies in a topological order, smallest order key first.
        waiting: dict[tuple[fx.Node, int], list[tuple[fx.Node, int]]] = {}
        for n in region.nodes:
            deps = {a for a in n.all_input_nodes if a in members}
            for i in range(k):
                for a in deps:
                    waiting.setdefault((a, i), []).append((n, i))
        copies_in_order = ordered_topological_sort(
            [(n, i) for n in region.nodes for i in range(k)],
            lambda c: waiting.get(c, ()),
            lambda c: (order_key(c[0], c[1]), index[c[0]] * k + c[1]),
        )
        for n, i in copies_in_order:
            copy_chunk(n, i)
        if any(len(copies.get(n, [])) != k for n in region.nodes):
            raise GraphschedError(f"region {region.id} has a dependency cycle; it cannot be chunked")
        for v in region.outputs():
            env[v] = join(v)

    delayed: list[fx.Node] = []
    emitted = False
    for n in nodes:
        if n in members:
            if n is last:
                emit_block()
                emitted = True
                for d in delayed:
                    copy_outside(d)
                delayed = []
            continue
        if n in below and not emitted:
            delayed.append(n)
            continue
        copy_outside(n)
    _propagate(b, _fake_mode_of(old))
    b.graph.lint()
    gm.graph = b.graph
    gm.recompile()
    return env
