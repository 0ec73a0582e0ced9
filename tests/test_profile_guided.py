"""Profile-guided planning on 2 gloo ranks (aten executor): re-planned from the step that runs.

Both ranks end on one plan per graph, every step (the profiled ones, the re-planned ones)
computes eager's loss and gradients bitwise, a plan that changes is rebuilt, and a second run
with the cost cache warm plans from the cached costs without profiling.
"""

from __future__ import annotations

import pytest

from graphsched.config import AUTO_PROFILE_STEPS, GraphschedConfig
from graphsched.errors import ConfigError
from graphsched.testing import run_distributed
from graphsched.testing.profile_checks import profile_guided_checks
from graphsched.testing.twins import step_is_bitwise_equal


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("costs") / "cache")
    return run_distributed(profile_guided_checks, world_size=2, args=(cache,), timeout_s=600)


def _bitwise(run):
    return all(step_is_bitwise_equal(s) for s in run["steps"])


def test_the_ilp_plan_is_re_planned_from_measured_costs_on_both_ranks_alike(runs):
    for r in runs:
        run = r["ilp"]
        assert _bitwise(run), run["steps"]
        assert set(run["graphs"]) == {"g0.forward", "g0.backward"}
        for g in run["graphs"].values():
            assert g["profiled"] and g["decided"]
            assert g["costs"]["from"] == "profiled" and g["costs"]["calls"] == 2
            assert g["measured_in_step"] > 0
            summary = g["costs"]["summary"]
            assert summary["measured_in_step"]["share"] > 0.5
            # The executor runs the graph's current plan.
            assert g["executor_plan_hash"] == g["plan_hash"]
        assert "re-planned from 2 profiled calls" in run["explain"]
        assert "measured in the step" in run["explain"]
    a, b = (r["ilp"]["graphs"] for r in runs)
    assert {n: g["plan_hash"] for n, g in a.items()} == {n: g["plan_hash"] for n, g in b.items()}


def test_a_changed_plan_is_rebuilt_and_still_matches_eager_bitwise(runs):
    for r in runs:
        run = r["switch"]
        assert _bitwise(run), run["steps"]
        for g in run["graphs"].values():
            assert g["schedule"] == "reverse_independent"
            assert g["costs"]["plan_changed"] is True
            assert g["profiled_plan_hash"] != g["plan_hash"]
            assert g["executor_plan_hash"] == g["plan_hash"]
    a, b = (r["switch"]["graphs"] for r in runs)
    assert {n: g["plan_hash"] for n, g in a.items()} == {n: g["plan_hash"] for n, g in b.items()}


def test_a_warm_cost_cache_plans_from_cached_costs_without_profiling(runs):
    for r in runs:
        first, cached = r["ilp"]["graphs"], r["cached"]["graphs"]
        assert _bitwise(r["cached"])
        for name, g in cached.items():
            assert not g["profiled"]
            assert g["costs"]["from"] == "cache"
            assert g["plan_hash"] == first[name]["plan_hash"]
            assert g["measured_in_step"] == first[name]["measured_in_step"]
        assert "planned from cached profiled costs" in r["cached"]["explain"]


def test_the_prediction_script_runs_on_cpu(tmp_path):
    from benchmarks.prediction import run_prediction

    record = run_prediction("tiny-cpu", "aten", profile_steps=2, steps=2, cache_dir=str(tmp_path),
                            log=lambda _line: None)
    assert set(record["graphs"]) == {"g0.forward", "g0.backward"}
    for g in record["graphs"].values():
        assert g["costs_from"] == "profiled" and g["profiled_calls"] == 2
        assert g["costs"]["measured_in_step"]["share"] > 0.5
    for key in ("replanned", "other"):
        for v in record[key]["graphs"].values():
            assert v["predicted_s"] > 0 and v["measured_s"] > 0 and v["error"] is not None
        step = record[key]["step"]
        # The step adds what an unscored step spent outside the graphs to the graphs' prediction.
        assert step["outside_graphs_s"] >= 0
        assert step["predicted_s"] == step["graphs_predicted_s"] + step["outside_graphs_s"]
    assert record["other"]["plans"] == {"g0.forward": "identity", "g0.backward": "identity"}
    assert len(record["first_steps_s"]) == 4 and record["overhead"]["first_step_s"] > 0
    # A second run with the cache warm: costs from the cache, nothing profiled, planned fast.
    again = run_prediction("tiny-cpu", "aten", profile_steps=2, steps=1, cache_dir=str(tmp_path),
                           log=lambda _line: None)
    assert again["goals"]["cached_run"]
    for g in again["graphs"].values():
        assert g["costs_from"] == "cache" and g["profiled_calls"] == 0 and g["plan_s"] < 1.0


