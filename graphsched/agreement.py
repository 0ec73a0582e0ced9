"""Every rank must run the same plan: agree on its inputs, share it, check it before running.

Gloo and NCCL match collectives by issue order, so two ranks with different plans would exchange
the wrong tensors or hang. Plans are made identical by construction (agreed costs, rank 0 solves,
the others receive its plan); ``verify_same_plan`` turns any remaining difference into a clear
error within seconds.

These exchanges happen while graphs are being compiled, so they go through the process group's
key-value store rather than through collectives: nothing can interleave with a collective still
queued on the group, and a rank that never arrives shows up as a store timeout naming the key.
Each exchange gets a fresh key from a per-process sequence number: every rank makes the same
exchanges in the same order (``graphsched.fingerprint`` first agrees on the options at ``wrap`` and
on each graph before it is compiled, so ranks that would diverge stop at that first exchange).

No wait is unbounded. While a rank works inside graphsched (compiling, profiling, solving) a
background thread bumps its heartbeat key; a rank waiting for others does not count as working. A
wait fails with :class:`AgreementTimeoutError`, naming what it awaited and where the other ranks
were, once a missing rank has shown no sign of life for ``agreement_timeout_s`` (a rank that died,
never reached compilation, or waits in another exchange); a rank that is merely slow keeps
beating and keeps the others waiting.

The module sits at the top of the package, beside ``fingerprint.py``, because the code that uses it
runs while graphs are compiled (``capture.py``, ``schedule/planner.py``, ``partition/chunking.py``);
``graphsched.runtime`` does not import it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import threading
import time
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch.distributed as dist

from graphsched.compat import default_group, default_store
from graphsched.errors import AgreementTimeoutError, PlanMismatchError
from graphsched.plan import Plan

_KEY_PREFIX = "graphsched/agreement"
_sequence = itertools.count()


#: Backends whose whole group lives in this one process (nothing to agree with).
_SINGLE_PROCESS_BACKENDS = ("graphsched_emulated",)


def world_is_distributed() -> bool:
    """Whether other processes run this program beside this one."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return str(dist.get_backend()).lower() not in _SINGLE_PROCESS_BACKENDS


#: Seconds without a sign of life from an awaited rank before a wait fails (set by ``wrap``).
DEFAULT_TIMEOUT_S = 60.0
_timeout_s = DEFAULT_TIMEOUT_S
_ALIVE = "graphsched/alive"
_AT = "graphsched/at"


def set_timeout(seconds: float) -> None:
    """Bound every later wait on the other ranks to ``seconds`` after their last sign of life."""
    global _timeout_s
    _timeout_s = float(seconds)


class _Liveness:
    """This process's heartbeat: bumped while it works inside graphsched and is not waiting."""

    def __init__(self) -> None:
        self.working = 0
        self.waiting = 0
        self.thread: threading.Thread | None = None
        self.group: Any = None


_live = _Liveness()


def _beat(store: Any, rank: int, group: Any) -> None:
    key = f"{_ALIVE}/{rank}"
    while True:
        time.sleep(max(0.05, min(1.0, _timeout_s / 8)))
        try:
            if not dist.is_initialized() or default_group() is not group:
                return  # the group this thread beats for is gone
            if _live.working > 0 and _live.waiting == 0:
                store.add(key, 1)
        except Exception:  # noqa: BLE001 - a torn-down store ends the heartbeat, nothing else
            return


def _ensure_heartbeat() -> None:
    if not world_is_distributed():
        return
    group = default_group()
    if _live.thread is not None and _live.thread.is_alive() and _live.group is group:
        return
    _live.group = group
    _live.thread = threading.Thread(
        target=_beat, args=(default_store(), dist.get_rank(), group),
        name="graphsched-heartbeat", daemon=True,
    )
    _live.thread.start()


@contextlib.contextmanager
def working() -> Iterator[None]:
    """Mark this rank as working inside graphsched (its heartbeat runs) while the block runs."""
    _live.working += 1
    try:
        _ensure_heartbeat()
        yield
    finally:
        _live.working -= 1


F = TypeVar("F", bound=Callable[..., Any])


