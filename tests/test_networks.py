"""Networks as users write them: plain layers of any width, rules that read no worker prediction
building any MLP or CNN, a rule that does saying which setting to add, the LFNN authors' network."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from agentnet.composition import to_run_config
from agentnet.config import ConfigError, ConvLayerConfig, ModelConfig
from agentnet.network import build_model
from agentnet.recipes import run_continual, train
from agentnet.registry import STRATEGIES
from agentnet.workers import WorkerLinear
from tests.conftest import compose_config

#: Rules whose update reads each worker's prediction (and so need layers split into predicting workers).
PREDICTING = {"lfnn", "lfnn_local"}


def test_only_the_leader_follower_rules_read_worker_predictions():
    assert {name for name in STRATEGIES.names() if STRATEGIES.get(name).worker_predictions} >= PREDICTING
    for name in ("bp", "fa", "fg_w", "fg_a", "lg_bp", "lg_fg_w", "lg_fg_a", "attention", "pepita"):
        assert not STRATEGIES.get(name).worker_predictions, name


@pytest.mark.parametrize("strategy", ["bp", "fa", "fg_w", "lg_bp", "attention", "pepita"])
def test_a_rule_that_reads_no_prediction_builds_any_widths(strategy):
    run = to_run_config(compose_config(f"strategy={strategy}", "model=mlp_100x2", "model.hidden=[256,128]"))
    model = build_model(run.model, 784, 10, [0, 1], predictions=False)
    assert [layer.out_features for layer in model.hidden] == [256, 128]  # per replica
    assert model.workers_per_layer == [1, 1] and not any(r.available for r in model.readouts)
    assert model.num_params == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    # widths that worker_size divides still split into workers of worker_size
    split = build_model(ModelConfig(hidden=[250, 128], worker_size=10), 784, 10, 0, predictions=False)
    assert split.workers_per_layer == [25, 1] and [r.available for r in split.readouts] == [True, False]


def test_the_same_plain_network_trains_under_bp_whatever_the_worker_size(mnist, quick_overrides, tmp_path):
    """For BP the split into workers is bookkeeping: two presets with other worker settings train
    exactly the same 784-256-256-10 network."""
    errors = []
    for preset in ("mlp_100x2", "mlp_275k"):
        metrics = train(compose_config("strategy=bp", f"model={preset}", "model.hidden=[256,256]", *quick_overrides,
                                       f"output_dir={tmp_path / preset}"), data=mnist)
        errors.append(metrics["test_error"])
    assert errors[0] == errors[1] and errors[0] < 15, errors


@pytest.mark.parametrize("strategy", sorted(PREDICTING))
def test_a_rule_that_reads_predictions_says_which_setting_to_add(strategy):
    with pytest.raises(ConfigError) as caught:
        to_run_config(compose_config(f"strategy={strategy}", "model=mlp_100x2", "model.hidden=[256,256]"))
    message = str(caught.value)
    assert message.startswith("model.worker_size=10: must divide every worker layer's width (hidden width 256 is not a multiple)")
    assert f"strategy={strategy} reads worker predictions" in message and "model.hidden_plain" in message
    with pytest.raises(ConfigError, match="conv channels 33 is not a multiple"):
        to_run_config(compose_config(f"strategy={strategy}", "model=cnn_mnist_275k", "model.conv.0.channels=33"))


def test_plain_layers_take_any_width_under_every_rule():
    run = to_run_config(compose_config("strategy=lfnn", "model=mlp_100x2", "model.hidden=[256,100]", "model.hidden_plain=[0]"))
    model = build_model(run.model, 784, 10)
    assert model.workers_per_layer == [10] and len(model.blocks()[0].stem) == 1


def test_conv_layers_of_any_width_under_a_rule_without_predictions():
    model = build_model(to_run_config(compose_config("strategy=fa", "model=cnn_mnist_275k", "model.conv.0.channels=33")).model,
                        784, 10, predictions=False)
    assert model.workers_per_layer[0] == 1 and model(torch.zeros(2, 784)).shape == (1, 2, 10)


@pytest.mark.slow
def test_a_conv_network_of_any_widths_learns_under_fa(mnist, quick_overrides):
    metrics = train(compose_config("strategy=fa", "model=cnn_mnist_275k", "model.conv.0.channels=33", "model.conv.1.channels=35",
                                   *quick_overrides, "trainer.epochs=1"), data=mnist)
    assert metrics["test_error"] < 60  # chance: 90 %


def test_a_workerless_readout_fails_clearly_where_something_asks_it_to_predict(mnist, quick_overrides):
    model = build_model(ModelConfig(hidden=[64], worker_size=64), 784, 10, predictions=False)
    with pytest.raises(ValueError, match="built for a rule that reads no worker predictions"):
        model.blocks()[0].readout(torch.zeros(1, 2, 1, 64))
    with pytest.raises(ConfigError, match="cl.lwf_local=true distils every worker's predictions"):
        run_continual(compose_config("strategy=bp", "model=mlp_100x2", "model.hidden=[64]", "benchmark=pmnist_quick",
                                     "benchmark.num_tasks=2", "cl=lwf", "cl.lwf_local=true", *quick_overrides), data=mnist)


def test_the_lfnn_authors_network(mnist, quick_overrides):
    run = to_run_config(compose_config("strategy=lfnn", "model=mlp_lfnn_authors"))
    model = build_model(run.model, 784, 10)
    # plain 784-256-128, then one leader-follower layer of 32 workers of 10, then the output layer
    assert model.workers_per_layer == [32] and isinstance(model.hidden[0], WorkerLinear)
    assert [layer.out_features for layer in model.blocks()[0].stem.layers] == [256, 128]
    assert model.num_params == 278_346
    metrics = train(compose_config("strategy=lfnn", "model=mlp_lfnn_authors", *quick_overrides), data=mnist)
    assert metrics["test_acc"] > 0.85, metrics["test_acc"]
    assert len(metrics["leadership_counts"]) == 1


def test_he_uniform_init_scales_the_default_draws():
    """``model.init=he_uniform``: every weight layer (plain, worker, conv, output) uniform in
    ±sqrt(6/fan_in) — the default draws times sqrt(6), so replicas still equal single networks —
    and zero biases; worker heads keep their own initialisation."""
    torch_init = ModelConfig(conv=[ConvLayerConfig(channels=4, plain=True), ConvLayerConfig(channels=20, pool=2)], hidden=[30, 20],
                             hidden_plain=[0], worker_head=True)
    he = dataclasses.replace(torch_init, init="he_uniform")
    a, b = build_model(torch_init, 784, 10, [0, 1]), build_model(he, 784, 10, [0, 1])
    weights = 0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if name.startswith("readouts"):
            assert torch.equal(p, q), name
        elif name.endswith("bias"):
            assert not q.any(), name
        else:
            weights += 1
            torch.testing.assert_close(q, p * 6 ** 0.5)
            assert q.abs().max() <= (6 / p[0].numel()) ** 0.5
    assert weights == 5  # two conv layers, two fully connected, the output
    single = build_model(he, 784, 10, 1)
    for p, q in zip(b.parameters(), single.parameters()):
        assert torch.equal(p[p.shape[0] // 2 :], q)
    with pytest.raises(ConfigError, match="model.init"):
        to_run_config(compose_config("model.init=xavier"))
