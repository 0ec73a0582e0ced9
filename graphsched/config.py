"""User-facing configuration of graphsched (a plain dataclass, validated on construction)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from graphsched.errors import ConfigError

#: Orders the scheduler knows. ``identity`` replays the captured order; ``reverse_independent`` is a
#: deliberately different valid order used to prove the runtime is order-agnostic; ``ilp`` solves for
#: the fastest order (needs the partition package).
SCHEDULES = ("identity", "reverse_independent", "ilp")
#: Where node costs come from: ``analytic`` (FLOPs and bytes against the device's peak rates),
#: ``measured`` (each node timed on the device, cached on disk; collectives from a microbenchmark
#: of the process group) or ``auto`` (measured on CUDA, analytic elsewhere).
COST_MODELS = ("auto", "analytic", "measured")
#: What runs a plan: ``aten`` (graphsched's executor, op by op, eager numerics), ``inductor``
#: (inductor-generated fused kernels emitted in the plan's order) or ``auto`` (inductor on CUDA
#: with triton, aten elsewhere).
CODEGENS = ("auto", "aten", "inductor")
#: ``profile_steps="auto"``: this many profiled steps on CUDA (docs/costs.md says why).
AUTO_PROFILE_STEPS = 3


def default_cache_dir() -> str:
    """Where measured costs and solved plans are cached when ``cache_dir`` is None."""
    return os.path.join(os.path.expanduser("~"), ".cache", "graphsched")


@dataclass
class GraphschedConfig:
    schedule: str = "identity"
    cost_model: str = "auto"
    #: Passed to torch.compile: True makes a graph break an error instead of several smaller graphs.
    fullgraph: bool = False
    #: On CUDA, run communication tasks on their own stream (events order the two streams).
    use_comm_stream: bool = True
    #: Time limit of the ILP solver, seconds.
    solver_time_limit_s: float = 20.0
    #: Largest number of micro-chunks a region may be cut into.
    max_chunks: int = 8
    #: Use this plan file as it is instead of planning.
    plan_file: str | None = None
    #: Where measured costs and solved plans are cached (None: ~/.cache/graphsched).
    cache_dir: str | None = None
    #: Check on every call that the process groups are those the graphs were captured with.
    check_process_groups: bool = True
    #: Free each intermediate tensor right after its last use, as the captured graph does.
    free_after_last_use: bool = True
    #: Micro-chunks per all-to-all region: 1 = off; an int k = every region cut into k chunks
    #: (Tutel-style; at most the region's cut extent); "auto" = per region, the k of
    #: {1, 2, 4, 8} (up to max_chunks) with the least predicted step time.
    chunks: int | str = 1
    #: Largest extra buffer memory (bytes) chunking may add to one region; None = no limit.
    memory_limit_bytes: int | None = None
    #: With chunks="auto": when chunking is predicted to pay, compile the unchunked graph too, time
    #: the first steps of each and keep the faster (a prediction alone can be wrong).
    measure_chunks: bool = True
    #: Seconds a rank waits for the others to agree (options, graphs, plans) after their last sign
    #: of life; a rank still working inside graphsched (profiling, solving) keeps the others waiting.
    agreement_timeout_s: float = 60.0
    #: What runs the plans: one of CODEGENS (see docs/inductor.md).
    codegen: str = "auto"
    #: With inductor code: refuse fusions that join work planned on two sides of a collective's
    #: issue or wait (a fused kernel runs where its latest part is planned, so such a fusion moves
    #: dW work out of its window or chunk 0 behind chunk 1); False: inductor fuses freely.
    fusion_within_segments: bool = True
    #: Split each call's batch (dim 0) into this many equal micro-batches run inside one captured
    #: step, so one micro-batch computes while another's all-to-all is on the wire. Gradient
    #: accumulation's semantics: routing and capacity per micro-batch, scalar outputs (losses)
    #: averaged, batch-first outputs joined (graphsched/microbatch.py). 1 = off; "auto" = compile
    #: k = 1 and k = 2, time the first training steps of each, keep the faster (rank 0 decides).
    micro_batches: int | str = 1
    #: Profile-guided planning: after each graph's first call, time this many calls of the
    #: compiled step, attribute every kernel and collective to its task, plan again from those
    #: costs (recompiling only if the plan changed) and cache them on disk for the next run.
    #: 0 = off (the default until the GPU measurement of docs/costs.md says it pays); "auto" =
    #: AUTO_PROFILE_STEPS on CUDA with schedule="ilp", off elsewhere (CPU keeps today's planning:
    #: fast tests, nothing to gain from host timings). See docs/costs.md.
    profile_steps: int | str = 0

    def __post_init__(self) -> None:
        _check_types(self)
        if self.codegen not in CODEGENS:
            raise ConfigError(f"codegen={self.codegen!r} is not known; use one of {', '.join(CODEGENS)}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"schedule={self.schedule!r} is not known; use one of {', '.join(SCHEDULES)}."
            )
        if self.cost_model not in COST_MODELS:
            raise ConfigError(
                f"cost_model={self.cost_model!r} is not known; use one of {', '.join(COST_MODELS)}."
            )
        if not (self.solver_time_limit_s > 0):
            raise ConfigError(
                f"solver_time_limit_s={self.solver_time_limit_s!r} must be > 0 seconds "
                "(e.g. 20.0)."
            )
        if not isinstance(self.max_chunks, int) or not (1 <= self.max_chunks <= 64):
            raise ConfigError(
                f"max_chunks={self.max_chunks!r} must be an integer in 1..64 (8 is a good limit)."
            )
        if self.chunks != "auto" and (
            not isinstance(self.chunks, int) or isinstance(self.chunks, bool) or not (1 <= self.chunks <= self.max_chunks)
        ):
            raise ConfigError(
                f"chunks={self.chunks!r} must be 1 (off), an integer in 2..max_chunks="
                f"{self.max_chunks} or \"auto\"; raise max_chunks for more chunks."
            )
        if self.plan_file is not None and self.schedule != "ilp":
            raise ConfigError(
                f"plan_file={os.fspath(self.plan_file)!r} is read by schedule=\"ilp\" only, and "
                f"schedule={self.schedule!r} would ignore it: pass schedule=\"ilp\" to run the saved "
                "plans, or drop plan_file."
            )
        if self.micro_batches != "auto" and self.micro_batches < 1:
            raise ConfigError(
                f"micro_batches={self.micro_batches!r} must be an integer >= 1 (1: off; 2 lets one "
                "micro-batch compute while the other's all-to-all runs) or \"auto\"."
            )
        if self.profile_steps != "auto" and not (0 <= self.profile_steps <= 100):
            raise ConfigError(
                f"profile_steps={self.profile_steps!r} must be 0 (off), an integer in 1..100 (steps "
                f"to profile before planning again; {AUTO_PROFILE_STEPS} is enough) or \"auto\"."
            )
        if self.plan_file is not None and self.profile_steps not in (0, "auto"):
            raise ConfigError(
                f"profile_steps={self.profile_steps!r} plans again from profiled costs, and "
                f"plan_file={os.fspath(self.plan_file)!r} runs saved plans as they are: pass one of "
                "them (profile_steps=0 with plan_file)."
            )
        if self.memory_limit_bytes is not None and (
            not isinstance(self.memory_limit_bytes, int) or isinstance(self.memory_limit_bytes, bool)
            or self.memory_limit_bytes < 0
        ):
            raise ConfigError(
                f"memory_limit_bytes={self.memory_limit_bytes!r} must be None (no limit) or an "
                "integer >= 0 (bytes of extra buffers chunking may add per region, e.g. 2**30)."
            )

    @classmethod
    def from_options(cls, **options: Any) -> "GraphschedConfig":
        """Build a config from keyword options, naming any unknown option and the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown graphsched option(s) {unknown}; known options are {sorted(known)}."
            )
        return cls(**options)

    def replace(self, **changes: Any) -> "GraphschedConfig":
        return dataclasses.replace(self, **changes)

    def profiled_steps(self, device_type: str) -> int:
        """The steps profile-guided planning profiles on a device of ``device_type`` (0: off)."""
        if self.profile_steps != "auto":
            return int(self.profile_steps)
        wanted = device_type == "cuda" and self.schedule == "ilp" and self.plan_file is None
        return AUTO_PROFILE_STEPS if wanted else 0


