"""Derived figures, the printed table and the JSON record of one benchmark run.

For a variant of step time ``t`` (median), with ``compute`` the compute-only step of its family
(eager and graphsched: ``compute-only``; inductor: ``compute-only-inductor``; DeepSpeed:
``compute-only-deepspeed``, each falling back to ``compute-only`` when not run) and ``comm`` the
communication alone (``comm-only``):

* speed-up over eager: ``t_eager / t``;
* exposed communication: ``t - compute`` (what the step pays for communication it did not hide);
* fraction of the limit reached: ``max(compute, comm) / t`` (1.0: nothing left to win by
  scheduling; eager sits near ``max / (compute + comm)``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from benchmarks.variants import COMPUTE_ONLY_OF, VariantResult

SCHEMA = "graphsched-benchmark/1"


def _median(results: dict[str, VariantResult], name: str) -> float | None:
    r = results.get(name)
    return r.median_ms if r is not None and r.status == "ok" else None


def compute_reference(results: dict[str, VariantResult], variant: VariantResult) -> tuple[str, float | None]:
    """(name, median ms) of the compute-only step that ``variant`` is compared with."""
    if variant.name.startswith("compute-only"):
        return variant.name, variant.median_ms
    own = COMPUTE_ONLY_OF.get(variant.family, "compute-only")
    if _median(results, own) is not None:
        return own, _median(results, own)
    return "compute-only", _median(results, "compute-only")


def derived(results: dict[str, VariantResult]) -> dict[str, dict[str, Any]]:
    """Per variant: speed-up over eager, exposed communication, fraction of the limit."""
    eager = _median(results, "eager")
    comm = _median(results, "comm-only")
    out: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        row: dict[str, Any] = {
            "speedup_vs_eager": None,
            "compute_reference": None,
            "exposed_comm_ms": None,
            "limit_ms": None,
            "limit_fraction": None,
        }
        t = r.median_ms
        if r.status == "ok" and t:
            if eager:
                row["speedup_vs_eager"] = eager / t
            if r.family != "comm":
                ref_name, compute = compute_reference(results, r)
                row["compute_reference"] = ref_name
                if compute is not None:
                    row["exposed_comm_ms"] = t - compute
                    if comm is not None and not name.startswith("compute-only"):
                        row["limit_ms"] = max(compute, comm)
                        row["limit_fraction"] = max(compute, comm) / t
        out[name] = row
    return out


def summary(results: dict[str, VariantResult]) -> dict[str, Any]:
    eager = _median(results, "eager")
    compute = _median(results, "compute-only")
    comm = _median(results, "comm-only")
    data: dict[str, Any] = {"eager_ms": eager, "compute_ms": compute, "comm_ms": comm}
    if compute is not None and comm is not None:
        data["limit_ms"] = max(compute, comm)
        data["comm_over_compute_plus_comm"] = comm / (compute + comm) if compute + comm > 0 else None
        if eager:
            data["best_possible_speedup_vs_eager"] = eager / max(compute, comm)
    if eager is not None and compute is not None and eager > 0:
        data["eager_exposed_comm_fraction"] = (eager - compute) / eager
    ok = [r for r in results.values() if r.status == "ok" and r.family not in ("comm",)
          and not r.name.startswith("compute-only") and r.median_ms]
    if ok:
        best = min(ok, key=lambda r: r.median_ms)
        data["fastest_variant"] = best.name
    return data


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    width = int(spec.split(".")[0]) + len(suffix)
    return "-".rjust(width) if value is None else format(value, spec) + suffix


def format_table(results: dict[str, VariantResult], header: Iterable[str] = ()) -> str:
    extra = derived(results)
    lines = list(header)
    cols = f"{'variant':<24} {'step ms':>9} {'vs eager':>8} {'exposed ms':>10} {'of limit':>8}  note"
    lines += [cols, "-" * len(cols)]
    for name, r in results.items():
        d = extra[name]
        if r.status != "ok":
            lines.append(f"{name:<24} {r.status:>9} {'':>8} {'':>10} {'':>8}  {r.reason[:90]}")
            continue
        note = ""
        if any("UNSCHEDULED" in n for n in r.notes):
            note = "some graphs ran unscheduled"
        lines.append(
            f"{name:<24} {_fmt(r.median_ms, '9.2f')} {_fmt(d['speedup_vs_eager'], '7.2f', 'x')}"
            f" {_fmt(d['exposed_comm_ms'], '10.2f')} {_fmt(d['limit_fraction'], '8.2f')}  {note}"
        )
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
        "notes": r.notes,
    }
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
