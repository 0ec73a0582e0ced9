"""The plan model: its file format, and the analysis and planning passes on small hand-built graphs."""

from __future__ import annotations

import json

import pytest

from graphsched.plan import PLAN_FORMAT_VERSION, ModelPlan, Plan, Phase, Task, TaskKind


def _plan() -> Plan:
    return Plan("g0.forward", "h", [
        Task("m.fwd", ["a"]),
        Task("m.all_to_all_single", ["c"], "comm", "collective_issue"),
        Task("m.wait", ["w"], kind="collective_wait", collective="m.all_to_all_single"),
    ])


def test_kinds_and_phases_are_enums_that_read_and_write_as_their_strings():
    plan = _plan()
    assert plan.tasks[1].kind is TaskKind.COLLECTIVE_ISSUE and plan.tasks[1].kind == "collective_issue"
    assert plan.tasks[0].phase is Phase.FORWARD and f"{plan.tasks[0].phase}" == "forward"
    data = json.loads(plan.to_json())
    assert [t["kind"] for t in data["tasks"]] == ["compute", "collective_issue", "collective_wait"]
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.tasks[2].kind is TaskKind.COLLECTIVE_WAIT
    assert again.collective_pairs() == {2: 1}
    with pytest.raises(ValueError, match="kind is one of"):
        Task("t", ["a"], kind="shuffle")


def test_a_plan_file_of_the_previous_format_names_the_fix():
    old = json.loads(ModelPlan({"g0.forward": _plan()}).to_json())
    old["version"] = PLAN_FORMAT_VERSION - 1
    for p in old["plans"].values():
        p["version"] = PLAN_FORMAT_VERSION - 1
        for t in p["tasks"]:
            del t["collective"]
    with pytest.raises(ValueError, match="Re-plan: delete the file"):
        ModelPlan.from_json(json.dumps(old))
    with pytest.raises(ValueError, match="Re-plan: delete the file"):
        Plan.from_dict(old["plans"]["g0.forward"])
    with pytest.raises(ValueError, match="Re-plan: delete the file"):  # graphsched demo's plan.json
        ModelPlan.from_json(json.dumps(old["plans"]))


def test_only_a_wait_names_a_collective_and_it_must_be_in_the_plan():
    with pytest.raises(ValueError, match="only wait"):
        Plan("g", "h", [Task("c", ["c"], "comm", "collective_issue", collective="c")])
    with pytest.raises(ValueError, match="no collective task"):
        Plan("g", "h", [Task("w", ["w"], kind="collective_wait", collective="c")])
