"""Measured cost of graph nodes: run each op once per distinct signature and cache the time on disk.

A node's inputs are rebuilt from the fake tensors in its arguments' ``meta["val"]`` (same shapes,
strides and dtypes; random floats, zeros for integer and bool tensors so index ops stay in range),
then ``node.target(*args, **kwargs)`` runs after warm-up and the median of the repeats is kept.
Results are keyed by the op, its argument signature and the device, and stored in
``<cache_dir>/node_costs.json``: a second run (or a second process) measures only what is new.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import warnings
from contextlib import ExitStack
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from graphsched.analysis.device_timer import time_once
from graphsched.analysis.costmodel import _concrete_int, _is_op_overload, is_compute_node
from graphsched.config import default_cache_dir
from graphsched.errors import ConfigError, GraphschedError

CACHE_FILE = "node_costs.json"
CACHE_FORMAT_VERSION = 1
#: Above this many nodes to measure, a progress bar is shown (on a terminal).
PROGRESS_MIN_NODES = 8


def device_label(device: torch.device) -> str:
    """What makes timings on ``device`` comparable: the GPU model, or the CPU thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-{torch.get_num_threads()}threads"


def is_profilable(node: fx.Node) -> bool:
    """A compute node with an ATen op and a value to produce (views, collectives, asserts: no)."""
    return (
        is_compute_node(node)
        and _is_op_overload(node.target)
        and node.meta.get("val") is not None
    )


def _signature(x: Any, device: torch.device) -> Any:
    """A JSON-able description of an argument, precise enough that equal ones time the same."""
    if isinstance(x, fx.Node):
        x = x.meta.get("val")
    if isinstance(x, torch.Tensor):
        return {
            "shape": [_concrete_int(s) for s in x.shape],
            "stride": [_concrete_int(s) for s in x.stride()],
            "offset": _concrete_int(x.storage_offset()),
            "dtype": str(x.dtype),
        }
    if isinstance(x, torch.SymInt):
        return _concrete_int(x)
    if isinstance(x, (list, tuple)):
        return [_signature(a, device) for a in x]
    if isinstance(x, dict):
        return {str(k): _signature(v, device) for k, v in sorted(x.items())}
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    if isinstance(x, torch.device):
        return str(device)
    return repr(x)


def _materialise(x: Any, device: torch.device, gen: torch.Generator) -> Any:
    """A real tensor (or value) standing for an argument of the node."""
    if isinstance(x, fx.Node):
        val = x.meta.get("val")
        if val is None:
            raise GraphschedError(
                f"input {x.name} has no meta['val']; capture the graph with AOTAutograd (which "
                "records fake values) before profiling it."
            )
        return _materialise(val, device, gen)
    if isinstance(x, torch.Tensor):
        size = [_concrete_int(s) for s in x.shape]
        stride = [_concrete_int(s) for s in x.stride()]
        offset = _concrete_int(x.storage_offset())
        # Enough storage for the strided view, so overlapping/broadcast layouts are reproduced.
        extent = 0 if 0 in size else 1 + sum((s - 1) * st for s, st in zip(size, stride))
        n = offset + extent
        if x.dtype.is_floating_point or x.dtype.is_complex:
            # randn has no 8-bit float kernels: draw in float32 and convert.
            base_dtype = x.dtype if x.dtype.itemsize >= 2 else torch.float32
            storage = torch.randn(n, dtype=base_dtype, device=device, generator=gen).to(x.dtype)
        else:
            storage = torch.zeros(n, dtype=x.dtype, device=device)
        return torch.as_strided(storage, size, stride, offset)
    if isinstance(x, torch.SymInt):
        return _concrete_int(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_materialise(a, device, gen) for a in x)
    if isinstance(x, dict):
        return {k: _materialise(v, device, gen) for k, v in x.items()}
    if isinstance(x, torch.device):
        # Factory ops recorded on the capture device run on the device being measured.
        return device
    return x


