"""The benchmark harness (``benchmarks/``), on CPU in one process: records, tables, the limit and
the best peer, presets and options. The emulated interconnect under it is tested in
``tests/test_emulated_backend.py``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from benchmarks.presets import ALL_VARIANTS, PRESETS, get_bench_preset
from benchmarks.report import build_record, derived, format_table
from benchmarks.run import apply_overrides, main, run_benchmark
from benchmarks.timing import Timing
from benchmarks.context import VariantResult
from graphsched.errors import ConfigError

TEST_VARIANTS = (
    "eager", "compute-only", "comm-only", "inductor-reorder", "deepspeed", "graphsched-ilp",
)


def test_tiny_cpu_preset_writes_a_complete_record(tmp_path):
    out = tmp_path / "tiny.json"
    lines: list[str] = []
    run_benchmark(
        get_bench_preset("tiny-cpu"), steps=2, warmup=1, variants=TEST_VARIANTS, out=str(out),
        command="python -m benchmarks.run --preset tiny-cpu --steps 2", log=lines.append,
    )
    assert not dist.is_initialized()  # the harness tears its group down
    record = json.loads(out.read_text())
    assert record["schema"] == "graphsched-benchmark/1"
    assert record["emulated"] is True
    assert record["command"].startswith("python -m benchmarks.run --preset tiny-cpu")
    assert record["bandwidth_gbps"] == 25.0 and record["virtual_size"] == 4
    assert record["device"]["type"] == "cpu" and record["device"]["name"]
    assert record["versions"]["torch"] == torch.__version__
    assert record["timing"] == {
        "method": "wall-clock", "statistic": "median", "warmup": 1, "steps": 2,
        "step": "forward+backward",
    }
    by_name = {v["name"]: v for v in record["variants"]}
    assert list(by_name) == list(TEST_VARIANTS)
    for name, v in by_name.items():
        if name == "deepspeed" and v["status"] == "skipped":
            assert "deepspeed" in v["reason"]
            continue
        assert v["status"] == "ok", (name, v["reason"])
        assert v["median_ms"] > 0 and len(v["samples_ms"]) == 2
    eager, compute, comm = by_name["eager"], by_name["compute-only"], by_name["comm-only"]
    # The same collectives everywhere; only the compute-only twin's cost no emulated bytes.
    assert eager["wire_bytes_per_step"] > 0
    assert compute["wire_bytes_per_step"] == eager["wire_bytes_per_step"]
    assert comm["wire_bytes_per_step"] == eager["wire_bytes_per_step"]
    assert by_name["graphsched-ilp"]["wire_bytes_per_step"] == eager["wire_bytes_per_step"]
    assert compute["emulated_bytes_per_step"] == 0
    assert eager["emulated_bytes_per_step"] == eager["wire_bytes_per_step"]  # scale 1 on CPU
    assert eager["speedup_vs_eager"] == 1.0
    assert record["summary"]["compute_ms"] == compute["median_ms"]
    assert any("EMULATED" in line for line in lines)
    assert any(line.startswith("graphsched-ilp") for line in "\n".join(lines).splitlines())


def _result(
    name: str, ms: float | None, status: str = "ok", losses: list[float] | None = None
) -> VariantResult:
    from benchmarks.variant_names import family_of

    return VariantResult(
        name=name, family=family_of(name), status=status,
        timing=Timing([ms]) if ms is not None else None, losses=list(losses or []),
    )


def _issue_13_table() -> dict[str, VariantResult]:
    """The H200 figures of issue 13 (gpu-smoke, 12.5 GB/s), plus two graphsched variants."""
    loss = [10.40, 10.40]
    rows = [
        ("eager", 59.1), ("compute-only", 36.3), ("comm-only", 23.9), ("inductor", 38.0),
        ("compute-only-inductor", 14.8), ("inductor-classic", 35.2), ("deepspeed", 45.1),
        ("compute-only-deepspeed", 20.9), ("graphsched-ilp", 46.2), ("deepspeed+graphsched", 40.0),
    ]
    return {n: _result(n, ms, losses=None if n == "comm-only" else loss) for n, ms in rows}


def test_true_limit_is_the_fastest_compute_of_any_family_or_the_comm():
    from benchmarks.report import true_limit

    results = _issue_13_table()
    lim = true_limit(results)
    # max(min(36.3, 14.8, 20.9), 23.9): communication bounds it, not eager's compute.
    assert lim["limit_ms"] == pytest.approx(23.9)
    assert lim["limit_compute_variant"] == "compute-only-inductor"
    assert lim["limit_compute_ms"] == pytest.approx(14.8)
    d = derived(results)
    for name in ("eager", "inductor-classic", "deepspeed", "graphsched-ilp"):
        assert d[name]["limit_ms"] == pytest.approx(23.9)
        assert d[name]["limit_fraction"] == pytest.approx(23.9 / results[name].median_ms)
    # Compute-bound: the fastest compute alone is the limit.
    results["comm-only"] = _result("comm-only", 5.0)
    assert true_limit(results)["limit_ms"] == pytest.approx(14.8)
    # A failed compute-only step does not set the limit.
    results["compute-only-inductor"].status = "failed"
    assert true_limit(results)["limit_ms"] == pytest.approx(20.9)
    assert true_limit(results)["limit_compute_variant"] == "compute-only-deepspeed"


def test_best_peer_is_named_and_every_graphsched_variant_is_compared_with_it():
    from benchmarks.report import best_peer

    results = _issue_13_table()
    assert best_peer(results) == ("inductor-classic", pytest.approx(35.2))
    d = derived(results)
    assert d["graphsched-ilp"]["speedup_vs_best_peer"] == pytest.approx(35.2 / 46.2)
    # DeepSpeed's model under graphsched is graphsched's, compared with DeepSpeed's compute alone.
    assert d["deepspeed+graphsched"]["speedup_vs_best_peer"] == pytest.approx(35.2 / 40.0)
    assert d["deepspeed+graphsched"]["compute_reference"] == "compute-only-deepspeed"
    assert d["compute-only-inductor"]["speedup_vs_best_peer"] is None
    table = format_table(results)
    assert "best peer: inductor-classic (35.20 ms)" in table
    assert "limit: 23.90 ms" in table and "compute-only-inductor" in table
    summary = build_record(results, {})["summary"]
    assert summary["best_peer"] == "inductor-classic" and summary["limit_ms"] == pytest.approx(23.9)
    # graphsched never counts as a peer, however fast.
    results["graphsched-ilp"] = _result("graphsched-ilp", 20.0, losses=[10.40, 10.40])
    assert best_peer(results)[0] == "inductor-classic"


def test_a_variant_with_a_nan_or_wrong_loss_fails_and_enters_no_table():
    from benchmarks.report import check_losses

    results = _issue_13_table()
    # Fast and wrong: NaN loss; fast and off by more than the bf16 tolerance (1e-2 absolute).
    results["graphsched-chunks2"] = _result("graphsched-chunks2", 20.0, losses=[10.40, float("nan")])
    results["graphsched-full"] = _result("graphsched-full", 21.0, losses=[10.42, 10.42])
    # Within tolerance passes; DeepSpeed's model is checked against plain DeepSpeed.
    results["graphsched-chunks4"] = _result("graphsched-chunks4", 50.0, losses=[10.405, 10.405])
    results["compute-only-deepspeed"].losses = [10.40 + 0.5] * 2
    results["deepspeed"].losses = [10.40 + 0.5] * 2
    check_losses(results, "bfloat16")
    assert results["graphsched-chunks2"].status == "failed"
    assert "non-finite" in results["graphsched-chunks2"].reason
    assert results["graphsched-full"].status == "failed"
    assert "tolerance 0.01 absolute" in results["graphsched-full"].reason
    assert results["graphsched-chunks4"].status == "ok"
    assert results["deepspeed+graphsched"].status == "failed"  # 10.40 against DeepSpeed's 10.90
    assert results["compute-only-deepspeed"].status == "ok"
    table = format_table(results)
    rows = [line.split()[0] for line in table.split("failed:")[0].splitlines() if line.strip()]
    assert "graphsched-chunks2" not in rows and "graphsched-full" not in rows
    assert "graphsched-chunks4" in rows
    failed = table.split("failed:")[1]
    assert "graphsched-chunks2: loss check: non-finite" in failed and "graphsched-full" in failed
    record = build_record(results, {})
    assert record["summary"]["fastest_variant"] == "compute-only-inductor" or record["summary"][
        "fastest_variant"] != "graphsched-chunks2"
    assert set(record["summary"]["failed"]) == {"graphsched-chunks2", "graphsched-full", "deepspeed+graphsched"}
    assert derived(results)["graphsched-chunks2"]["speedup_vs_eager"] is None
    # float32: 1e-4 relative.
    fp32 = {"eager": _result("eager", 1.0, losses=[2.0]), "inductor": _result("inductor", 1.0, losses=[2.0003])}
    check_losses(fp32, "float32")
    assert fp32["inductor"].status == "failed" and "relative" in fp32["inductor"].reason
    fp32 = {"eager": _result("eager", 1.0, losses=[2.0]), "inductor": _result("inductor", 1.0, losses=[2.0001])}
    check_losses(fp32, "float32")
    assert fp32["inductor"].status == "ok"


def test_quick_selects_the_peers_that_matter_and_variants_still_win(tmp_path):
    from benchmarks.presets import QUICK_STEPS, QUICK_VARIANTS
    from benchmarks.run import parse_args, quick_preset

    preset = quick_preset(get_bench_preset("gpu-e16"))
    assert preset.variants == QUICK_VARIANTS
    assert (preset.warmup, preset.steps) == (QUICK_STEPS["warmup"], QUICK_STEPS["steps"])
    assert preset.solver_time_limit_s <= 5.0
    for needed in ("eager", "comm-only", "compute-only", "compute-only-inductor",
                   "compute-only-deepspeed", "inductor-classic", "deepspeed",
                   "deepspeed+graphsched", "graphsched-ilp"):
        assert needed in QUICK_VARIANTS
    assert set(QUICK_VARIANTS) <= set(ALL_VARIANTS)
    assert "graphsched-chunks4" not in QUICK_VARIANTS and "inductor-overlap" not in QUICK_VARIANTS
    assert parse_args(["--quick"]).quick
    # --variants picks the subset, --quick the steps; the record says it was quick.
    out = tmp_path / "q.json"
    record = run_benchmark(
        get_bench_preset("tiny-cpu"), variants=["eager", "comm-only", "graphsched-inductor"],
        quick=True, out=str(out), log=lambda _line: None,
    )
    assert [v["name"] for v in record["variants"]] == ["eager", "comm-only", "graphsched-inductor"]
    tiny = get_bench_preset("tiny-cpu")
    assert record["quick"] is True
    assert record["timing"]["steps"] == min(tiny.steps, QUICK_STEPS["steps"])
    assert record["preset"]["solver_time_limit_s"] <= 5.0


def test_derived_figures_follow_the_documented_formulas():
    results = {
        r.name: r
        for r in (
            _result("eager", 20.0), _result("compute-only", 12.0), _result("comm-only", 8.0),
            _result("graphsched-ilp", 15.0), _result("inductor", 16.0),
            _result("compute-only-inductor", 10.0), _result("deepspeed", None, "skipped"),
        )
    }
    d = derived(results)
    assert d["graphsched-ilp"]["speedup_vs_eager"] == pytest.approx(20 / 15)
    assert d["graphsched-ilp"]["exposed_comm_ms"] == pytest.approx(3.0)
    # The limit takes the fastest compute alone of any family (inductor's 10 ms), not eager's.
    assert d["graphsched-ilp"]["limit_fraction"] == pytest.approx(10 / 15)
    # Inductor is compared with its own compute-only step.
    assert d["inductor"]["compute_reference"] == "compute-only-inductor"
    assert d["inductor"]["exposed_comm_ms"] == pytest.approx(6.0)
    assert d["inductor"]["limit_fraction"] == pytest.approx(10 / 16)
    assert d["deepspeed"]["speedup_vs_eager"] is None
    record = build_record(results, {"command": "x"})
    assert record["summary"]["best_possible_speedup_vs_eager"] == pytest.approx(20 / 10)
    assert record["summary"]["fastest_variant"] == "graphsched-ilp"
    table = format_table(results)
    assert all(name in table for name in results) and "skipped" in table


def test_presets_and_overrides():
    assert "tiny-cpu" in PRESETS and any(p.device == "cuda" for p in PRESETS.values())
    for preset in PRESETS.values():
        assert set(preset.variants) <= set(ALL_VARIANTS)
    changed = apply_overrides(get_bench_preset("tiny-cpu"), ["batch_size=2", "model.n_layers=3"])
    assert changed.batch_size == 2 and changed.model.n_layers == 3
    with pytest.raises(ConfigError, match="virtual_size"):
        apply_overrides(get_bench_preset("tiny-cpu"), ["virtual_size=3"])
    assert apply_overrides(get_bench_preset("tiny-cpu"), ["model_family=swiglu"]).model_family == "swiglu"
    with pytest.raises(ConfigError, match="model_family=swiglu"):
        apply_overrides(get_bench_preset("tiny-cpu"), ["model_family=mixtral"])
    with pytest.raises(ConfigError, match="unknown benchmark preset"):
        get_bench_preset("huge")
    with pytest.raises(ConfigError, match="CUDA"):
        run_benchmark(get_bench_preset("gpu-smoke")) if not torch.cuda.is_available() else (
            _ for _ in ()).throw(ConfigError("CUDA present"))


def test_cli_lists_presets(capsys):
    assert main(["--list"]) == 0
    assert "tiny-cpu" in capsys.readouterr().out


def test_benchmark_records_go_outside_the_source_tree_by_default():
    from benchmarks.presets import get_bench_preset
    from benchmarks.run import default_out_path

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = default_out_path(get_bench_preset("tiny-cpu"), 25.0, {"type": "cpu", "name": "x86_64"})
    assert not os.path.abspath(path).startswith(repo + os.sep), path
    assert "graphsched_bench" in path


def test_cpu_figures_are_labelled_as_not_speed_results():
    from benchmarks.run import cpu_note

    results = {r.name: r for r in (
        _result("eager", 10.0), _result("compute-only", 8.0), _result("comm-only", 5.0),
        _result("graphsched-ilp", 7.5),  # beats its compute-only reference: CPU noise
    )}
    note = cpu_note(results, "cpu")
    assert "not speed results" in note and "negative exposed ms" in note and "graphsched-ilp" in note
    assert cpu_note(results, "cuda") is None


def test_deepspeed_variants_are_skipped_cleanly_without_deepspeed(monkeypatch):
    import importlib.util
    import sys

    from benchmarks import variants

    real = importlib.util.find_spec
    monkeypatch.setattr(
        variants.importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    with pytest.raises(variants.Skip, match="deepspeed not installed"):
        variants.deepspeed_ready(torch.device("cpu"), None)
    monkeypatch.setattr(variants.importlib.util, "find_spec", real)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # installed, but its import fails
    if real("deepspeed") is not None:
        with pytest.raises(variants.Skip, match="deepspeed not installed: import failed"):
            variants.deepspeed_ready(torch.device("cpu"), None)


def test_model_speed_times_both_dispatch_modes_with_equal_losses(tmp_path):
    from benchmarks.model_speed import main as model_speed

    out = tmp_path / "speed.json"
    assert model_speed([
        "--preset", "tiny-cpu", "--modes", "eager", "--models", "reference:einsum,reference:index",
        "--steps", "1", "--warmup", "1", "--count", "--out", str(out),
    ]) == 0
    assert not dist.is_initialized()
    record = json.loads(out.read_text())
    counts = {r["model"]: r for r in record["results"] if r["mode"] == "count"}
    # The index dispatch does the experts' FLOPs only; the einsums add 5 matmuls of S*E*C*d.
    assert counts["reference:index"]["tflop"] < counts["reference:einsum"]["tflop"]
    assert counts["reference:index"]["gb_written"] < counts["reference:einsum"]["gb_written"]
    rows = {r["model"]: r for r in record["results"] if r["mode"] == "eager"}
    assert set(rows) == {"reference:einsum", "reference:index"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows.values())
    assert rows["reference:einsum"]["loss"] == pytest.approx(rows["reference:index"]["loss"], abs=1e-6)
    assert record["versions"]["torch"] == torch.__version__ and record["command"]


def test_micro_batch_variants_run_graphsched_and_peers_on_the_same_micro_batches():
    from benchmarks.variant_names import compute_only_of, loss_reference_of, micro_batches_of
    from benchmarks.variants import RUNNERS, graphsched_options

    assert graphsched_options("inductor-mb2") == {"schedule": "ilp", "codegen": "inductor", "micro_batches": 2}
    assert graphsched_options("inductor-chunks4-mb2")["chunks"] == 4
    assert graphsched_options("inductor-mbauto")["micro_batches"] == "auto"
    assert micro_batches_of("inductor-classic-mb2") == 2 and micro_batches_of("inductor-classic") == 1
    # Losses are checked against eager run on the same micro-batches; peers get the same step.
    assert loss_reference_of("graphsched-inductor-mb2") == "eager-mb2"
    assert loss_reference_of("inductor-classic-mb2") == "eager-mb2"
    assert loss_reference_of("graphsched-inductor-mbauto") == "eager"
    assert compute_only_of("graphsched-inductor-mb2") == "compute-only-inductor-mb2"
    assert {"eager-mb2", "inductor-classic-mb2", "graphsched-inductor-mbauto"} <= set(RUNNERS) <= set(ALL_VARIANTS)
