#!/usr/bin/env python
"""Train the graphsched reference MoE GPT under DeepSpeed, its forward and backward run by graphsched.

The model is ``graphsched.models.MoEGPT`` (embeddings, attention blocks and loss of the reference
model) whose MoE feed-forward layers are DeepSpeed ``MoE`` layers of the same shape (see
``graphsched.integrations.deepspeed_gpt``: DeepSpeed only treats parameters as expert-parallel in
its own MoE layers). Parallelism is set up the DeepSpeed way:

* expert parallelism over ``--ep-size`` ranks (default: all of them), data parallelism over the
  rest: ``deepspeed.initialize`` creates the expert-parallel and expert-data-parallel groups;
* the optimizer's parameter groups come from
  ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``: expert parameters
  in their own groups (``moe: True``, ``name: ep_size_<N>``), so ZeRO reduces their gradients over
  the expert-data-parallel group only;
* ZeRO stage 1 (``recipes/ds_config_cpu.json``, float32) or 2 (``recipes/ds_config_gpu.json``,
  bfloat16).

Then ``graphsched.integrations.deepspeed_moe.wrap_deepspeed_moe(engine)`` makes the DeepSpeed MoE
layers capturable and wraps the engine's module in place: ``engine(...)``, ``engine.backward``,
``engine.step`` and checkpoints are used exactly as without graphsched (``--no-graphsched`` to
compare). Data is synthetic and generated on the fly, a different stream per rank: by default
arithmetic progressions modulo the vocabulary (``--data progression``: learnable, so the loss
falls), or uniformly random tokens (``--data random``, ``graphsched.models.make_batch``: the loss
stays near ln(vocab_size)).

Launch (see recipes/README.md)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 recipes/train_moe_gpt_deepspeed.py --steps 10
    torchrun --nproc_per_node 8 recipes/train_moe_gpt_deepspeed.py --preset gpu_medium \\
        --deepspeed-config recipes/ds_config_gpu.json --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# DeepSpeed picks its accelerator when first asked; on a machine without CUDA, say CPU explicitly
# (it would guess CPU too, with a warning).
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer  # noqa: E402

import graphsched  # noqa: E402
from graphsched.errors import ConfigError  # noqa: E402
from graphsched.integrations.deepspeed_gpt import build_deepspeed_moe_gpt  # noqa: E402
from graphsched.integrations.deepspeed_moe import wrap_deepspeed_moe  # noqa: E402
from graphsched.models import MoEGPTConfig, get_preset, make_batch  # noqa: E402

RECIPES = Path(__file__).resolve().parent


@dataclass
class StepRecord:
    """One optimizer step: the loss averaged over all ranks, and its wall time on rank 0."""

    step: int
    loss: float
    seconds: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="graphsched.models preset (tiny, small, gpu_medium, gpu_large)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps to run (after any loaded checkpoint)")
    p.add_argument("--deepspeed-config", default=None,
                   help="DeepSpeed JSON config (default: ds_config_cpu.json on DeepSpeed's CPU accelerator, "
                        "else ds_config_gpu.json)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per rank per micro-step (overrides train_micro_batch_size_per_gpu)")
    p.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: world size)")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data seed")
    p.add_argument("--data", choices=("progression", "random"), default="progression",
                   help="synthetic data: learnable arithmetic progressions, or random tokens")
    p.add_argument("--no-graphsched", action="store_true", help="run the plain DeepSpeed model (baseline)")
    p.add_argument("--schedule", default="identity", help="graphsched schedule (GraphschedConfig.schedule)")
    p.add_argument("--explain", action="store_true", help="print graphsched.explain after the first step")
    p.add_argument("--save-dir", default=None, help="save a DeepSpeed checkpoint here at the end")
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.add_argument("--load-dir", default=None, help="resume from the latest DeepSpeed checkpoint in this directory")
    p.add_argument("--quiet", action="store_true", help="no per-step log lines")
    # The deepspeed launcher passes --local_rank; torchrun sets LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def progression_batch(
    config: MoEGPTConfig, batch_size: int, seed: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``start, start + step, start + 2 * step, ...`` modulo the vocabulary.

    Start and step (1..8) are random per sequence; the model learns to read the step off the
    context. Same contract as ``graphsched.models.make_batch``: (idx, targets) shifted by one.
    """
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, config.vocab_size, (batch_size, 1), generator=gen)
    step = torch.randint(1, 9, (batch_size, 1), generator=gen)
    tokens = (start + step * torch.arange(config.seq_len + 1)) % config.vocab_size
    idx, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if device is not None:
        idx, targets = idx.to(device), targets.to(device)
    return idx, targets


