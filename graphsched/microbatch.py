"""Micro-batches in one captured step: ``wrap(model, micro_batches=k)``.

The batch is split along its first dimension into k equal micro-batches and the model runs on each
inside one compiled call, so the captured forward holds k independent copies of the model and the
backward k independent backwards. Nothing ties micro-batch 1's attention or gate to micro-batch 0's
all-to-all, so a plan can run one while the other is on the wire: the overlap that splitting an
all-to-all region cannot give, since routing needs the whole batch before anything is sent.

Semantics are those of gradient accumulation over k equal micro-batches, which is what the
unscheduled oracle runs (``micro_batched(model, k)`` called eagerly): routing, capacity and drops are
decided per micro-batch; a scalar output (a mean-reduced loss) is the mean of the micro-batches';
a batch-first tensor output (logits) is their concatenation. A model whose loss is a sum, or whose
outputs are neither, must not use this option: the combination refuses what it does not know.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from graphsched.errors import ConfigError


def _batch_size(leaves: list[Any]) -> int:
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.ndim >= 1:
            return int(leaf.shape[0])
    raise ConfigError(
        "micro_batches > 1 needs a tensor argument with a batch dimension (dim 0) to split; "
        "this call has none: use micro_batches=1."
    )


def split_call(args: tuple, kwargs: dict, count: int) -> list[tuple[tuple, dict]]:
    """The arguments of each micro-batch: every tensor whose dim 0 is the batch size (that of the
    first tensor argument) is cut into ``count`` equal slices; every other argument goes to each."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    batch = _batch_size(leaves)
    if batch % count:
        raise ConfigError(
            f"micro_batches={count} does not divide the batch of {batch}: use a batch size that "
            f"is a multiple of {count}, or another micro_batches."
        )
    size = batch // count
    calls = []
    for i in range(count):
        part = [
            leaf.narrow(0, i * size, size)
            if isinstance(leaf, torch.Tensor) and leaf.ndim >= 1 and leaf.shape[0] == batch else leaf
            for leaf in leaves
        ]
        calls.append(pytree.tree_unflatten(part, spec))
    return calls


def can_split(args: tuple, kwargs: dict, count: int) -> bool:
    """Whether ``split_call`` can cut this call into ``count`` micro-batches."""
    leaves = pytree.tree_leaves((args, kwargs))
    sizes = [leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.ndim >= 1]
    return bool(sizes) and sizes[0] % count == 0


def _combine_leaf(parts: list[Any], where: str) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.ndim == 0:
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            return total / len(parts)
        return torch.cat(parts, dim=0)
    if all(p is None for p in parts):
        return None
    if all(isinstance(p, (int, float, bool, str)) and p == first for p in parts):
        return first
    raise ConfigError(
        f"micro_batches cannot combine the model's output {where} ({type(first).__name__}, "
        "differing between micro-batches): only tensors (scalars averaged, batch-first tensors "
        "concatenated) and equal constants are combined; use micro_batches=1."
    )


def combine_outputs(outputs: list[Any]) -> Any:
    """One output from the micro-batches' outputs: scalars averaged, batch-first tensors joined."""
    flat = [pytree.tree_flatten(o) for o in outputs]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        raise ConfigError(
            "the model returned differently structured outputs for two micro-batches; use "
            "micro_batches=1."
        )
    leaves = [_combine_leaf([f[0][j] for f in flat], f"leaf {j}") for j in range(len(flat[0][0]))]
    return pytree.tree_unflatten(leaves, spec)


def micro_batched(fn: Callable[..., Any], count: int) -> Callable[..., Any]:
    """``fn`` run on ``count`` micro-batches of its arguments, outputs combined (see the module
    docstring). ``count == 1`` returns ``fn`` itself."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"micro_batches={count!r} must be an integer >= 1 (1: off).")
    if count == 1:
        return fn

    def call(*args: Any, **kwargs: Any) -> Any:
        return combine_outputs([fn(*a, **kw) for a, kw in split_call(args, kwargs, count)])

    call.__name__ = f"micro_batched_{count}"
    return call


#: The micro-batch counts ``micro_batches="auto"`` measures against each other.
AUTO_CANDIDATES = (1, 2)


class MicroBatchChoice:
    """``micro_batches="auto"``: one compiled call per count in AUTO_CANDIDATES, run in turn over
    the first training steps, then the fastest (``runtime.measured_choice.MeasuredChoice``: k = 1
    is preferred and wins unless another is faster by its margin). A call whose batch does not
    split runs k = 1 from then on, with one warning."""

    def __init__(self, choice: Any, single: Callable[..., Any], counts: tuple[int, ...]) -> None:
        self.choice = choice
        self.single = single
        self.counts = counts
        self.unsplittable = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.unsplittable and not all(can_split(args, kwargs, k) for k in self.counts):
            import warnings

            from graphsched.errors import GraphschedFallbackWarning

            self.unsplittable = True
            warnings.warn(
                f"graphsched: micro_batches=\"auto\" cannot split this call's batch into "
                f"{max(self.counts)}; it runs one micro-batch from now on (use a batch size that is "
                f"a multiple of {max(self.counts)}).", GraphschedFallbackWarning, stacklevel=3)
        if self.unsplittable:
            return self.single(*args, **kwargs)
        return self.choice((args, kwargs))
