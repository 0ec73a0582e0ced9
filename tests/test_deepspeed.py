"""DeepSpeed integration: capturable DeepSpeed MoE layers, training parity, checkpoints, the recipe.

Single-process checks run first (capacity replication, class swap, refused options). Then one spawn
of 2 gloo ranks: a model holding two ``deepspeed.moe.layer.MoE(ep_size=2)`` layers is trained for 3
ZeRO-1 steps unwrapped and wrapped by graphsched; losses and parameters must be bitwise equal (the
wrapped model runs the same ops in the same order). Checkpoints saved by either load into the other
with bitwise equal parameters, and the recipe trains a couple of steps with and without graphsched.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed (pip install deepspeed)", allow_module_level=True)

from graphsched.errors import ConfigError  # noqa: E402
from graphsched.testing import run_distributed  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "train_moe_gpt_deepspeed.py"
D_MODEL = 16
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_on_cpu():
    """DeepSpeed picks its accelerator at import. The 2 ranks use NCCL only with 2 GPUs (as
    run_distributed does), else gloo on CPU: tell DeepSpeed so (the spawned ranks inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        if torch.cuda.device_count() < 2:
            mp.setenv("DS_ACCELERATOR", "cpu")
        yield


class ToyMoENet(nn.Module):
    """Linear -> DeepSpeed MoE (top-1, random token selection) -> MoE (top-2) -> Linear -> loss."""

    def __init__(self, ep_size: int, **moe_options) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        def expert() -> nn.Module:
            return nn.Sequential(nn.Linear(D_MODEL, 32), nn.GELU(), nn.Linear(32, D_MODEL))

        self.inp = nn.Linear(D_MODEL, D_MODEL)
        options = dict(num_experts=4, ep_size=ep_size, min_capacity=2)
        options.update(moe_options)
        self.moe1 = MoE(D_MODEL, expert(), k=1, use_rts=True, **options)
        self.moe2 = MoE(D_MODEL, expert(), k=2, top2_2nd_expert_sampling=False, **options)
        self.out = nn.Linear(D_MODEL, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h, aux1, _ = self.moe1(h)
        h, aux2, _ = self.moe2(torch.relu(h))
        logits = self.out(h).reshape(-1, 8)
        return nn.functional.cross_entropy(logits, y.reshape(-1)) + 0.01 * (aux1 + aux2)


# ---------------------------------------------------------------- single process


def test_static_capacity_equals_deepspeeds_capacity_bit_for_bit():
    from deepspeed.moe.sharded_moe import _capacity

    from graphsched.integrations.deepspeed_moe import static_capacity

    rng = random.Random(0)
    factors = [0.1, 0.5, 1.0, 1.1, 1.2, 1.25, 1.5, 2.0, 2.2, 2.5] + [rng.uniform(0.01, 4) for _ in range(40)]
    checked = 0
    for tokens in (1, 7, 16, 20, 100, 1024, 12345):
        for experts in (1, 2, 3, 4, 8, 64):
            for factor in factors:
                for min_capacity in (0, 4):
                    expected = int(_capacity(torch.zeros(tokens, experts), torch.tensor(factor),
                                             torch.tensor(min_capacity)))
                    assert static_capacity(tokens, experts, factor, min_capacity) == expected, (
                        tokens, experts, factor, min_capacity)
                    checked += 1
    assert checked == 7 * 6 * 50 * 2


def _single_moe(**options) -> nn.Module:
    from deepspeed.moe.layer import MoE

    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(D_MODEL, 32), nn.GELU(), nn.Linear(32, D_MODEL))
    defaults = dict(num_experts=4, ep_size=1, k=1, use_rts=False, min_capacity=2)
    defaults.update(options)
    return MoE(D_MODEL, expert, **defaults)


def test_make_capturable_switches_layers_in_place_and_keeps_parameters():
    from deepspeed.moe.sharded_moe import MOELayer, TopKGate

    from graphsched.integrations.deepspeed_moe import (
        CapturableMOELayer,
        CapturableTopKGate,
        make_capturable,
        restore,
    )

    model = nn.Sequential(_single_moe(), _single_moe(k=2, top2_2nd_expert_sampling=False))
    keys = list(model.state_dict())
    params = list(model.parameters())
    assert make_capturable(model) == 2
    layer = model[0].deepspeed_moe
    assert type(layer) is CapturableMOELayer and isinstance(layer, MOELayer)
    assert type(layer.gate) is CapturableTopKGate and isinstance(layer.gate, TopKGate)
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert make_capturable(model) == 2  # idempotent
    assert restore(model) == 2
    assert type(model[0].deepspeed_moe) is MOELayer and type(model[1].deepspeed_moe.gate) is TopKGate


def test_capturable_layer_matches_deepspeed_and_compiles_to_one_graph():
    """ep_size=1 (no collective): same outputs as DeepSpeed's layer, and one graph, no graph break."""
    from graphsched.integrations.deepspeed_moe import make_capturable

    for k in (1, 2, 3):
        reference = _single_moe(k=k, top2_2nd_expert_sampling=False)
        capturable = _single_moe(k=k, top2_2nd_expert_sampling=False)
        make_capturable(capturable)
        graphs = []

        def count_graphs(gm, example_inputs):
            graphs.append(gm)
            return gm

        compiled = torch.compile(capturable, backend=count_graphs, fullgraph=False)
        for training in (True, False):
            reference.train(training)
            capturable.train(training)
            x = torch.randn(2, 12, D_MODEL)
            expected = reference(x)
            assert torch.equal(capturable(x)[0], expected[0])
            got = compiled(x)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert len(graphs) == 2, f"k={k}: one graph per mode (train, eval), got {len(graphs)}"
        torch._dynamo.reset()


@pytest.mark.parametrize(
    "options, fix",
    [
        ({"drop_tokens": False}, "drop_tokens=True"),
        ({"use_rts": True}, "use_rts=False"),
        ({"noisy_gate_policy": "RSample"}, "noisy_gate_policy=None"),
        ({"k": 2, "top2_2nd_expert_sampling": True}, "top2_2nd_expert_sampling=False"),
        ({"enable_expert_tensor_parallelism": True}, "enable_expert_tensor_parallelism=False"),
    ],
)
def test_unsupported_options_raise_config_error_naming_the_fix(options, fix):
    from deepspeed.moe.sharded_moe import MOELayer

    from graphsched.integrations.deepspeed_moe import make_capturable

    model = _single_moe(**options)
    with pytest.raises(ConfigError, match=fix.replace("(", r"\(")):
        make_capturable(model)
    assert type(model.deepspeed_moe) is MOELayer  # nothing changed


def test_engine_timers_and_tutel_are_refused():
    from graphsched.integrations.deepspeed_moe import make_capturable

    model = _single_moe()
    model.deepspeed_moe.wall_clock_breakdown = True  # what deepspeed.initialize does for the config flag
    with pytest.raises(ConfigError, match='"wall_clock_breakdown": false'):
        make_capturable(model)
    model = _single_moe()
    model.deepspeed_moe.use_tutel = True
    with pytest.raises(ConfigError, match="use_tutel=False"):
        make_capturable(model)


def test_random_gating_is_accepted_when_the_schedule_keeps_the_captured_order():
    from graphsched.integrations.deepspeed_moe import make_capturable

    assert make_capturable(_single_moe(use_rts=True, noisy_gate_policy="Jitter"), allow_random_gating=True) == 1


def test_prepare_for_capture_leaves_other_models_alone():
    from graphsched.integrations import inner_module, prepare_for_capture

    model = nn.Sequential(nn.Linear(4, 4))
    assert prepare_for_capture(model) == 0
    assert inner_module(model) is model


# ---------------------------------------------------------------- two gloo ranks, one spawn


def _engine(ep_size: int, seed: int, wrap: bool, **wrap_options):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from graphsched.integrations.deepspeed_moe import wrap_deepspeed_moe

    torch.manual_seed(seed)
    model = ToyMoENet(ep_size)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}, "steps_per_print": 10**6}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2), config=config)
    if wrap:
        wrap_deepspeed_moe(engine, **wrap_options)
    return engine


