"""``wrap(model, micro_batches=k)``: k micro-batches in one captured step.

The oracle is eager run on the same micro-batches (gradient accumulation's semantics, see
graphsched/microbatch.py). One distributed run (2 gloo ranks) trains the reference model with the
aten executor and with inductor code generation and returns what the tests assert on; the split,
the join and the option's errors are tested without a process group.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphsched.analysis.graph import is_random
from graphsched.config import GraphschedConfig
from graphsched.errors import ConfigError
from graphsched.microbatch import combine_outputs, micro_batched, split_call
from graphsched.testing import run_distributed
from graphsched.testing.microbatch_checks import micro_batch_checks

# --- split and join, no process group ------------------------------------------------------------


def test_batch_first_tensors_are_split_and_every_other_argument_is_shared():
    idx = torch.arange(12).reshape(4, 3)
    table = torch.ones(5, 3)  # dim 0 is not the batch: every micro-batch gets all of it
    calls = split_call((idx, table), {"scale": 2.0, "mask": idx > 3}, 2)
    assert len(calls) == 2
    (a0, t0), kw0 = calls[0]
    (a1, t1), kw1 = calls[1]
    assert torch.equal(a0, idx[:2]) and torch.equal(a1, idx[2:])
    assert t0 is table and t1 is table
    assert kw0["scale"] == kw1["scale"] == 2.0
    assert torch.equal(kw1["mask"], (idx > 3)[2:])


def test_scalars_are_averaged_batch_first_tensors_joined_and_constants_kept():
    out = combine_outputs([
        (torch.tensor(1.0), torch.zeros(2, 3), None, 7),
        (torch.tensor(3.0), torch.ones(2, 3), None, 7),
    ])
    loss, logits, nothing, constant = out
    assert loss.item() == 2.0
    assert torch.equal(logits, torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]))
    assert nothing is None and constant == 7


def test_a_mean_loss_over_equal_micro_batches_is_the_full_batch_mean():
    x = torch.randn(8, 5)
    target = torch.randint(0, 5, (8,))
    split_loss = micro_batched(lambda a, b: F.cross_entropy(a, b), 4)(x, target)
    torch.testing.assert_close(split_loss, F.cross_entropy(x, target))


def test_outputs_it_cannot_combine_and_batches_it_cannot_split_are_refused_naming_the_fix():
    with pytest.raises(ConfigError, match="does not divide the batch of 3"):
        split_call((torch.zeros(3, 2),), {}, 2)
    with pytest.raises(ConfigError, match="needs a tensor argument with a batch dimension"):
        split_call((2.0,), {}, 2)
    with pytest.raises(ConfigError, match="cannot combine"):
        combine_outputs([(1,), (2,)])
    with pytest.raises(ConfigError, match="micro_batches=0"):
        GraphschedConfig(micro_batches=0)
    with pytest.raises(ConfigError, match="micro_batches"):
        GraphschedConfig(micro_batches=2.0)
    assert GraphschedConfig().micro_batches == 1


def test_attention_without_dropout_is_not_an_ordered_random_op():
    # Tagged as seeded for its dropout; chaining it in captured order tied every micro-batch's
    # attention (and all-to-alls) to the micro-batch before.
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert torch.Tag.nondeterministic_seeded in op.tags

    def attention_node(*args, **kwargs):
        graph = torch.fx.Graph()
        q = graph.placeholder("q")
        return graph.call_function(op, (q, q, q, *args), kwargs)

    assert not is_random(attention_node())  # dropout_p's default: 0.0
    assert not is_random(attention_node(0.0))
    assert not is_random(attention_node(dropout_p=0.0, is_causal=True))
    assert is_random(attention_node(0.1))
    assert is_random(attention_node(dropout_p=0.5))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    assert is_random(graph.call_function(torch.ops.aten.native_dropout.default, (x, 0.5, True)))


# --- two gloo ranks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
        return run_distributed(
            micro_batch_checks, world_size=2, args=(str(tmp_path_factory.mktemp("mb")),), timeout_s=600,
        )


@pytest.mark.parametrize("codegen", ["aten", "inductor"])
def test_micro_batched_steps_are_bitwise_equal_to_eager_on_the_same_micro_batches(runs, codegen):
    for per_rank in runs:
        r = per_rank[codegen]
        assert r["fallbacks"] == {}
        assert set(r["codegen"].values()) == {codegen}
        for step in r["steps"]:
            assert step["losses_equal"], step["losses"]
            assert step["grads_same_names"]
            assert step["grads_bitwise_equal"], step["max_grad_diff"]
        assert r["params_bitwise_equal_after"]


@pytest.mark.parametrize("codegen", ["aten", "inductor"])
def test_the_second_micro_batch_goes_on_the_wire_before_the_first_ones_next_all_to_all(runs, codegen):
    # One MoE layer per micro-batch: captured order is [mb0 dispatch, mb0 combine, mb1 dispatch,
    # mb1 combine]; on a slow link the plan sends mb1's dispatch while mb0's experts compute.
    for per_rank in runs:
        orders = per_rank[codegen]["orders"]
        forward = next(o for o in orders.values() if o["kind"] == "forward")
        mb0_dispatch, mb0_combine, mb1_dispatch, _ = forward["captured"]
        planned = forward["planned"]
        assert planned.index(mb1_dispatch) < planned.index(mb0_combine), planned
        if codegen == "inductor":
            # The code launches the collectives in the plan's order (not inductor's captured one).
            assert forward["emitted"] == planned


def test_every_rank_planned_the_same_collective_order(runs):
    for codegen in ("aten", "inductor"):
        assert runs[0][codegen]["orders"] == runs[1][codegen]["orders"]


def test_auto_measures_one_and_two_micro_batches_then_every_rank_runs_rank_zeros_choice(runs):
    chosen = {per_rank["auto"]["chosen"] for per_rank in runs}
    assert len(chosen) == 1 and chosen <= {"1", "2"}
    for per_rank in runs:
        r = per_rank["auto"]
        assert r["timed"] == {"1": 3, "2": 3}  # the first call of each compiles: not timed
        assert {row["k"] for row in r["steps"][:2]} == {1, 2}
        for row in r["steps"]:  # every call right for the micro-batches it ran
            assert row["losses_equal"] and row["grads_bitwise_equal"], row
        assert 'micro_batches="auto"' in r["explain"]


def test_auto_runs_one_micro_batch_when_the_batch_does_not_split():
    import warnings

    import graphsched
    from graphsched.models import MoEGPT, get_preset, make_batch

    config = get_preset("tiny").replace(n_layers=1)
    model = graphsched.wrap(MoEGPT(config), micro_batches="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(*make_batch(config, 3, seed=0)).backward()
    texts = [str(w.message) for w in caught if "micro_batches" in str(w.message)]
    assert len(texts) == 1 and "multiple of 2" in texts[0]
