"""A predicted chunking gain is checked against the clock before it is kept.

With ``chunks="auto"``, when chunking is predicted to pay, the chunked and the unchunked graph are
both compiled, run in turn for the first steps, timed, and the faster kept (the unchunked one
unless the other beats it by ``MIN_GAIN``); every rank runs rank 0's choice.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from graphsched.runtime.measured_choice import MIN_GAIN, MeasuredChoice, decide
from graphsched.testing import run_distributed


class _FakeClock:
    """Each variant's call takes a fixed time; marks are the running total."""

    def __init__(self) -> None:
        self.now = 0.0

    def mark(self) -> float:
        return self.now

    def seconds(self, a: float, b: float) -> float:
        return b - a


def _choice(cost: dict[str, float], trials: int = 3):
    clock = _FakeClock()
    calls: list[str] = []
    decided: list[str] = []

    def variant(name):
        def run(x):
            calls.append(name)
            clock.now += cost[name]
            return name

        return run

    choice = MeasuredChoice(
        {"chunked": variant("chunked"), "unchunked": variant("unchunked")}, "unchunked",
        torch.device("cpu"), share=lambda c: c, on_decided=lambda c, rec: decided.append(c),
        trials=trials, clock=clock,
    )
    return choice, calls, decided


def test_variants_alternate_then_the_faster_runs_alone():
    choice, calls, decided = _choice({"chunked": 0.8, "unchunked": 1.0}, trials=3)
    for _ in range(12):
        choice(None)
    # 2 untimed + 2 x 3 timed calls alternate; then the faster one only.
    assert calls[:8] == ["chunked", "unchunked"] * 4
    assert calls[8:] == ["chunked"] * 4
    assert decided == ["chunked"]
    # The first call of each variant (compilation) is not timed.
    samples = choice.record.samples
    assert samples["chunked"] == pytest.approx([0.8] * 3) and samples["unchunked"] == pytest.approx([1.0] * 3)


def test_a_slower_or_barely_faster_chunking_keeps_the_unchunked_graph():
    for chunked in (1.2, 1.0 - MIN_GAIN / 2):
        choice, calls, decided = _choice({"chunked": chunked, "unchunked": 1.0})
        for _ in range(10):
            choice(None)
        assert decided == ["unchunked"] and calls[-2:] == ["unchunked", "unchunked"]


def test_decide_takes_medians_and_prefers_the_preferred_on_ties():
    assert decide({"a": [1.0, 9.0, 1.0], "b": [2.0, 2.0, 2.0]}, "b") == "a"
    assert decide({"a": [1.0], "b": [1.0]}, "b") == "b"


def test_every_rank_runs_rank_0s_choice():
    decided = []
    choice = MeasuredChoice({"x": lambda: "x", "y": lambda: "y"}, "y", torch.device("cpu"),
                            share=lambda mine: "x", on_decided=lambda c, r: decided.append(c),
                            trials=1, is_rank0=False)
    out = [choice() for _ in range(6)]
    assert decided == ["x"] and out[4:] == ["x", "x"]


# -- end to end, two gloo ranks -----------------------------------------------------------------


def _auto_chunks_run(rank: int, world_size: int) -> dict:
    import graphsched
    from graphsched.analysis.commmodel import CommModel
    from graphsched.analysis.costmodel import DeviceSpec
    from graphsched.models import MoEGPT, get_preset, make_batch
    from graphsched.partition import chunking, costers

    # A slow link: chunking is predicted to pay, so the measured choice runs.
    chunking.default_coster = lambda config, device, comm=None: costers.AnalyticCoster(
        DeviceSpec.h100(), CommModel.analytic(1e8, 1e-6))
    config = get_preset("tiny").replace(top_k=2, capacity_factor=0.75, moe_dispatch="einsum")

    def build():
        torch.manual_seed(5)
        return MoEGPT(config, dist.group.WORLD)

    eager, wrapped = build(), graphsched.wrap(build(), chunks="auto", cost_model="analytic")
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    opt_w = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    worst = 0.0
    for step in range(11):
        idx, tgt = make_batch(config, 2, seed=step * 10 + rank)
        for opt in (opt_e, opt_w):
            opt.zero_grad(set_to_none=True)
        le, lw = eager(idx, tgt), wrapped(idx, tgt)
        le.backward()
        lw.backward()
        worst = max(worst, abs(le.item() - lw.item()),
                    *((pe.grad - pw.grad).abs().max().item() for pe, pw in zip(eager.parameters(), wrapped.parameters())))
        opt_e.step()
        opt_w.step()
    plans = graphsched.captured_plans(wrapped)
    choices = {n: p.options.get("chunk_choice", {}).get("chosen") for n, p in plans.items()}
    return {"worst": worst, "graphs": sorted(plans), "choices": choices,
            "chunked_predicted": any(int(d["k"]) > 1 for p in plans.values() for d in (p.options.get("chunks") or {}).values())}


@pytest.fixture(scope="module")
def auto_ranks():
    return run_distributed(_auto_chunks_run, world_size=2)


def test_measured_choice_trains_right_and_every_rank_keeps_one_variant(auto_ranks):
    first = auto_ranks[0]
    assert len(first["graphs"]) == 2  # the kept variant's forward and backward only
    chosen = set(first["choices"].values())
    assert len(chosen) == 1 and chosen <= {"chunked", "unchunked"}
    # The kept graphs are the chunked ones exactly when chunked was chosen.
    assert all(g.startswith("g0u.") == (chosen == {"unchunked"}) for g in first["graphs"])
    assert first["chunked_predicted"] == (chosen == {"chunked"})
    for r in auto_ranks:
        assert r["choices"] == first["choices"] and r["graphs"] == first["graphs"]
        assert r["worst"] <= 1e-5
