"""neural_collective_v0 hosting the continual benchmark: one episode is a whole
task stream run by the CLI's own :class:`~agentnet.session.Session`;
``infos`` carry the task index and the accuracy matrix so far; a cooperative reward option.

Tiny real-MNIST streams (320 training examples, 5 steps a task, 2000 test examples per task).
"""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from pettingzoo.test import api_test, parallel_api_test, seed_test
from pettingzoo.utils import parallel_to_aec

from agentnet.config import BenchmarkConfig, ConfigError
from agentnet.recipes import run_continual
from envs import neural_collective_v0
from tests.conftest import compose_config, data_root, without_timing

#: 3 permuted tasks of one pass over 320 examples (batch 64: 5 steps each, 15 in the episode).
BENCH = {"name": "pmnist_quick", "num_tasks": 3}
TINY = dict(hidden=(20, 20), data_subset=320, batch_size=64, data_root=str(data_root()), benchmark=BENCH)


def ones(env) -> dict[str, np.ndarray]:
    return {a: np.ones(1, np.float32) for a in env.agents}


def run_episode(env, seed: int):
    _, infos = env.reset(seed=seed)
    history = [(None, infos)]
    while env.agents:
        _, rewards, terms, truncs, infos = env.step(ones(env))
        history.append((rewards, infos))
    return history, terms, truncs


PROTECT = {"name": "attention", "mode": "protect", "protect_lambda": 100.0}


@pytest.mark.parametrize(("strategy", "cl"), [("lfnn", "none"), ("bp", "ewc"), (PROTECT, "none")])
def test_all_ones_episode_reproduces_the_cli_accuracy_matrix(strategy, cl, tmp_path):
    """Also for a strategy with task-end state (attention protect): the env's sequence tells it where tasks end."""
    env = neural_collective_v0.parallel_env(strategy=strategy, cl=cl, **TINY)
    history, terms, truncs = run_episode(env, seed=3)
    assert len(history) - 1 == env.max_cycles == 15 and all(terms.values()) and not any(truncs.values())

    # `agentnet benchmark=pmnist_quick strategy=... cl=...` with the env's network, data and seed.
    cfg = compose_config(
        "benchmark=pmnist_quick", "benchmark.num_tasks=3", f"cl={cl}",
        *([f"strategy={strategy}"] if isinstance(strategy, str) else
          ["strategy=attention", "strategy.mode=protect", "strategy.protect_lambda=100"]),
        "model.hidden=[20,20]", "model.worker_size=10", "data.subset=320", "data.test_subset=2000",
        "trainer.batch_size=64", "trainer.progress=false", "device=cpu", "seed=3",
        f"data.root={data_root()}", f"output_dir={tmp_path}",
    )
    metrics = run_continual(cfg, data=env._base_data)  # the env's MNIST, loaded as the CLI loads it (not twice)
    R = env.sequence.record.acc_matrices[0]
    assert R == metrics["acc_matrix"]  # exactly, every row
    final = history[-1][1]["worker_0"]["acc_matrix"]
    np.testing.assert_array_equal(final, np.asarray(metrics["acc_matrix"], np.float32))
    assert without_timing(env.trainer.history) == without_timing(metrics["history"])
    if strategy is PROTECT:  # every task end reached the strategy once (no hook missing, none doubled)
        assert env.strategy.protect.tasks == 3
    # ... and run_continual on the env's own RunConfig is the same run.
    env.run.output_dir = str(tmp_path / "same")
    assert run_continual(env.run, data=env._base_data)["acc_matrix"] == R


def test_infos_carry_task_index_and_accuracy_matrix_with_fixed_shapes():
    env = neural_collective_v0.parallel_env(**TINY)
    history, _, _ = run_episode(env, seed=0)
    keys = set(history[0][1]["worker_0"])
    assert {"task", "tasks_done", "acc_matrix", "batch_loss", "cycle"} <= keys
    for _, infos in history:
        assert set(infos) == set(env.possible_agents)
        assert all(set(i) == keys for i in infos.values())
        m = infos["worker_0"]["acc_matrix"]
        assert m.shape == (4, 3) and m.dtype == np.float32
    reset = history[0][1]["worker_0"]
    assert reset["task"] == 0 and reset["tasks_done"] == 0
    assert np.all((reset["acc_matrix"][0] > 0) & (reset["acc_matrix"][0] < 1))  # row 0: before training
    assert np.all(reset["acc_matrix"][1:] == neural_collective_v0.UNREACHED)
    tasks = [i["worker_0"]["task"] for _, i in history[1:]]
    done = [i["worker_0"]["tasks_done"] for _, i in history[1:]]
    assert tasks == [0] * 5 + [1] * 5 + [2] * 5
    assert done == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3]
    for (_, infos), d in zip(history[1:], done):
        m = infos["worker_0"]["acc_matrix"]
        assert np.all(m[: d + 1] >= 0) and np.all(m[d + 1 :] == neural_collective_v0.UNREACHED)
    final = history[-1][1]["worker_0"]["acc_matrix"]
    assert np.all((final >= 0) & (final <= 1)) and not np.array_equal(final[0], final[1])


