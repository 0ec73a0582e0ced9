"""Derived figures, the loss check, the printed table and the JSON record of one benchmark run.

For a variant of step time ``t`` (median), with ``compute`` the compute-only step of its own model
and kernels (reference model eager / graphsched: ``compute-only``; inductor:
``compute-only-inductor``; DeepSpeed's model: ``compute-only-deepspeed``; each falling back to
``compute-only`` when not run) and ``comm`` the communication alone (``comm-only``):

* speed-up over eager: ``t_eager / t``; over the best peer: ``t_peer / t``, the best peer being the
  fastest non-graphsched variant that communicates (eager, inductor's, DeepSpeed's);
* exposed communication: ``t - compute`` (what the step pays for communication it did not hide);
* the limit: ``max(fastest compute-only step of any family, comm)``: no schedule of any model or
  kernels measured here beats it; fraction of the limit reached: ``limit / t``.

No fast wrong answers: every variant's losses (one per step run) are checked against its
reference's (``eager``; plain ``deepspeed`` for DeepSpeed's model, whose weights differ) step by
step; a non-finite loss, or one off by more than ``LOSS_TOLERANCE`` (bfloat16: 1e-2 absolute;
float32: 1e-4 relative), marks the variant failed: it enters no table and no derived figure, and is
listed under "failed" with the reason.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

from benchmarks.context import VariantResult
from benchmarks.variant_names import compute_only_of, loss_reference_of

SCHEMA = "graphsched-benchmark/1"

#: dtype -> (kind, tolerance) of the loss check: "abs" |a - b| <= tol, "rel" |a - b| <= tol * |b|.
LOSS_TOLERANCE = {"bfloat16": ("abs", 1e-2), "float32": ("rel", 1e-4)}


def _median(results: dict[str, VariantResult], name: str) -> float | None:
    r = results.get(name)
    return r.median_ms if r is not None and r.status == "ok" else None


def is_peer(r: VariantResult) -> bool:
    """A variant graphsched is compared with: runs the whole step, is not graphsched."""
    return (
        r.family not in ("graphsched", "comm") and not r.name.startswith("compute-only")
    )


def compute_reference(results: dict[str, VariantResult], variant: VariantResult) -> tuple[str, float | None]:
    """(name, median ms) of the compute-only step that ``variant`` is compared with."""
    if variant.name.startswith("compute-only"):
        return variant.name, variant.median_ms
    own = compute_only_of(variant.name)
    if _median(results, own) is not None:
        return own, _median(results, own)
    return "compute-only", _median(results, "compute-only")


def true_limit(results: dict[str, VariantResult]) -> dict[str, Any]:
    """``max(fastest compute-only step of any family, comm-only)``, with where each came from."""
    computes = {
        name: r.median_ms
        for name, r in results.items()
        if name.startswith("compute-only") and r.status == "ok" and r.median_ms
    }
    comm = _median(results, "comm-only")
    data: dict[str, Any] = {"limit_ms": None, "limit_compute_ms": None, "limit_compute_variant": None,
                            "comm_ms": comm}
    if computes:
        name = min(computes, key=computes.__getitem__)
        data["limit_compute_variant"], data["limit_compute_ms"] = name, computes[name]
        if comm is not None:
            data["limit_ms"] = max(computes[name], comm)
    return data


def best_peer(results: dict[str, VariantResult]) -> tuple[str, float] | None:
    """(name, median ms) of the fastest ok peer (see ``is_peer``), or None."""
    peers = [r for r in results.values() if r.status == "ok" and r.median_ms and is_peer(r)]
    if not peers:
        return None
    best = min(peers, key=lambda r: r.median_ms)
    return best.name, best.median_ms


def check_losses(results: dict[str, VariantResult], dtype: str) -> None:
    """Mark failed every ok variant whose losses are not finite or stray from its reference's."""
    kind, tol = LOSS_TOLERANCE.get(dtype, ("abs", 1e-2))
    stated = f"{tol:g} {'absolute' if kind == 'abs' else 'relative'} ({dtype})"
    for name, r in results.items():
        if r.status != "ok" or not r.losses:
            continue
        bad = [v for v in r.losses if not math.isfinite(v)]
        if bad:
            r.status = "failed"
            r.reason = f"loss check: non-finite loss {bad[0]} (of {len(r.losses)} steps)"
            continue
        ref_name = loss_reference_of(name)
        ref = results.get(ref_name) if ref_name else None
        if ref is None or not ref.losses or not all(math.isfinite(v) for v in ref.losses):
            if ref_name:
                r.notes.append(f"loss check: only finiteness ({ref_name} has no losses to compare)")
            continue
        worst = 0.0
        for a, b in zip(r.losses, ref.losses):
            err = abs(a - b) if kind == "abs" else abs(a - b) / max(abs(b), 1e-30)
            worst = max(worst, err)
        r.loss_error = worst
        if worst > tol:
            r.status = "failed"
            r.reason = (
                f"loss check: loss {r.losses[0]:.6g} strays from {ref_name}'s {ref.losses[0]:.6g} "
                f"by {worst:.3g} (tolerance {stated})"
            )


