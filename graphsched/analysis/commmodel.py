"""Communication cost: an alpha-beta model per collective kind, fitted from timed collectives.

A collective moving ``n`` bytes takes ``alpha + beta * n`` seconds. ``n`` is always the size of the
input buffer one rank hands to the collective (the per-rank shard for an all-gather); the benchmark
and :func:`graphsched.analysis.costmodel.collective_bytes` use that same convention, so a fitted
model applies to graph nodes directly. The sweep here prices any size; ``graph_collectives.py``
times a graph's own collectives at their sizes, and ``contention.py`` measures the factor the model
carries for the scheduler.

The agreement helpers (:func:`agree_costs`, :func:`agree_comm_model`) make every rank hold the same
numbers: a plan computed from identical numbers is identical on every rank, which the collectives'
issue order requires.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

from graphsched.analysis.collective_calls import (
    COLLECTIVE_KINDS,
    collective_call,
    global_rank0,
    group_device,
    median_time,
)
from graphsched.errors import ConfigError, GraphschedError

#: Doubling message sizes (bytes) timed by default: 4 KiB .. 16 MiB spans the latency-bound and the
#: bandwidth-bound regimes of NVLink, InfiniBand and gloo alike.
DEFAULT_SIZES = tuple(2**k for k in range(12, 25))

REDUCTIONS = ("max", "mean", "rank0")


@dataclass
class AlphaBeta:
    """``time(n) = alpha_s + beta_s_per_byte * n``; ``rel_error``: the fit's worst relative miss."""

    alpha_s: float
    beta_s_per_byte: float
    rel_error: float = 0.0

    def time(self, nbytes: float) -> float:
        return self.alpha_s + self.beta_s_per_byte * float(nbytes)

    @property
    def bandwidth_bytes_s(self) -> float:
        return math.inf if self.beta_s_per_byte <= 0 else 1.0 / self.beta_s_per_byte


def fit_alpha_beta(sizes: Sequence[float], times: Sequence[float]) -> AlphaBeta:
    """Least-squares fit of ``t = alpha + beta * size``, both constrained to be >= 0.

    Residuals are weighted by ``1 / t`` (relative error): sizes double over several orders of
    magnitude, and an unweighted fit would let the largest message decide alpha alone.
    """
    if len(sizes) != len(times):
        raise ConfigError(
            f"fit_alpha_beta got {len(sizes)} sizes but {len(times)} times; pass one time per size."
        )
    if len(set(float(s) for s in sizes)) < 2:
        raise ConfigError(
            "fit_alpha_beta needs at least two distinct message sizes to separate latency from "
            "bandwidth; time the collective at several (e.g. doubling) sizes."
        )
    if any(not (t > 0 and math.isfinite(t)) for t in times) or any(s < 0 for s in sizes):
        raise ConfigError(
            "fit_alpha_beta needs positive, finite times and non-negative sizes; drop failed "
            f"measurements before fitting (got times={list(times)})."
        )
    s = [float(x) for x in sizes]
    t = [float(x) for x in times]
    w = [1.0 / (x * x) for x in t]
    sw = sum(w)
    sws = sum(wi * si for wi, si in zip(w, s))
    swss = sum(wi * si * si for wi, si in zip(w, s))
    swt = sum(wi * ti for wi, ti in zip(w, t))
    swst = sum(wi * si * ti for wi, si, ti in zip(w, s, t))
    det = sw * swss - sws * sws
    alpha = (swss * swt - sws * swst) / det
    beta = (sw * swst - sws * swt) / det
    # The constrained optimum lies on a boundary when the free one leaves the feasible region.
    if alpha < 0:
        alpha, beta = 0.0, swst / swss
    if beta < 0:
        alpha, beta = swt / sw, 0.0
    rel = max(abs(alpha + beta * si - ti) / ti for si, ti in zip(s, t))
    return AlphaBeta(alpha_s=alpha, beta_s_per_byte=beta, rel_error=rel)


def _analytic_factor(kind: str, world_size: int) -> float:
    """Bytes on the busiest link per input byte, for ring / pairwise algorithms."""
    n = world_size
    return {
        # Kept at 1 (not (n-1)/n): the local chunk is still a copy, and it is the usual estimate.
        "all_to_all": 1.0,
        "all_reduce": 2.0 * (n - 1) / n,
        "all_gather": float(n - 1),
        "reduce_scatter": (n - 1) / n,
        "broadcast": 1.0,
        "default": 1.0,
    }[kind]