def test_cooperative_reward_is_the_mean_accuracy_over_tasks_seen_paid_at_task_ends():
    coop = neural_collective_v0.parallel_env(reward="cooperative", reward_scale=2.0, **TINY)
    selfish = neural_collective_v0.parallel_env(**TINY)
    history, _, _ = run_episode(coop, seed=1)
    own, _, _ = run_episode(selfish, seed=1)
    R = history[-1][1]["worker_0"]["acc_matrix"]
    for step, ((rewards, infos), (own_rewards, _)) in enumerate(zip(history[1:], own[1:]), start=1):
        assert len(set(rewards.values())) == 1  # everyone gets the same
        value = rewards["worker_0"]
        if step % 5 == 0:  # task i = step // 5 ended: mean of R[i][0..i-1]
            i = step // 5
            assert value == pytest.approx(2.0 * float(np.mean(R[i, :i].astype(np.float64))), rel=1e-6) and value > 0
        else:
            assert value == 0.0
        assert any(r != 0 for r in own_rewards.values())  # self-interest: each agent's local objective
    # The reward does not change training.
    assert all(torch.equal(p, q) for p, q in zip(coop.model.parameters(), selfish.model.parameters()))


def test_max_cycles_is_the_sequence_length_and_can_only_truncate_it():
    env = neural_collective_v0.parallel_env(**TINY)
    assert env.max_cycles == env.stream_steps == 15
    short = neural_collective_v0.parallel_env(max_cycles=7, **TINY)
    history, terms, truncs = run_episode(short, seed=0)
    assert len(history) - 1 == 7 and all(truncs.values()) and not any(terms.values())
    m = history[-1][1]["worker_0"]["acc_matrix"]
    assert np.all(m[:2] >= 0) and np.all(m[2:] == neural_collective_v0.UNREACHED)  # task 1 done, task 2 cut
    with pytest.raises(ConfigError, match=r"^max_cycles=100: the benchmark's task sequence ends after 15 steps"):
        neural_collective_v0.parallel_env(max_cycles=100, **TINY)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(reward="team"), r"^reward='team'"),
    (dict(reward="cooperative", benchmark=None), r"^reward='cooperative'.*needs a benchmark"),
    (dict(benchmark="pmnist_slow"), r"^benchmark='pmnist_slow': no such protocol.*pmnist_quick"),
    (dict(benchmark={"name": "pmnist_quick", "num_tasks": 0}), r"benchmark.num_tasks"),
    (dict(benchmark=42), r"^benchmark=42"),
    (dict(cl="ewc", benchmark=None), r"^cl.name='ewc'.*needs a task sequence"),
    (dict(cl="ewk"), r"^cl.name='ewk': unknown"),
])
def test_bad_benchmark_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        neural_collective_v0.parallel_env(**{**TINY, **kwargs})


def test_benchmark_accepts_a_name_or_a_config():
    named = neural_collective_v0.parallel_env(**{**TINY, "benchmark": "pmnist_quick", "data_subset": 64})
    assert named.benchmark == BenchmarkConfig(name="pmnist_quick", num_tasks=10) and named.max_cycles == 10
    given = neural_collective_v0.parallel_env(**{**TINY, "benchmark": BenchmarkConfig(name="mine", num_tasks=2, iterations_per_task=3)})
    assert given.max_cycles == 6 and given.sequence.num_tasks == 2


def test_pettingzoo_api_suite_with_a_benchmark():
    # 2 tasks of 3 steps truncated at 5: a task end, then a truncation inside task 2, then auto-resets.
    kwargs = dict(TINY, benchmark={"name": "pmnist_quick", "num_tasks": 2, "iterations_per_task": 3}, max_cycles=5)
    parallel_api_test(neural_collective_v0.parallel_env(**kwargs), num_cycles=8)
    api_test(parallel_to_aec(neural_collective_v0.parallel_env(**kwargs)), num_cycles=8)
    seed_test(lambda: parallel_to_aec(neural_collective_v0.parallel_env(**kwargs)), num_cycles=6)
    parallel_api_test(neural_collective_v0.parallel_env(action_mode="delta", **kwargs), num_cycles=8)


def test_pickled_benchmark_env_continues_exactly_and_leaves_globals_alone():
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    env = neural_collective_v0.parallel_env(strategy="lfnn", cl="si", **TINY)
    env.reset(seed=2)
    rng = np.random.default_rng(0)
    act = lambda: {a: rng.uniform(0, 2, 1).astype(np.float32) for a in env.agents}  # noqa: E731
    for _ in range(3):
        env.step(act())
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    for cut in (3, 10):  # mid task 1, then right at the end of task 2 (between tasks)
        while env.cycles < cut:
            env.step(act())
        blob = pickle.dumps(env)
        assert len(blob) < 2_000_000
        copy = pickle.loads(blob)
        for _ in range(4):  # across the end of task 1 (step 5), then into task 3
            actions = act()
            a, b = env.step(actions), copy.step(actions)
            for d1, d2 in zip(a, b):
                for k in d1:
                    if isinstance(d1[k], dict):
                        assert d1[k].keys() == d2[k].keys()
                        for key in d1[k]:
                            assert np.array_equal(d1[k][key], d2[k][key]), key
                    else:
                        assert np.array_equal(d1[k], d2[k]), k
        assert all(torch.equal(p, q) for p, q in zip(env.model.parameters(), copy.model.parameters()))
        assert env.sequence.record.acc_matrices == copy.sequence.record.acc_matrices


def test_env_loads_its_data_as_its_config_says(tmp_path):
    """``data_normalize=False`` (pmnist_vdv's / pmnist_online's pixels in [0, 1]) reaches the env's
    data, and that data is refused by a CLI config that standardises."""
    env = neural_collective_v0.parallel_env(strategy="bp", data_normalize=False, **TINY)
    assert env.run.data.normalize is False and env._base_data.standardized is False
    assert float(env.data.train.x.min()) == 0.0 and float(env.data.train.x.max()) == 1.0
    cfg = compose_config("benchmark=pmnist_quick", "benchmark.num_tasks=3", "trainer.progress=false",
                         f"data.root={data_root()}", f"output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"^data\.normalize=True"):
        run_continual(cfg, data=env._base_data)
