"""One-GPU check of every mode against eager: ``python -m graphsched.testing.gpu_check``.

On one CUDA device with a one-rank NCCL group (the all-to-alls still run through NCCL, on its own
stream), every mode (``identity``, ``ilp``, ``chunks`` 2 / 4 / auto and, where the installed
graphsched has it, ``codegen="inductor"``) trains the reference model and a second model
(``SwiGLUMoEGPT``: RMSNorm, SwiGLU experts, a shared expert, top-1 gating) beside an eager copy, in
float32 and bfloat16:

* steps 1-2 on one batch without optimizer steps (the parameters never change, so every step
  must give the same answer: a race shows as a step that differs from the first);
* steps 3-5 on new batches, each followed by an AdamW step on both copies, after which the
  wrapped copy's parameters are set to the eager copy's (so that each step compares gradients at
  the same, changed, parameters; without it bf16 rounding makes the two trajectories drift apart).

Tolerances against eager: float32, losses and every parameter's gradient within 1e-4 relative
(``|dloss| / |loss|``, ``||dg|| / ||g||``); bfloat16, losses within 1e-2 and each gradient's norm
within 5%. The report records the chunk count every region got (chunked modes must chunk).
``--cost-model`` adds the ILP plan's predicted step time against the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

import graphsched
from graphsched.compat import dynamo_reset
from graphsched.microbatch import micro_batched
from graphsched.models import MoEGPT, get_preset, make_batch

FP32_REL_TOL = 1e-4
BF16_LOSS_TOL = 1e-2
BF16_NORM_TOL = 0.05


def _model_families() -> dict[str, Callable[..., torch.nn.Module]]:
    from graphsched.models.swiglu_moe import SwiGLUMoEGPT

    return {"reference": MoEGPT, "swiglu": SwiGLUMoEGPT}


def modes() -> dict[str, dict[str, Any]]:
    """Mode name -> wrap options."""
    out: dict[str, dict[str, Any]] = {
        "identity": {"schedule": "identity", "codegen": "aten"},
        "ilp": {"schedule": "ilp", "codegen": "aten"},
        "chunks2": {"schedule": "ilp", "chunks": 2, "codegen": "aten"},
        "chunks4": {"schedule": "ilp", "chunks": 4, "codegen": "aten"},
        "chunks-auto": {"schedule": "ilp", "chunks": "auto", "codegen": "aten"},
    }
    out["inductor"] = {"schedule": "ilp", "codegen": "inductor"}
    out["inductor-chunks2"] = {"schedule": "ilp", "codegen": "inductor", "chunks": 2}
    out["inductor-chunks-auto"] = {"schedule": "ilp", "codegen": "inductor", "chunks": "auto"}
    # Two micro-batches in one step, checked against eager run on the same micro-batches.
    out["ilp-mb2"] = {"schedule": "ilp", "codegen": "aten", "micro_batches": 2}
    out["inductor-mb2"] = {"schedule": "ilp", "codegen": "inductor", "micro_batches": 2}
    out["inductor-chunks2-mb2"] = {"schedule": "ilp", "codegen": "inductor", "chunks": 2, "micro_batches": 2}
    return out


def compare(dtype: str, loss_e: float, loss_w: float, grads_e: list, grads_w: list) -> dict[str, Any]:
    """One step's comparison with eager under the dtype's tolerance."""
    finite = bool(torch.isfinite(torch.tensor(loss_w)))
    if dtype == "float32":
        loss_err = abs(loss_w - loss_e) / max(abs(loss_e), 1e-12)
        grad_err = max(
            ((gw.float() - ge.float()).norm() / ge.float().norm().clamp_min(1e-30)).item()
            for ge, gw in zip(grads_e, grads_w)
        )
        ok = finite and loss_err <= FP32_REL_TOL and grad_err <= FP32_REL_TOL
    else:
        loss_err = abs(loss_w - loss_e)
        grad_err = max(
            abs(gw.float().norm().item() - ge.float().norm().item()) / max(ge.float().norm().item(), 1e-30)
            for ge, gw in zip(grads_e, grads_w)
        )
        ok = finite and loss_err <= BF16_LOSS_TOL and grad_err <= BF16_NORM_TOL
    return {"loss_eager": loss_e, "loss": loss_w, "loss_err": loss_err, "grad_err": grad_err, "ok": bool(ok)}


def chunk_counts(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The chunk count each region of each scheduled graph got."""
    rows = []
    for name, plan in graphsched.captured_plans(model).items():
        for rid, d in (plan.options.get("chunks") or {}).items():
            rows.append({"graph": name, "region": rid, "module": d.get("module"), "k": d.get("k"),
                         "nodes": d.get("nodes"), "collectives": len(d.get("collectives", [])),
                         "cut": d.get("cut"), "error": d.get("error")})
    return rows