@dataclass
class CommModel:
    """One :class:`AlphaBeta` per collective kind (``all_to_all``, ``all_reduce``, ...).

    A ``"default"`` entry, when present, serves kinds without their own entry. ``contention``: how
    much slower compute runs while a collective is in flight (1.0: not at all); measured with the
    collectives on CUDA (:mod:`graphsched.analysis.contention`), read by the scheduler's simulator.
    """

    per_kind: dict[str, AlphaBeta] = field(default_factory=dict)
    contention: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.contention) and self.contention >= 1.0):
            raise ConfigError(
                f"CommModel.contention={self.contention!r} must be a finite number >= 1.0 (1.0: "
                "a collective in flight does not slow compute)."
            )

    def time(self, kind: str, nbytes: float) -> float:
        model = self.per_kind.get(kind) or self.per_kind.get("default")
        if model is None:
            raise GraphschedError(
                f"the communication model has no entry for {kind!r} (it has "
                f"{sorted(self.per_kind)}); time it with benchmark_collectives(group, "
                f"kinds=(..., {kind!r})) or add a 'default' entry."
            )
        return model.time(nbytes)

    @classmethod
    def analytic(
        cls, bandwidth_bytes_s: float, latency_s: float, world_size: int = 2
    ) -> "CommModel":
        """A model from a link's bandwidth and latency, without measuring anything."""
        if not (bandwidth_bytes_s > 0) or not (latency_s >= 0) or world_size < 1:
            raise ConfigError(
                f"CommModel.analytic needs bandwidth_bytes_s > 0, latency_s >= 0 and world_size "
                f">= 1 (got {bandwidth_bytes_s!r}, {latency_s!r}, {world_size!r})."
            )
        ws = max(world_size, 2)
        return cls(
            {
                kind: AlphaBeta(latency_s, _analytic_factor(kind, ws) / bandwidth_bytes_s, 0.0)
                for kind in (*COLLECTIVE_KINDS, "default")
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_kind": {
                k: {"alpha_s": v.alpha_s, "beta_s_per_byte": v.beta_s_per_byte,
                    "rel_error": v.rel_error}
                for k, v in sorted(self.per_kind.items())
            },
            "contention": self.contention,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CommModel":
        per_kind = {k: AlphaBeta(**v) for k, v in data["per_kind"].items()}
        return cls(per_kind, contention=float(data.get("contention", 1.0)))


# ---------------------------------------------------------------------------------------------
# Measuring real collectives


def benchmark_collectives(
    group: dist.ProcessGroup | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    kinds: Sequence[str] = ("all_to_all", "all_reduce"),
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | None = None,
    contention: bool = True,
) -> CommModel:
    """Time the group's collectives at each size (bytes per rank) and fit one alpha-beta per kind.

    Buffers live where the group's collectives run (:func:`group_device`; ``device``, the model's
    device, is preferred where the backend supports it). On CUDA, with ``contention``, the model's
    contention factor is measured too (:func:`graphsched.analysis.contention.measure_contention`,
    with the first of ``kinds``); elsewhere it is 1.0.

    Every rank must call this with the same arguments. Each timing is preceded by a barrier; the
    median of ``repeats`` is kept, then the ranks' medians (and contention factors) are reduced
    with MAX, so every rank fits the same data and returns the same model.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise GraphschedError(
            "benchmark_collectives needs an initialised process group; call "
            "torch.distributed.init_process_group first (or use CommModel.analytic)."
        )
    unknown = [k for k in kinds if k not in COLLECTIVE_KINDS]
    if not kinds or unknown or repeats < 1 or warmup < 0 or len(set(sizes)) < 2:
        raise ConfigError(
            f"benchmark_collectives: kinds must be among {COLLECTIVE_KINDS} (unknown: {unknown}), "
            f"repeats >= 1, warmup >= 0 and at least two distinct sizes (got kinds={list(kinds)}, "
            f"repeats={repeats}, warmup={warmup}, sizes={list(sizes)})."
        )
    device = group_device(group, device)
    sizes = sorted(set(int(s) for s in sizes))
    measured_bytes: dict[str, list[int]] = {}
    medians: list[float] = []
    for kind in kinds:
        measured_bytes[kind] = []
        for size in sizes:
            # float32 elements (collective_call rounds to a multiple of the group size).
            fn, nbytes = collective_call(kind, -(-size // 4), group, device)
            medians.append(median_time(fn, group, device, repeats, warmup))
            measured_bytes[kind].append(nbytes)
    factor = 1.0
    if contention and device.type == "cuda":
        from graphsched.analysis.contention import measure_contention

        factor = measure_contention(group, device, kinds[0]).factor
    times = torch.tensor(medians + [factor], dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    flat = times.cpu().tolist()
    per_kind: dict[str, AlphaBeta] = {}
    for i, kind in enumerate(kinds):
        chunk = flat[i * len(sizes):(i + 1) * len(sizes)]
        per_kind[kind] = fit_alpha_beta(measured_bytes[kind], chunk)
    return CommModel(per_kind, contention=flat[-1])


# ---------------------------------------------------------------------------------------------
# Agreement across ranks


def _keys_digest(keys: list[str]) -> str:
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()


def agree_costs(
    costs: dict[str, float],
    group: dist.ProcessGroup | None = None,
    reduce: str = "max",
) -> dict[str, float]:
    """Return the same ``{name: seconds}`` on every rank of ``group``.

    Every rank must pass the same keys (checked first). ``reduce="max"`` takes the slowest rank's
    number for each key (the step waits for it), ``"mean"`` the average, ``"rank0"`` the first
    rank's. Without an initialised process group (or with one rank) a copy is returned.
    """
    if reduce not in REDUCTIONS:
        raise ConfigError(f"agree_costs: reduce={reduce!r} is not known; use one of {REDUCTIONS}.")
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return {k: float(v) for k, v in costs.items()}
    world_size = dist.get_world_size(group)
    keys = sorted(costs)
    bad = [k for k in keys if not math.isfinite(float(costs[k]))][:3]
    mine = (_keys_digest(keys), len(keys), bad)
    gathered: list[Any] = [None] * world_size
    # Exchanged before raising, so that every rank raises or none does (no rank left hanging).
    dist.all_gather_object(gathered, mine, group=group)
    if any(g[2] for g in gathered):
        detail = "; ".join(f"rank {r}: {g[2]}" for r, g in enumerate(gathered) if g[2])
        raise GraphschedError(
            f"agree_costs: some costs are not finite numbers ({detail}); re-measure those nodes "
            "or drop them so the analytic model covers them."
        )
    if len({g[0] for g in gathered}) > 1:
        all_keys: list[Any] = [None] * world_size
        dist.all_gather_object(all_keys, keys, group=group)
        union = set().union(*map(set, all_keys))
        diffs = []
        for r, ks in enumerate(all_keys):
            missing = sorted(union - set(ks))
            if missing:
                diffs.append(f"rank {r} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        raise GraphschedError(
            "agree_costs: ranks hold costs for different nodes (" + "; ".join(diffs) + "); every "
            "rank must capture the same model with the same input shapes and measure the same "
            "graph, so that node names match."
        )
    if not keys:
        return {}
    device = group_device(group)
    values = torch.tensor([float(costs[k]) for k in keys], dtype=torch.float64, device=device)
    if reduce == "max":
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    elif reduce == "mean":
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
        values /= world_size
    else:
        dist.broadcast(values, src=global_rank0(group), group=group)
    return dict(zip(keys, values.cpu().tolist()))


def agree_comm_model(
    model: CommModel, group: dist.ProcessGroup | None = None, reduce: str = "max"
) -> CommModel:
    """Return the same :class:`CommModel` on every rank (each number agreed as in agree_costs)."""
    flat = {
        f"{kind}/{name}": float(getattr(ab, name))
        for kind, ab in model.per_kind.items()
        for name in ("alpha_s", "beta_s_per_byte", "rel_error")
    }
    flat["contention"] = model.contention
    agreed = agree_costs(flat, group=group, reduce=reduce)
    return CommModel(
        {
            kind: AlphaBeta(
                agreed[f"{kind}/alpha_s"],
                agreed[f"{kind}/beta_s_per_byte"],
                agreed[f"{kind}/rel_error"],
            )
            for kind in model.per_kind
        },
        contention=agreed["contention"],
    )
