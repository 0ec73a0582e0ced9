"""Micro-chunking: cut the work around each all-to-all into k chunks so that chunk i's all-to-all
overlaps chunk i+1's compute; k chosen per region.

``make_graph_transform(config)`` returns the hook ``GraphschedBackend`` applies to the Dynamo graph
before AOTAutograd (so the backward is chunked too, consistently, by differentiation):

1. find the regions (``regions.find_regions``);
2. choose k per region: ``chunks=k`` takes k (at most the region's cut extent; ordered by the
   list schedule); ``chunks="auto"`` predicts the step time of the region for every k in
   {1, 2, 4, 8} up to ``max_chunks`` and keeps the fastest: each k's pipeline (per-chunk stage
   costs at the chunked shapes, plus the cost of splitting and joining) is a two-resource
   ``ScheduleProblem`` solved by ``schedule.solve``, so the ILP picks the order for each k and
   the k by comparing makespans. A k whose extra buffers exceed ``memory_limit_bytes`` is
   rejected. Identical regions (every layer of a model) are solved once;
3. rank 0's choices are broadcast (collectives must be issued identically everywhere);
4. cut each region (``rewrite.rewrite_region``), emitting its copies in the solved order, so even
   ``schedule="identity"`` runs the pipeline.

Costs: compute nodes are run on meta tensors of the chunk shapes under a dispatch mode that
prices every aten kernel at ``launch + max(flops / peak, bytes / bandwidth)`` (the analytic model
of ``analysis.costmodel``), so a small chunk pays its launch and re-reads its weights; with
``cost_model="measured"`` they are timed on the device instead. All-to-alls come from the
communication model (alpha + beta * bytes). The backward of a stage is priced at
``backward_factor`` (2) times its forward compute and the same communication.

The decisions per region (JSON-able) come back to the caller with the rewritten graph
(``ChunkingTransform.rewrite`` returns a :class:`Chunked`); ``capture.py`` puts them into every
plan's options. The stage model and the choice of k are in ``pipeline_model.py``, the costs in
``costers.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx as fx

from graphsched.analysis.costmodel import device_of
from graphsched.config import GraphschedConfig
from graphsched.errors import ConfigError, GraphschedError, GraphschedFallbackWarning
from graphsched.partition.costers import RegionCoster, default_coster
from graphsched.partition.pipeline_model import (
    AUTO_CANDIDATES,
    SOLVE_LIMIT_S,
    ChunkChoice,
    choose_chunks,
    fixed_chunks,
    region_pipeline,
    region_stages,
)
from graphsched.partition.regions import Region, find_regions
from graphsched.partition.rewrite import CHUNK_TAG, chunk_sizes, rewrite_region
from graphsched.partition.split_rules import SplitRules, default_rules
from graphsched.partition.waits import inline_wait_functions, unwaited_collectives

log = logging.getLogger(__name__)

#: Region id -> what was decided for it: k, sizes, predicted seconds per k, rejected k's, errors.
Decisions = dict[str, dict[str, Any]]


class Chunked(NamedTuple):
    """A rewritten graph and the decisions per region that made it (``{}``: no region)."""

    gm: fx.GraphModule
    decisions: Decisions


# -- the transform ---------------------------------------------------------------------------


def _agree(decisions: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's decisions on every rank (the chunked graphs must issue identical collectives).

    Shared through the process group's store, not a collective: this runs while compiling, when
    collectives of the eager part of the step may still be queued on the group.
    """
    from graphsched.agreement import share_from_rank0

    return share_from_rank0(decisions, "chunks")


