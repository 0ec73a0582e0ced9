"""Which code runs a graph (``codegen``), and the settings graphsched compiles under with inductor.

``resolve_codegen`` turns the option into ``"aten"`` or ``"inductor"``; ``partition_fn_for`` and
``inductor_aot_options`` are the AOTAutograd arguments for graphs that code will run;
``inductor_settings`` is the inductor config of every graphsched compile (order pass or oracle).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from graphsched.config import CODEGENS


def inductor_available(device: torch.device) -> bool:
    """True where ``codegen="auto"`` picks inductor: a CUDA device with triton installed."""
    if device.type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - very old torch
        return False
    return bool(has_triton())


def resolve_codegen(codegen: str, device: torch.device) -> str:
    """``"aten"`` or ``"inductor"`` for the option value ``codegen`` on ``device``."""
    if codegen not in CODEGENS:
        raise ValueError(f"codegen={codegen!r} is not one of {CODEGENS}")
    if codegen == "auto":
        return "inductor" if inductor_available(device) else "aten"
    return codegen


def inductor_deterministic() -> bool:
    """Inductor's ``config.deterministic``: when on, inductor skips every reordering pass."""
    from graphsched.compat import inductor_config as ic

    return bool(getattr(ic, "deterministic", False))


def inductor_aot_options(codegen: str) -> dict[str, Any]:
    """Extra ``aot_autograd`` arguments for graphs that inductor will compile: its decompositions."""
    if codegen != "inductor":
        return {}
    from graphsched.compat import select_decomp_table

    return {"decompositions": select_decomp_table()}


def partition_fn_for(codegen: str) -> Callable[..., Any]:
    """AOTAutograd's partitioner for graphs that ``codegen`` runs.

    The aten executor: ``default_partition`` (the backward runs the ops eager autograd runs,
    nothing recomputed: eager's numerics). Inductor: the partitioner ``torch.compile`` uses
    (inductor's joint-graph passes, then min-cut rematerialisation), so graphsched's kernels are
    torch.compile's kernels; with ``default_partition`` inductor's step computed 1 ms more on
    gpu-smoke (an H200: 211 kernels against 188, the loss backward unfused).
    """
    if codegen == "inductor":
        from graphsched.compat import inductor_partition_fn

        return inductor_partition_fn
    from graphsched.compat import default_partition

    return default_partition


def inductor_settings(
    order_pass: Callable[[list[Any]], list[Any]] | None, kernel_profile: bool = False
) -> dict[str, Any]:
    """The inductor config graphsched compiles under; ``order_pass=None`` keeps inductor's order.

    The same settings, with and without the pass, are the oracle: the two compiles differ only in
    the order of whole kernels. ``reorder_for_compute_comm_overlap`` must be on for the pass list
    to run (it also changes two lowerings, so the oracle sets it too); the list holds graphsched's
    pass alone, so inductor's own ``sink_waits`` / ``raise_comms`` never run. The FX-graph cache is
    off: the pass is a per-graph object the cache cannot key on (see docs/inductor.md).
    ``kernel_profile``: C++ kernels open a profiler range named after themselves, so that a CPU
    step can be attributed kernel by kernel (profile-guided planning; numerics unchanged).
    """
    from graphsched.compat import inductor_config as ic

    settings: dict[str, Any] = {
        "reorder_for_compute_comm_overlap": True,
        "reorder_for_compute_comm_overlap_passes": [order_pass] if order_pass is not None else [],
        "fx_graph_cache": False,
        "fx_graph_remote_cache": False,
    }
    settings = {k: v for k, v in settings.items() if hasattr(ic, k)}
    if kernel_profile and hasattr(getattr(ic, "cpp", None), "enable_kernel_profile"):
        settings["cpp.enable_kernel_profile"] = True
    # Inductor's FX-level overlap schedulers would reorder the graph before ours sees it (and
    # from torch 2.14 enable_simple_overlap runs after user passes): off where they exist.
    dist_opts = getattr(ic, "aten_distributed_optimizations", None)
    for name in ("enable_overlap_scheduling", "enable_simple_overlap"):
        if dist_opts is not None and hasattr(dist_opts, name):
            settings[f"aten_distributed_optimizations.{name}"] = False
    return settings
