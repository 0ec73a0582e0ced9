"""Compute alone: the reference MoE GPT against the same GPT with DeepSpeed's MoE layers.

    python -m benchmarks.model_speed --preset gpu-smoke            # H200: about 1-2 minutes
    python -m benchmarks.model_speed --preset cpu-profile --profile  # CPU: where the time goes

Both models are built at the preset's sizes on the compute-only twin of an emulated
expert-parallel group (infinite bandwidth: the all-to-alls move data but cost no wire time), so a
step is compute alone, forward + backward, exactly as the harness's ``compute-only`` and
``compute-only-deepspeed`` variants. Each model runs eager and under ``torch.compile`` (inductor);
the reference model also runs with each ``moe_dispatch`` mode. ``--profile`` prints the
``torch.profiler`` table of one eager step of each model (ops by self time) and a breakdown of the
reference MoE layer by part (gate, dispatch, experts, combine). The JSON record (``--out``, default
``benchmarks/results/model_speed_<preset>_<device>_<time>.json``) holds every sample.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shlex
import sys
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from benchmarks.presets import get_bench_preset
from benchmarks.timing import synchronize, time_steps
from benchmarks.context import Skip

#: The CPU profile's sizes: gpu-smoke's shape ratios (C*E = 2.5 S, S = 2 d_ff, 16 experts over
#: EP 8, top-2, cf 1.25) scaled down to run on a CPU in seconds, float32.
CPU_PROFILE = dict(
    vocab_size=1024, seq_len=512, d_model=256, n_heads=4, n_layers=2, d_ff=1024, num_experts=16,
    top_k=2, capacity_factor=1.25, min_capacity=4, dtype="float32",
)


def _preset(name: str):
    from graphsched.models import MoEGPTConfig

    if name == "cpu-profile":
        base = get_bench_preset("tiny-cpu")
        return base.replace(
            name="cpu-profile", model=MoEGPTConfig(**CPU_PROFILE), batch_size=4, virtual_size=8,
            warmup=2, steps=5,
        )
    return get_bench_preset(name)


def _models(preset, device: torch.device, group, seed: int, which: Sequence[str]):
    """(name, builder) of each model to time; a builder returns the model on ``device``."""
    from graphsched.models import MoEGPT

    out: list[tuple[str, Callable[[], torch.nn.Module]]] = []
    for name in which:
        if name.startswith("reference"):
            mode = name.partition(":")[2] or preset.model.moe_dispatch

            def build(mode=mode):
                torch.manual_seed(seed)
                return MoEGPT(preset.model.replace(moe_dispatch=mode), process_group=group).to(device)

            out.append((f"reference:{mode}", build))
        elif name == "deepspeed":

            def build_ds():
                from benchmarks.deepspeed_variants import deepspeed_model

                model, _groups = deepspeed_model(preset, group, seed)
                return model.to(device)

            out.append(("deepspeed", build_ds))
        else:
            raise SystemExit(f"unknown model {name!r}: reference[:einsum|:index] or deepspeed")
    return out


def _step_fn(model, batch) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """A step (grads cleared, forward + backward) and the list holding its last loss."""
    idx, targets = batch
    params = [p for p in model.parameters() if p.requires_grad]
    last: list[torch.Tensor] = []

    def step() -> None:
        for p in params:
            p.grad = None
        loss = model(idx, targets)
        loss.backward()
        last[:] = [loss.detach()]

    return step, last


def moe_breakdown(model, tokens: torch.Tensor, device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Forward + backward ms of each part of the first reference MoE layer on ``tokens``."""
    from graphsched.models import MoELayer

    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    x = tokens.detach().requires_grad_(True)

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        return (time.perf_counter() - t0) / repeats * 1e3

    def whole() -> None:
        y, aux = layer(x)
        (y.float().sum() + aux).backward()

    def gate() -> None:
        out = layer.gate(x, dtype=x.dtype)
        (out.combine_weights.float().sum() + out.l_aux).backward()

    return {"moe_layer_fwd_bwd_ms": timed(whole), "gate_fwd_bwd_ms": timed(gate)}