def load_ds_config(args: argparse.Namespace) -> dict:
    path = args.deepspeed_config
    if path is None:
        on_cpu = get_accelerator().device_name() == "cpu"
        path = RECIPES / ("ds_config_cpu.json" if on_cpu else "ds_config_gpu.json")
    with open(path) as f:
        ds_config = json.load(f)
    if args.micro_batch_size is not None:
        ds_config["train_micro_batch_size_per_gpu"] = args.micro_batch_size
        ds_config.pop("train_batch_size", None)
    return ds_config


def model_config(args: argparse.Namespace, ds_config: dict) -> MoEGPTConfig:
    config = get_preset(args.preset)
    # Parameters in the dtype DeepSpeed trains in: bf16 when the config enables it, else fp32.
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    return config.replace(dtype="bfloat16" if bf16 else "float32")


def expert_parallel_size(args: argparse.Namespace, config: MoEGPTConfig) -> int:
    world = dist.get_world_size()
    ep = args.ep_size or world
    if world % ep != 0 or config.num_experts % ep != 0:
        raise ConfigError(
            f"--ep-size {ep} must divide the world size ({world}) and the preset's num_experts "
            f"({config.num_experts}); e.g. --ep-size {min(world, config.num_experts)}."
        )
    return ep


def build_engine(args: argparse.Namespace, ds_config: dict, config: MoEGPTConfig, ep_size: int):
    """The DeepSpeed engine of the model, wrapped by graphsched unless --no-graphsched."""
    model = build_deepspeed_moe_gpt(config, ep_size, seed=args.seed)
    # Expert parameters (tagged allreduce=False by DeepSpeed's MoE) go to their own groups.
    param_groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"}
    )
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config)
    if not args.no_graphsched:
        # After deepspeed.initialize: the expert-parallel groups exist and the engine's settings
        # on the MoE layers are checked.
        wrap_deepspeed_moe(engine, schedule=args.schedule)
    return engine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args: argparse.Namespace) -> list[StepRecord]:
    """Run the recipe in an initialised (or initialisable) process group; return rank 0's log."""
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = load_ds_config(args)
    config = model_config(args, ds_config)
    ep_size = expert_parallel_size(args, config)
    engine = build_engine(args, ds_config, config, ep_size)
    log = (lambda *a: None) if (rank != 0 or args.quiet) else (lambda *a: print(*a, flush=True))

    if args.load_dir:
        load_path, _ = engine.load_checkpoint(args.load_dir)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint found in {args.load_dir!r} (no 'latest' file).")
        log(f"loaded {load_path} (step {engine.global_steps})")

    micro_batch = engine.train_micro_batch_size_per_gpu()
    accumulation = engine.gradient_accumulation_steps()
    log(f"preset {args.preset}: {sum(p.numel() for p in engine.module.parameters()):,} parameters on "
        f"rank 0, {world} ranks, expert-parallel size {ep_size}, "
        f"micro-batch {micro_batch} x {config.seq_len} tokens, graphsched "
        f"{'off' if args.no_graphsched else 'on (schedule=' + args.schedule + ')'}")

    batch_fn = progression_batch if args.data == "progression" else make_batch
    records: list[StepRecord] = []
    engine.train()
    first = engine.global_steps
    for step in range(first, first + args.steps):
        _sync(engine.device)
        start = time.perf_counter()
        total = torch.zeros((), device=engine.device)
        for micro in range(accumulation):
            # A distinct, reproducible batch per (step, micro-step, rank): a resumed run sees the
            # batches an uninterrupted run would have seen.
            seed = args.seed * 1_000_003 + (step * accumulation + micro) * world + rank
            idx, targets = batch_fn(config, micro_batch, seed, device=engine.device)
            loss = engine(idx, targets)
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        _sync(engine.device)
        seconds = time.perf_counter() - start
        mean = total / accumulation
        dist.all_reduce(mean)
        records.append(StepRecord(step + 1, mean.item() / world, seconds))
        log(f"step {step + 1:5d} | loss {records[-1].loss:.4f} | step time {seconds * 1e3:8.1f} ms")
        if args.explain and step == first and not args.no_graphsched and rank == 0:
            graphsched.explain(engine.module)
        if args.save_dir and args.save_every and (step + 1) % args.save_every == 0:
            engine.save_checkpoint(args.save_dir, tag=f"global_step{engine.global_steps}")

    if args.save_dir:
        engine.save_checkpoint(args.save_dir, tag=f"global_step{engine.global_steps}")
        log(f"saved {args.save_dir}/global_step{engine.global_steps}")
    if len(records) > 1:
        # The first step includes graph capture; the median of the others is the steady state.
        steady = statistics.median(r.seconds for r in records[1:])
        log(f"done: {len(records)} steps, final loss {records[-1].loss:.4f}, median step time "
            f"{steady * 1e3:.1f} ms (steps 2..{len(records)})")
    return records


def main(argv: list[str] | None = None) -> list[StepRecord]:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
