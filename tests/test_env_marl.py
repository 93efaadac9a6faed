"""neural_collective_v0 inside the MARL libraries that consume PettingZoo envs:
SuperSuit's vector envs feeding Stable-Baselines3's PPO, and TorchRL's ``PettingZooWrapper``.

The libraries come with the ``marl`` extra (``pip install -e ".[dev,marl]"``, what ``make setup``
installs); ``importorskip`` only guards a bare checkout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs import neural_collective_v0
from tests.conftest import data_root

# A tiny network (2 + 2 workers and the output agent) on a small subset: each env step is cheap.
TINY = dict(hidden=(20, 20), data_subset=320, batch_size=32, data_root=str(data_root()))


def ObservationLog(venv):
    """An SB3 vector-env wrapper counting the vector steps taken and keeping every observation handed on."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class Log(VecEnvWrapper):
        def __init__(self, venv) -> None:
            super().__init__(venv)
            self.steps, self.observations = 0, []

        def reset(self):
            obs = self.venv.reset()
            self.observations.append(obs.copy())
            return obs

        def step_wait(self):
            obs, rewards, dones, infos = self.venv.step_wait()
            self.steps += 1
            self.observations.append(obs.copy())
            return obs, rewards, dones, infos

    return Log(venv)


def test_supersuit_vector_env_feeds_sb3_ppo():
    ss = pytest.importorskip("supersuit")
    sb3 = pytest.importorskip("stable_baselines3")

    par = neural_collective_v0.parallel_env(action_mode="scale_centered", max_cycles=6, epochs=5, **TINY)
    vec = ss.pettingzoo_env_to_vec_env_v1(par)  # one vector slot per agent (all share their spaces)
    vec = ss.concat_vec_envs_v1(vec, 2, num_cpus=0, base_class="stable_baselines3")  # copies the env by pickling
    assert vec.num_envs == 2 * par.num_workers
    # The copies are exact clones (same seed stream); seed them apart once: copy i gets seed 0 + i,
    # and every later (unseeded) reset draws from its own stream. SB3's seed=... cannot reach them:
    # SuperSuit's SB3 wrapper forwards VecEnv.seed to a ConcatVecEnv that has none (a library gap).
    vec.venv.reset(seed=0)
    seen = ObservationLog(vec)
    model = sb3.PPO("MlpPolicy", seen, n_steps=8, batch_size=40, n_epochs=1, device="cpu", policy_kwargs=dict(net_arch=[16]))
    initial = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=240)  # 3 rollouts of 8 vector steps, 24 env steps per copy: four auto-resets each
    # What SB3 consumed: exactly the env's steps (24 of the 10-slot vector env: 240 agent transitions) ...
    assert seen.steps == 24 and len(seen.observations) == 1 + 24
    # ... its last rollout holds the observations the env returned before each of steps 17-24 (the
    # buffer keeps them env-major after training: SB3's swap_and_flatten) ...
    rollout = np.stack(seen.observations[16:24]).swapaxes(0, 1).reshape(-1, neural_collective_v0.OBS_DIM)
    assert np.array_equal(model.rollout_buffer.observations.reshape(rollout.shape), rollout)
    # ... and what it learned from them: PPO's update moved the policy.
    assert any(not torch.equal(a, b) for a, b in zip(initial, model.policy.parameters()))
    # Auto-resets draw new episodes from each copy's own seed stream, and the copies differ.
    copies = vec.venv.vec_envs
    seeds = [c.par_env.unwrapped.episode_seed for c in copies]
    assert len(set(seeds)) == len(seeds)
    obs = vec.reset()
    assert obs.shape == (2 * par.num_workers, neural_collective_v0.OBS_DIM) and np.all(np.abs(obs) <= 1)


