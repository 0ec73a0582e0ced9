"""graphsched's own costing of the emulated link, against the harness' fit of the same link.

``python -m benchmarks.commcheck --bandwidth 12.5 --out X.json`` (one GPU, a fresh process) sets
up the emulated group as ``benchmarks.run`` does and measures:

* the harness' ``all_to_all_fit`` (``linkcheck.fit_emulated_link``: 1..64 MiB, device buffers);
* graphsched's sweep, exactly as ``wrap`` makes it (``measure_comm_model("measured", device)``):
  its all-to-all fit and its contention factor;
* the collectives of one step of a preset's model wrapped by graphsched (measured costs, the
  aten executor, identity plans so no solver runs): each collective node's planned cost, timed by
  graphsched at the graph's own size through the model's group.

It prints, per size, graphsched's number, the harness fit's and their ratio, and the contention
factor beside the harness' overlap check; the JSON record holds the same. On a CPU (``--device
cpu``) the emulated link takes no time and graphsched uses its analytic model: that run only
shows that the check works.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Sequence

import torch
import torch.distributed as dist

from benchmarks.linkcheck import FIT_SIZES, LinkFit, fit_emulated_link, overlap_check
from benchmarks.presets import BenchPreset, get_bench_preset
from benchmarks.run import apply_overrides
from graphsched.analysis.commmodel import DEFAULT_SIZES, CommModel
from graphsched.analysis.costmodel import collective_bytes, collective_kind, is_collective_node
from graphsched.testing.emulated.backend import init_emulated_process_group


def _row(nbytes: int, graphsched_s: float, harness: LinkFit, source: str) -> dict[str, Any]:
    theirs = harness.all_to_all.time(nbytes)
    return {
        "bytes": nbytes,
        "source": source,
        "graphsched_ms": graphsched_s * 1e3,
        "harness_fit_ms": theirs * 1e3,
        "ratio": graphsched_s / theirs if theirs > 0 else None,
    }


def sweep_rows(comm: CommModel, harness: LinkFit) -> list[dict[str, Any]]:
    """graphsched's all-to-all fit against the harness fit at both sweeps' sizes."""
    sizes = sorted(set(DEFAULT_SIZES) | set(FIT_SIZES))
    return [_row(n, comm.time("all_to_all", n), harness, "graphsched fit") for n in sizes]


def graph_rows(model: torch.nn.Module, harness: LinkFit) -> list[dict[str, Any]]:
    """Each captured graph's all-to-all nodes: graphsched's planned cost against the harness fit."""
    from graphsched.api import state_of

    rows = []
    for g in state_of(model).capture.graphs:
        if g.analysis is None:
            continue
        for node in g.gm.graph.nodes:
            if is_collective_node(node) and collective_kind(node) == "all_to_all":
                row = _row(collective_bytes(node), g.analysis.node(node.name).cost, harness,
                           f"{g.name}:{node.name}")
                rows.append(row)
    return rows


def run_graph_step(preset: BenchPreset, world: Any, device: torch.device, cache_dir: str | None) -> Any:
    """One forward and backward of the preset's model, wrapped with graphsched's measured costs."""
    import graphsched
    from graphsched.models import MoEGPT, make_batch

    torch.manual_seed(0)
    model = MoEGPT(preset.model, process_group=world).to(device)
    graphsched.wrap(model, schedule="identity", codegen="aten", cost_model="measured", cache_dir=cache_dir)
    idx, targets = make_batch(preset.model, preset.batch_size, 0, device)
    model(idx, targets).backward()
    return model


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    print(f"  {'bytes':>10}  {'graphsched ms':>13}  {'harness fit ms':>14}  {'ratio':>6}  source")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        print(f"  {r['bytes']:>10}  {r['graphsched_ms']:>13.4f}  {r['harness_fit_ms']:>14.4f}  "
              f"{ratio:>6}  {r['source']}")


def check(
    bandwidth_gbps: float, device: torch.device, preset: BenchPreset | None,
    virtual_size: int | None = None, fit_sizes: Sequence[int] = FIT_SIZES,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """The record: both fits, the step's collectives (with ``preset``), contention on CUDA.
    ``virtual_size``: the emulated group's size (default: the preset's, else 8)."""
    from graphsched.analysis.contention import measure_contention
    from graphsched.analysis.cost_source import measure_comm_model

    if virtual_size is None:
        virtual_size = preset.virtual_size if preset is not None else 8
    world = init_emulated_process_group(virtual_size, bandwidth_gbps, device=device)
    try:
        harness = fit_emulated_link(world, device, sizes=tuple(fit_sizes))
        comm = measure_comm_model("measured", device)
        assert comm is not None
        record: dict[str, Any] = {
            "bandwidth_gbps": bandwidth_gbps,
            "virtual_size": virtual_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "harness_all_to_all_fit": harness.to_dict(),
            "graphsched_comm_model": comm.to_dict(),
            "sweep": sweep_rows(comm, harness),
            # The harness' own medians against graphsched's fit at the same sizes.
            "harness_points": [
                {**_row(n, comm.time("all_to_all", n), harness, "graphsched fit"),
                 "harness_measured_ms": t * 1e3}
                for n, t in zip(harness.sizes, harness.times_s)
            ],
        }
        if device.type == "cuda":
            record["graphsched_contention"] = measure_contention(world, device).to_dict()
            record["harness_overlap_check"] = overlap_check(world, device)
        if preset is not None:
            try:
                model = run_graph_step(preset, world, device, cache_dir)
                record["graph"] = {"preset": preset.name, "rows": graph_rows(model, harness)}
            except Exception as exc:  # noqa: BLE001 - the sweep part of the record still counts
                record["graph"] = {"preset": preset.name, "error": f"{type(exc).__name__}: {exc}"}
        return record
    finally:
        dist.destroy_process_group()


def report(record: dict[str, Any]) -> None:
    wire = (record["harness_all_to_all_fit"]["all_to_all_input_gbps"] or math.nan)
    n = record["virtual_size"]
    print(f"emulated EP {n} at {record['bandwidth_gbps']:g} GB/s on {record['device']}: harness fit "
          f"{wire * (n - 1) / n:.2f} GB/s on the wire, alpha "
          f"{record['harness_all_to_all_fit']['all_to_all_alpha_us']:.1f} us")
    _print_rows("all-to-all, graphsched's sweep fit vs the harness fit:", record["sweep"])
    graph = record.get("graph")
    if graph and "rows" in graph:
        _print_rows(f"all-to-alls of one {graph['preset']} step, timed by graphsched at their "
                    "sizes:", graph["rows"])
    elif graph:
        print(f"graph step failed: {graph['error']}")
    print(f"graphsched contention factor: {record['graphsched_comm_model']['contention']:.3f}")
    if "graphsched_contention" in record:
        c = record["graphsched_contention"]
        o = record["harness_overlap_check"]
        print(f"  its check: {c['matmuls']} matmuls {c['compute_s'] * 1e3:.3f} ms alone, "
              f"{c['compute_beside_comm_s'] * 1e3:.3f} ms beside {c['collectives']} all-to-alls "
              f"(factor {c['factor']:.3f}); harness overlap check: both {o['both_ms']:.2f} ms = "
              f"{o['slowdown_over_max']:.3f} x the larger of {o['compute_ms']:.2f} / {o['comm_ms']:.2f} ms")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.commcheck", description=__doc__.splitlines()[0])
    p.add_argument("--bandwidth", type=float, default=12.5, help="emulated link GB/s (default 12.5)")
    p.add_argument("--virtual-size", type=int, default=None,
                   help="emulated group size (default: the preset's; 8 with --no-graph)")
    p.add_argument("--preset", default="gpu-smoke", help="model whose step's collectives are checked")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset override")
    p.add_argument("--no-graph", action="store_true", help="skip the model step (sweeps only)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default=None, help="write the JSON record here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run on a GPU machine (or --device cpu to try it)")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    preset = None if args.no_graph else apply_overrides(get_bench_preset(args.preset), args.set)
    record = check(args.bandwidth, device, preset, args.virtual_size)
    record["command"] = "python -m benchmarks.commcheck " + " ".join(sys.argv[1:] if argv is None else argv)
    report(record)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
