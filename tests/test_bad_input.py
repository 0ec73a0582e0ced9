"""Bad input gets a clear error naming the fix; what graphsched cannot handle runs unscheduled."""

import warnings

import pytest
import torch
import torch.nn as nn

import graphsched
from graphsched import ConfigError, GraphschedConfig, GraphschedError, GraphschedFallbackWarning
from graphsched.testing import run_distributed
from graphsched.testing.bad_input import changed_process_group


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"schedule": "fastest"}, "use one of"),
        ({"max_chunks": 0}, "must be an integer in 1..64"),
        ({"solver_time_limit_s": -1}, "must be > 0"),
        ({"no_such_option": 1}, "known options are"),
    ],
)
def test_bad_config_values_name_the_fix(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        GraphschedConfig.from_options(**options)
    with pytest.raises(ConfigError, match=fragment):
        graphsched.wrap(nn.Linear(2, 2), **options)


def test_experts_not_divisible_by_world_size_names_the_fix():
    from graphsched.models.moe import check_expert_split

    with pytest.raises(ConfigError, match="multiple of"):
        check_expert_split(num_experts=4, ep_size=3)


def test_wrap_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        graphsched.wrap(lambda x: x)


def test_explain_before_any_step_says_what_to_do():
    model = graphsched.wrap(nn.Linear(2, 2))
    with pytest.raises(GraphschedError, match="run one forward"):
        graphsched.explain(model, file=None)
    with pytest.raises(GraphschedError, match="graphsched.wrap"):
        graphsched.explain(nn.Linear(2, 2), file=None)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).sum()


def _train(model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss = model(x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def test_model_without_collectives_wraps_and_trains_unchanged():
    torch.manual_seed(0)
    eager = Plain()
    torch.manual_seed(0)
    wrapped = graphsched.wrap(Plain())
    keys = list(wrapped.state_dict())
    l1, p1 = _train(eager)
    l2, p2 = _train(wrapped)
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert list(wrapped.state_dict()) == keys == list(eager.state_dict())
    report = graphsched.explain(wrapped, file=None)
    assert "collectives: 0" in report


def test_analysis_failure_falls_back_with_one_warning_and_right_numbers():
    def broken_cost(node):
        raise RuntimeError("cannot cost this node")

    torch.manual_seed(0)
    eager = Plain()
    torch.manual_seed(0)
    wrapped = graphsched.wrap(Plain(), cost_fn=broken_cost)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        l2, p2 = _train(wrapped)
    fallbacks = [w for w in caught if issubclass(w.category, GraphschedFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
    assert "runs unscheduled" in str(fallbacks[0].message)
    l1, p1 = _train(eager)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_new_input_shape_recompiles_instead_of_failing():
    torch.manual_seed(0)
    model = graphsched.wrap(Plain())
    for batch in (4, 6):
        model(torch.randn(batch, 8)).backward()
    forwards = [g for g in graphsched.api.state_of(model).capture.graphs if g.name.endswith("forward")]
    assert len(forwards) == 2


def test_calling_under_another_process_group_raises_with_the_fix():
    outcomes = run_distributed(changed_process_group, world_size=2)
    for o in outcomes:
        assert "other process groups" in o["error"]
        assert "graphsched.wrap again" in o["error"]