class NodeProfiler:
    """Measure nodes of aten graphs on ``device``; cache results in ``cache_dir``.

    Subclasses may override :meth:`time_callable` (e.g. to count or to fake measurements).
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        repeats: int = 5,
        warmup: int = 2,
        show_progress: bool | None = None,
        seed: int = 0,
    ) -> None:
        if repeats < 1 or warmup < 0:
            raise ConfigError(
                f"NodeProfiler needs repeats >= 1 and warmup >= 0 (got {repeats}, {warmup})."
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
        self.repeats = repeats
        self.warmup = warmup
        #: None: show a bar when stderr is a terminal.
        self.show_progress = show_progress
        self.seed = seed
        self.device_name = device_label(self.device)
        self._cache: dict[str, float] = self._read_cache()

    # -- cache ---------------------------------------------------------------------------------

    @property
    def cache_path(self) -> str:
        return os.path.join(self.cache_dir, CACHE_FILE)

    def _read_cache(self) -> dict[str, float]:
        try:
            with open(self.cache_path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            warnings.warn(
                f"ignoring unreadable node-cost cache {self.cache_path} ({exc}); delete it to "
                "silence this warning.",
                stacklevel=3,
            )
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_FORMAT_VERSION:
            return {}
        return {str(k): float(v) for k, v in data.get("entries", {}).items()}

    def _write_cache(self) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        # Merge with what another process may have written meanwhile; replace atomically.
        merged = self._read_cache()
        merged.update(self._cache)
        self._cache = merged
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".node_costs.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(
                {"version": CACHE_FORMAT_VERSION, "entries": merged}, f, indent=0, sort_keys=True
            )
        os.replace(tmp, self.cache_path)

    def key(self, node: fx.Node) -> str:
        """The cache key: op, argument signature (shapes, strides, dtypes, constants), device."""
        return json.dumps(
            [
                str(node.target),
                _signature(tuple(node.args), self.device),
                _signature(dict(node.kwargs), self.device),
                self.device_name,
            ],
            sort_keys=True,
            separators=(",", ":"),
        )

    def cached(self, node: fx.Node) -> float | None:
        return self._cache.get(self.key(node)) if is_profilable(node) else 0.0

    # -- measuring -----------------------------------------------------------------------------

    def time_callable(self, fn: Callable[[], Any]) -> float:
        """Median seconds of ``fn()`` after warm-up (CUDA events on GPU, perf_counter on CPU)."""
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return statistics.median(time_once(fn, self.device) for _ in range(self.repeats))

    def _run(self, node: fx.Node) -> float:
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        cuda = self.device.type == "cuda"
        try:
            args = _materialise(tuple(node.args), self.device, gen)
            kwargs = _materialise(dict(node.kwargs), self.device, gen)
            target = node.target
            with ExitStack() as stack:
                # Random ops (dropout) must not advance the training run's generators.
                devices = [self.device.index] if cuda else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                stack.enter_context(torch.no_grad())
                if cuda:
                    stack.enter_context(torch.cuda.device(self.device))
                return self.time_callable(lambda: target(*args, **kwargs))
        except GraphschedError:
            raise
        except Exception as exc:
            raise GraphschedError(
                f"could not run node {node.name} ({node.target}) on {self.device}: "
                f"{type(exc).__name__}: {exc}. Leave it unmeasured: CostModel then uses its "
                "analytic cost."
            ) from exc

    def measure(self, node: fx.Node) -> float:
        """Seconds ``node`` takes on the device (0 for views, collectives, waits, in/outputs)."""
        if not is_profilable(node):
            return 0.0
        key = self.key(node)
        if key not in self._cache:
            self._cache[key] = self._run(node)
            self._write_cache()
        return self._cache[key]

    def measure_nodes(
        self, nodes: Iterable[fx.Node] | fx.Graph | fx.GraphModule
    ) -> dict[str, float]:
        """``{node name: seconds}`` for every profilable node; nodes that fail to run are left out
        (with a warning) so the analytic model covers them."""
        if isinstance(nodes, fx.GraphModule):
            nodes = nodes.graph
        if isinstance(nodes, fx.Graph):
            nodes = nodes.nodes
        todo = [n for n in nodes if is_profilable(n)]
        keys = {n.name: self.key(n) for n in todo}
        missing: dict[str, fx.Node] = {}
        for n in todo:
            if keys[n.name] not in self._cache:
                missing.setdefault(keys[n.name], n)
        show = self.show_progress
        if show is None:
            show = len(missing) > PROGRESS_MIN_NODES and sys.stderr.isatty()
        failed: dict[str, str] = {}
        try:
            for key, node in tqdm(
                missing.items(), desc="profiling nodes", unit="op", disable=not show
            ):
                try:
                    self._cache[key] = self._run(node)
                except GraphschedError as exc:
                    failed[key] = str(exc)
        finally:
            if any(k in self._cache for k in missing):
                self._write_cache()
        for key, msg in failed.items():
            warnings.warn(msg, stacklevel=2)
        return {n.name: self._cache[keys[n.name]] for n in todo if keys[n.name] in self._cache}
