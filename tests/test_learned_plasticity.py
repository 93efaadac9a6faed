"""The learned-plasticity example (issue #14 item 8): PPO through SuperSuit on a continual task stream.

Tiny streams (2 tasks of 10 steps, 2 + 2 workers and the output agent) keep it fast; the
comparison itself is ``benchmarks/learned_plasticity.py``'s job.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import data_root

pytest.importorskip("supersuit")
pytest.importorskip("stable_baselines3")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("learned_plasticity", ROOT / "examples" / "learned_plasticity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(ex):
    return dataclasses.replace(
        ex.PlasticityConfig(), num_tasks=2, data_subset=320, batch_size=32, hidden=(20, 20), copies=2,
        timesteps=400, n_steps=20, ppo_batch_size=50, n_epochs=1, net_arch=[16], data_root=str(data_root()),
    )


def test_task_clock_extends_observations_within_their_space_and_pickles(ex, tiny):
    env = ex.make_env(tiny)
    obs, _ = env.reset(seed=3)
    agent = env.possible_agents[0]
    space = env.observation_space(agent)
    assert space.shape == (13,) and all(space.contains(o) for o in obs.values())
    assert all(np.array_equal(o[-2:], [0.0, 0.0]) for o in obs.values())
    zero = {a: np.zeros(1, np.float32) for a in env.possible_agents}
    for step in range(1, 13):
        obs, *_ = env.step(zero)
        assert np.allclose(obs[agent][-2:], [(step % 10) / 10, step / 20])  # 10 steps per task, 20 in all
        assert space.contains(obs[agent])
    copy = pickle.loads(pickle.dumps(env))  # SuperSuit's vector envs copy it by pickling
    a, *_ = env.step(zero)
    b, *_ = copy.step(zero)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert env.episode_seeds == copy.episode_seeds == [3]


def test_evaluation_applies_the_policy_and_the_fixed_rule_learns(ex, tiny):
    seed = ex.held_out_seeds(1)[0]
    fixed = ex.run_episode(tiny, ex.fixed_rule, seed)
    frozen = ex.run_episode(tiny, lambda obs: -np.ones((len(obs), 1), np.float32), seed)  # multiplier 0
    R_frozen = np.array(frozen["acc_matrix"])
    assert np.allclose(R_frozen, R_frozen[0])  # nothing ever changed: every row is the untrained row
    assert frozen["return"] == pytest.approx(R_frozen[0, 0] + R_frozen[0].mean())  # 2 stages: task 1, then both
    assert frozen["BWT"] == 0.0 and all(m == 0.0 for m in frozen["multiplier_by_layer"].values())
    assert all(m == 1.0 for m in fixed["multiplier_by_layer"].values())
    assert ex.run_episode(tiny, ex.constant_multiplier(0.0, tiny), seed)["acc_matrix"] == frozen["acc_matrix"]
    doubled = ex.run_episode(tiny, ex.constant_multiplier(2.0, tiny), seed)
    assert all(m == 2.0 for m in doubled["multiplier_by_layer"].values()) and doubled["acc_matrix"] != fixed["acc_matrix"]
    with pytest.raises(ValueError, match="multiplier=2.5"):
        ex.constant_multiplier(2.5, tiny)
    assert fixed["learning_acc"] > frozen["learning_acc"] + 0.1  # 10 Adam steps per task: about 0.28 vs 0.12
    # The fixed rule's episode is the env's own (scale_centered u = 0 is the strategy's step bit for bit).
    env = ex.make_env(tiny)
    env.reset(seed=seed)
    while env.agents:
        env.step({a: np.zeros(1, np.float32) for a in env.agents})
    assert np.array_equal(env.unwrapped.last_acc_matrix, np.array(fixed["acc_matrix"], np.float32))


def test_ppo_trains_a_shared_policy_and_held_out_sequences_are_checked(ex, tiny):
    model, trained_on = ex.train_policy(tiny, seed=0)
    assert model.num_timesteps >= tiny.timesteps
    assert len(trained_on) >= 2 * tiny.copies  # the seeded starts and the auto-reset episodes
    # Training returns (VecMonitor): a sum of 2 task-end mean accuracies per finished episode.
    assert model.return_curve and all(0.0 < r <= 2.0 for _, r in model.return_curve)
    held_out = ex.held_out_seeds(2)
    results = ex.evaluate(tiny, ex.ppo_policy(model), held_out, trained_on)
    assert [r["seed"] for r in results] == held_out
    for r in results:
        assert 0.0 <= r["ACC"] <= 1.0 and np.array(r["acc_matrix"]).shape == (3, 2)
        assert all(0.0 <= m <= 2.0 for m in r["multiplier_by_layer"].values())
    with pytest.raises(ValueError, match="were training episodes"):
        ex.evaluate(tiny, ex.fixed_rule, [sorted(trained_on)[0]], trained_on)
    # The same policy seed trains the same policy (SB3's generators and the env copies' seeds).
    again, seeds_again = ex.train_policy(tiny, seed=0)
    obs = np.random.default_rng(0).uniform(0, 1, (5, 13)).astype(np.float32)
    assert seeds_again == trained_on
    assert np.array_equal(model.predict(obs, deterministic=True)[0], again.predict(obs, deterministic=True)[0])