def check_mode(family: str, dtype: str, mode: str, options: dict[str, Any], group: Any,
               device: torch.device, preset: str, layers: int, batch: int, cache_dir: str) -> dict[str, Any]:
    build_model = _model_families()[family]
    config = get_preset(preset).replace(n_layers=layers, dtype=dtype)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(config, process_group=group).to(device)

    dynamo_reset()
    t0 = time.perf_counter()
    eager = build()
    # The oracle runs the micro-batches the wrapped model runs (gradient accumulation's semantics).
    oracle = micro_batched(eager, options.get("micro_batches", 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = graphsched.wrap(build(), cache_dir=cache_dir, solver_time_limit_s=5.0, **options)
        opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-4)
        opt_w = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
        steps = []
        fixed = make_batch(config, batch, seed=0, device=device)
        for step in range(5):
            optimizer_step = step >= 2
            idx, tgt = make_batch(config, batch, seed=step, device=device) if optimizer_step else fixed
            for opt in (opt_e, opt_w):
                opt.zero_grad(set_to_none=True)
            le = oracle(idx, tgt)
            le.backward()
            lw = wrapped(idx, tgt)
            lw.backward()
            pairs = [(pe.grad, pw.grad) for pe, pw in zip(eager.parameters(), wrapped.parameters())
                     if pe.grad is not None]
            row = compare(dtype, le.item(), lw.item(), [a for a, _ in pairs], [b for _, b in pairs])
            row["optimizer_step"] = optimizer_step
            steps.append(row)
            if optimizer_step:
                opt_e.step()
                opt_w.step()
                # Re-align the copies: in bf16, rounding decides whether an update moves a weight,
                # so two runs whose gradients differ in the last bit drift apart step by step
                # (measured: 0.4% of a gradient's norm after one step, 10% after three). Each step
                # then checks the gradients at the same, changed, parameters.
                with torch.no_grad():
                    for pe, pw in zip(eager.parameters(), wrapped.parameters()):
                        pw.copy_(pe)
        torch.cuda.synchronize(device)
    chunks = chunk_counts(wrapped)
    result = {
        "model": family, "dtype": dtype, "mode": mode, "options": options, "steps": steps,
        "ok": all(s["ok"] for s in steps),
        "chunks": chunks,
        "max_k": max((c["k"] or 1 for c in chunks), default=1),
        "warnings": sorted({str(w.message)[:300] for w in caught if "graphsched" in str(w.message)}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if "chunks" in options and options["chunks"] not in (1, "auto"):
        # A fixed chunk count that never chunks proves nothing.
        result["ok"] = result["ok"] and result["max_k"] > 1
    return result


def measure_step(model: torch.nn.Module, config: Any, batch: int, device: torch.device,
                 warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    idx, tgt = make_batch(config, batch, seed=7, device=device)
    fwd, bwd, total = [], [], []
    for i in range(warmup + repeats):
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        loss = model(idx, tgt)
        e1.record()
        loss.backward()
        e2.record()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            fwd.append(e0.elapsed_time(e1) / 1e3)
            bwd.append(e1.elapsed_time(e2) / 1e3)
            total.append(e0.elapsed_time(e2) / 1e3)
    return {"forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd), "step_s": statistics.median(total)}


def cost_model_check(group: Any, device: torch.device, preset: str, layers: int, batch: int, cache_dir: str) -> dict[str, Any]:
    config = get_preset(preset).replace(n_layers=layers)
    dynamo_reset()
    torch.manual_seed(0)
    model = graphsched.wrap(MoEGPT(config, process_group=group).to(device), schedule="ilp", cache_dir=cache_dir)
    measure_step(model, config, batch, device, warmup=1, repeats=1)
    plans = graphsched.captured_plans(model)
    fwd = sum(p.predicted_time or 0.0 for n, p in plans.items() if n.endswith(".forward"))
    bwd = sum(p.predicted_time or 0.0 for n, p in plans.items() if n.endswith(".backward"))
    measured = measure_step(model, config, batch, device)
    return {
        "predicted_forward_s": fwd, "predicted_backward_s": bwd, "measured": measured,
        "step_error": (fwd + bwd - measured["step_s"]) / measured["step_s"],
        "forward_error": (fwd - measured["forward_s"]) / measured["forward_s"],
        "backward_error": (bwd - measured["backward_s"]) / measured["backward_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpu_medium")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--models", default="reference,swiglu", help="comma-separated: reference, swiglu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default="all", help=f"comma-separated of: {', '.join(modes())}; or all")
    parser.add_argument("--cost-model", action="store_true", help="also compare predicted and measured step time")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device; the CPU tests (python -m pytest) cover the CPU.", file=sys.stderr)
        return 2
    all_modes = modes()
    chosen = list(all_modes) if args.modes == "all" else args.modes.split(",")
    unknown = [m for m in chosen if m not in all_modes]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(all_modes)}")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    group = dist.group.WORLD
    cache_dir = tempfile.mkdtemp(prefix="graphsched-cache-")
    report: dict[str, Any] = {
        "command": " ".join(["python", "-m", "graphsched.testing.gpu_check", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "graphsched": getattr(graphsched, "__version__", None),
        "preset": args.preset, "layers": args.layers, "batch": args.batch, "world_size": 1,
        "note": "one-rank NCCL group: the all-to-alls run through NCCL but move no data between GPUs",
        "tolerances": {"float32_relative": FP32_REL_TOL, "bfloat16_loss": BF16_LOSS_TOL,
                       "bfloat16_grad_norm_relative": BF16_NORM_TOL},
        "runs": [],
    }
    for family in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for mode in chosen:
                try:
                    res = check_mode(family, dtype, mode, all_modes[mode], group, device, args.preset,
                                     args.layers, args.batch, cache_dir)
                except Exception as exc:  # noqa: BLE001 - one failing mode must not hide the others
                    res = {"model": family, "dtype": dtype, "mode": mode, "ok": False,
                           "error": f"{type(exc).__name__}: {exc}"[:2000]}
                report["runs"].append(res)
                steps = res.get("steps", [])
                print(f"{family:9s} {dtype:8s} {mode:16s} ok={res['ok']!s:5s} max_k={res.get('max_k', '-')} "
                      f"loss_err={max((s['loss_err'] for s in steps), default=float('nan')):.2e} "
                      f"grad_err={max((s['grad_err'] for s in steps), default=float('nan')):.2e} "
                      f"{res.get('seconds', '')}s {res.get('error', '')}", flush=True)
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)
    if args.cost_model:
        report["cost_model"] = cost_model_check(group, device, args.preset, args.layers, args.batch, cache_dir)
        print(json.dumps(report["cost_model"], indent=1), flush=True)
    report["ok"] = all(r["ok"] for r in report["runs"])
    report["chunked_somewhere"] = any(r.get("max_k", 1) > 1 for r in report["runs"])
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    dist.destroy_process_group()
    print(f"all ok: {report['ok']}; k > 1 occurred: {report['chunked_somewhere']}")
    return 0 if report["ok"] and report["chunked_somewhere"] else 1


if __name__ == "__main__":
    sys.exit(main())