def _train(engine, rank: int, steps: int, first_step: int = 0) -> list[float]:
    torch.manual_seed(1000 + 17 * first_step + rank)  # random token selection draws from here
    losses = []
    for step in range(first_step, first_step + steps):
        gen = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(2, 8, D_MODEL, generator=gen).to(engine.device)
        y = torch.randint(0, 8, (2, 8), generator=gen).to(engine.device)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _params(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _load_recipe():
    # recipes/ is a folder of scripts, not a package: load the file as a module (registered, so that
    # its dataclasses resolve their own module).
    spec = importlib.util.spec_from_file_location("train_moe_gpt_deepspeed", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _distributed_checks(rank: int, world_size: int, tmp: str) -> dict:
    import deepspeed

    import graphsched

    deepspeed.init_distributed()
    out: dict = {}

    plain = _engine(world_size, seed=0, wrap=False)
    out["plain_losses"] = _train(plain, rank, STEPS)
    plain.save_checkpoint(os.path.join(tmp, "plain"), tag="s3")
    plain_params = _params(plain)

    wrapped = _engine(world_size, seed=0, wrap=True)
    out["wrapped_losses"] = _train(wrapped, rank, STEPS)
    wrapped.save_checkpoint(os.path.join(tmp, "wrapped"), tag="s3")
    wrapped_params = _params(wrapped)
    out["params_equal_after_training"] = _same(plain_params, wrapped_params)
    out["graphs"] = [
        (g.name, g.fallback_reason, sum(1 for n in g.gm.graph.nodes if "all_to_all_single" in str(n.target)))
        for g in graphsched.api.state_of(wrapped.module).capture.graphs
    ]

    # A checkpoint saved unwrapped loads into a wrapped engine, and the other way round.
    into_wrapped = _engine(world_size, seed=1, wrap=True)
    into_wrapped.load_checkpoint(os.path.join(tmp, "plain"), tag="s3")
    out["plain_ckpt_into_wrapped"] = _same(_params(into_wrapped), plain_params)
    into_plain = _engine(world_size, seed=1, wrap=False)
    into_plain.load_checkpoint(os.path.join(tmp, "wrapped"), tag="s3")
    out["wrapped_ckpt_into_plain"] = _same(_params(into_plain), wrapped_params)
    # Training goes on identically from either (optimizer states were restored too).
    out["resumed_losses"] = (_train(into_wrapped, rank, 1, STEPS), _train(into_plain, rank, 1, STEPS))

    try:
        _engine(world_size, seed=0, wrap=True, fullgraph=True)
        out["fullgraph_error"] = None
    except ConfigError as exc:
        out["fullgraph_error"] = str(exc)

    recipe = _load_recipe()
    save = os.path.join(tmp, "recipe")
    on = recipe.main(["--steps", "2", "--quiet", "--save-dir", save])
    off = recipe.main(["--steps", "2", "--quiet", "--no-graphsched"])
    resumed = recipe.main(["--steps", "1", "--quiet", "--load-dir", save])
    out["recipe"] = ([(r.step, r.loss) for r in on], [(r.step, r.loss) for r in off],
                     [(r.step, r.loss) for r in resumed])
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("deepspeed"))
    return run_distributed(_distributed_checks, world_size=2, args=(tmp,), timeout_s=240)


def test_wrapped_training_is_bitwise_equal_to_deepspeed(results):
    for r in results:
        assert len(r["wrapped_losses"]) == STEPS
        assert r["wrapped_losses"] == r["plain_losses"]  # exact float equality
        assert r["params_equal_after_training"]


def test_each_graph_holds_all_four_all_to_alls(results):
    """Two MoE layers, two all-to-alls each, in one forward and one backward graph."""
    graphs = results[0]["graphs"]
    counts = {name.rsplit(".", 1)[1]: n for name, _, n in graphs if n}
    assert counts == {"forward": 4, "backward": 4}, graphs


def test_backward_graph_runs_under_a_plan(results):
    reasons = {name: reason for name, reason, n in results[0]["graphs"] if n}
    assert [reasons[name] for name in reasons if name.endswith(".backward")] == [None]


def test_forward_graph_with_top2_gating_runs_under_a_plan(results):
    reasons = {name: reason for name, reason, n in results[0]["graphs"] if n}
    assert [reasons[name] for name in reasons if name.endswith(".forward")] == [None]


def test_checkpoints_load_across_wrapped_and_unwrapped(results):
    for r in results:
        assert r["plain_ckpt_into_wrapped"]
        assert r["wrapped_ckpt_into_plain"]
        from_plain, from_wrapped = r["resumed_losses"]
        assert from_plain == from_wrapped


def test_fullgraph_under_the_engine_is_refused_with_the_fix(results):
    assert "fullgraph=False" in results[0]["fullgraph_error"]


def test_recipe_trains_with_and_without_graphsched_and_resumes(results):
    on, off, resumed = results[0]["recipe"]
    assert [s for s, _ in on] == [1, 2] and [s for s, _ in resumed] == [3]
    assert all(math.isfinite(loss) for _, loss in on + resumed)
    assert on == off
    assert results[0]["recipe"] == results[1]["recipe"]  # every rank logs the all-reduced loss