def keeps_alive(fn: F) -> F:
    """Decorator: ``fn`` runs under :func:`working`."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with working():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def _read_at(store: Any, rank: int) -> str | None:
    key = f"{_AT}/{rank}"
    return store.get(key).decode() if store.check([key]) else None


def _wait_for(store: Any, keys: dict[int, str], seq: int, purpose: str) -> dict[int, bytes]:
    """The values of ``keys`` (rank -> store key), waiting while the missing ranks show life."""
    rank = dist.get_rank()
    store.set(f"{_AT}/{rank}", f"{seq}/{purpose}")
    start = time.monotonic()
    last_seen = {r: start for r in keys}
    beats: dict[int, int] = {}
    got: dict[int, bytes] = {}
    pause = 0.005
    _live.waiting += 1
    try:
        _ensure_heartbeat()
        while True:
            now = time.monotonic()
            for r, key in keys.items():
                if r in got:
                    continue
                at = _read_at(store, r)  # read before the key: see _diverged
                if store.check([key]):
                    got[r] = store.get(key)
                    continue
                if at is not None and _diverged(at, seq, purpose):
                    raise PlanMismatchError(
                        f"graphsched: the ranks run different agreement steps: this rank (rank "
                        f"{rank}) waits for {purpose!r} (step {seq}), rank {r} for {at!r}. The ranks "
                        "compiled different graphs (other options, input shapes or control flow); "
                        "give every rank the same model, options and input shapes."
                    )
                beat = store.add(f"{_ALIVE}/{r}", 0)
                if r in beats and beat != beats[r]:
                    last_seen[r] = now
                beats[r] = beat
            if len(got) == len(keys):
                return got
            silent = {r: now - last_seen[r] for r in keys if r not in got}
            stale = {r: s for r, s in silent.items() if s > _timeout_s}
            if stale:
                where = "; ".join(
                    f"rank {r}: no sign of life for {s:.1f} s, last seen "
                    + (f"waiting for {_read_at(store, r)!r}" if _read_at(store, r) else "nowhere in graphsched")
                    for r, s in sorted(stale.items())
                )
                raise AgreementTimeoutError(
                    f"graphsched: rank {rank} waited {now - start:.1f} s for the other ranks' "
                    f"{purpose!r} (agreement step {seq}) ({where}). A rank died, never reached "
                    "compilation, or compiles other graphs than this one. Every rank must wrap the "
                    "same model with the same options and run the same steps; a rank that needs "
                    f"longer without working in graphsched: raise agreement_timeout_s (now {_timeout_s:g} s)."
                )
            time.sleep(pause)
            pause = min(0.1, pause * 2)
    finally:
        _live.waiting -= 1


def _diverged(at: str, seq: int, purpose: str) -> bool:
    """Whether a rank whose latest wait is ``at`` (and which has not published step ``seq``) will
    never publish it: it waits in the same step for something else, or already in a later step."""
    other_seq, _, other_purpose = at.partition("/")
    try:
        n = int(other_seq)
    except ValueError:
        return False
    return n > seq or (n == seq and other_purpose != purpose)


def exchange(payload: Any, purpose: str) -> list[Any]:
    """Every rank's JSON-serialisable ``payload``, ordered by rank (through the store)."""
    if not world_is_distributed():
        return [payload]
    store = default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    seq = next(_sequence)
    base = f"{_KEY_PREFIX}/{seq}/{purpose}"
    store.set(f"{base}/{rank}", json.dumps(payload))
    got = _wait_for(store, {r: f"{base}/{r}" for r in range(world) if r != rank}, seq, purpose)
    return [payload if r == rank else json.loads(got[r]) for r in range(world)]


def agree_on_costs(costs: dict[str, float]) -> dict[str, float]:
    """Each cost replaced by its maximum over ranks (the step waits for the slowest rank)."""
    gathered = exchange(costs, "costs")
    keys = sorted(costs)
    for r, other in enumerate(gathered):
        if sorted(other) != keys:
            missing = sorted(set(keys) ^ set(other))[:5]
            raise PlanMismatchError(
                f"graphsched: rank {r} measured other graph nodes than this rank (e.g. {missing}); "
                "every rank must run the same model with the same input shapes."
            )
    return {k: max(float(o[k]) for o in gathered) for k in keys}


def share_from_rank0(payload: Any, purpose: str) -> Any:
    """Rank 0's payload on every rank (others pass None)."""
    if not world_is_distributed():
        return payload
    store = default_store()
    seq = next(_sequence)
    key = f"{_KEY_PREFIX}/{seq}/{purpose}"
    if dist.get_rank() == 0:
        text = json.dumps(payload)
        store.set(key, text)
        return json.loads(text)
    return json.loads(_wait_for(store, {0: key}, seq, purpose)[0])


def broadcast_plan(plan_json: str | None) -> str:
    """Rank 0's plan JSON, on every rank."""
    text = share_from_rank0(plan_json, "plan")
    assert text is not None
    return text


def verify_same_plan(plan: Plan) -> None:
    """Raise PlanMismatchError on every rank unless all ranks hold ``plan``."""
    mine = [plan.graph_name, plan.graph_hash, plan.content_hash()]
    gathered: Sequence[list[str]] = exchange(mine, "verify")
    if all(g == mine for g in gathered):
        return
    lines = [f"  rank {r}: graph {g[0]} graph-hash {g[1][:12]} plan-hash {g[2][:12]}" for r, g in enumerate(gathered)]
    raise PlanMismatchError(
        f"graphsched: ranks hold different plans for graph {plan.graph_name!r}; running them would "
        "mismatch the collectives and hang.\n" + "\n".join(lines) + "\nFix: give every rank the "
        "same plan file (or none), the same model and input shapes; if you planned on each rank "
        "separately, let graphsched plan (rank 0 decides and shares the plan)."
    )
