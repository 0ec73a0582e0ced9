"""The command line: ``graphsched inspect`` on plans and timelines, ``graphsched demo``'s files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphsched.cli import main
from graphsched.plan import ModelPlan, Plan, Task


def forward_plan() -> Plan:
    """A solved plan (predicted times on every task): 4 s, the wait stalls compute for 1 s."""
    return Plan("g0.forward", "h-fwd", [
        Task("a.fwd", ["n0"], "compute", "compute", "forward", 0.0, 1.0),
        Task("m.all_to_all_single", ["c0"], "comm", "collective_issue", "forward", 1.0, 3.0),
        Task("b.fwd", ["n1"], "compute", "compute", "forward", 1.0, 2.0),
        Task("m.wait", ["w0"], "compute", "collective_wait", "forward", 3.0, 3.0, collective="m.all_to_all_single"),
        Task("m.fwd", ["n2"], "compute", "compute", "forward", 3.0, 4.0),
    ], options={"schedule": "ilp"})


def backward_plan() -> Plan:
    """A plan with cost numbers only (simulated): 3.5 s."""
    return Plan("g0.backward", "h-bwd", [
        Task("m.dX", ["d0"], "compute", "compute", "input_grad"),
        Task("m.all_to_all_single", ["c1"], "comm", "collective_issue", "input_grad"),
        Task("m.dW", ["d1"], "compute", "compute", "weight_grad"),
        Task("m.wait", ["w1"], "compute", "collective_wait", "input_grad", collective="m.all_to_all_single"),
        Task("m.dX[1]", ["d2"], "compute", "compute", "input_grad"),
    ], options={"schedule": "identity"}, costs={"d0": 1.0, "c1": 2.0, "d1": 1.5, "d2": 0.5})


def plans() -> dict[str, Plan]:
    return {"g0.forward": forward_plan(), "g0.backward": backward_plan(), "g1.inference": forward_plan()}


def _is_picture(path) -> bool:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    return img.shape[0] > 100 and img.shape[1] > 100 and len(np.unique(img.reshape(-1, 3), axis=0)) > 8


def test_inspect_a_demo_plan_json_prints_the_summary_and_writes_trace_png_and_timeline(tmp_path, capsys):
    plan_json = tmp_path / "plan.json"
    plan_json.write_text(json.dumps({name: p.to_dict() for name, p in plans().items()}))
    out = [tmp_path / "trace.json", tmp_path / "timeline.png", tmp_path / "timeline.json"]
    rc = main(["inspect", str(plan_json), "--trace", str(out[0]), "--png", str(out[1]), "--json", str(out[2])])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "predicted" in printed and "7500.000" in printed  # step time of forward + backward, ms
    for path in out:
        assert path.exists() and str(path) in printed
    trace = json.loads(out[0].read_text())
    names = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert names == {t.name for p in (forward_plan(), backward_plan()) for t in p.tasks}
    assert _is_picture(out[1])

    # What inspect wrote, inspect reads back to the same summary.
    summary = printed.split("\nwrote")[0]
    for path in (out[0], out[2]):
        assert main(["inspect", str(path)]) == 0
        assert capsys.readouterr().out.strip() == summary.strip()


def test_inspect_reads_a_model_plan_and_a_single_plan(tmp_path, capsys):
    model_plan = tmp_path / "model_plan.json"
    model_plan.write_text(ModelPlan(plans={"g0.forward": forward_plan(), "g0.backward": backward_plan()}).to_json())
    single = tmp_path / "forward.json"
    single.write_text(forward_plan().to_json())
    assert main(["inspect", str(model_plan)]) == 0
    assert "7500.000" in capsys.readouterr().out
    assert main(["inspect", str(single)]) == 0
    assert "4000.000" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        ({"g0.backward": {**backward_plan().to_dict(), "costs": {}}}, "neither predicted times nor cost"),
        ({"hello": 1}, "neither a graphsched plan"),
        (None, "cannot read"),
    ],
)
def test_inspect_explains_what_it_cannot_read(tmp_path, capsys, content, message):
    path = tmp_path / "input.json"
    path.write_text("{not json" if content is None else json.dumps(content))
    assert main(["inspect", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_demo_writes_plan_trace_and_timeline_png(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bitwise equal" in printed
    for name in ("plan.json", "trace.json", "timeline.png", "timeline.json"):
        assert (out / name).exists(), name
        assert str(out / name) in printed
    trace = json.loads((out / "trace.json").read_text())
    processes = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"}
    assert {"rank 0 (measured)", "rank 1 (measured)"} <= processes
    plan = json.loads((out / "plan.json").read_text())
    measured = {(e["args"]["graph"], e["name"]) for e in trace["traceEvents"]
                if e["ph"] == "X" and e["args"]["source"] == "measured" and e["args"]["rank"] == 0}
    expected = {(g, t["name"]) for g, p in plan.items() if not g.endswith("inference") for t in p["tasks"]}
    assert measured == expected  # every task of the training step's plans was recorded
    assert _is_picture(out / "timeline.png")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--device", "cuda"], "--device cuda needs 2 GPU(s)"),
        (["--schedule", "fast"], "invalid choice: 'fast'"),
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--world-size", "3"], "cannot be split"),
    ],
)
def test_demo_refuses_bad_arguments_in_one_line_before_starting_processes(monkeypatch, capsys, argv, fragment):
    import torch

    import graphsched.demo

    def no_spawn(*a, **k):
        raise AssertionError("processes were started")

    monkeypatch.setattr(graphsched.demo, "run_distributed", no_spawn)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        code = main(["demo", *argv])
    except SystemExit as exc:  # argparse's own choice errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err


def test_demo_help_lists_choices_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "{identity,reverse_independent,ilp}" in text and "{tiny,small,gpu_medium,gpu_large}" in text
    assert "default identity" in text and "default tiny" in text and "default cpu" in text
