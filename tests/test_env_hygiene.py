"""neural_collective_v0 as MARL libraries use it: own random generators, seeding, pickling, errors,
spaces and scales. The libraries themselves are exercised in tests/test_env_marl.py."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from envs import neural_collective_v0
from tests.conftest import data_root, without_timing

TINY = dict(hidden=(20, 20), data_subset=640, batch_size=64, data_root=str(data_root()))


def ones(env) -> dict[str, np.ndarray]:
    return {a: np.ones(1, np.float32) for a in env.agents}


def global_draws() -> tuple[float, float, float]:
    """One draw from each global generator an RL library uses (Python, NumPy, torch)."""
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def params(env) -> list[torch.Tensor]:
    return [p.detach().clone() for p in env.model.parameters()]


def test_env_never_touches_the_global_generators():
    seed_globals(123)
    expected = [global_draws() for _ in range(4)]

    seed_globals(123)
    got = [global_draws()]
    env = neural_collective_v0.parallel_env(seed=7, **TINY)  # construction seeds and initialises a model
    got.append(global_draws())
    env.reset()
    env.reset(seed=5)
    got.append(global_draws())
    # A strategy drawing from torch's global generator during its step (as dropout or a noisy rule would).
    inner = env.strategy.compute
    noise = []

    def noisy_compute(x, y):
        noise.append(float(torch.rand(1)))
        return inner(x, y)

    env.strategy.compute = noisy_compute
    for _ in range(3):
        env.step(ones(env))
    got.append(global_draws())
    assert got == expected
    # The strategy's draws come from the env's own stream, which continues from step to step.
    assert len(set(noise)) == 3


def test_env_stream_is_reproducible_and_continues():
    def strategy_noise(env, steps):
        inner, noise = env.strategy.compute, []

        def noisy_compute(x, y):
            noise.append(float(torch.rand(1)))
            return inner(x, y)

        env.strategy.compute = noisy_compute
        for _ in range(steps):
            env.step(ones(env))
        return noise

    a = neural_collective_v0.parallel_env(**TINY)
    b = neural_collective_v0.parallel_env(**TINY)
    a.reset(seed=11)
    torch.manual_seed(999)  # the caller's global seeding must not leak into the env's stream
    b.reset(seed=11)
    assert strategy_noise(a, 2) == strategy_noise(b, 2)


def test_reset_without_seed_starts_a_new_episode_from_the_env_stream():
    env = neural_collective_v0.parallel_env(seed=4, **TINY)
    env.reset()
    first = params(env)
    same = neural_collective_v0.parallel_env(**TINY)
    same.reset(seed=4)
    assert all(torch.equal(p, q) for p, q in zip(first, params(same)))  # first unseeded reset: the constructor's seed

    seeds, episodes = [env.episode_seed], [first]
    for _ in range(2):
        env.reset()
        seeds.append(env.episode_seed)
        episodes.append(params(env))
    assert len(set(seeds)) == 3
    for earlier, later in zip(episodes, episodes[1:]):
        assert not torch.equal(earlier[0], later[0])  # a different network each episode
    # reset(seed=s) reseeds the stream: the unseeded episodes that follow repeat.
    same.reset()
    same.reset()
    assert same.episode_seed == seeds[2]
    assert all(torch.equal(p, q) for p, q in zip(episodes[2], params(same)))
    # ... and so does the batch order (the same observations after a step of the same actions).
    obs_a, *_ = env.step(ones(env))
    obs_b, *_ = same.step(ones(same))
    assert all(np.array_equal(obs_a[k], obs_b[k]) for k in obs_a)


def test_infos_have_the_same_keys_at_reset_and_step():
    env = neural_collective_v0.parallel_env(**TINY)
    _, reset_infos = env.reset(seed=0)
    _, _, _, _, step_infos = env.step(ones(env))
    assert set(reset_infos) == set(step_infos) == set(env.possible_agents)
    for agent in env.possible_agents:
        assert set(reset_infos[agent]) == set(step_infos[agent])
        assert {"batch_loss", "batch_acc", "layer", "index", "cycle"} <= set(step_infos[agent])
    assert reset_infos["worker_0"]["cycle"] == 0 and reset_infos["worker_0"]["batch_loss"] == 0.0
    assert step_infos["worker_0"]["cycle"] == 1 and step_infos["worker_0"]["batch_loss"] > 0


def random_actions(env, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {a: rng.uniform(0, 2, 1).astype(np.float32) for a in env.agents}


@pytest.mark.parametrize("strategy", ["lfnn", "fg_w", "attention"])
def test_pickled_env_continues_exactly_where_the_original_was(strategy):
    import pickle

    env = neural_collective_v0.parallel_env(strategy=strategy, max_cycles=50, epochs=2, **TINY)
    blob = pickle.dumps(env)  # before any reset
    assert len(blob) < 2_000_000, f"{len(blob)} bytes"
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(8):
        env.step(random_actions(env, rng))
    blob = pickle.dumps(env)
    # The dataset stays out: the pickle is the tiny model, Adam's moments and generator states.
    print(f"{strategy}: pickle after 8 steps {len(blob) / 1e3:.1f} kB")
    assert len(blob) < 2_000_000, f"{len(blob)} bytes"
    copy = pickle.loads(blob)
    assert copy.agents == env.agents and copy.cycles == env.cycles == 8
    for _ in range(4):  # across the end of the epoch (10 steps): evaluation and leader bookkeeping too
        actions = random_actions(env, rng)
        a = env.step(actions)
        b = copy.step(actions)
        for d1, d2 in zip(a, b):
            assert d1.keys() == d2.keys()
            for k in d1:
                assert np.array_equal(d1[k], d2[k]) if not isinstance(d1[k], dict) else d1[k] == d2[k], k
    assert all(torch.equal(p, q) for p, q in zip(env.model.parameters(), copy.model.parameters()))
    assert without_timing(env.trainer.history) == without_timing(copy.trainer.history) and len(env.trainer.history) == 1
    # Unseeded episodes continue from the same seed stream.
    env.reset()
    copy.reset()
    assert env.episode_seed == copy.episode_seed


def test_deepcopy_is_independent_and_globals_untouched():
    import copy as copy_module

    env = neural_collective_v0.parallel_env(**TINY)
    env.reset(seed=0)
    env.step(ones(env))
    seed_globals(5)
    expected = global_draws()
    seed_globals(5)
    twin = copy_module.deepcopy(env)  # unpickling rebuilds a model: still on the env's own stream
    assert global_draws() == expected
    before = params(env)
    twin.step(ones(twin))
    assert all(torch.equal(p, q) for p, q in zip(before, params(env)))  # stepping the copy leaves the original
    assert not torch.equal(params(twin)[0], before[0])


def test_stepping_outside_an_episode_says_so():
    env = neural_collective_v0.parallel_env(max_cycles=2, **TINY)
    with pytest.raises(RuntimeError, match=r"no episode started; call reset\(\)"):
        env.step({})
    env.reset(seed=0)
    env.step(ones(env))
    _, _, _, truncs, _ = env.step(ones(env))
    assert all(truncs.values()) and env.agents == []
    for call in (lambda: env.step({}), lambda: env.step({"worker_0": np.ones(1, np.float32)}),
                 lambda: env.step_batched(torch.ones(env.num_workers))):
        with pytest.raises(RuntimeError, match=r"episode over; call reset\(\)"):
            call()
    env.reset()
    assert env.agents and env.step(ones(env))[0]


def test_step_batched_honours_max_cycles():
    env = neural_collective_v0.parallel_env(max_cycles=3, **TINY)
    env.reset(seed=0)
    flags = [env.step_batched(torch.ones(env.num_workers))[3] for _ in range(3)]
    assert flags == [False, False, True] and env.trainer.step == 3
    with pytest.raises(RuntimeError, match="episode over"):
        env.step_batched(torch.ones(env.num_workers))
    assert env.trainer.step == 3  # nothing was trained past max_cycles


@pytest.mark.parametrize("action_mode", ["scale", "delta"])
def test_every_action_is_checked_against_its_own_space(action_mode):
    env = neural_collective_v0.parallel_env(action_mode=action_mode, **TINY)
    env.reset(seed=0)
    good = {a: np.zeros(env.action_space(a).shape, np.float32) for a in env.agents}
    before = params(env)
    shape = env.action_space("worker_3").shape
    for bad in (np.float32(0.0), np.zeros((1, *shape), np.float32), np.zeros(shape[0] + 1, np.float32), "fast"):
        with pytest.raises(ValueError, match="worker_3"):
            env.step({**good, "worker_3": bad})
    # The output agent's delta space differs from a hidden worker's: its own shape is checked.
    out = env.possible_agents[-1]
    with pytest.raises(ValueError, match=out):
        env.step({**good, out: np.zeros(env.action_space("worker_0").shape, np.float32)} if action_mode == "delta"
                 else {**good, out: np.zeros((1, 1), np.float32)})
    assert all(torch.equal(p, q) for p, q in zip(before, params(env)))  # nothing was applied
    # Any real dtype and torch tensors of the right shape are accepted (SB3 hands float64).
    env.step({a: torch.as_tensor(v, dtype=torch.float64) for a, v in good.items()})


@pytest.mark.parametrize(("field", "value"), [("max_cycles", 0), ("max_cycles", -3), ("max_cycles", 2.5), ("max_cycles", True),
                                              ("max_scale", 0.0), ("max_delta", float("nan")), ("action_mode", "bold"),
                                              ("render_mode", "svg")])
def test_invalid_arguments_name_their_field(field, value):
    from agentnet.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^{field}="):
        neural_collective_v0.parallel_env(**{**TINY, field: value})


@pytest.mark.parametrize("strategy", ["lfnn", "attention", "bp"])
def test_default_observations_are_squashed_into_finite_bounds(strategy):
    squashed = neural_collective_v0.parallel_env(strategy=strategy, **TINY)
    raw = neural_collective_v0.parallel_env(strategy=strategy, observation_mode="raw", **TINY)
    space = squashed.observation_space("worker_0")
    assert np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high)) and space.is_bounded()
    obs_s, _ = squashed.reset(seed=1)
    obs_r, _ = raw.reset(seed=1)
    for _ in range(3):
        for agent in squashed.possible_agents:
            assert squashed.observation_space(agent).contains(obs_s[agent]), agent
            got = torch.as_tensor(obs_s[agent]).clone()
            got[3:10] = neural_collective_v0.unsquash(got[3:10])  # roles and depth are passed through
            torch.testing.assert_close(got, torch.as_tensor(obs_r[agent]), rtol=1e-4, atol=1e-6)
        obs_s, *_ = squashed.step(ones(squashed))
        obs_r, *_ = raw.step(ones(raw))
    # Large raw signals (weight norms) really are compressed, not copied.
    assert raw.state().max() > 1 and squashed.state().max() <= 1


def test_output_reward_is_minus_the_global_loss_not_the_strategy_objective():
    import copy

    env = neural_collective_v0.parallel_env(strategy="lfnn", **TINY)
    env.reset(seed=0)
    before = copy.deepcopy(env.model)
    _, rewards, _, _, infos = env.step(ones(env))
    x, y = env.last_step_inputs
    with torch.no_grad():
        ce = float(torch.nn.functional.cross_entropy(before(x)[0], y))
    out = env.possible_agents[-1]
    assert rewards[out] == pytest.approx(-ce, rel=1e-5) and infos[out]["batch_loss"] == pytest.approx(ce, rel=1e-5)
    assert 1.5 < ce < 3.5  # an untrained 10-way classifier; LFNN's whole objective is several times larger


def test_reward_scale_multiplies_every_reward():
    plain = neural_collective_v0.parallel_env(strategy="lfnn", **TINY)
    scaled = neural_collective_v0.parallel_env(strategy="lfnn", reward_scale=0.1, **TINY)
    plain.reset(seed=2)
    scaled.reset(seed=2)
    _, r1, *_ = plain.step_batched(torch.ones(plain.num_workers))
    _, r2, *_ = scaled.step_batched(torch.ones(scaled.num_workers))
    torch.testing.assert_close(r2, r1 * 0.1)
    assert not torch.equal(r1, r2)


def test_scale_centered_zero_is_the_strategy_step_and_its_ends_are_zero_and_max_scale():
    plain = neural_collective_v0.parallel_env(action_mode="scale", **TINY)
    centred = neural_collective_v0.parallel_env(action_mode="scale_centered", **TINY)
    space = centred.action_space("worker_0")
    assert space.low[0] == -1 and space.high[0] == 1
    plain.reset(seed=0)
    centred.reset(seed=0)
    n = plain.num_workers
    zero = torch.zeros(n)  # what an untrained zero-mean Gaussian policy plays on average
    for _ in range(2):
        plain.step_batched(torch.ones(n))
        centred.step_batched(zero)
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), centred.model.parameters()))
    ends_scale = torch.ones(n)
    ends_scale[0], ends_scale[1] = 0.0, plain.max_scale
    ends_centred = torch.zeros(n)
    ends_centred[0], ends_centred[1] = -1.0, 1.0
    frozen = centred.model.hidden[0].weight[:10].clone()
    plain.step_batched(ends_scale)
    centred.step_batched(ends_centred)
    assert torch.equal(centred.model.hidden[0].weight[:10], frozen)
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), centred.model.parameters()))
    with pytest.raises(ValueError, match=r"worker_2.*outside \[-1.0, 1.0\]"):
        centred.step({**{a: np.zeros(1, np.float32) for a in centred.agents}, "worker_2": np.full(1, 1.5, np.float32)})
    from agentnet.config import ConfigError

    with pytest.raises(ConfigError, match="^max_scale=0.5"):
        neural_collective_v0.parallel_env(action_mode="scale_centered", max_scale=0.5, **TINY)


def test_centered_map_and_its_inverse():
    to_scale, to_centred = neural_collective_v0.centered_to_scale, neural_collective_v0.scale_to_centered
    u = np.array([-1.0, -0.5, 0.0, 0.5, 1.0], np.float32)
    np.testing.assert_allclose(to_scale(u, 3.0), [0.0, 0.5, 1.0, 2.0, 3.0])
    assert torch.equal(to_scale(torch.from_numpy(u), 3.0), torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0]))
    for m in (0.0, 0.25, 1.0, 1.7, 3.0):
        assert to_scale(np.float64(to_centred(m, 3.0)), 3.0) == pytest.approx(m)
    with pytest.raises(ValueError, match="multiplier=3.5"):
        to_centred(3.5, 3.0)


def test_state_is_every_observation_for_centralised_critics():
    env = neural_collective_v0.parallel_env(**TINY)
    with pytest.raises(RuntimeError, match="call reset"):
        env.state()
    obs, _ = env.reset(seed=0)
    for _ in range(2):
        state = env.state()
        assert state.dtype == np.float32 and state.shape == env.state_space.shape == (env.num_workers * neural_collective_v0.OBS_DIM,)
        assert env.state_space.contains(state)
        np.testing.assert_array_equal(state, np.concatenate([obs[a] for a in env.possible_agents]))
        obs, *_ = env.step(ones(env))


def test_group_map_puts_agents_of_one_action_shape_together():
    env = neural_collective_v0.parallel_env(action_mode="delta", **TINY)
    groups = env.group_map
    assert list(groups) == ["layer_1", "layer_2", "output"]
    assert [a for g in groups.values() for a in g] == env.possible_agents
    for agents in groups.values():
        assert len({env.action_space(a).shape for a in agents}) == 1
    assert env.action_space(groups["layer_1"][0]).shape != env.action_space(groups["layer_2"][0]).shape


CONV = dict(TINY, conv=[{"channels": 20, "pool": 2}], hidden=(20,))  # 2 filter-wise conv workers, 2 FC workers, output


@pytest.mark.parametrize("action_mode", ["scale", "delta"])
def test_conv_filter_wise_workers_are_agents(action_mode):
    from pettingzoo.test import api_test, parallel_api_test
    from pettingzoo.utils import parallel_to_aec

    kwargs = dict(CONV, strategy="lfnn", action_mode=action_mode, max_cycles=4)
    parallel_api_test(neural_collective_v0.parallel_env(**kwargs), num_cycles=6)
    api_test(parallel_to_aec(neural_collective_v0.parallel_env(**kwargs)), num_cycles=6)
    env = neural_collective_v0.parallel_env(**kwargs)
    assert env.num_workers == 5 and env.group_map["layer_1"] == ["worker_0", "worker_1"]
    if action_mode == "delta":  # a filter-wise worker's update: its 10 filters (1 x 3 x 3) and biases
        assert env.action_space("worker_0").shape == (10 * (9 + 1),)
    env.reset(seed=0)
    conv = env.model.hidden[0]  # reset builds the episode's network
    before = conv.weight.detach().clone(), conv.bias.detach().clone()
    if action_mode == "scale":
        actions = torch.ones(env.num_workers)
        actions[0] = 0.0  # freeze worker_0's filters
        env.step_batched(actions)
        assert torch.equal(conv.weight[:10], before[0][:10]) and torch.equal(conv.bias[:10], before[1][:10])
        assert not torch.equal(conv.weight[10:], before[0][10:])
    else:
        moves = [np.full(env.action_space(a).shape, 0.01, np.float32) for a in env.possible_agents]
        env.step_batched(moves)
        torch.testing.assert_close(conv.weight - before[0], torch.full_like(conv.weight, 0.01))
        assert env.proposed_gradient()[0].shape == (20, 10)


def test_conv_all_ones_reproduces_the_trainer_bit_for_bit():
    from agentnet.session import build_session

    env = neural_collective_v0.parallel_env(strategy="lfnn", max_cycles=10_000, **CONV)
    env.reset(seed=3)
    while env.agents:
        env.step(ones(env))
    run = neural_collective_v0.run_config(strategy="lfnn", hidden=CONV["hidden"], conv=CONV["conv"], data_subset=640,
                                          batch_size=64, data_root=CONV["data_root"], seed=3)
    session = build_session(run, env.data)
    session.run_all()
    for (name, p), q in zip(session.model.named_parameters(), env.model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("block", ["vgg", "residual"])
def test_conv_block_workers_are_agents(block):
    from pettingzoo.test import api_test, parallel_api_test
    from pettingzoo.utils import parallel_to_aec

    from agentnet.config import ConfigError

    spec = {"channels": 20, "block": block, "workers": 2, "pool": 2}  # 2 blocks of 2 convs (and a shortcut)
    kwargs = dict(CONV, conv=[spec], strategy="lfnn", max_cycles=4)
    parallel_api_test(neural_collective_v0.parallel_env(**kwargs), num_cycles=6)
    api_test(parallel_to_aec(neural_collective_v0.parallel_env(**kwargs)), num_cycles=6)
    env = neural_collective_v0.parallel_env(observation_mode="raw", **kwargs)
    assert env.num_workers == 5 and env.group_map["layer_1"] == ["worker_0", "worker_1"]
    env.reset(seed=0)
    blocks = env.model.hidden[0]
    before = [p.detach().clone() for p in blocks.parameters()]
    actions = torch.ones(env.num_workers)
    actions[0] = 0.0  # freeze block 0: every one of its parameters (rows grouped by block)
    obs, *_ = env.step_batched(actions)
    for p, q in zip(blocks.parameters(), before):
        assert torch.equal(p.view(2, -1)[0], q.view(2, -1)[0]) and not torch.equal(p.view(2, -1)[1], q.view(2, -1)[1])
    norms = [torch.cat([p.detach().reshape(2, -1)[i] for p in blocks.parameters()]).norm() for i in range(2)]
    torch.testing.assert_close(obs[:2, 8], torch.stack(norms))
    assert obs[0, 9] == 0 and obs[1, 9] > 0
    with pytest.raises(ValueError, match="^proposed_gradient: block-wise"):
        env.proposed_gradient()
    with pytest.raises(ConfigError, match=r"^action_mode='delta'"):
        neural_collective_v0.parallel_env(**{**kwargs, "action_mode": "delta"})


def test_plain_and_normalisation_layers_belong_to_the_agents_of_the_block_they_feed():
    """A plain conv in front of the FC worker layer and the conv workers' batch norm: each agent owns
    its rows of them, as gradient routing groups a block (``model.stems``, ``model.hidden``, ``model.norms``)."""
    from agentnet.config import ConfigError

    conv = [{"channels": 20, "pool": 2, "norm": "batch"}, {"channels": 20, "plain": True, "norm": "batch"}]
    env = neural_collective_v0.parallel_env(**{**CONV, "conv": conv, "strategy": "bp", "observation_mode": "raw"})
    env.reset(seed=0)
    norm, stem = env.model.norms[0], env.model.stems[1]  # conv workers' norm; plain layers in front of the FC workers
    owned = [*norm.parameters(), *stem.parameters()]
    before = [p.detach().clone() for p in owned]
    actions = torch.ones(env.num_workers)
    actions[[0, 2]] = 0.0  # worker_0 (conv layer), worker_2 (FC layer)
    obs, *_ = env.step_batched(actions)
    for p, q in zip(owned, before):
        assert torch.equal(p[:10], q[:10]) and not torch.equal(p[10:], q[10:])  # rows of agent 0 of each block frozen
    assert obs[0, 9] == 0 and obs[2, 9] == 0 and obs[1, 9] > 0 and obs[3, 9] > 0
    fc = [*env.model.hidden[1].parameters(), *stem.parameters()]
    torch.testing.assert_close(obs[3, 8], torch.cat([p.detach().reshape(2, -1)[1] for p in fc]).norm())
    with pytest.raises(ConfigError, match=r"^action_mode='delta'"):
        neural_collective_v0.parallel_env(**{**CONV, "conv": conv, "action_mode": "delta"})
    with pytest.raises(ConfigError, match=r"^model: a plain layer .* 15 channels"):
        neural_collective_v0.parallel_env(**{**CONV, "conv": [{"channels": 15, "plain": True}]})