def derived(results: dict[str, VariantResult]) -> dict[str, dict[str, Any]]:
    """Per variant: speed-ups over eager and the best peer, exposed communication, the limit."""
    eager = _median(results, "eager")
    limit = true_limit(results)["limit_ms"]
    peer = best_peer(results)
    out: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        row: dict[str, Any] = {
            "speedup_vs_eager": None,
            "speedup_vs_best_peer": None,
            "compute_reference": None,
            "exposed_comm_ms": None,
            "limit_ms": None,
            "limit_fraction": None,
        }
        t = r.median_ms
        if r.status == "ok" and t:
            if eager:
                row["speedup_vs_eager"] = eager / t
            if peer is not None and r.family != "comm" and not name.startswith("compute-only"):
                row["speedup_vs_best_peer"] = peer[1] / t
            if r.family != "comm":
                ref_name, compute = compute_reference(results, r)
                row["compute_reference"] = ref_name
                if compute is not None:
                    row["exposed_comm_ms"] = t - compute
                if limit is not None and not name.startswith("compute-only"):
                    row["limit_ms"] = limit
                    row["limit_fraction"] = limit / t
        out[name] = row
    return out


def summary(results: dict[str, VariantResult]) -> dict[str, Any]:
    eager = _median(results, "eager")
    compute = _median(results, "compute-only")
    comm = _median(results, "comm-only")
    data: dict[str, Any] = {"eager_ms": eager, "compute_ms": compute, "comm_ms": comm}
    lim = true_limit(results)
    data.update(lim)
    limit = lim["limit_ms"]
    if compute is not None and comm is not None:
        data["comm_over_compute_plus_comm"] = comm / (compute + comm) if compute + comm > 0 else None
    if eager and limit:
        data["best_possible_speedup_vs_eager"] = eager / limit
    if eager is not None and compute is not None and eager > 0:
        data["eager_exposed_comm_fraction"] = (eager - compute) / eager
    peer = best_peer(results)
    data["best_peer"], data["best_peer_ms"] = peer if peer is not None else (None, None)
    ok = [r for r in results.values() if r.status == "ok" and r.family not in ("comm",)
          and not r.name.startswith("compute-only") and r.median_ms]
    if ok:
        best = min(ok, key=lambda r: r.median_ms)
        data["fastest_variant"] = best.name
    data["failed"] = {n: r.reason for n, r in results.items() if r.status == "failed"}
    data["skipped"] = {n: r.reason for n, r in results.items() if r.status == "skipped"}
    return data


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    width = int(spec.split(".")[0]) + len(suffix)
    return "-".rjust(width) if value is None else format(value, spec) + suffix


def format_table(results: dict[str, VariantResult], header: Iterable[str] = ()) -> str:
    """The ok variants only; then the best peer, the limit, and the failed and skipped lists."""
    extra = derived(results)
    lines = list(header)
    cols = (f"{'variant':<24} {'step ms':>9} {'vs eager':>8} {'vs peer':>8} {'exposed ms':>10} "
            f"{'limit/step':>10}  note")
    lines += [cols, "-" * len(cols)]
    for name, r in results.items():
        if r.status != "ok":
            continue
        d = extra[name]
        note = ""
        if any("UNSCHEDULED" in n for n in r.notes):
            note = "some graphs ran unscheduled"
        lines.append(
            f"{name:<24} {_fmt(r.median_ms, '9.2f')} {_fmt(d['speedup_vs_eager'], '7.2f', 'x')}"
            f" {_fmt(d['speedup_vs_best_peer'], '7.2f', 'x')} {_fmt(d['exposed_comm_ms'], '10.2f')}"
            f" {_fmt(d['limit_fraction'], '10.2f')}  {note}"
        )
    peer = best_peer(results)
    lim = true_limit(results)
    lines.append("")
    lines.append(
        "best peer: " + (f"{peer[0]} ({peer[1]:.2f} ms); 'vs peer' = its step / this step" if peer else "none ran")
    )
    if lim["limit_ms"] is not None:
        lines.append(
            f"limit: {lim['limit_ms']:.2f} ms = max(fastest compute alone {lim['limit_compute_ms']:.2f} ms "
            f"[{lim['limit_compute_variant']}], comm alone {lim['comm_ms']:.2f} ms)"
        )
    for status in ("failed", "skipped"):
        listed = [(n, r.reason) for n, r in results.items() if r.status == status]
        if listed:
            lines.append(f"{status}:")
            lines += [f"  {n}: {reason[:200]}" for n, reason in listed]
    return "\n".join(lines)


def variant_record(r: VariantResult, extra: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": r.name,
        "family": r.family,
        "status": r.status,
        "reason": r.reason,
        "median_ms": r.median_ms,
        "setup_s": round(r.setup_s, 3),
        "wire_bytes_per_step": r.wire_bytes_per_step,
        "copied_bytes_per_step": r.copied_bytes_per_step,
        "emulated_bytes_per_step": r.emulated_bytes_per_step,
        "collectives_per_step": r.collectives_per_step,
        "peak_memory_gb": r.peak_memory_gb,
        "final_loss": r.final_loss,
        "losses": r.losses,
        "loss_error": r.loss_error,
        "notes": r.notes,
    }
    if r.stream_profile is not None:
        data["stream_profile"] = r.stream_profile
    if r.timing is not None:
        data.update(r.timing.to_dict())
    data.update(extra)
    return data


def build_record(
    results: dict[str, VariantResult], meta: dict[str, Any]
) -> dict[str, Any]:
    extra = derived(results)
    record = {"schema": SCHEMA, "emulated": True, **meta}
    record["summary"] = summary(results)
    record["variants"] = [variant_record(r, extra[name]) for name, r in results.items()]
    return record


def write_record(record: dict[str, Any], path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    return path