@dataclass
class ChunkingTransform:
    """The graph transform; ``records`` lists what it decided for each graph it was handed."""

    config: GraphschedConfig
    rules: SplitRules = field(default_factory=default_rules)
    #: Builds the cost source for a device (default: analytic or measured per ``config``).
    coster_factory: Callable[[torch.device], RegionCoster] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    #: The measured CommModel made by ``wrap`` (None: analytic costs).
    comm: Any = None
    #: One cost source per device, kept across graphs.
    _costers: dict[str, RegionCoster] = field(default_factory=dict, repr=False)

    def _coster(self, device: torch.device) -> RegionCoster:
        if str(device) not in self._costers:
            factory = self.coster_factory or (lambda d: default_coster(self.config, d, self.comm))
            self._costers[str(device)] = factory(device)
        return self._costers[str(device)]

    def _decide(self, region: Region, coster: RegionCoster, seen: dict[str, ChunkChoice]) -> dict[str, Any]:
        chunks = self.config.chunks
        if chunks == "auto":
            candidates = [k for k in AUTO_CANDIDATES if k <= self.config.max_chunks]
        else:
            assert isinstance(chunks, int)
            candidates = [min(chunks, region.extent)]
        limit = min(SOLVE_LIMIT_S, self.config.solver_time_limit_s)
        pipeline, _ = region_pipeline(region, self.rules, coster)
        # Identical layers give identical pipelines: solve each distinct one once.
        tried = sorted({1, *candidates} & set(range(1, region.extent + 1)))
        signature = json.dumps(
            [[(st.name, st.resource, st.deps) for st in pipeline.stages], pipeline.extent, chunks,
             self.config.memory_limit_bytes,
             [dataclasses.asdict(pipeline.costs(chunk_sizes(pipeline.extent, k))) for k in tried]],
            sort_keys=True,
        )
        choice = seen.get(signature)
        if choice is None:
            if chunks == "auto":
                choice = choose_chunks(pipeline, candidates, self.config.memory_limit_bytes, limit)
            else:
                choice = fixed_chunks(pipeline, candidates[0], self.config.memory_limit_bytes, limit)
            seen[signature] = choice
        record: dict[str, Any] = region.describe(self.rules)
        record.update(
            mode="auto" if chunks == "auto" else "fixed",
            k=choice.k,
            sizes=choice.sizes,
            predicted_s={str(k): v for k, v in sorted(choice.predicted.items())},
            rejected={str(k): v for k, v in sorted(choice.rejected.items())},
            order=choice.order,
            forward_s=choice.forward_s,
            backward_s=choice.backward_s,
        )
        return record

    def rewrite(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Chunked:
        """Cut the regions of ``gm`` (in place) and say what was decided for each.

        Never fails for want of a rule or an estimate: a failed choice leaves the regions whole,
        a failed rewrite restores the unchunked graph (warning once); both record ``k = 1`` and
        the error.
        """
        # torch <= 2.12 records the all-to-all's wait as an autograd function: make it a plain
        # wait first, so that every region holds its collectives' waits (see waits.py).
        inline_wait_functions(gm)
        regions = find_regions(gm, self.rules)
        decisions: dict[str, Any] = {}
        if regions:
            try:
                coster = self._coster(device_of(example_inputs))
                seen: dict[str, ChunkChoice] = {}
                for region in regions:
                    decisions[region.id] = self._decide(region, coster, seen)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed estimate means "do not chunk"
                log.warning("chunking: choosing chunk counts failed (%s); regions stay whole", exc)
                decisions = {r.id: {**r.describe(self.rules), "k": 1, "error": repr(exc)} for r in regions}
            decisions = _agree(decisions)
        original = gm.graph
        try:
            self._rewrite(gm, regions, decisions)
        except Exception as exc:  # noqa: BLE001 - the unchunked graph is always correct
            gm.graph = original
            gm.recompile()
            for d in decisions.values():
                d["k"] = 1
                d["error"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"graphsched: chunking failed ({type(exc).__name__}: {exc}); the regions run "
                "unchunked (same results, less overlap). Please report the model; chunks=1 "
                "silences this.",
                GraphschedFallbackWarning,
                stacklevel=2,
            )
        recorded = {rid: {k: v for k, v in d.items() if k != "order"} for rid, d in decisions.items()}
        self.records.append(recorded)
        for rid, d in decisions.items():
            log.info("chunking %s (%s): k=%s %s", rid, d.get("module"), d.get("k"), d.get("predicted_s", {}))
        return Chunked(gm, recorded)

    def _rewrite(self, gm: fx.GraphModule, regions: list[Region], decisions: dict[str, Any]) -> None:
        pending = list(regions)
        while pending:
            region = pending.pop(0)
            d = decisions.get(region.id, {})
            k = int(d.get("k", 1))
            if k <= 1:
                continue
            _, stage_of = region_stages(region, self.rules)
            position = {tid: i for i, tid in enumerate(d.get("order", []))}
            index = {n: i for i, n in enumerate(region.nodes)}

            def key(n: fx.Node, i: int, stage_of=stage_of, position=position, index=index) -> tuple:
                return (position.get(f"{stage_of[n]}@c{i}", len(position)), index[n], i)

            env = rewrite_region(gm, region, d["sizes"], self.rules, key)
            pending = [r.remapped(env) for r in pending]
        # Never a wrong answer: a chunk's collective read before its wait would read a buffer
        # still in transfer (found on CUDA, where NCCL writes on its own stream).
        unwaited = unwaited_collectives(
            gm.graph,
            lambda n: bool(getattr(self.rules.lookup(n), "collective", False)),
            lambda n: getattr(self.rules.lookup(n), "wait", False),
            only=lambda n: CHUNK_TAG in (n.meta.get("custom") or {}),
        )
        if unwaited:
            raise GraphschedError(
                f"chunked collectives {[n.name for n in unwaited]} are read before their wait"
            )


def make_graph_transform(config: GraphschedConfig, comm: Any = None) -> ChunkingTransform | None:
    """The chunking transform; None when ``config.chunks == 1`` (nothing to do). Callers run its
    ``rewrite``, which returns the rewritten graph with the decisions (``wrap`` hands it to
    ``GraphschedBackend``). ``comm``: the measured CommModel, if any."""
    if config.chunks == 1:
        return None
    return ChunkingTransform(config, comm=comm)
