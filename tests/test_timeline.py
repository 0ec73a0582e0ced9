"""Timelines: predicted from plans, measured from recorded steps; trace, Gantt chart and summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from graphsched.errors import ConfigError, GraphschedError
from graphsched.plan import Plan, Task, TaskKind
from graphsched.runtime.recorder import TaskTiming
from graphsched.timelines import (
    Timeline,
    Timelines,
    load_timelines,
    match_collectives,
    rank_stats,
    step_graph_order,
    summarize,
    timeline,
    timelines_from_trace,
    to_chrome_trace,
)
from graphsched.timelines.gantt import COMM_COLOUR, PHASE_COLOURS, write_gantt_png


def forward_plan() -> Plan:
    """Solved-plan style: every task carries its predicted times.

    compute a [0,1], b [1,2], m [3,4]; the all-to-all runs [1,3] and the wait stalls compute [2,3].
    """
    tasks = [
        Task("a.fwd", ["n0"], "compute", "compute", "forward", 0.0, 1.0),
        Task("m.all_to_all_single", ["c0"], "comm", "collective_issue", "forward", 1.0, 3.0),
        Task("b.fwd", ["n1"], "compute", "compute", "forward", 1.0, 2.0),
        Task("m.wait", ["w0"], "compute", "collective_wait", "forward", 3.0, 3.0, collective="m.all_to_all_single"),
        Task("m.fwd", ["n2"], "compute", "compute", "forward", 3.0, 4.0),
    ]
    return Plan("g0.forward", "h-fwd", tasks, options={"schedule": "ilp", "status": "optimal",
                                                      "chunks": {"m": 2}}, predicted_time=4.0)


def backward_plan() -> Plan:
    """Identity-plan style: no times, only cost numbers (simulated)."""
    tasks = [
        Task("m.dX", ["d0"], "compute", "compute", "input_grad"),
        Task("m.all_to_all_single", ["c1"], "comm", "collective_issue", "input_grad"),
        Task("m.dW", ["d1"], "compute", "compute", "weight_grad"),
        Task("m.wait", ["w1"], "compute", "collective_wait", "input_grad", collective="m.all_to_all_single"),
        Task("m.dX[1]", ["d2", "v0"], "compute", "compute", "input_grad"),
    ]
    costs = {"d0": 1.0, "c1": 2.0, "d1": 1.5, "d2": 0.5}
    return Plan("g0.backward", "h-bwd", tasks, options={"schedule": "identity"}, costs=costs)


def plans() -> dict[str, Plan]:
    return {"g0.backward": backward_plan(), "g0.forward": forward_plan(), "g1.inference": forward_plan()}


def measured_timings(shift: float = 10.0) -> list[TaskTiming]:
    return [
        TaskTiming("g0.forward", "a.fwd", "compute", "compute", "forward", shift + 0.0, shift + 1.0),
        TaskTiming("g0.forward", "m.wait", "compute", "collective_wait", "forward", shift + 1.2, shift + 3.0),
        TaskTiming("g0.forward", "m.all_to_all_single", "comm", "collective_issue", "forward", shift + 1.0, shift + 3.0),
        TaskTiming("g0.forward", "m.fwd", "compute", "compute", "forward", shift + 3.0, shift + 3.5),
        TaskTiming("g0.backward", "m.dX", "compute", "compute", "input_grad", shift + 4.0, shift + 5.0),
        TaskTiming("g0.backward", "m.dW", "compute", "compute", "weight_grad", shift + 5.0, shift + 5.5),
    ]


# -- building ---------------------------------------------------------------------------------------


def test_a_step_runs_forwards_then_backwards_in_reverse_and_skips_inference():
    assert step_graph_order(["g1.backward", "g0.inference", "g1.forward", "g0.backward", "g0.forward"]) == [
        "g0.forward", "g1.forward", "g1.backward", "g0.backward"
    ]
    assert step_graph_order(["g1.inference", "g0.inference"]) == ["g0.inference", "g1.inference"]


def test_solved_plan_times_are_used_as_they_are():
    tl = Timeline.from_plans({"g0.forward": forward_plan()})
    ivs = {iv.name: iv for _g, iv in tl.intervals(0)}
    assert [(t.name, t.start, t.end) for t in forward_plan().tasks] == [
        (n, ivs[n].start, ivs[n].end) for n in ivs
    ]
    assert ivs["m.all_to_all_single"].stream == "comm" and ivs["m.all_to_all_single"].wait == "m.wait"
    assert rank_stats(tl, 0).step_time == forward_plan().predicted_time == max(t.end for t in forward_plan().tasks)


def test_plans_without_times_are_simulated_on_two_in_order_streams():
    tl = Timeline.from_plans({"g0.backward": backward_plan()})
    times = {iv.name: (iv.start, iv.end) for _g, iv in tl.intervals(0)}
    assert times == {
        "m.dX": (0.0, 1.0),
        "m.all_to_all_single": (1.0, 3.0),  # after the compute listed before it
        "m.dW": (1.0, 2.5),                 # overlaps the transfer
        "m.wait": (2.5, 3.0),               # the compute stream stalls until the transfer ends
        "m.dX[1]": (3.0, 3.5),              # a node without a cost number (a view) costs nothing
    }


def test_graphs_follow_each_other_and_inference_is_left_out_of_a_training_step():
    tl = Timeline.from_plans(plans(), rank=3)
    assert list(tl.ranks) == [3]
    assert list(tl.ranks[3]) == ["g0.forward", "g0.backward"]
    assert tl.graph_spans(3) == {"g0.forward": (0.0, 4.0), "g0.backward": (4.0, 7.5)}
    assert tl.options["g0.forward"]["chunks"] == {"m": 2}


def test_waits_match_the_collective_their_plan_names():
    tasks = [
        Task("p.all_to_all_single", ["c0"], "comm", "collective_issue"),
        Task("q.all_to_all_single", ["c1"], "comm", "collective_issue"),
        Task("p.all_to_all_single[1]", ["c2"], "comm", "collective_issue"),
        Task("q.wait", ["w1"], "compute", "collective_wait", collective="q.all_to_all_single"),
        Task("p.wait", ["w0"], "compute", "collective_wait", collective="p.all_to_all_single[1]"),
        Task("p.wait[1]", ["w2"], "compute", "collective_wait", collective="p.all_to_all_single"),
    ]
    plan = Plan("g0.forward", "h", tasks)
    assert match_collectives(plan) == {3: 1, 4: 2, 5: 0}
    # A wait without a named collective is refused (no guess from task names or times).
    tasks[3].collective = None
    with pytest.raises(ValueError, match="names no collective"):
        Plan("g0.forward", "h", tasks)
    with pytest.raises(ValueError, match="no collective task"):
        Plan("g0.forward", "h", tasks[:2] + [Task("x.wait", ["w9"], "compute", "collective_wait", collective="nope")])


def test_a_plan_without_times_or_costs_names_the_fix():
    plan = backward_plan()
    plan.costs = {}
    with pytest.raises(GraphschedError, match="schedule='ilp'|costs="):
        Timeline.from_plans({"g0.backward": plan})
    tl = Timeline.from_plans({"g0.backward": plan}, costs={"g0.backward": backward_plan().costs})
    assert rank_stats(tl, 0).step_time == 3.5


def test_measured_timings_start_at_zero_with_collectives_on_the_comm_lane():
    tl = Timeline.from_timings(measured_timings(), rank=1, plans=plans())
    assert tl.source == "measured" and list(tl.ranks) == [1]
    assert list(tl.ranks[1]) == ["g0.forward", "g0.backward"]
    ivs = {iv.name: iv for _g, iv in tl.intervals(1)}
    assert min(iv.start for iv in ivs.values()) == 0.0
    assert ivs["m.all_to_all_single"].stream == "comm" and ivs["m.all_to_all_single"].wait == "m.wait"
    assert ivs["m.wait"].stream == "compute"
    # dicts (as sent between processes) give the same timeline
    from dataclasses import asdict

    assert Timeline.from_timings([asdict(t) for t in measured_timings()], rank=1, plans=plans()) == tl


def two_collectives_plan() -> Plan:
    """Two all-to-alls in flight at once; q's wait comes first, then p's."""
    return Plan("g0.forward", "h2", [
        Task("p.all_to_all_single", ["c0"], "comm", "collective_issue"),
        Task("q.all_to_all_single", ["c1"], "comm", "collective_issue"),
        Task("a.fwd", ["n0"]),
        Task("q.wait", ["w1"], kind="collective_wait", collective="q.all_to_all_single"),
        Task("p.wait", ["w0"], kind="collective_wait", collective="p.all_to_all_single"),
    ])


def overlapping_timings() -> list[TaskTiming]:
    """p's transfer ends last (3.95) and q's first (2.9), but p's wait ends first (3.0): each
    collective's end is closest to the *other* collective's wait (ends recorded on two clocks,
    or an end event recorded late, need not coincide)."""
    return [
        TaskTiming("g0.forward", "a.fwd", "compute", "compute", "forward", 1.0, 2.0),
        TaskTiming("g0.forward", "q.wait", "compute", "collective_wait", "forward", 3.0, 3.9),
        TaskTiming("g0.forward", "p.wait", "compute", "collective_wait", "forward", 2.0, 3.0),
        TaskTiming("g0.forward", "p.all_to_all_single", "comm", "collective_issue", "forward", 0.0, 3.95),
        TaskTiming("g0.forward", "q.all_to_all_single", "comm", "collective_issue", "forward", 0.5, 2.9),
    ]


def test_measured_collectives_are_paired_by_the_plan_not_by_the_closest_wait_end():
    tl = Timeline.from_timings(overlapping_timings(), plans={"g0.forward": two_collectives_plan()})
    ivs = {iv.name: iv for _g, iv in tl.intervals(0)}
    for name in ("p", "q"):
        wait = ivs[f"{name}.all_to_all_single"].wait
        assert wait == f"{name}.wait"
        # the closest-end rule would have paired it with the other wait
        closest = min(("p.wait", "q.wait"), key=lambda w: abs(ivs[w].end - ivs[f"{name}.all_to_all_single"].end))
        assert closest != wait
    flows = [e for e in to_chrome_trace(tl)["traceEvents"] if e["ph"] == "f"]
    assert sorted(e["ts"] for e in flows) == [ivs["p.wait"].start * 1e6, ivs["q.wait"].start * 1e6]


def test_measured_collectives_without_their_plan_are_an_error_naming_the_fix():
    with pytest.raises(GraphschedError, match="no plan of that graph was given.*plans="):
        Timeline.from_timings(overlapping_timings())
    with pytest.raises(GraphschedError, match="no plan of that graph"):
        Timeline.from_timings(overlapping_timings(), plans={"g0.backward": backward_plan()})
    with pytest.raises(GraphschedError, match="paired with no wait in the plan.*the plans the step ran"):
        Timeline.from_timings(overlapping_timings(), plans={"g0.forward": forward_plan()})
    # Timings without collectives need no plan.
    computed = [t for t in overlapping_timings() if t.kind == TaskKind.COMPUTE]
    assert [iv.name for _g, iv in Timeline.from_timings(computed).intervals(0)] == ["a.fwd"]


def test_merge_joins_ranks_of_one_source_only():
    merged = Timeline.merge([Timeline.from_timings(measured_timings(), r, plans=plans()) for r in (1, 0)])
    assert list(merged.ranks) == [0, 1]
    with pytest.raises(ConfigError, match="rank 0"):
        Timeline.merge([merged, Timeline.from_timings(measured_timings(), 0, plans=plans())])
    with pytest.raises(ConfigError, match="sources"):
        Timeline.merge([merged, Timeline.from_plans(plans())])


# -- figures ------------------------------------------------------------------------------------------


def test_summary_figures_agree_with_the_plan():
    tl = Timeline.from_plans(plans())
    s = rank_stats(tl, 0)
    every = [iv for _g, iv in tl.intervals(0)]
    assert s.step_time == max(iv.end for iv in every) == 7.5
    assert s.comm_total == sum(iv.duration for iv in every if iv.stream == "comm") == 4.0
    assert s.compute_busy == pytest.approx(sum(iv.duration for iv in every if iv.kind == TaskKind.COMPUTE))
    # forward: transfer [1,3], compute idle [2,3]; backward: transfer [5,7], compute idle [6.5,7]
    assert s.exposed_comm == pytest.approx(1.5) and s.exposed_comm <= s.comm_total
    assert s.overlap_ratio == pytest.approx(2.5 / 4.0)
    assert [(g.graph, g.start, g.end) for g in s.gaps] == [("g0.forward", 2.0, 3.0), ("g0.backward", 6.5, 7.0)]
    assert s.gaps[0].after == "b.fwd" and s.gaps[0].before == "m.fwd"
    assert s.gaps[0].waiting_on == ["m.all_to_all_single"]

    text = summarize(tl)  # in milliseconds
    assert "7500.000" in text and "1500.000" in text and "62%" in text
    assert "chunks per region: m=2" in text
    assert "g0.forward at 2000.000" in text


def test_summary_compares_predicted_and_measured_when_both_exist():
    text = Timelines(Timeline.from_plans(plans()), Timeline.from_timings(measured_timings(), plans=plans())).summary()
    assert "predicted" in text and "measured" in text and "measured / predicted" in text


# -- trace --------------------------------------------------------------------------------------------


def _both() -> Timelines:
    measured = Timeline.merge([Timeline.from_timings(measured_timings(), r, plans=plans()) for r in (0, 1)])
    return Timelines(Timeline.from_plans(plans()), measured)


def test_trace_follows_the_trace_event_format_and_holds_every_task():
    tls = _both()
    trace = json.loads(json.dumps(to_chrome_trace(tls)))
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    for e in complete:
        for key in ("name", "ph", "ts", "dur", "pid", "tid"):
            assert key in e, (key, e)
        assert e["dur"] >= 0 and e["ts"] >= 0
        assert {"graph", "phase", "kind"} <= set(e["args"])
    processes = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(processes.values()) == ["rank 0 (measured)", "rank 0 (predicted)", "rank 1 (measured)"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    for pid in processes:
        lanes = {name: tid for (p, tid), name in threads.items() if p == pid}
        assert set(lanes) == {"compute", "comm"} and len(set(lanes.values())) == 2
    for e in complete:  # each event sits on the thread named after its lane
        assert threads[(e["pid"], e["tid"])] == e["args"]["stream"]
    predicted_pid = next(p for p, n in processes.items() if n == "rank 0 (predicted)")
    names = [(e["args"]["graph"], e["name"]) for e in complete if e["pid"] == predicted_pid]
    expected = [("g0.forward", t.name) for t in forward_plan().tasks] + [
        ("g0.backward", t.name) for t in backward_plan().tasks
    ]
    assert names == expected
    assert [e["dur"] for e in complete if e["pid"] == predicted_pid][:2] == [1e6, 2e6]  # microseconds


def test_trace_links_each_collective_to_its_wait():
    events = to_chrome_trace(_both())["traceEvents"]
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert starts and set(starts) == set(ends)
    assert len(starts) == 2 + 2  # predicted: 2 collectives; measured: one per rank
    for i, s in starts.items():
        assert ends[i]["ts"] >= s["ts"] and ends[i]["pid"] == s["pid"] and ends[i]["tid"] != s["tid"]


def test_trace_and_timeline_files_read_back_to_the_same_timelines(tmp_path):
    tls = _both()
    tls.write_trace(tmp_path / "trace.json")
    tls.save(tmp_path / "timeline.json")
    assert load_timelines(tmp_path / "timeline.json") == tls
    back = timelines_from_trace(json.loads((tmp_path / "trace.json").read_text()))
    assert back.summary() == tls.summary()
    assert back.predicted.options == tls.predicted.options


# -- Gantt chart --------------------------------------------------------------------------------------


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def test_gantt_png_shows_lanes_phases_communication_and_exposure(tmp_path):
    import matplotlib.image as mpimg

    one = write_gantt_png(tmp_path / "one.png", Timeline.from_plans(plans()), dpi=50)
    both = write_gantt_png(tmp_path / "both.png", _both(), dpi=50)
    img_one = (mpimg.imread(one)[..., :3] * 255).round().astype(np.uint8)
    img = (mpimg.imread(both)[..., :3] * 255).round().astype(np.uint8)
    assert img.shape[1] == img_one.shape[1] == 14 * 50
    assert img.shape[0] > img_one.shape[0]  # a measured panel with two ranks below the predicted one
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert len(colours) > 8
    for c in [PHASE_COLOURS["forward"], PHASE_COLOURS["input_grad"], PHASE_COLOURS["weight_grad"], COMM_COLOUR]:
        assert _hex(c) in colours, c
    # Exposed communication: red at 25% over white.
    reds = img[(img[..., 0] > 230) & (img[..., 1] < 215) & (img[..., 1] > 180) & (img[..., 2] < 215)]
    assert len(reds) > 50


# -- from a wrapped model ----------------------------------------------------------------------------


@pytest.fixture()
def one_rank_group(tmp_path):
    """A 1-process gloo group: the reference model still issues its all-to-alls."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_timeline_of_a_wrapped_model_predicts_and_measures_one_step(one_rank_group, tmp_path):
    import graphsched
    from graphsched.models import MoEGPT, get_preset, make_batch

    config = get_preset("tiny")
    torch.manual_seed(0)
    model = graphsched.wrap(MoEGPT(config, process_group=one_rank_group), cost_model="analytic",
                            cache_dir=str(tmp_path))
    idx, targets = make_batch(config, 2, seed=0)

    def step():
        model(idx, targets).backward()

    step()  # capture and warm up
    tls = timeline(model, step)
    plans_ = graphsched.captured_plans(model)
    assert tls.predicted is not None and tls.measured is not None
    assert list(tls.predicted.ranks[0]) == list(tls.measured.ranks[0]) == ["g0.forward", "g0.backward"]
    for graph in ("g0.forward", "g0.backward"):
        plan_names = [t.name for t in plans_[graph].tasks]
        assert [iv.name for iv in tls.predicted.ranks[0][graph]] == plan_names
        assert sorted(iv.name for iv in tls.measured.ranks[0][graph]) == sorted(plan_names)
    # The identity plans carry no times: they are simulated from the captured graphs' costs.
    analyses = {a.name: a for a in graphsched.captured_analyses(model)}
    s = rank_stats(tls.predicted, 0)
    comm_cost = sum(c.cost for g in ("g0.forward", "g0.backward") for c in analyses[g].collectives)
    assert s.comm_total == pytest.approx(comm_cost)
    assert 0 <= s.exposed_comm <= s.comm_total and s.step_time > 0
    every = [iv for _g, iv in tls.measured.intervals(0)]
    assert all(iv.end >= iv.start >= 0 for iv in every)
    assert rank_stats(tls.measured, 0).step_time > 0
    # Each measured collective is paired with the wait its plan names.
    for graph in ("g0.forward", "g0.backward"):
        pairs = {plans_[graph].tasks[i].name: plans_[graph].tasks[w].name
                 for w, i in plans_[graph].collective_pairs().items()}
        measured_pairs = {iv.name: iv.wait for iv in tls.measured.ranks[0][graph] if iv.kind == TaskKind.COLLECTIVE_ISSUE}
        assert measured_pairs == pairs and pairs
    # The summary compares predicted with measured per graph and task class.
    rows = tls.errors()
    assert {r.graph for r in rows} == {"g0.forward", "g0.backward", "step"}
    assert tls.error_report() in tls.summary()
