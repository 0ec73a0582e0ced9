"""Run a function on N local processes joined by a gloo (CPU) or NCCL (CUDA) process group.

``run_distributed(fn, world_size=2, args=(...))`` spawns the processes, initialises
``torch.distributed`` in each, calls ``fn(rank, world_size, *args)`` and returns the list of the
values each rank returned (ordered by rank). An exception on any rank is re-raised here with that
rank's traceback, so a failing test reads like a single-process failure.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import socket
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    store_path: str,
    backend: str,
    fn: Callable[..., Any],
    args: tuple,
    result_dir: str,
    timeout_s: float,
) -> None:
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    # Two ranks on two cores: more intra-op threads than cores only adds contention.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    path = os.path.join(result_dir, f"rank{rank}.pkl")
    # A rank stuck in a collective prints every thread's stack before the group times out.
    faulthandler.dump_traceback_later(max(1.0, 0.9 * timeout_s), exit=False)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        # A file store private to this run: no port that a concurrent run could take.
        dist.init_process_group(
            backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        value = fn(rank, world_size, *args)
        outcome: tuple[str, Any] = ("ok", value)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        outcome = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - tearing down after a failure
                pass
    with open(path, "wb") as f:
        pickle.dump(outcome, f)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    backend: str | None = None,
    timeout_s: float = 300.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return each rank's value.

    ``fn`` must be importable (a module-level function) because processes are spawned, not forked.
    Return values must be picklable (move tensors to CPU first).
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    with tempfile.TemporaryDirectory(prefix="graphsched-run-") as result_dir:
        store_path = os.path.join(result_dir, "store")
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, store_path, backend, fn, args, result_dir, timeout_s),
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s + 60)
        for p in procs:
            if p.is_alive():
                p.kill()
        results: list[Any] = []
        errors: list[str] = []
        for rank, p in enumerate(procs):
            path = os.path.join(result_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: exited with code {p.exitcode} and no result")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(value)
                results.append(None)
            else:
                results.append(value)
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return results