def test_inductor_code_is_attributed_kernel_by_kernel_and_recompiled_on_cpu(tmp_path):
    import torch
    import torch.distributed as dist

    import graphsched
    from graphsched.compat import inductor_config
    from graphsched.models import MoEGPT, get_preset, make_batch
    from graphsched.testing.emulated.backend import init_emulated_process_group

    init_emulated_process_group(4)
    try:
        config = get_preset("tiny").replace(n_layers=1)
        torch.manual_seed(0)
        model = MoEGPT(config, process_group=dist.group.WORLD)
        graphsched.wrap(model, schedule="ilp", codegen="inductor", cost_model="analytic", profile_steps=1,
                        cache_dir=str(tmp_path))
        idx, tgt = make_batch(config, 2, seed=0)
        losses = []
        with inductor_config.patch(compile_threads=1):
            for _ in range(4):  # compile, profile, re-plan, run the new plan
                loss = model(idx, tgt)
                loss.backward()
                losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses)))
        graphs = [g for g in graphsched.api.state_of(model).capture.graphs if g.plan is not None]
        assert {g.name for g in graphs} == {"g0.forward", "g0.backward"}
        for g in graphs:
            assert g.codegen == "inductor"
            info = g.plan.options["costs"]
            assert info["from"] == "profiled", info
            assert info["summary"]["measured_in_step"]["share"] > 0.5
            details = info["details"]
            # Nearly every launch of the real wrapper maps to plan nodes and every profiled op to a launch.
            assert details["unmapped_launches"] <= 0.25 * details["launches"], details
            assert details["ops_unmatched"] <= 0.25 * details["ops_matched"], details
            assert g.runner.decided and g.runner.profiled_calls == 1
    finally:
        dist.destroy_process_group()


def test_a_profiled_graph_profiles_its_first_calls_then_decides_once():
    import torch

    from graphsched.runtime.profiled_graph import CallProfiler, GraphCallTimer, ProfiledGraph, ProfileSchedule

    ran = []

    def target(args):
        ran.append(list(args))
        args.clear()  # the boxed convention: the callee owns the list
        return "first"

    decisions = []

    def decide(samples):
        decisions.append([s.label for s in samples])
        return lambda args: "re-planned"

    graph = ProfiledGraph("g0.forward", target, ProfileSchedule(steps=2), CallProfiler(torch.device("cpu")), decide)
    assert graph._boxed_call
    outs = [graph([i]) for i in range(3)]
    assert outs == ["first"] * 3 and not graph.decided and graph.profiled_calls == 2
    graph.timer = GraphCallTimer(torch.device("cpu"))
    assert graph([3]) == "re-planned" and graph.decided
    assert decisions == [["graphsched/g0.forward/call1", "graphsched/g0.forward/call2"]]
    assert graph([4]) == "re-planned" and len(decisions) == 1
    assert [len(v) for v in graph.timer.seconds().values()] == [2]
    assert ran == [[0], [1], [2]]
    cached = ProfiledGraph("g0.backward", target, ProfileSchedule(steps=2), CallProfiler(torch.device("cpu")), None)
    assert cached.decided and cached([5]) == "first" and cached.profiled_calls == 0


def test_profile_steps_option():
    assert GraphschedConfig().profiled_steps("cuda") == 0  # off by default
    assert GraphschedConfig(schedule="ilp").profiled_steps("cuda") == 0
    auto = {"profile_steps": "auto"}
    assert GraphschedConfig(**auto).profiled_steps("cuda") == 0  # identity plans do not depend on costs
    assert GraphschedConfig(schedule="ilp", **auto).profiled_steps("cuda") == AUTO_PROFILE_STEPS
    assert GraphschedConfig(schedule="ilp", **auto).profiled_steps("cpu") == 0
    assert GraphschedConfig(profile_steps=2).profiled_steps("cpu") == 2
    for bad in (-1, 101, 1.5, True, "yes"):
        with pytest.raises(ConfigError, match="profile_steps"):
            GraphschedConfig(profile_steps=bad)
    with pytest.raises(ConfigError, match="plan_file"):
        GraphschedConfig(schedule="ilp", plan_file="p.json", profile_steps=3)


def test_a_re_plan_searches_for_at_most_the_re_plan_limit():
    from graphsched.schedule.planner import REPLAN_SOLVE_LIMIT_S, IlpPlanner

    long = IlpPlanner(GraphschedConfig(schedule="ilp", solver_time_limit_s=30.0))
    assert long.for_replanning().config.solver_time_limit_s == REPLAN_SOLVE_LIMIT_S
    assert long.config.solver_time_limit_s == 30.0  # the first plan keeps its whole limit
    short = IlpPlanner(GraphschedConfig(schedule="ilp", solver_time_limit_s=0.5))
    assert short.for_replanning().config.solver_time_limit_s == 0.5
