"""What a variant's name says: its family, its model, the compute-only variant and the loss
reference it is compared with, and its micro-batches (``-mbN``)."""

from __future__ import annotations


def family_of(name: str) -> str:
    if "graphsched" in name:
        return "graphsched"
    if "inductor" in name:
        return "inductor"
    if "deepspeed" in name:
        return "deepspeed"
    if name == "comm-only":
        return "comm"
    return "eager"


def model_of(name: str) -> str:
    """Which model a variant runs: "deepspeed" (DeepSpeed's MoE layers) or "reference"."""
    return "deepspeed" if "deepspeed" in name else "reference"


def compute_only_of(name: str) -> str:
    """The compute-only variant a variant is compared with: the same model and kernels, no wire."""
    if name.startswith("compute-only"):
        return name
    if model_of(name) == "deepspeed":
        return "compute-only-deepspeed"
    if "inductor" in name:
        k = micro_batches_of(name)
        return f"compute-only-inductor-mb{k}" if k > 1 else "compute-only-inductor"
    return "compute-only"


def loss_reference_of(name: str) -> str | None:
    """The variant whose losses ``name``'s must match: eager for the reference model, plain
    DeepSpeed for DeepSpeed's model (other weights); None for the oracles themselves."""
    if name in ("eager", "deepspeed", "comm-only") or name.startswith("eager-mb"):
        return None
    if model_of(name) == "deepspeed":
        return "deepspeed"
    # Micro-batches route per micro-batch (gradient accumulation's semantics): eager run alike.
    k = micro_batches_of(name)
    return f"eager-mb{k}" if k > 1 else "eager"


def micro_batches_of(name: str) -> int:
    """The micro-batches a variant splits each step into: ``-mbN`` in its name, else 1."""
    head, sep, tail = name.rpartition("-mb")
    return int(tail) if sep and tail.isdigit() else 1
