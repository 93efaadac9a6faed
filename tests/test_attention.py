"""The attention-seeking strategy: exact mode is back-propagation; the other modes are not, and learn."""

from __future__ import annotations

import json
import math

import pytest
import torch

from agentnet.config import ModelConfig, RunConfig, TrainerConfig
from agentnet.data import ImageData, Split
from agentnet.network import WorkerNetwork
from agentnet.registry import STRATEGIES, build_strategy
from agentnet.training import Trainer, train
from tests.conftest import compose_config


def make_trainer(strategy: dict, hidden, activation, optimizer, dtype, data, seed=0):
    run = RunConfig(
        strategy=STRATEGIES.config(strategy),
        model=ModelConfig(hidden=hidden, worker_size=10, activation=activation),
        trainer=TrainerConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3, momentum=0.9, lr_schedule="none"),
    )
    torch.manual_seed(seed)
    model = WorkerNetwork(data.input_dim, 10, run.model).to(dtype)
    return Trainer(run, model, build_strategy(run.strategy, model), data, output_dir=None)


def small_data(mnist, dtype) -> ImageData:
    n = 512
    return ImageData(train=Split(mnist.train.x[:n].to(dtype), mnist.train.y[:n]), test=Split(mnist.test.x[:n].to(dtype), mnist.test.y[:n]))


def max_relative_error(a: WorkerNetwork, b: WorkerNetwork) -> float:
    worst = 0.0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        worst = max(worst, ((p - q).norm() / q.norm()).item())
    return worst


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("hidden", [[40], [60, 40, 30]])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_exact_mode_updates_equal_backprop(mnist, activation, hidden, optimizer, dtype, tol):
    data = small_data(mnist, dtype)
    ours = make_trainer({"name": "attention", "mode": "exact"}, hidden, activation, optimizer, dtype, data)
    ref = make_trainer({"name": "bp"}, hidden, activation, optimizer, dtype, data)
    assert max_relative_error(ours.model, ref.model) == 0.0  # same seed, same start
    for step in range(6):
        x, y = data.train.x[64 * step : 64 * (step + 1)], data.train.y[64 * step : 64 * (step + 1)]
        ours.train_step(x, y)
        ref.train_step(x, y)
        # Gradients (the updates' source) and the parameters after the update both agree.
        for p, q in zip(ours.model.parameters(), ref.model.parameters()):
            assert ((p.grad - q.grad).norm() / q.grad.norm()).item() <= tol
        assert max_relative_error(ours.model, ref.model) <= tol
    # The trajectory really moved: the check above is not comparing untouched weights.
    fresh = make_trainer({"name": "bp"}, hidden, activation, optimizer, dtype, data)
    assert max_relative_error(ours.model, fresh.model) > 1e-4


@pytest.mark.parametrize("mode", ["normalized", "topk"])
def test_other_modes_differ_from_backprop(mnist, mode):
    data = small_data(mnist, torch.float64)
    ours = make_trainer({"name": "attention", "mode": mode, "rho": 0.5}, [60, 40], "relu", "sgd", torch.float64, data)
    ref = make_trainer({"name": "bp"}, [60, 40], "relu", "sgd", torch.float64, data)
    x, y = data.train.x[:64], data.train.y[:64]
    ours.train_step(x, y)
    ref.train_step(x, y)
    # The first hidden layer is where the modified attention shows (the output layer is plain).
    diff = (ours.model.hidden[0].weight.grad - ref.model.hidden[0].weight.grad).norm() / ref.model.hidden[0].weight.grad.norm()
    if mode == "normalized":
        assert diff > 1e-3, "normalized attention silently fell back to BP"
    else:
        assert max_relative_error(ours.model, ref.model) > 1e-6, "topk silently fell back to BP"


def test_topk_freezes_unattended_neurons_bit_exactly(mnist):
    data = small_data(mnist, torch.float32)
    trainer = make_trainer({"name": "attention", "mode": "topk", "rho": 0.25}, [60, 40], "relu", "adam", torch.float32, data)
    for step in range(3):  # a few steps so Adam has momentum that would move frozen rows
        x, y = data.train.x[64 * step : 64 * (step + 1)], data.train.y[64 * step : 64 * (step + 1)]
        before = [(l.weight.detach().clone(), l.bias.detach().clone()) for l in trainer.model.hidden]
        result = trainer.train_step(x, y)
        for layer, scale, (w, b) in zip(trainer.model.hidden, result.update_scale, before):
            n = layer.out_features
            assert scale.shape == (1, n)  # (R, n): one scale per unit of each replica
            frozen_per_replica = (scale == 0).sum(-1)
            assert (frozen_per_replica == n - math.ceil(0.25 * n)).all()
            frozen = (scale == 0).reshape(-1)  # replica-major, like the weight's rows
            assert torch.equal(layer.weight[frozen], w[frozen]) and torch.equal(layer.bias[frozen], b[frozen])
            assert not torch.equal(layer.weight[~frozen], w[~frozen])
    assert len(result.signals["attention_received"]) == 2 and len(result.signals["objective"]) == 2


@pytest.mark.parametrize("mode", ["normalized", "topk"])
def test_other_modes_learn_real_mnist(mode, mnist, quick_overrides):
    metrics = train(compose_config("strategy=attention", f"strategy.mode={mode}", *quick_overrides), data=mnist)
    assert metrics["test_acc"] > 0.75, metrics["test_acc"]


def test_cli_exact_matches_bp_metrics(mnist, quick_overrides, tmp_path):
    common = [*quick_overrides, "trainer.epochs=1"]
    a = train(compose_config("strategy=attention", "strategy.mode=exact", *common, f"output_dir={tmp_path / 'a'}"), data=mnist)
    b = train(compose_config("strategy=bp", *common, f"output_dir={tmp_path / 'b'}"), data=mnist)
    for key in ("test_acc", "train_acc", "test_loss", "train_loss", "final_train_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert written["strategy"] == "attention"
