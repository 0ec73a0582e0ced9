"""Benchmark presets: a model size, a batch, an emulated group and how long to measure.

Sizes of the GPU presets follow DESIGN.md's "Where overlap pays": an MoE block of d_model 2048 and
ffn 8192, top-2 routing with capacity factor 1.25, 2048-token sequences, bf16, chosen so that the
emulated communication is 30-60% of the step (compute + communication) at 25 GB/s and at
12.5 GB/s: measured on an H100 for gpu-e16, 31% and 47% (docs/benchmarks.md). Every figure they give is emulated: one GPU plays one
rank of a ``virtual_size``-rank expert-parallel group (graphsched.testing.emulated).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from graphsched.errors import ConfigError
from graphsched.models import MoEGPTConfig

#: Every variant the harness knows, in the order it runs them (see benchmarks/variants.py).
ALL_VARIANTS = (
    "eager",
    "compute-only",
    "comm-only",
    "inductor",
    "compute-only-inductor",
    "inductor-reorder",
    "inductor-classic",
    "inductor-overlap",
    "deepspeed",
    "compute-only-deepspeed",
    "deepspeed+graphsched",
    "graphsched-identity",
    "graphsched-ilp",
    "graphsched-chunks2",
    "graphsched-chunks4",
    "graphsched-full",
    "graphsched-inductor",
    "graphsched-inductor-fusefree",
    "graphsched-inductor-chunks2",
    "graphsched-inductor-chunks2-fusefree",
    "graphsched-inductor-chunks4",
    "graphsched-inductor-auto",
    "graphsched-rewrite+inductor-classic",
    # Two micro-batches in one step (gradient accumulation's semantics): the eager oracle, the
    # peers on the same step, graphsched's plan over both.
    "eager-mb2",
    "compute-only-inductor-mb2",
    "inductor-classic-mb2",
    "graphsched-inductor-mb2",
    "graphsched-inductor-chunks2-mb2",
    "graphsched-inductor-chunks4-mb2",
    "graphsched-inductor-mbauto",
    # Four micro-batches: finer interleaving, twice -mb2's collective calls.
    "eager-mb4",
    "compute-only-inductor-mb4",
    "inductor-classic-mb4",
    "graphsched-inductor-mb4",
)

#: ``--quick``: the peers that matter and the limit's parts, in about 5 minutes of H200 time per
#: GPU preset: the fastest inductor peer (inductor-classic; plain inductor and inductor-reorder
#: were slower on an H200), DeepSpeed, every family's compute alone (the limit takes the fastest),
#: communication alone, and graphsched's ILP schedule on both models (plus graphsched-inductor
#: where graphsched has ``codegen``; skipped otherwise, at no cost).
QUICK_VARIANTS = (
    "eager",
    "compute-only",
    "comm-only",
    "compute-only-inductor",
    "inductor-classic",
    "deepspeed",
    "compute-only-deepspeed",
    "deepspeed+graphsched",
    "graphsched-ilp",
    "graphsched-inductor",
    "graphsched-inductor-auto",
)
#: ``--quick`` measures fewer steps, and gives the ILP less time per graph.
QUICK_STEPS = {"warmup": 2, "steps": 5, "solver_time_limit_s": 5.0}


MODEL_FAMILIES = ("reference", "swiglu")


@dataclass(frozen=True)
class BenchPreset:
    """One benchmark configuration; ``python -m benchmarks.run --preset NAME`` runs it."""

    name: str
    description: str
    model: MoEGPTConfig
    #: sequences per step on the emulated rank (tokens per rank = batch_size * seq_len)
    batch_size: int
    #: size of the emulated expert-parallel group (the model holds num_experts / virtual_size experts)
    virtual_size: int
    #: "cpu" or "cuda"
    device: str
    bandwidth_gbps: float = 25.0
    warmup: int = 3
    steps: int = 10
    #: variants run by default (a subset of ALL_VARIANTS)
    variants: tuple[str, ...] = ALL_VARIANTS
    #: graphsched's ILP time limit per graph, seconds (GraphschedConfig.solver_time_limit_s)
    solver_time_limit_s: float = 20.0
    #: graphsched's profile-guided planning for every graphsched variant
    #: (GraphschedConfig.profile_steps: 0 off, N profiled steps, "auto"); the profiled steps and the
    #: re-planning step run before the timed warm-up
    profile_steps: int | str = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: the graphsched-side model: "reference" (MoEGPT) or "swiglu" (SwiGLUMoEGPT: RMSNorm, SwiGLU
    #: experts, a shared expert), the second model every scheduling choice is tried on
    model_family: str = "reference"

    def __post_init__(self) -> None:
        if self.model_family not in MODEL_FAMILIES:
            raise ConfigError(
                f"preset {self.name!r}: model_family={self.model_family!r} is not one of "
                f"{list(MODEL_FAMILIES)} (e.g. --set model_family=swiglu)."
            )
        unknown = [v for v in self.variants if v not in ALL_VARIANTS]
        if unknown:
            raise ConfigError(
                f"preset {self.name!r} names unknown variants {unknown}; known: {list(ALL_VARIANTS)}."
            )
        if self.model.num_experts % self.virtual_size != 0:
            raise ConfigError(
                f"preset {self.name!r}: num_experts={self.model.num_experts} is not a multiple of "
                f"virtual_size={self.virtual_size}; every emulated rank must hold whole experts."
            )
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"preset {self.name!r}: device must be 'cpu' or 'cuda', not {self.device!r}.")

    @property
    def tokens_per_rank(self) -> int:
        return self.batch_size * self.model.seq_len

    def replace(self, **changes: Any) -> "BenchPreset":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = dataclasses.asdict(self.model)
        data["variants"] = list(self.variants)
        data["notes"] = list(self.notes)
        data["tokens_per_rank"] = self.tokens_per_rank
        return data


def _gpu_model(**changes: Any) -> MoEGPTConfig:
    base = MoEGPTConfig(
        vocab_size=32768, seq_len=2048, d_model=2048, n_heads=16, n_layers=4, d_ff=8192,
        num_experts=16, top_k=2, capacity_factor=1.25, min_capacity=4, dtype="bfloat16",
    )
    return base.replace(**changes)


PRESETS: dict[str, BenchPreset] = {
    p.name: p
    for p in (
        BenchPreset(
            name="tiny-cpu",
            description="Smoke test on CPU in seconds: every variant runs, no speed meaning.",
            model=MoEGPTConfig(
                vocab_size=128, seq_len=16, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                num_experts=8, top_k=2, capacity_factor=1.25,
            ),
            batch_size=4,
            virtual_size=4,
            device="cpu",
            warmup=1,
            steps=3,
            solver_time_limit_s=5.0,
            notes=("CPU: the emulated link only counts bytes, so comm-only is ~0; times prove "
                   "that the harness runs, not speed.",),
        ),
        BenchPreset(
            name="gpu-smoke",
            description=(
                "Quick GPU check of every variant (d 1024, ffn 4096, 2 MoE layers, 8K tokens, EP 8): "
                "all variants in about 150 s on an H100; communication is only ~23% of the step."
            ),
            model=_gpu_model(seq_len=1024, d_model=1024, d_ff=4096, n_layers=2),
            batch_size=8,
            virtual_size=8,
            device="cuda",
            warmup=3,
            steps=10,
            solver_time_limit_s=10.0,
        ),
        BenchPreset(
            name="gpu-e16",
            description=(
                "DESIGN.md's block: d 2048, ffn 8192, 16 experts over EP 8 (2 local), top-2, "
                "cf 1.25, 8K tokens per rank, 4 MoE layers, bf16. H100: communication 31% of "
                "compute+comm at 25 GB/s, 47% at 12.5 GB/s."
            ),
            model=_gpu_model(n_layers=4),
            batch_size=4,
            virtual_size=8,
            device="cuda",
            solver_time_limit_s=15.0,
        ),
        BenchPreset(
            name="gpu-e64",
            description=(
                "Many small experts: d 2048, ffn 8192, 64 experts over EP 16 (4 local), top-2, "
                "cf 1.25, 8K tokens per rank, 4 MoE layers, bf16."
            ),
            model=_gpu_model(n_layers=4, num_experts=64),
            batch_size=4,
            virtual_size=16,
            device="cuda",
            solver_time_limit_s=15.0,
        ),
    )
}


def get_bench_preset(name: str) -> BenchPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown benchmark preset {name!r}; use one of {', '.join(PRESETS)} "
            "(python -m benchmarks.run --list shows them)."
        ) from None