@pytest.mark.parametrize("action_mode", ["scale", "delta"])
def test_torchrl_wrapper_specs_and_rollout(action_mode):
    pytest.importorskip("torchrl")
    from torchrl.envs.libs.pettingzoo import PettingZooWrapper
    from torchrl.envs.utils import check_env_specs

    par = neural_collective_v0.parallel_env(action_mode=action_mode, max_cycles=4, **TINY)
    group_map = par.group_map if action_mode == "delta" else None  # default: every worker_<i> in one group
    env = PettingZooWrapper(env=par, return_state=True, group_map=group_map, seed=0)
    groups = list(env.group_map)
    assert groups == (["layer_1", "layer_2", "output"] if action_mode == "delta" else ["worker"])
    check_env_specs(env, seed=0)
    rollout = env.rollout(10, break_when_any_done=False)  # across a truncation and its auto-reset
    assert rollout.batch_size == torch.Size([10])
    assert rollout["state"].shape == (10, par.num_workers * neural_collective_v0.OBS_DIM)
    for group in groups:
        agents = len(env.group_map[group])
        assert rollout[group, "observation"].shape == (10, agents, neural_collective_v0.OBS_DIM)
        assert rollout["next", group, "reward"].shape == (10, agents, 1)
        assert torch.isfinite(rollout["next", group, "reward"]).all()
        assert set(rollout["next", group, "info"].keys()) >= {"batch_loss", "batch_acc", "cycle", "layer", "index"}
    assert rollout["next", "done"].any()  # max_cycles=4 within 10 steps


#: A benchmark episode of 2 permuted tasks of 3 steps: task ends inside a rollout.
BENCH = dict(TINY, benchmark={"name": "pmnist_quick", "num_tasks": 2, "iterations_per_task": 3})


def test_torchrl_specs_and_rollout_with_a_benchmark():
    pytest.importorskip("torchrl")
    from torchrl.envs.libs.pettingzoo import PettingZooWrapper
    from torchrl.envs.utils import check_env_specs

    par = neural_collective_v0.parallel_env(reward="cooperative", **BENCH)
    env = PettingZooWrapper(env=par, return_state=True, seed=0)
    check_env_specs(env, seed=0)  # the (T+1, T) accuracy matrix with -1 fill stacks into a fixed spec
    rollout = env.rollout(8, break_when_any_done=False)  # the 6-step sequence ends and auto-resets
    info = rollout["next", "worker", "info"]
    assert info["acc_matrix"].shape == (8, par.num_workers, 3, 2)
    assert info["task"][:6, 0].flatten().tolist() == [0, 0, 0, 1, 1, 1]
    assert info["tasks_done"][:6, 0].flatten().tolist() == [0, 0, 1, 1, 1, 2]
    reward = rollout["next", "worker", "reward"][:, :, 0]
    assert torch.all(reward[2] > 0) and torch.all(reward[2] == reward[2, 0]) and torch.all(reward[:2] == 0)
    assert rollout["next", "done"][5].all()


def test_supersuit_vector_env_with_a_benchmark():
    ss = pytest.importorskip("supersuit")
    par = neural_collective_v0.parallel_env(**BENCH)
    vec = ss.concat_vec_envs_v1(ss.pettingzoo_env_to_vec_env_v1(par), 2, num_cpus=0, base_class="stable_baselines3")
    vec.venv.reset(seed=0)
    actions = np.ones((vec.num_envs, 1), np.float32)
    for step in range(6):
        _, rewards, dones, infos = vec.step(actions)
    assert dones.all() and len(infos) == vec.num_envs  # the sequence's end, then SB3-style auto-reset
    # SuperSuit hands on the auto-reset's infos (the next episode's row 0); the finished episode's
    # matrix stays on each copy.
    assert all(i["tasks_done"] == 0 and i["acc_matrix"].shape == (3, 2) and "terminal_observation" in i for i in infos)
    a, b = (c.par_env.unwrapped.last_acc_matrix for c in vec.venv.vec_envs)
    assert a.shape == (3, 2) and np.all(a >= 0) and not np.array_equal(a, b)  # copies seeded apart


def test_steps_under_a_callers_no_grad_train_as_usual():
    # TorchRL's collectors step the env inside torch.no_grad(); the step trains the network all the same.
    envs = [neural_collective_v0.parallel_env(max_cycles=4, **TINY) for _ in range(2)]
    for env in envs:
        env.reset(seed=0)
    actions = {a: np.full(1, 0.5, np.float32) for a in envs[0].possible_agents}
    before = [p.detach().clone() for p in envs[1].model.parameters()]
    for _ in range(3):
        plain = envs[0].step(actions)
        with torch.no_grad():
            quiet = envs[1].step(actions)
        for a in actions:
            assert np.array_equal(plain[0][a], quiet[0][a]) and plain[1][a] == quiet[1][a]
    assert all(torch.equal(p, q) for p, q in zip(envs[0].model.parameters(), envs[1].model.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(before, envs[1].model.parameters()))