_NUMBER = "a number"
_PATH = "a path (str) or None"
#: What each option must be (checked before its range), as a predicate and a description.
_TYPES: dict[str, tuple[Any, str]] = {
    "schedule": (lambda v: isinstance(v, str), f"one of the strings {', '.join(SCHEDULES)}"),
    "cost_model": (lambda v: isinstance(v, str), f"one of the strings {', '.join(COST_MODELS)}"),
    "fullgraph": (lambda v: isinstance(v, bool), "True or False"),
    "use_comm_stream": (lambda v: isinstance(v, bool), "True or False"),
    "solver_time_limit_s": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), _NUMBER),
    "max_chunks": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "plan_file": (lambda v: v is None or isinstance(v, (str, os.PathLike)), _PATH),
    "cache_dir": (lambda v: v is None or isinstance(v, (str, os.PathLike)), _PATH),
    "check_process_groups": (lambda v: isinstance(v, bool), "True or False"),
    "free_after_last_use": (lambda v: isinstance(v, bool), "True or False"),
    "chunks": (lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool)), 'an integer or "auto"'),
    "memory_limit_bytes": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or None"),
    "agreement_timeout_s": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                            "a number of seconds > 0"),
    "measure_chunks": (lambda v: isinstance(v, bool), "True or False"),
    "codegen": (lambda v: isinstance(v, str), f"one of the strings {', '.join(CODEGENS)}"),
    "fusion_within_segments": (lambda v: isinstance(v, bool), "True or False"),
    "micro_batches": (lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool)),
                      'an integer or "auto"'),
    "profile_steps": (lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool)),
                      'an integer or "auto"'),
}


def _check_types(config: GraphschedConfig) -> None:
    for name, (ok, expected) in _TYPES.items():
        value = getattr(config, name, None)
        if hasattr(config, name) and not ok(value):
            raise ConfigError(
                f"{name}={value!r} ({type(value).__name__}) is not valid: {name} must be {expected}."
            )
