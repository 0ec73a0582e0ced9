"""Profiled costs on disk, so that a second run plans from them without profiling again.

One JSON file per graph under ``<cache_dir>/step_costs/``, named by a key over everything the
numbers depend on: the graph (its structural hash: ops, wiring, shapes, dtypes), what runs it
(``codegen``), the device (GPU model, or CPU thread count), the process group (backend, size and,
where the group describes its link as plain data, that description: the emulated group's
bandwidth), the library versions (torch, triton) and the attribution's format. The file holds
every cost of the graph as the final plan used them, with their sources, so a cached run
reproduces the same numbers and hits the plan cache too (``schedule/planner.py`` keys plans by
their costs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from graphsched.analysis.provenance import CostSource

CACHE_SUBDIR = "step_costs"
#: Bump when the attribution changes what a number means: older files are then ignored.
FORMAT_VERSION = 1


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    return {"torch": torch.__version__, "triton": _version("triton"), "graphsched": _version("graphsched")}


def group_signature() -> dict[str, Any] | None:
    """What the default process group's costs depend on; None outside torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from graphsched.compat import default_group

    sig: dict[str, Any] = {"backend": str(dist.get_backend()), "world": dist.get_world_size()}
    options = getattr(default_group(), "options", None)
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        sig["options"] = {k: repr(v) for k, v in sorted(dataclasses.asdict(options).items())}
    return sig


def cost_key(graph_hash: str, codegen: str, device: str, extra: dict[str, Any] | None = None) -> str:
    """The cache key of a graph's profiled costs (``device``: ``profiler.device_label``)."""
    blob = json.dumps(
        {"format": FORMAT_VERSION, "graph": graph_hash, "codegen": codegen, "device": device,
         "group": group_signature(), "versions": library_versions(), "extra": extra or {}},
        sort_keys=True, separators=(",", ":"), default=str,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass
class CachedCosts:
    """A graph's costs as its profiled plan used them: node -> seconds, node -> source."""

    costs: dict[str, float]
    sources: dict[str, CostSource]
    #: how many profiled calls the measured numbers are medians of
    calls: int

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "costs": self.costs,
                "sources": {k: str(v) for k, v in self.sources.items()}, "calls": self.calls}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CachedCosts":
        return cls({str(k): float(v) for k, v in data["costs"].items()},
                   {str(k): CostSource(v) for k, v in data["sources"].items()}, int(data.get("calls", 0)))


@dataclass
class StepCostCache:
    directory: str

    def path(self, key: str) -> str:
        return os.path.join(self.directory, CACHE_SUBDIR, f"{key}.json")

    def load(self, key: str) -> CachedCosts | None:
        """The entry under ``key``; None when absent, unreadable or of another format."""
        try:
            with open(self.path(key)) as f:
                data = json.load(f)
            if data.get("version") != FORMAT_VERSION:
                return None
            return CachedCosts.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store(self, key: str, entry: CachedCosts) -> str:
        """Write ``entry`` atomically (another process may read meanwhile); returns the path."""
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".step_costs.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(entry.to_dict(), f, sort_keys=True)
        os.replace(tmp, path)
        return path
