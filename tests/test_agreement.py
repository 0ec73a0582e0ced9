"""Ranks that disagree, die or are slow: a clear graphsched error on every rank, never a hang."""

import os

import pytest

from graphsched.testing import run_distributed
from graphsched.testing.agreement_checks import options_mismatch_cases, rank_dies_while_compiling

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    plan_path = str(tmp_path_factory.mktemp("agree") / "plans.json")
    return run_distributed(options_mismatch_cases, world_size=2, args=(plan_path, TIMEOUT_S), timeout_s=120)


@pytest.mark.parametrize("option", ["schedule", "chunks", "plan_file"])
def test_ranks_wrapped_with_different_options_raise_naming_the_option(cases, option):
    for rank, outcome in enumerate(cases):
        case = outcome[option]
        assert case["type"] == "PlanMismatchError", (rank, case)
        assert f"different options ({option})" in case["error"]
        assert "rank 0:" in case["error"] and "rank 1:" in case["error"]
        assert case["seconds"] < TIMEOUT_S  # at wrap, before anything waits


def test_ranks_with_different_input_shapes_raise_naming_the_shapes(cases):
    for outcome in cases:
        case = outcome["shapes"]
        assert case["type"] == "PlanMismatchError", case
        assert case["error"].startswith("graphsched: graph g0 was captured on the ranks with different input shapes")
        assert "int64[2, 16]" in case["error"] and "int64[3, 16]" in case["error"]
        assert "report a bug" not in case["error"]


def test_a_rank_slower_than_the_timeout_but_working_keeps_the_others_waiting(cases):
    for outcome in cases:
        assert outcome["slow"]["type"] is None, outcome["slow"]
    assert cases[0]["slow"]["seconds"] > 1.5 * TIMEOUT_S  # rank 0 did wait past the timeout


def test_a_rank_that_never_reaches_graphsched_is_reported_not_awaited(cases):
    case = cases[0]["absent"]
    assert case["type"] == "AgreementTimeoutError", case
    assert "'options'" in case["error"] and "rank 1: no sign of life" in case["error"]
    assert "agreement_timeout_s" in case["error"]
    assert case["seconds"] < TIMEOUT_S + 10


def test_a_rank_killed_while_compiling_makes_every_survivor_raise(tmp_path):
    with pytest.raises(RuntimeError, match="rank 1: exited with code 3"):
        run_distributed(rank_dies_while_compiling, world_size=2, args=(str(tmp_path), TIMEOUT_S), timeout_s=120)
    kind, seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 2)
    assert kind == "AgreementTimeoutError", message
    assert "rank 1: no sign of life" in message and "'verify'" in message
    assert float(seconds) < TIMEOUT_S + 20
    assert not os.path.exists(tmp_path / "rank1.txt")
