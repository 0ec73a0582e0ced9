"""What a new user meets first: plan files, models with nothing to schedule, option types, pulp."""

import configparser
import dataclasses
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn

import graphsched
from graphsched import ConfigError, GraphschedConfig, GraphschedError, GraphschedFallbackWarning, ModelPlan, Plan, Task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- plan files (point 2) ---------------------------------------------------------------------

def _plan(name="g0.forward"):
    return Plan(graph_name=name, graph_hash="h", tasks=[Task(name="t", nodes=["a"])])


def test_the_demo_plan_json_is_accepted_as_a_plan_file(tmp_path):
    demo_style = {"g0.forward": _plan().to_dict(), "g0.backward": _plan("g0.backward").to_dict()}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(demo_style))
    plans = ModelPlan.from_json(path.read_text())
    assert sorted(plans.plans) == ["g0.backward", "g0.forward"]
    graphsched.wrap(nn.Linear(2, 2), schedule="ilp", plan_file=str(path))  # no error


@pytest.mark.parametrize("content, fragment", [("{}", "holds no plans"), ('{"a": 1}', "not a graphsched plan file")])
def test_a_json_that_is_no_plan_file_says_what_to_pass(tmp_path, content, fragment):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        graphsched.wrap(nn.Linear(2, 2), schedule="ilp", plan_file=str(path))
    assert fragment in str(info.value) and "save_plans" in str(info.value)
    assert "version None" not in str(info.value)


def test_a_plan_file_with_a_schedule_that_would_ignore_it_is_refused(tmp_path):
    with pytest.raises(ConfigError, match='schedule="ilp"') as info:
        graphsched.wrap(nn.Linear(2, 2), plan_file=str(tmp_path / "plans.json"))  # schedule="identity"
    assert "ignore" in str(info.value) and "drop plan_file" in str(info.value)


# -- nothing to schedule (point 4) --------------------------------------------------------------

def _steps(model, n=2):
    for _ in range(n):
        model(torch.randn(3, 4)).sum().backward()


def test_nn_sequential_says_once_that_nothing_is_scheduled_and_why():
    model = graphsched.wrap(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps(model)
    said = [w for w in caught if issubclass(w.category, GraphschedFallbackWarning)]
    assert len(said) == 1 and "nothing to schedule" in str(said[0].message)
    assert "nn.Sequential" in str(said[0].message)
    text = graphsched.explain(model, file=None)
    assert "nothing to schedule" in text and "run one" not in text
    with pytest.raises(GraphschedError, match="nothing to schedule") as info:
        graphsched.save_plans(model, os.devnull)
    assert "run one" not in str(info.value)
    with pytest.raises(GraphschedError, match="nothing to schedule"):
        graphsched.timeline(model, lambda: _steps(model, 1))


class Own(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))

    def forward(self, x):
        return self.body(x)


def test_a_model_without_collectives_says_there_is_no_communication_to_overlap():
    model = graphsched.wrap(Own())
    _steps(model)
    assert "none holds a collective" in graphsched.explain(model, file=None)
    with pytest.raises(GraphschedError, match="none holds a collective"):
        graphsched.save_plans(model, os.devnull)
    with pytest.raises(GraphschedError, match="none holds a collective"):  # not "0.000 ms, 100%"
        graphsched.timeline(model, lambda: _steps(model, 1))


# -- option types (point 5) ---------------------------------------------------------------------

def test_a_positional_string_option_says_how_to_pass_options():
    with pytest.raises(ConfigError, match=r"schedule='ilp'"):
        graphsched.wrap(nn.Linear(2, 2), "ilp")


BAD_TYPES = {
    "schedule": 3,
    "cost_model": None,
    "fullgraph": "no",
    "use_comm_stream": "yes",
    "solver_time_limit_s": "20",
    "max_chunks": 2.0,
    "plan_file": 1,
    "cache_dir": 1,
    "check_process_groups": 1,
    "free_after_last_use": "true",
    "chunks": "2",
    "memory_limit_bytes": 1.5,
    "agreement_timeout_s": 0,
    "measure_chunks": "yes",
    "codegen": 1,
    "fusion_within_segments": "no",
    "micro_batches": 2.0,
    "profile_steps": 3.0,
}


def test_every_option_has_a_type_check():
    fields = {f.name for f in dataclasses.fields(GraphschedConfig)}
    missing = fields - set(BAD_TYPES)
    assert not missing, f"add a bad value for {missing} here and a check in config.py"


@pytest.mark.parametrize("name", sorted(BAD_TYPES))
def test_an_option_of_the_wrong_type_is_refused_naming_it(name):
    with pytest.raises(ConfigError, match=name):
        graphsched.wrap(nn.Linear(2, 2), **{name: BAD_TYPES[name]})


# -- solver (point 9) ----------------------------------------------------------------------------

def test_pulp_is_bounded_below_4_which_ships_no_cbc():
    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    reqs = [Requirement(line.strip()) for line in cfg["options"]["install_requires"].splitlines()
            if line.strip() and not line.strip().startswith("#")]
    pulp_req = next(r for r in reqs if r.name == "pulp")
    assert not pulp_req.specifier.contains("4.0") and not pulp_req.specifier.contains("4.2")
    assert pulp_req.specifier.contains("3.3.2")
    import pulp

    assert pulp_req.specifier.contains(pulp.__version__)
