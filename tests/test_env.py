"""The PettingZoo environment: PettingZoo's own test suite, trainer equivalence, bad actions, graph view."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch
from pettingzoo.test import (
    api_test,
    max_cycles_test,
    parallel_api_test,
    render_test,
    seed_test,
)
from pettingzoo.utils import parallel_to_aec

from envs import neural_collective_v0
from tests.conftest import REPO, data_root

STRATEGIES = sorted(p.stem for p in (REPO / "configs" / "strategy").glob("*.yaml"))
#: PettingZoo's API suite for every strategy; the local greedy Table 1 rules share their global
#: versions' env path, so they run in the slow suite only (keeps the default suite near 10 min).
API_CASES = [pytest.param(s, marks=pytest.mark.slow) if s.startswith("lg_") else s for s in STRATEGIES]
SMALL = dict(hidden=(20, 20), data_subset=640, batch_size=64, data_root=str(data_root()))


@pytest.mark.parametrize("action_mode", ["scale", "delta"])
@pytest.mark.parametrize("strategy", API_CASES)
def test_pettingzoo_api_suite(strategy, action_mode):
    kwargs = dict(SMALL, strategy=strategy, action_mode=action_mode, max_cycles=6)
    parallel_api_test(neural_collective_v0.parallel_env(**kwargs), num_cycles=12)
    api_test(parallel_to_aec(neural_collective_v0.parallel_env(**kwargs)), num_cycles=12)
    seed_test(lambda: parallel_to_aec(neural_collective_v0.parallel_env(**kwargs)), num_cycles=8)


def test_max_cycles_and_render():
    max_cycles_test(neural_collective_v0)
    render_test(lambda render_mode=None: neural_collective_v0.env(render_mode=render_mode, **SMALL))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_ones_reproduces_the_trainer_bit_for_bit(strategy):
    par = neural_collective_v0.parallel_env(strategy=strategy, max_cycles=10_000, **SMALL)
    par.reset(seed=3)
    steps = 0
    while par.agents:
        _, _, terms, truncs, _ = par.step({a: np.ones(1, np.float32) for a in par.agents})
        steps += 1
    assert steps == par.stream_steps == math.ceil(640 / 64) and all(terms.values())

    run = neural_collective_v0.run_config(strategy=strategy, hidden=SMALL["hidden"], data_subset=640, batch_size=64,
                                          data_root=SMALL["data_root"], seed=3)
    from agentnet.session import build_session

    data = par.data  # the same seeded subset
    session = build_session(run, data)
    session.run_all()
    model, trainer = session.model, session.trainer
    for (name, p), q in zip(model.named_parameters(), par.model.parameters()):
        assert torch.equal(p, q), f"{strategy}: {name} differs"
    assert trainer.evaluate(data.test) == par.trainer.evaluate(data.test)
    if trainer.strategy.selection is not None:
        assert all(torch.equal(a, b) for a, b in zip(trainer.strategy.selection.counts, par.strategy.selection.counts))


def test_out_of_space_actions_raise_and_change_nothing():
    par = neural_collective_v0.parallel_env(**SMALL)
    par.reset(seed=0)
    before = [p.clone() for p in par.model.parameters()]
    ones = {a: np.ones(1, np.float32) for a in par.agents}
    for bad, match in (
        ({**ones, "worker_1": np.array([np.nan], np.float32)}, "worker_1"),
        ({**ones, "worker_2": np.array([-0.5], np.float32)}, r"worker_2.*outside \[0, 2.0\]"),
        ({**ones, "worker_0": np.ones(3, np.float32)}, "shape"),
        ({a: v for a, v in ones.items() if a != "worker_4"}, "no action"),
        ({**ones, "worker_99": np.ones(1, np.float32)}, "unknown"),
    ):
        with pytest.raises(ValueError, match=match):
            par.step(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, par.model.parameters()))
    with pytest.raises(ValueError, match="scale actions must have shape"):
        par.step_batched(torch.ones(3))
    delta = neural_collective_v0.parallel_env(action_mode="delta", **SMALL)
    delta.reset(seed=0)
    actions = {a: np.zeros(delta.action_space(a).shape, np.float32) for a in delta.agents}
    actions["worker_0"] = actions["worker_0"] + 1.0  # outside ±max_delta
    with pytest.raises(ValueError, match="worker_0.*outside"):
        delta.step(actions)


def test_scale_zero_freezes_and_delta_writes_exactly():
    par = neural_collective_v0.parallel_env(strategy="lfnn", **SMALL)
    par.reset(seed=0)
    actions = torch.ones(par.num_workers)
    actions[0] = 0.0  # worker_0: first worker of layer 1
    layer = par.model.hidden[0]
    w0 = layer.weight[:10].clone()
    obs, rewards, terminated, truncated, info = par.step_batched(actions)
    assert torch.equal(layer.weight[:10], w0) and not torch.equal(layer.weight[10:20], w0)
    assert obs.shape == (par.num_workers, neural_collective_v0.OBS_DIM) and obs.dtype == torch.float32
    assert rewards.shape == (par.num_workers,) and not terminated and not truncated
    assert obs[0, 9] == 0 and obs[1, 9] > 0  # last-update norm observed

    delta = neural_collective_v0.parallel_env(action_mode="delta", **SMALL)
    delta.reset(seed=0)
    before = [p.clone() for p in delta.model.parameters()]
    moves = [np.full(delta.action_space(a).shape, 0.01, np.float32) for a in delta.possible_agents]
    delta.step_batched(moves)
    for p, q in zip(delta.model.parameters(), before):
        torch.testing.assert_close(p - q, torch.full_like(p, 0.01))
    assert delta.proposed_gradient()[0].shape == (20, 785)


def test_observations_and_rewards_are_local_signals():
    # Raw observations: the signals themselves (the default squashes them into finite bounds).
    par = neural_collective_v0.parallel_env(strategy="lfnn", observation_mode="raw", **SMALL)
    par.reset(seed=0)
    obs, rewards, *_ = par.step_batched(torch.ones(par.num_workers))
    hidden = obs[:-1]
    assert torch.all(hidden[:, 0] + hidden[:, 1] == 1)  # each worker leads or follows
    assert obs[-1, 2] == 1 and rewards[-1] == -obs[-1, 3]  # output agent: minus the global loss
    leaders = hidden[:, 0] == 1
    assert torch.all(hidden[:, 3] >= 0) and torch.all(rewards[:-1] <= 0)
    att = neural_collective_v0.parallel_env(strategy="attention", observation_mode="raw", **SMALL)
    att.reset(seed=0)
    obs, rewards, *_ = att.step_batched(torch.ones(att.num_workers))
    assert torch.all(obs[:-1, 5] > 0) and torch.equal(rewards[:-1], obs[:-1, 5])
    assert leaders.any()


@pytest.mark.parametrize("strategy", ["bp", "lfnn"])
def test_activation_and_parameter_observations_match_their_definitions(strategy):
    # Columns 6-9 recomputed from scratch: the mean and std of each worker's activations on the
    # step's batch (the pre-update forward), its parameter norm after the step and the norm of the
    # step's change. Two steps, so the kept previous parameters are checked too.
    import copy

    par = neural_collective_v0.parallel_env(strategy=strategy, observation_mode="raw", **SMALL)
    par.reset(seed=0)
    layers = lambda model: [*model.hidden, model.output]  # noqa: E731
    for _ in range(2):
        before = copy.deepcopy(par.model)
        obs, *_ = par.step_batched(torch.ones(par.num_workers))
        x, y = par.last_step_inputs
        with torch.no_grad():
            record = before.forward_record(x, y)
        row = 0
        for li, (new, old) in enumerate(zip(layers(par.model), layers(before))):
            agents = par.model.hidden[li].num_workers if li < len(par.model.hidden) else 1
            units = new.weight.shape[0] // agents
            w_new = torch.cat([new.weight.detach().flatten(1), new.bias.detach()[:, None]], 1).view(agents, -1)
            w_old = torch.cat([old.weight.detach().flatten(1), old.bias.detach()[:, None]], 1).view(agents, -1)
            got = obs[row : row + agents]
            torch.testing.assert_close(got[:, 8], w_new.norm(dim=1))
            torch.testing.assert_close(got[:, 9], (w_new - w_old).norm(dim=1), rtol=1e-4, atol=1e-7)
            if li < len(par.model.hidden):
                act = record.layers[li].activation[0].reshape(len(x), agents, units)
                torch.testing.assert_close(got[:, 6], act.mean((0, 2)))
                torch.testing.assert_close(got[:, 7], act.std((0, 2)), rtol=1e-4, atol=1e-6)
            row += agents
        assert row == par.num_workers


def test_to_networkx_graph_view():
    par = neural_collective_v0.parallel_env(strategy="lfnn", **SMALL)
    par.reset(seed=0)
    par.step_batched(torch.ones(par.num_workers))
    graph = par.to_networkx()
    assert isinstance(graph, nx.DiGraph)
    assert set(par.possible_agents) <= set(graph.nodes) and "input" in graph.nodes
    assert graph.number_of_edges() == 2 + 2 * 2 + 2  # input->2, 2x2 hidden blocks, 2->output
    node = graph.nodes["worker_1"]
    assert node["layer"] == 1 and node["index"] == 1 and node["role"] in ("leader", "follower")
    w = par.model.hidden[1].weight.detach()
    assert graph.edges["worker_0", "worker_3"]["weight"] == pytest.approx(w[10:20, 0:10].norm().item(), rel=1e-5)
    image = neural_collective_v0.parallel_env(render_mode="rgb_array", **SMALL)
    image.reset(seed=0)
    assert image.render().dtype == np.uint8


def test_example_policy_runs(monkeypatch):
    import runpy

    monkeypatch.setattr("sys.argv", ["bandit", "--steps", "20", "--subset", "640"])
    runpy.run_path(str(REPO / "examples" / "bandit_step_sizes.py"), run_name="__main__")


def test_a_strategy_declares_the_signal_the_env_observes():
    """Nothing strategy-specific in the env: a user strategy naming its own per-unit signal gets it
    as observation entry 5 (summed over a worker's units) and as its workers' reward."""
    from agentnet.registry import STRATEGIES, register_strategy
    from strategies.bp import Backprop

    if "test_unit_activity_bp" not in STRATEGIES.names():

        @register_strategy("test_unit_activity_bp")
        class UnitActivityBP(Backprop):
            worker_signal = "unit_activity"

            def compute(self, x, y):
                record = self.model.forward_record(x, y)
                result = super().compute(x, y)
                result.signals["unit_activity"] = [r.activation.detach().abs().mean(1) for r in record.layers]
                return result

    par = neural_collective_v0.parallel_env(strategy="test_unit_activity_bp", observation_mode="raw", **SMALL)
    par.reset(seed=0)
    obs, rewards, *_ = par.step_batched(torch.ones(par.num_workers))
    assert torch.all(obs[:-1, 5] >= 0) and obs[:-1, 5].sum() > 0
    torch.testing.assert_close(rewards[:-1], obs[:-1, 5])
    plain = neural_collective_v0.parallel_env(strategy="bp", observation_mode="raw", **SMALL)
    plain.reset(seed=0)
    obs, rewards, *_ = plain.step_batched(torch.ones(plain.num_workers))
    assert torch.all(obs[:, 5] == 0) and torch.all(rewards[:-1] == rewards[-1])  # bp: everyone gets minus the task loss


#: A shipped batch-normed CNN preset on a small subset (4 steps per epoch).
CNN = dict(model="cnn_mnist_275k", data_subset=128, batch_size=32, data_root=str(data_root()))


def test_pettingzoo_api_suite_on_a_cnn_preset():
    par = neural_collective_v0.parallel_env(strategy="lfnn_local", max_cycles=4, **CNN)
    assert par.num_workers == 2 + 6 + 9 + 1
    parallel_api_test(par, num_cycles=6)


def test_all_ones_reproduces_the_trainer_bit_for_bit_on_a_cnn_preset():
    from agentnet.session import build_session

    par = neural_collective_v0.parallel_env(strategy="lfnn_local", max_cycles=10_000, **CNN)
    par.reset(seed=3)
    while par.agents:
        par.step({a: np.ones(1, np.float32) for a in par.agents})
    run = neural_collective_v0.run_config(strategy="lfnn_local", model="cnn_mnist_275k", data_subset=128, batch_size=32,
                                          data_root=CNN["data_root"], seed=3)
    session = build_session(run, par.data)
    session.run_all()
    for (name, p), q in zip(session.model.state_dict().items(), par.model.state_dict().values()):
        assert torch.equal(p, q), name  # parameters and batch-norm statistics
