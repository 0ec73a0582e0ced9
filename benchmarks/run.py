"""Run one benchmark preset: every variant in one process, one table, one JSON record.

    python -m benchmarks.run --preset tiny-cpu
    python -m benchmarks.run --preset gpu-e16 --bandwidth 12.5 --steps 20

The process initialises torch.distributed as rank 0 of an emulated expert-parallel group
(graphsched.testing.emulated): every number is an emulation of one rank of that group on this one
device, and the record says so (``"emulated": true``). See docs/benchmarks.md for the method.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from benchmarks.presets import (
    ALL_VARIANTS,
    PRESETS,
    QUICK_STEPS,
    QUICK_VARIANTS,
    BenchPreset,
    get_bench_preset,
)
from benchmarks.report import build_record, check_losses, derived, format_table, write_record
from benchmarks.context import BenchContext, VariantResult
from benchmarks.variants import run_variant
from graphsched.errors import ConfigError
from graphsched.models import make_batch
from graphsched.testing.emulated.backend import init_emulated_process_group, new_emulated_group

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # GPU records kept: --out
#: Default home of the JSON records: outside the source tree.
DEFAULT_OUT_DIR = os.path.join(tempfile.gettempdir(), "graphsched_bench")
OPTIMIZERS = ("none", "sgd", "adamw")


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _graphsched_source_version() -> str:
    import graphsched

    return f"{graphsched.__version__} (source tree)"


def _git(*args: str) -> str | None:
    """The output of ``git args`` in the source tree, or None where git cannot say."""
    try:
        out = subprocess.run(["git", *args], cwd=os.path.dirname(RESULTS_DIR), capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_commit() -> str | None:
    return (_git("rev-parse", "HEAD") or "").strip() or None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from the commit ``_git_commit`` names (then that commit does not
    say what ran: the record's ``code_note`` must)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status.strip())


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": {"type": device.type, "name": platform.processor() or platform.machine()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "deepspeed": _version("deepspeed"),
            "triton": _version("triton"),
            "graphsched": _version("graphsched") or _graphsched_source_version(),
        },
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"].update(
            name=props.name,
            multiprocessors=props.multi_processor_count,
            memory_gb=round(props.total_memory / 2**30, 1),
        )
    return info


def _device_tag(device: dict[str, Any]) -> str:
    """A short file-name tag: "H100" for "NVIDIA H100 80GB HBM3", "cpu" on a CPU."""
    if device.get("type") != "cuda":
        return "cpu"
    for word in str(device.get("name", "")).replace("-", " ").split():
        if any(ch.isdigit() for ch in word) and word[0].isalpha():
            return "".join(ch for ch in word if ch.isalnum())
    return "cuda"


def default_out_path(preset: BenchPreset, bandwidth: float, device: dict[str, Any]) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    tag = _device_tag(device)
    bw = "inf" if math.isinf(bandwidth) else f"{bandwidth:g}".replace(".", "p")
    return os.path.join(DEFAULT_OUT_DIR, f"{preset.name}_{bw}GBps_{tag}_{stamp}.json")


def cpu_note(results: dict[str, VariantResult], device_type: str) -> str | None:
    """What CPU figures are (and are not): printed under the table and kept in the record."""
    if device_type == "cuda":
        return None
    rows = derived(results)
    odd = [n for n, d in rows.items() if (d["exposed_comm_ms"] or 0) < 0 or (d["limit_fraction"] or 0) > 1]
    return ("note: CPU figures show that every variant runs; they are not speed results. On a CPU the "
            "emulated link's copies and the matmuls share the same few cores and step times are noisy, "
            "so a step can beat its compute-only reference (negative exposed ms) or the limit (of limit "
            "above 1)" + (f", as here for {', '.join(odd)}" if odd else "") + ". Measure speed on a GPU.")


def _free_cuda() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def apply_overrides(preset: BenchPreset, assignments: Sequence[str]) -> BenchPreset:
    """Apply ``KEY=VALUE`` changes: preset fields (``batch_size=2``) or ``model.FIELD=VALUE``."""
    import ast

    preset_changes: dict[str, Any] = {}
    model_changes: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. batch_size=2 or model.n_layers=2.")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if key.startswith("model."):
            model_changes[key[len("model."):]] = value
        else:
            preset_changes[key] = value
    try:
        if model_changes:
            preset_changes["model"] = preset.model.replace(**model_changes)
        return preset.replace(**preset_changes) if preset_changes else preset
    except TypeError as exc:
        raise ConfigError(f"--set: {exc}; see BenchPreset and MoEGPTConfig for the field names.") from None


def quick_preset(preset: BenchPreset) -> BenchPreset:
    """``preset`` as ``--quick`` runs it: QUICK_VARIANTS, fewer steps, a shorter ILP limit."""
    return preset.replace(
        variants=QUICK_VARIANTS,
        warmup=min(preset.warmup, QUICK_STEPS["warmup"]),
        steps=min(preset.steps, QUICK_STEPS["steps"]),
        solver_time_limit_s=min(preset.solver_time_limit_s, QUICK_STEPS["solver_time_limit_s"]),
    )


def run_benchmark(
    preset: BenchPreset,
    *,
    bandwidth_gbps: float | None = None,
    latency_us: float = 0.0,
    steps: int | None = None,
    warmup: int | None = None,
    variants: Sequence[str] | None = None,
    optimizer: str = "none",
    seed: int = 0,
    out: str | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
    timeline_dir: str | None = None,
    quick: bool = False,
    profile_dir: str | None = None,
) -> dict[str, Any]:
    """Run ``preset``'s variants; print the table; write and return the JSON record.

    ``quick``: QUICK_VARIANTS with QUICK_STEPS' warm-up, steps and ILP time limit, each unless
    given here (``variants``, ``steps``, ``warmup`` win).
    """
    preset = quick_preset(preset) if quick else preset
    changes: dict[str, Any] = {}
    if bandwidth_gbps is not None:
        changes["bandwidth_gbps"] = float(bandwidth_gbps)
    if steps is not None:
        changes["steps"] = steps
    if warmup is not None:
        changes["warmup"] = warmup
    if variants is not None:
        changes["variants"] = tuple(variants)
    preset = preset.replace(**changes) if changes else preset
    if preset.steps < 1 or preset.warmup < 1:
        raise ConfigError(
            f"steps={preset.steps} and warmup={preset.warmup} must both be >= 1 (the first step "
            "compiles and plans; it is never timed)."
        )
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={optimizer!r} is not known; use one of {OPTIMIZERS}.")
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"preset {preset.name!r} needs a CUDA device and none is visible; run it on a GPU "
            "machine, or use --preset tiny-cpu here."
        )
    if dist.is_initialized():
        raise ConfigError(
            "torch.distributed is already initialised in this process; the benchmark initialises "
            "its own emulated group: run it in a fresh process."
        )
    device = torch.device("cuda", torch.cuda.current_device()) if preset.device == "cuda" else torch.device("cpu")
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    env = environment(device)
    log(
        f"graphsched benchmark (EMULATED interconnect): preset {preset.name}, "
        f"{env['device']['name']}, EP {preset.virtual_size} at {preset.bandwidth_gbps:g} GB/s, "
        f"{preset.tokens_per_rank} tokens/rank, warmup {preset.warmup}, steps {preset.steps}"
    )
    world = init_emulated_process_group(
        preset.virtual_size, preset.bandwidth_gbps, latency_us=latency_us, device=device
    )
    try:
        compute_only = new_emulated_group(math.inf)
        batch = make_batch(preset.model, preset.batch_size, seed, device)
        ctx = BenchContext(
            preset=preset, device=device, world=world, compute_only=compute_only, batch=batch,
            seed=seed, optimizer=optimizer, timeline_dir=timeline_dir, profile_dir=profile_dir,
        )
        link: dict[str, Any] = {"bandwidth_gbps": preset.bandwidth_gbps, "latency_us": latency_us}
        if device.type == "cuda":
            from benchmarks.linkcheck import fit_emulated_link, overlap_check

            link["copy_bandwidth_gbps"] = world.link.copy_bandwidth_gbps(device)
            if math.isfinite(preset.bandwidth_gbps):
                fit = fit_emulated_link(world, device)
                link["all_to_all_fit"] = fit.to_dict()
                n = preset.virtual_size
                measured = link["all_to_all_fit"]["all_to_all_input_gbps"]
                if measured:
                    link["all_to_all_wire_gbps"] = measured * (n - 1) / n
                link["overlap_check"] = overlap_check(world, device)
                _free_cuda()
            world.reset_stats()
            log(
                f"emulated link: copy engine {link['copy_bandwidth_gbps']:.1f} GB/s (device -> "
                f"pinned host); all-to-all measured at "
                f"{link.get('all_to_all_wire_gbps') or float('nan'):.2f} GB/s on the wire "
                f"(asked {preset.bandwidth_gbps:g})"
            )
            if "overlap_check" in link:
                oc = link["overlap_check"]
                log(
                    f"overlap check: matmuls {oc['compute_ms']:.2f} ms, all-to-alls "
                    f"{oc['comm_ms']:.2f} ms, together {oc['both_ms']:.2f} ms "
                    f"({oc['slowdown_over_max']:.3f} x the larger; 1.0 = full overlap)"
                )
        results: dict[str, VariantResult] = {}
        # In the preset's (or --variants') order; comm-only replays the collectives the eager
        # variant recorded, or records an eager step itself when eager has not run yet.
        order = list(dict.fromkeys(preset.variants))
        for name in order:
            t0 = time.perf_counter()
            r = run_variant(ctx, name)
            results[name] = r
            shown = f"{r.median_ms:.2f} ms" if r.median_ms is not None else f"{r.status}: {r.reason[:120]}"
            log(f"  {name:<24} {shown}  ({time.perf_counter() - t0:.1f} s)")
        # No fast wrong answers: a variant whose loss is off is failed, in no table.
        check_losses(results, preset.model.dtype)
        meta: dict[str, Any] = {
            "command": command or "python -m benchmarks.run --preset " + preset.name,
            "preset": preset.to_dict(),
            "bandwidth_gbps": preset.bandwidth_gbps,
            "virtual_size": preset.virtual_size,
            "link": link,
            **env,
            "timing": {
                "method": "cuda-events" if device.type == "cuda" else "wall-clock",
                "statistic": "median",
                "warmup": preset.warmup,
                "steps": preset.steps,
                "step": "forward+backward" + ("" if optimizer == "none" else f"+optimizer({optimizer})"),
            },
            # graphsched's own (cost_model="auto"): measured on CUDA, analytic on CPU.
            "graphsched_costs": "measured by graphsched" if device.type == "cuda" else "analytic (CPU)",
            "quick": quick,
            "started_at": started.isoformat(timespec="seconds"),
            "elapsed_s": round(time.perf_counter() - t_start, 1),
        }
        record = build_record(results, meta)
        header = [
            "",
            f"{preset.name} on {env['device']['name']} — EMULATED EP {preset.virtual_size} at "
            f"{preset.bandwidth_gbps:g} GB/s; median of {preset.steps} steps "
            f"({meta['timing']['step']})",
        ]
        log(format_table(results, header))
        record["note"] = note = cpu_note(results, device.type)
        if note:
            log(note)
        path = out or default_out_path(preset, preset.bandwidth_gbps, env["device"])
        write_record(record, path)
        record["path"] = path
        log(f"wrote {path}")
        return record
    finally:
        dist.destroy_process_group()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Compare eager, inductor, DeepSpeed and graphsched MoE training steps on an "
        "emulated expert-parallel interconnect (one device plays one rank).",
    )
    p.add_argument("--preset", default="tiny-cpu", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="emulated link bandwidth in GB/s per rank (default: the preset's, 25); "
                   "'inf' moves no bytes")
    p.add_argument("--latency-us", type=float, default=0.0, help="fixed cost per collective (us)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compiles here)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of: {', '.join(ALL_VARIANTS)}")
    p.add_argument("--quick", action="store_true",
                   help=f"the peers that matter ({', '.join(QUICK_VARIANTS)}), "
                   f"{QUICK_STEPS['warmup']} warm-up and {QUICK_STEPS['steps']} timed steps; "
                   "--variants / --steps / --warmup still win")
    p.add_argument("--optimizer", default="none", choices=OPTIMIZERS,
                   help="add an optimizer step to the timed step (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a preset field (batch_size=2, virtual_size=16) or a model field "
                   "(model.n_layers=2); repeatable")
    p.add_argument("--out", default=None, help=f"JSON path (default: a new file in {DEFAULT_OUT_DIR}; keep GPU records with "
                   "--out benchmarks/results/NAME.json)")
    p.add_argument("--timeline-dir", default=None,
                   help="write each graphsched variant's timeline (PNG + trace) of one step here")
    p.add_argument("--profile-dir", default=None,
                   help="GPU: profile one step of every variant after timing; kernel traces and a "
                        "stream summary (link busy / overlapped / exposed) go here and in the JSON")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for preset in PRESETS.values():
            print(f"{preset.name:<12} {preset.device:<5} {preset.description}")
        return 0
    variants = None
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in ALL_VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {', '.join(ALL_VARIANTS)}")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in argv_list)
    try:
        run_benchmark(
            apply_overrides(get_bench_preset(args.preset), args.set),
            bandwidth_gbps=args.bandwidth,
            latency_us=args.latency_us,
            steps=args.steps,
            warmup=args.warmup,
            variants=variants,
            optimizer=args.optimizer,
            seed=args.seed,
            out=args.out,
            command=command,
            timeline_dir=args.timeline_dir,
            quick=args.quick,
            profile_dir=args.profile_dir,
        )
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
