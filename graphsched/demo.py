"""``graphsched demo``: train the reference MoE model eagerly and wrapped on N processes, compare.

Runs on a CPU-only machine (gloo) by default; ``--device cuda`` uses NCCL, one process per GPU.
Exits non-zero if the wrapped run differs from the eager one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from graphsched.testing.launch import run_distributed
from graphsched.testing.parity import ParityResult, ParitySpec, run_parity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from graphsched.config import SCHEDULES
    from graphsched.models.config import PRESETS

    parser.add_argument("--steps", type=int, default=4, help="training steps (default 4)")
    parser.add_argument("--preset", default="tiny", choices=tuple(PRESETS),
                        help="model preset (default tiny; gpu_* presets are sized for a GPU)")
    parser.add_argument("--top-k", type=int, default=2, choices=(1, 2), help="experts per token (default 2)")
    parser.add_argument("--capacity-factor", type=float, default=0.75,
                        help="expert capacity factor (below 1 drops tokens; default 0.75)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per rank and step (default 2)")
    parser.add_argument("--world-size", type=int, default=2,
                        help="processes = expert-parallel ranks (default 2; must divide the experts)")
    parser.add_argument("--schedule", default="identity", choices=SCHEDULES,
                        help="graphsched schedule (default identity; ilp solves for overlap)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu: gloo processes; cuda: NCCL, one GPU per process (default cpu)")
    parser.add_argument("--codegen", default="aten", choices=("aten", "inductor", "auto"),
                        help="what runs the plans: the aten executor (oracle: eager) or inductor's "
                        "code (oracle: torch.compile with the same inductor settings; default aten)")
    parser.add_argument("--out", default="graphsched_out",
                        help="folder for plan.json, trace.json, timeline.png and timeline.json "
                             "(default graphsched_out)")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="largest accepted gradient difference (default 0: bitwise equal)")


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with ``args`` (one line), found before any process starts; None if nothing."""
    from graphsched.errors import GraphschedError
    from graphsched.models.config import get_preset
    from graphsched.models.moe import check_expert_split

    if args.steps < 1 or args.batch_size < 1 or args.world_size < 1:
        return "--steps, --batch-size and --world-size must be at least 1."
    if args.device == "cuda":
        import torch

        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < args.world_size:
            return (f"--device cuda needs {args.world_size} GPU(s) (one per process), this machine "
                    f"has {found}; run on CPU with --device cpu (the default) or lower --world-size.")
    try:
        config = get_preset(args.preset)
        check_expert_split(config.num_experts, args.world_size)
    except GraphschedError as exc:
        return str(exc)
    return None


def _print_results(results: list[ParityResult], tolerance: float) -> bool:
    ok = True
    for r in results:
        print(f"\nrank {r.rank}: {'step':>4}  {'eager loss':>14}  {'graphsched loss':>16}  {'max |grad diff|':>15}")
        for i, s in enumerate(r.steps):
            print(f"        {i:>4}  {s.eager_loss:>14.8f}  {s.wrapped_loss:>16.8f}  {s.max_grad_diff:>15.3e}")
        print(f"        tokens dropped by the first MoE layer on a fresh batch: {r.dropped_tokens}")
        if r.inference_max_diff is not None:
            print(f"        inference (no_grad, eval) max |logit diff|: {r.inference_max_diff:.3e}")
        if tolerance == 0.0:
            rank_ok = r.bitwise_equal and r.params_bitwise_equal_after and r.inference_max_diff == 0.0
        else:
            rank_ok = r.max_grad_diff <= tolerance and r.max_loss_diff <= tolerance
        ok = ok and rank_ok
    return ok


def _write_timelines(out: Path, plans: dict[str, Any], results: list[ParityResult]) -> list[Path]:
    """Timelines of the last step: measured on every rank, predicted from the plans when they
    carry times or cost numbers. Writes trace.json, timeline.png and timeline.json."""
    from graphsched.errors import GraphschedError
    from graphsched.plan import Plan
    from graphsched.timelines import Timeline, Timelines, step_graph_order

    # Every rank ran rank 0's plans (the ranks agree on them before the first step).
    plan_objs = {name: Plan.from_dict(p) for name, p in plans.items()}
    parts = [Timeline.from_timings(r.timings, r.rank, plans=plan_objs) for r in results if r.timings]
    measured = Timeline.merge(parts) if parts else None
    predicted = None
    graphs = step_graph_order(plan_objs)
    if measured is not None:
        graphs = [g for g in graphs if g in next(iter(measured.ranks.values()))] or graphs
    if graphs:
        try:
            predicted = Timeline.from_plans(plan_objs, rank=0, graphs=graphs)
        except GraphschedError:
            print("\n(no predicted timeline: these plans carry no predicted times or cost numbers; "
                  "--schedule ilp predicts them)")
    timelines = Timelines(predicted=predicted, measured=measured)
    if not len(timelines):
        return []
    print("\ntimeline of the last step" + (" (measured on every rank)" if measured else "") + ":")
    print(timelines.summary())
    return [
        timelines.write_trace(out / "trace.json"),
        timelines.write_png(out / "timeline.png"),
        timelines.save(out / "timeline.json"),
    ]


def run(args: argparse.Namespace) -> int:
    problem = check_arguments(args)
    if problem is not None:
        print(f"graphsched demo: error: {problem}", file=sys.stderr)
        return 2
    spec = ParitySpec(
        preset=args.preset,
        model_overrides={"top_k": args.top_k, "capacity_factor": args.capacity_factor},
        steps=args.steps,
        batch_size=args.batch_size,
        wrap_options={"schedule": args.schedule, "codegen": args.codegen},
        device=args.device,
        record_last_step=True,
    )
    print(
        f"graphsched demo: {args.world_size} processes ({'nccl' if args.device == 'cuda' else 'gloo'}), "
        f"preset {args.preset!r}, top-{args.top_k}, capacity factor {args.capacity_factor}, "
        f"{args.steps} steps, schedule {args.schedule!r}, codegen {args.codegen!r} (oracle: "
        f"{'eager' if args.codegen == 'aten' else 'torch.compile, same inductor settings, on inductor'})"
    )
    start = time.perf_counter()
    results = run_distributed(
        run_parity, world_size=args.world_size, args=(spec,),
        backend="nccl" if args.device == "cuda" else "gloo",
    )
    elapsed = time.perf_counter() - start
    ok = _print_results(results, args.tolerance)
    report = results[0].report
    if report:
        print("\n" + report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plans = {name: json.loads(text) for name, text in results[0].plans_json.items()}
    (out / "plan.json").write_text(json.dumps(plans, indent=1, sort_keys=True))
    written = [out / "plan.json"] + _write_timelines(out, plans, results)
    print("\nwrote " + ", ".join(str(p) for p in written))
    if len(written) > 1:
        print(f"open {written[1]} in https://ui.perfetto.dev or chrome://tracing; "
              f"summarise any of these files with: graphsched inspect {written[-1]}")
    worst = max(r.max_grad_diff for r in results)
    verdict = "bitwise equal" if worst == 0.0 and ok else ("within tolerance" if ok else "DIFFERENT")
    print(f"largest gradient difference over all ranks and steps: {worst:.3e} -> {verdict} "
          f"({elapsed:.1f} s)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graphsched demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