def layer_speed(preset, device: torch.device, group, which: Sequence[str], steps: int) -> list[dict[str, Any]]:
    """One MoE layer alone of each model, fwd+bwd on random tokens: median ms, and the profiler's
    self time split into the dispatch/combine matmuls ([T, E*C] operands), the other matmuls
    (the experts) and everything else."""
    from torch.profiler import ProfilerActivity, profile

    from graphsched.models import MoELayer

    cfg = preset.model
    tokens = preset.tokens_per_rank
    dtype = cfg.torch_dtype
    rows: list[dict[str, Any]] = []
    for name in which:
        torch.manual_seed(0)
        if name.startswith("reference"):
            mode = name.partition(":")[2] or cfg.moe_dispatch
            name = f"reference:{mode}"
            layer = MoELayer(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, cfg.capacity_factor,
                             cfg.min_capacity, group, dispatch=mode).to(device, dtype)
            fwd = layer
        else:
            try:
                from benchmarks.deepspeed_variants import deepspeed_ready

                deepspeed_ready(device, group)
            except Skip as exc:
                rows.append({"model": name, "status": "skipped", "reason": f"skipped: {exc}"})
                continue
            from graphsched.integrations.deepspeed_gpt import DeepSpeedMoEFeedForward

            ffn = DeepSpeedMoEFeedForward(cfg, ep_size=group.size())
            ffn.moe.set_deepspeed_parallelism()
            layer = ffn.to(device, dtype)
            fwd = layer
        x = torch.randn(tokens, cfg.d_model, device=device).to(dtype).requires_grad_(True)

        def step() -> None:
            y, aux = fwd(x)
            (y.float().sum() + aux.float()).backward()

        timing = time_steps(step, device, warmup=2, steps=steps)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            step()
            synchronize(device)
        from graphsched.models import compute_capacity

        capacity = compute_capacity(tokens, cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.min_capacity)
        slot_dims = {cfg.num_experts * capacity, capacity}
        parts: dict[str, float] = {}
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        for ev in prof.key_averages(group_by_input_shape=True):
            if not ev.key.startswith("aten::") or ev.key.startswith("aten::_c10d"):
                continue
            us = getattr(ev, attr, None)
            if us is None:  # older torch
                us = getattr(ev, "self_cuda_time_total" if device.type == "cuda" else attr, 0.0)
            if ev.key in ("aten::bmm", "aten::mm", "aten::addmm"):
                dims = {d for shape in ev.input_shapes for d in shape}
                # The einsums' matmuls hold a [tokens, E*C] (or [.., C, tokens]) operand.
                einsum = name.startswith("reference") and tokens in dims and bool(dims & slot_dims)
                part = "dispatch/combine matmuls" if einsum else "expert matmuls"
            else:
                part = "everything else"
            parts[part] = parts.get(part, 0.0) + us / 1e3
        rows.append({"model": name, "mode": "layer", "status": "ok", **timing.to_dict(),
                     "by_part_ms": {k: round(v, 2) for k, v in parts.items()}})
        print(f"{name:<18} layer     {timing.median_ms:9.2f} ms  {rows[-1]['by_part_ms']}")
        del layer, fwd, x
    return rows


