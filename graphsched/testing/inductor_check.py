"""One-GPU check of codegen="inductor": ``python -m graphsched.testing.inductor_check --out x.json``.

On one CUDA device with a one-rank NCCL group (the all-to-alls run through NCCL, move no data):
1. numerics: graphsched codegen="inductor" (identity and ilp plans) against its oracle, inductor in
   its own order through the same AOTAutograd partitioner and inductor settings
   (``inductor_oracle_backend``), over several optimizer steps; also plain
   ``torch.compile(backend="inductor")`` (min-cut partitioner: another graph, so a tolerance);
   tolerances: bf16 loss within 1e-2 and every gradient norm within 5 %, fp32 1e-4 relative;
2. the plan in the code: the generated backward wrapper is read and the weight-gradient kernels
   between each ``all_to_all_single`` and its ``wait_tensor`` are listed;
3. speed: median step (forward + backward, CUDA events, after warm-up) of torch.compile, the
   inductor oracle, graphsched-inductor (identity, ilp; ilp-slowlink: planned with a 2 ms
   all-to-all so that weight gradients move into the windows, which a one-rank group would not
   give) and graphsched-aten (ilp).
Writes a JSON report to ``--out``; exit status 1 when a numerics check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

import graphsched
from graphsched.analysis.labels import GraphKind
from graphsched.codegen.compiler import inductor_oracle_backend
from graphsched.compat import dynamo_reset
from graphsched.models import get_preset, make_batch
from graphsched.testing.inductor_checks import dw_kernels_in_code_windows
from graphsched.testing.twins import build_model


Run = tuple[list[float], list[dict[str, torch.Tensor]]]


def _variant(
    name: str, config: Any, group: Any, device: torch.device, cache_dir: str
) -> tuple[torch.nn.Module, Callable[..., Any]]:
    """(the module holding the parameters, what a step calls)."""
    model = build_model(config, 0, group, device)
    if name == "torch.compile":
        return model, torch.compile(model, backend="inductor", dynamic=False)
    if name == "oracle":
        return model, torch.compile(model, backend=inductor_oracle_backend(), dynamic=False)
    schedule, codegen = {
        "graphsched-inductor-identity": ("identity", "inductor"),
        "graphsched-inductor-ilp": ("ilp", "inductor"),
        "graphsched-inductor-ilp-slowlink": ("ilp", "inductor"),
        "graphsched-aten-ilp": ("ilp", "aten"),
    }[name]
    options: dict[str, Any] = {}
    if name.endswith("slowlink"):
        # A one-rank group moves no data, so measured costs leave little to hide: plan as if each
        # all-to-all took 2 ms (compute priced by the device's roofline), so that dW work moves
        # into the windows. Priced as one CPU thread, gpu_medium's compute took 40 s and no
        # window was worth filling.
        from graphsched.analysis.costmodel import DeviceSpec
        from graphsched.testing.scheduling import CommHeavyCosts

        costs = CommHeavyCosts(comm_s=2e-3, spec=DeviceSpec.detect(device))
        options = {"cost_fn": costs, "cost_model": "analytic"}
    graphsched.wrap(model, schedule=schedule, codegen=codegen, cache_dir=cache_dir, **options)
    return model, model


def _steps(model: torch.nn.Module, call: Callable[..., Any], config: Any, batch: int, steps: int,
           device: torch.device) -> tuple[list[float], list[dict[str, torch.Tensor]], list[str]]:
    from graphsched.compat import run_and_get_code

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses, grads, code = [], [], []
    for step in range(steps):
        idx, tgt = make_batch(config, batch, seed=step, device=device)
        opt.zero_grad(set_to_none=True)

        def run() -> torch.Tensor:
            loss = call(idx, tgt)
            loss.backward()
            return loss

        if step == 0:
            loss, code = run_and_get_code(run)
        else:
            loss = run()
        losses.append(loss.item())
        grads.append({n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return losses, grads, list(code)


def _compare(ref: Run, got: Run, bf16: bool) -> dict[str, Any]:
    loss_tol, grad_tol = (1e-2, 0.05) if bf16 else (1e-4, 1e-4)
    (lr, gr), (lg, gg) = ref, got
    loss_diff = max(abs(a - b) / (1.0 if bf16 else max(abs(a), 1e-12)) for a, b in zip(lr, lg))
    worst_norm, worst_name, bitwise = 0.0, None, lr == lg
    # In bf16 the gradients are compared at the first step only, where the parameters are the
    # same: each AdamW step rounds into bf16 weights, so runs whose gradients differ in the last
    # bit drift apart (measured on an H200: a gate weight's gradient norm 10% apart after two
    # steps between torch.compile and the oracle). Losses are compared at every step.
    for a, b in zip(gr[:1] if bf16 else gr, gg[:1] if bf16 else gg):
        for n, ga in a.items():
            gb = b.get(n)
            if gb is None:
                return {"ok": False, "error": f"gradient {n} missing"}
            bitwise = bitwise and torch.equal(ga, gb)
            na, nb = ga.norm().item(), gb.norm().item()
            rel = abs(na - nb) / max(na, 1e-12)
            if rel > worst_norm:
                worst_norm, worst_name = rel, n
    return {
        "losses_ref": lr, "losses": lg, "loss_diff": loss_diff, "worst_grad_norm_rel": worst_norm,
        "worst_grad": worst_name, "bitwise": bitwise,
        "ok": loss_diff <= loss_tol and worst_norm <= grad_tol,
        "tolerance": {"loss": loss_tol, "grad_norm_rel": grad_tol},
    }


def _median_step(call: Callable[..., Any], model: torch.nn.Module, config: Any, batch: int,
                 device: torch.device, warmup: int, repeats: int) -> float:
    idx, tgt = make_batch(config, batch, seed=7, device=device)
    times = []
    for i in range(warmup + repeats):
        if device.type != "cuda":
            t0 = time.perf_counter()
            call(idx, tgt).backward()
            elapsed = time.perf_counter() - t0
        else:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            call(idx, tgt).backward()
            e1.record()
            torch.cuda.synchronize()
            elapsed = e0.elapsed_time(e1) / 1e3
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpu_medium")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="", help="override the preset's dtype (float32, bfloat16)")
    parser.add_argument("--out", default="inductor_check.json")
    parser.add_argument("--variants", default="", help="comma-separated subset (the oracle always runs)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a smoke run of this script (gloo, wall-clock timing)")
    args = parser.parse_args(argv)

    if args.device == "cuda":
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=0, world_size=1)
    group = dist.group.WORLD
    config = get_preset(args.preset).replace(n_layers=args.layers)
    if args.dtype:
        config = config.replace(dtype=args.dtype)
    bf16 = config.dtype == "bfloat16"
    cache_dir = tempfile.mkdtemp(prefix="graphsched-inductor-check-")
    from graphsched.compat import inductor_config as ic

    report: dict[str, Any] = {
        "command": " ".join([sys.executable, "-m", "graphsched.testing.inductor_check", *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "preset": args.preset, "layers": args.layers, "batch": args.batch, "dtype": str(getattr(config, "dtype", "")),
        "inductor_deterministic": bool(getattr(ic, "deterministic", False)),
        "note": "one-rank NCCL group: the all-to-alls run through NCCL but move no data between GPUs; "
                "oracle = inductor in its own order through graphsched's AOTAutograd (default_partition) "
                "with the same inductor settings; torch.compile = backend='inductor' (min-cut partitioner)",
        "variants": {},
    }
    names = ["oracle", "torch.compile", "graphsched-inductor-identity", "graphsched-inductor-ilp",
             "graphsched-inductor-ilp-slowlink", "graphsched-aten-ilp"]
    if args.variants:
        wanted = set(args.variants.split(","))
        names = [n for n in names if n == "oracle" or n in wanted]
    results: dict[str, Any] = {}
    ok = True
    for name in names:
        dynamo_reset()
        t0 = time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            model, call = _variant(name, config, group, device, cache_dir)
            losses, grads, code = _steps(model, call, config, args.batch, args.steps, device)
            entry["compile_and_steps_s"] = round(time.perf_counter() - t0, 1)
            results[name] = (losses, grads)
            if name != "oracle":
                entry["vs_oracle"] = _compare(results["oracle"], (losses, grads), bf16)
                ok = ok and entry["vs_oracle"]["ok"]
            if name.startswith("graphsched"):
                graphs = graphsched.api.state_of(model).capture.graphs
                entry["codegen"] = {g.name: g.codegen for g in graphs}
                bw = next((g for g in graphs if g.kind == GraphKind.BACKWARD), None)
                if bw is not None and bw.plan is not None:
                    entry["backward_options"] = bw.plan.options
                    bw_code = [c for c in code if "all_to_all_single" in c]
                    if bw.inductor_report and bw_code:
                        entry["code_windows"] = dw_kernels_in_code_windows(bw_code[-1], bw.inductor_report, bw.plan)
            entry["median_step_s"] = _median_step(call, model, config, args.batch, device, args.warmup, args.repeats)
        except Exception as exc:  # noqa: BLE001 - report every variant
            entry["error"] = f"{type(exc).__name__}: {exc}"
            ok = False
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["variants"][name] = entry
        brief = {k: v for k, v in entry.items() if k != "backward_options"}
        print(name, json.dumps(brief, default=str)[:2000], flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    report["ok"] = ok
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
