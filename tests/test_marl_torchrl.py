"""The TorchRL multi-agent PPO example (issue #34 item 5): IPPO and MAPPO over the env's layer groups.

A tiny stream (2 permuted tasks of 10 steps, 2 + 2 workers and the output agent) and two collected
batches per policy keep it to seconds; the comparison itself is the example's ``main`` (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import data_root

pytest.importorskip("torchrl")

ROOT = Path(__file__).resolve().parent.parent
STATE_DIM = 5 * 11 + 2  # every agent's 11 signals and the task clock


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("marl_torchrl", ROOT / "examples" / "marl_torchrl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(ex):
    stream = dataclasses.replace(ex.lp.PlasticityConfig(), num_tasks=2, data_subset=320, batch_size=32, hidden=(20, 20),
                                 data_root=str(data_root()))
    # 2 batches of 20 env steps (one 20-step episode each) = 200 agent-steps; 2 minibatches per epoch.
    return ex.MarlConfig(stream=stream, timesteps=200, frames_per_batch=20, minibatch_frames=10, epochs=2, num_cells=16)


@pytest.fixture(autouse=True)
def _torch_threads():
    """One thread (instead of conftest's 2): the networks are tiny, and a second thread only adds
    synchronisation, tens of ms per env step on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(ex, tiny):
    threads = torch.get_num_threads()  # a module fixture: set up before the function-scoped one above
    torch.set_num_threads(1)
    try:
        return {algo: ex.train(tiny, algo, seed=0, progress=None) for algo in ex.ALGOS}
    finally:
        torch.set_num_threads(threads)


def initial_modules(ex, tiny, algo):
    """The actors and critics ``train`` starts from (same seed, same construction order)."""
    torch.manual_seed(0)
    env, _ = ex.make_env(tiny, 0)
    actors = {g: ex.make_actor(env, g, tiny) for g in env.group_map}
    critics = {g: ex.make_critic(env, g, tiny, algo) for g in env.group_map}
    return actors, critics


def test_the_global_state_carries_every_agents_signals_and_the_clock(ex, tiny):
    env, par = ex.make_env(tiny, 0)
    assert list(env.group_map) == ["layer_1", "layer_2", "output"]
    assert env.full_observation_spec["state"].shape == (STATE_DIM,)
    td = env.reset()
    inner = par.unwrapped
    assert torch.equal(td["state"][:-2], torch.as_tensor(inner.state()))
    assert td["state"][-2:].tolist() == [0.0, 0.0]  # the clock at the start
    td = env.rollout(13, break_when_any_done=False)
    assert np.allclose(td["next", "state"][-1, -2:].numpy(), [3 / 10, 13 / 20])  # step 13: 3 into task 2, 13 of 20
    for group, agents in env.group_map.items():  # each agent's own observation sits in the state, in agent order
        for j, agent in enumerate(agents):
            i = par.possible_agents.index(agent)
            assert torch.equal(td["next", group, "observation"][-1, j, :11], td["next", "state"][-1, 11 * i : 11 * (i + 1)])
    assert par.state_space.contains(par.state())


@pytest.mark.parametrize("algo", ["ippo", "mappo"])
def test_multi_agent_ppo_trains_through_torchrls_collector_and_loss(ex, tiny, trained, algo):
    from torchrl.objectives import ClipPPOLoss
    from torchrl.objectives.value import GAE

    t = trained[algo]
    assert t.frames == 40  # two batches from the collector
    assert set(t.losses) == {"layer_1", "layer_2", "output"}
    assert all(isinstance(l, ClipPPOLoss) and isinstance(l.value_estimator, GAE) for l in t.losses.values())
    assert len(t.log) == 2 and all(np.isfinite(v) for entry in t.log for v in entry.values())
    assert {k.split("/")[1] for k in t.log[-1]} == {"loss_objective", "loss_critic"}
    # Every episode finished in a batch paid two task-end rewards (each a mean accuracy): return in (0, 2].
    assert len(t.return_curve) == 2 and all(0.0 < r <= 2.0 for _, r in t.return_curve)
    assert len(t.episode_seeds) >= 2
    # PPO's updates moved every group's actor and critic.
    actors, critics = initial_modules(ex, tiny, algo)
    for g in t.actors:
        for before, after in ((actors[g], t.actors[g]), (critics[g], t.critics[g])):
            pairs = list(zip(before.parameters(), after.parameters()))
            assert pairs and any(not torch.equal(a, b) for a, b in pairs)


def test_mappos_critic_reads_the_global_state_and_ippos_each_observation(trained):
    from tensordict import TensorDict

    obs = {g: torch.rand(7, len(a), 13) for g, a in trained["ippo"].group_map.items()}
    state = torch.rand(7, STATE_DIM)
    for g, agents in trained["mappo"].group_map.items():
        critic = trained["mappo"].critics[g]
        assert critic.in_keys == ["state"]
        value = critic(TensorDict({"state": state}, batch_size=[7]))[g, "state_value"]
        assert value.shape == (7, len(agents), 1)
        other = critic(TensorDict({"state": state.flip(0)}, batch_size=[7]))[g, "state_value"]
        assert torch.allclose(other, value.flip(0), atol=1e-5) and not torch.allclose(other, value, atol=1e-3)  # read from the state
        with pytest.raises(Exception):
            critic(TensorDict({"state": torch.rand(7, STATE_DIM - 2)}, batch_size=[7]))  # the clock-less state: wrong width

        ippo = trained["ippo"].critics[g]
        assert ippo.in_keys == [(g, "observation")]
        value = ippo(TensorDict({(g, "observation"): obs[g]}, batch_size=[7]))[g, "state_value"]
        assert value.shape == (7, len(agents), 1)


def test_evaluation_runs_the_deterministic_actors_on_held_out_sequences(ex, tiny, trained):
    t = trained["mappo"]
    policy = ex.torchrl_policy(t)
    obs = np.random.default_rng(0).uniform(0, 1, (5, 13)).astype(np.float32)
    u = policy(obs)
    assert u.shape == (5, 1) and np.all(np.abs(u) <= 1) and np.array_equal(u, policy(obs))  # deterministic
    # Each group's actor acts for its own agents: changing the output agent's observation moves its action only.
    moved = obs.copy()
    moved[4] = 1 - moved[4]
    v = policy(moved)
    assert np.array_equal(u[:4], v[:4]) and not np.array_equal(u[4], v[4])
    held_out = ex.lp.held_out_seeds(1)
    runs = ex.evaluate(tiny, t, held_out)
    assert len(runs) == 1 and set(runs[0]) >= {"seed", "acc_matrix", "ACC", "BWT", "forgetting", "learning_acc", "return",
                                                "multiplier_by_layer"}
    assert runs[0]["seed"] == held_out[0] and np.array(runs[0]["acc_matrix"]).shape == (3, 2)
    assert all(0.0 <= m <= 2.0 for m in runs[0]["multiplier_by_layer"].values())
    with pytest.raises(ValueError, match="were training episodes"):
        ex.evaluate(tiny, t, [sorted(t.episode_seeds)[0]])
    fixed = ex.lp.evaluate(tiny.stream, ex.lp.fixed_rule, held_out)
    assert "MAPPO (TorchRL)" in ex.table(fixed, {"mappo": {0: runs}})
