"""The error report: predicted (plans) against measured (a recorded step) per graph and task class,
on a step recorded on 2 gloo ranks; through the Python API and ``graphsched inspect``."""

from __future__ import annotations

import json

import pytest

from graphsched.cli import main
from graphsched.errors import ConfigError
from graphsched.plan import Plan
from graphsched.testing import run_distributed
from graphsched.testing.parity import ParitySpec, run_parity
from graphsched.timelines import (
    TASK_CLASSES,
    Timeline,
    Timelines,
    error_rows,
    load_timelines,
    rank_stats,
    step_graph_order,
)
from graphsched.timelines.report import COLLECTIVE, COMPUTE, EXPOSED_WAIT, STEP, WEIGHT_GRAD, ErrorRow


@pytest.fixture(scope="module")
def recorded():
    """(plans, per-rank TaskTimings) of the last of two training steps of the tiny MoE model."""
    spec = ParitySpec(steps=2, record_last_step=True, check_inference=False)
    results = run_distributed(run_parity, world_size=2, args=(spec,))
    plans = {name: Plan.from_json(text) for name, text in results[0].plans_json.items()}
    return plans, {r.rank: r.timings for r in results}


def _timelines(plans: dict[str, Plan], timings: dict[int, list]) -> Timelines:
    measured = Timeline.merge([Timeline.from_timings(t, rank, plans=plans) for rank, t in timings.items()])
    ran = [g for g in step_graph_order(plans) if g in measured.ranks[0]]
    return Timelines(Timeline.from_plans(plans, graphs=ran), measured)


def test_rows_cover_every_graph_and_class_and_sum_to_the_timelines_totals(recorded):
    plans, timings = recorded
    tls = _timelines(plans, timings)
    graphs = list(tls.measured.ranks[0])
    assert graphs == ["g0.forward", "g0.backward"]
    for rank in (0, 1):
        rows = error_rows(tls, rank)
        assert [(r.graph, r.task_class) for r in rows] == [
            (g, c) for g in graphs + [STEP] for c in TASK_CLASSES
        ]
        for source, tl, r_of in (("predicted", tls.predicted, 0), ("measured", tls.measured, rank)):
            value = (lambda row: row.predicted_ms) if source == "predicted" else (lambda row: row.measured_ms)
            step = {r.task_class: value(r) for r in rows if r.graph == STEP}
            for c in TASK_CLASSES:
                assert step[c] == pytest.approx(sum(value(r) for r in rows if r.graph != STEP and r.task_class == c))
            stats = rank_stats(tl, r_of)
            assert step[COMPUTE] + step[WEIGHT_GRAD] == pytest.approx(stats.compute_busy * 1e3)
            assert step[COLLECTIVE] == pytest.approx(stats.comm_total * 1e3)
            assert step[EXPOSED_WAIT] == pytest.approx(stats.exposed_comm * 1e3, abs=1e-6)
            by = {(r.graph, r.task_class): value(r) for r in rows}
            for g in graphs:  # the MoE layers' all-to-alls run in both graphs
                assert by[(g, COMPUTE)] > 0 and by[(g, COLLECTIVE)] > 0
            assert by[("g0.forward", WEIGHT_GRAD)] == 0 and by[("g0.backward", WEIGHT_GRAD)] > 0
        for r in rows:
            if r.predicted_ms:
                assert r.error_pct == pytest.approx(100 * (r.measured_ms - r.predicted_ms) / r.predicted_ms)
            else:
                assert r.error_pct is None


def test_the_error_formula_and_its_missing_cases():
    assert ErrorRow("g", COMPUTE, 2.0, 3.0).error_pct == pytest.approx(50.0)
    assert ErrorRow("g", COMPUTE, 4.0, 3.0).error_pct == pytest.approx(-25.0)
    assert ErrorRow("g", COMPUTE, 0.0, 3.0).error_pct is None
    assert ErrorRow("g", COMPUTE, None, 3.0).error_pct is None


def test_the_report_needs_both_timelines(recorded):
    plans, _ = recorded
    with pytest.raises(ConfigError, match="only a predicted one.*graphsched inspect plan.json timeline.json"):
        error_rows(Timeline.from_plans(plans))


def test_the_summary_prints_the_report_and_inspect_reads_saved_plans_and_measured_timeline(recorded, tmp_path, capsys):
    plans, timings = recorded
    tls = _timelines(plans, timings)
    assert "predicted vs measured, rank" in tls.summary()
    assert tls.error_report() in tls.summary()

    # Offline: the plans (as graphsched demo writes them) and a saved measured timeline.
    plan_json = tmp_path / "plan.json"
    plan_json.write_text(json.dumps({name: p.to_dict() for name, p in plans.items()}))
    measured_json = Timelines(measured=tls.measured).save(tmp_path / "measured.json")
    assert main(["inspect", str(plan_json), str(measured_json)]) == 0
    printed = capsys.readouterr().out
    offline = load_timelines(plan_json, measured_json)
    assert offline.errors() == tls.errors()
    assert offline.error_report() in printed
    for g in ("g0.forward", "g0.backward", STEP):
        for c in TASK_CLASSES:
            assert any(line.split()[:1] == [g] and c in line for line in printed.splitlines()), (g, c)

    # One file per source: two measured timelines are refused, naming both files.
    measured_json.with_name("copy.json").write_text(measured_json.read_text())
    assert main(["inspect", str(measured_json), str(measured_json.with_name("copy.json"))]) == 2
    assert "both hold a measured timeline" in capsys.readouterr().err
