"""Guard against running captured collectives under other process groups than they were captured.

The captured graphs name their process groups. If the user re-initialises torch.distributed with
another world size, or swaps a module's group, the graphs would talk to the wrong peers or hang. A
fingerprint of the groups a model holds is taken when it is wrapped and compared on every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
import torch.nn as nn

from graphsched.compat import process_group_names
from graphsched.errors import ProcessGroupMismatchError


@dataclass(frozen=True)
class GroupDescription:
    path: str
    name: str
    size: int
    rank: int
    alive: bool


def _describe(path: str, pg: "dist.ProcessGroup") -> GroupDescription:
    try:
        name = str(pg.group_name)
    except Exception:  # noqa: BLE001 - a destroyed group may refuse to answer
        name = "?"
    try:
        size, rank = pg.size(), pg.rank()
    except Exception:  # noqa: BLE001
        size, rank = -1, -1
    alive = dist.is_initialized() and pg in process_group_names()
    return GroupDescription(path, name, size, rank, alive)


@dataclass(frozen=True)
class GroupFingerprint:
    world_size: int | None
    groups: tuple[GroupDescription, ...]

    def describe(self) -> str:
        parts = [f"world size {self.world_size}"]
        parts += [f"{g.path}: group {g.name!r} of size {g.size}{'' if g.alive else ' (destroyed)'}" for g in self.groups]
        return "; ".join(parts)


def group_slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Where the model keeps process groups: (dotted path, module, attribute name)."""
    if not dist.is_available():
        return []
    slots = []
    for mod_name, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if isinstance(value, dist.ProcessGroup):
                slots.append((f"{mod_name}.{attr}" if mod_name else attr, mod, attr))
    return slots


def fingerprint(slots: list[tuple[str, nn.Module, str]]) -> GroupFingerprint:
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    groups = []
    for path, mod, attr in slots:
        value = getattr(mod, attr, None)
        if isinstance(value, dist.ProcessGroup):
            groups.append(_describe(path, value))
    return GroupFingerprint(world, tuple(groups))


def check_same_groups(captured: GroupFingerprint, now: GroupFingerprint) -> None:
    if captured == now:
        return
    raise ProcessGroupMismatchError(
        "graphsched: the wrapped model is called under other process groups than it was wrapped "
        f"with.\n  wrapped with: {captured.describe()}\n  called with:  {now.describe()}\n"
        "The captured graphs would exchange data with the wrong ranks. Fix: call graphsched.wrap "
        "again on a model built for the new process groups (or graphsched.unwrap it first)."
    )