def layer_counts(preset, modes: Sequence[str] = ("einsum", "index")) -> list[dict[str, Any]]:
    """Bytes written and FLOPs of one reference MoE layer, fwd+bwd, at the preset's sizes and
    dtype, counted on fake tensors (nothing computed: any size runs on a CPU in seconds).

    Bytes are those of every non-view aten op's outputs (reads are not counted); FLOPs are
    ``torch.utils.flop_counter``'s (the matmuls). No group: the experts' bmm runs over all E
    experts, the same FLOPs as E_local experts over W*C slots.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import FlopCounterMode

    from graphsched.models import MoELayer

    class _Bytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.by_op: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not getattr(func, "is_view", False) and name not in ("detach", "_unsafe_view", "alias"):
                n = sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
                self.by_op[name] = self.by_op.get(name, 0) + n
            return out

    cfg = preset.model
    rows = []
    for mode in modes:
        with torch.device("meta"):
            layer = MoELayer(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, cfg.capacity_factor,
                             cfg.min_capacity, None, dispatch=mode).to(cfg.torch_dtype)
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        for module in layer.modules():
            for key, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[key] = torch.nn.Parameter(
                        fake.from_tensor(torch.empty(param.shape, dtype=param.dtype)))
        counted, flops = _Bytes(), FlopCounterMode(display=False)
        with fake:
            x = torch.randn(preset.tokens_per_rank, cfg.d_model, dtype=cfg.torch_dtype, requires_grad=True)
            with flops, counted:
                y, aux = layer(x)
                (y.float().sum() + aux).backward()
        top = sorted(counted.by_op.items(), key=lambda kv: -kv[1])[:8]
        rows.append({
            "model": f"reference:{mode}", "mode": "count", "status": "ok",
            "gb_written": sum(counted.by_op.values()) / 1e9, "tflop": flops.get_total_flops() / 1e12,
            "top_ops_gb": {k: round(v / 1e9, 3) for k, v in top},
        })
        r = rows[-1]
        print(f"reference:{mode:<8} count     {r['gb_written']:.2f} GB written, {r['tflop']:.3f} TFLOP "
              f"per MoE layer fwd+bwd; {r['top_ops_gb']}")
    return rows


def profile_step(step: Callable[[], None], device: torch.device, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    synchronize(device)
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_speed", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-profile", help="cpu-profile, tiny-cpu, gpu-smoke, gpu-e16, ...")
    p.add_argument("--models", default="reference:einsum,reference:index,deepspeed")
    p.add_argument("--modes", default="eager,inductor", help="eager and/or inductor")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables (eager)")
    p.add_argument("--count", action="store_true",
                   help="also count bytes written and FLOPs of one reference MoE layer (fake tensors)")
    p.add_argument("--layer", action="store_true",
                   help="also time one MoE layer alone of each model, with a profile split by part")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from benchmarks.report import write_record
    from benchmarks.run import RESULTS_DIR, _device_tag, environment
    from graphsched.models import make_batch
    from graphsched.testing.emulated.backend import init_emulated_process_group

    preset = _preset(args.preset)
    # Few steps: compilation dominates the run, and compute alone varies little between steps.
    preset = preset.replace(steps=args.steps or min(preset.steps, 5), warmup=args.warmup or min(preset.warmup, 2))
    count_only = args.count and not args.layer and not args.modes.strip()
    if preset.device == "cuda" and not torch.cuda.is_available() and not count_only:
        raise SystemExit(f"preset {preset.name} needs a CUDA device (--count --modes '' runs anywhere)")
    device = torch.device("cuda") if preset.device == "cuda" and not count_only else torch.device("cpu")
    env = environment(device)
    group = init_emulated_process_group(preset.virtual_size, math.inf, device=device)
    results: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}
    try:
        batch = make_batch(preset.model, preset.batch_size, 0, device)
        which = [m.strip() for m in args.models.split(",") if m.strip()]
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if args.count:
            results += layer_counts(preset)
        if args.layer:
            results += layer_speed(preset, device, group, which, preset.steps)
        for name, build in _models(preset, device, group, 0, which):
            for mode in modes:
                row: dict[str, Any] = {"model": name, "mode": mode}
                torch._dynamo.reset()
                try:
                    model = build()
                except (Skip, ImportError) as exc:
                    row.update(status="skipped", reason=f"skipped: {exc}")
                    results.append(row)
                    print(f"{name:<18} {mode:<9} {row['reason']}")
                    continue
                if mode == "inductor" and name == "deepspeed":
                    # DeepSpeed's int(capacity) and _AllToAll break the graph; the capturable
                    # layers (same code, functional all-to-all, static capacity) compile whole.
                    from graphsched.integrations.deepspeed_moe import make_capturable

                    make_capturable(model)
                run = torch.compile(model) if mode == "inductor" else model
                step, last = _step_fn(run, batch)
                t0 = time.perf_counter()
                timing = time_steps(step, device, warmup=preset.warmup, steps=preset.steps)
                row.update(status="ok", setup_s=round(time.perf_counter() - t0, 2), **timing.to_dict())
                row["loss"] = float(last[0].float())
                if args.profile and mode == "eager":
                    profiles[name] = profile_step(step, device)
                    if name.startswith("reference"):
                        d = preset.model.d_model
                        tokens = torch.randn(preset.tokens_per_rank, d, device=device).to(
                            preset.model.torch_dtype
                        )
                        row["breakdown"] = moe_breakdown(model, tokens, device)
                results.append(row)
                print(f"{name:<18} {mode:<9} {row['median_ms']:9.2f} ms  loss {row['loss']:.5f}  "
                      f"{row.get('breakdown', '')}")
                del model, run, step, last
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    for name, table in profiles.items():
        print(f"\n== {name}, one eager step ==\n{table}")
    record = {
        "schema": "graphsched-model-speed/1",
        "command": "python -m benchmarks.model_speed " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "preset": preset.to_dict(),
        **env,
        "step": "forward+backward, compute alone (infinite-bandwidth emulated group)",
        "results": results,
        "profiles": profiles,
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = args.out or os.path.join(
        RESULTS_DIR, f"model_speed_{preset.name}_{_device_tag(env['device'])}_{stamp}.json"
    )
    write_record(record, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
