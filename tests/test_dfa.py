"""``dfa`` (direct feedback alignment): each hidden layer's gradient is its own fixed random matrix
times the output error, gated by its own activation derivative, and never involves another layer's
weights; it learns real MNIST; populations, checkpoints, bf16 autocast and the CL methods work with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agentnet.composition import to_run_config
from agentnet.config import ConfigError, ConvLayerConfig, ModelConfig
from agentnet.network import WorkerNetwork, build_model
from agentnet.recipes import run_continual, train
from agentnet.registry import STRATEGIES, build_strategy
from strategies.dfa import DirectFeedbackAlignment
from tests.conftest import compose_config
from tests.test_layer_kinds import batch, mixed_model
from tests.test_population import FILTER_CONV, MIXED, _data, _max_relative_error, _trained


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mlp(replicas: int = 2, hidden=(8, 6)) -> WorkerNetwork:
    return WorkerNetwork(12, 4, ModelConfig(hidden=list(hidden), activation="relu"), list(range(replicas)), predictions=False).double()


def tiny_batch(n: int = 10, inputs: int = 12, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, inputs, generator=gen, dtype=torch.float64), torch.randint(0, 4, (n,), generator=gen)


def step_grads(name: str, model, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    strategy = build_strategy(name, model)
    strategy.backward(strategy.compute(x, y))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rows(p: torch.Tensor, r: int, R: int) -> torch.Tensor:
    n = p.shape[0] // R
    return p[r * n : (r + 1) * n]


def test_registered_configurable_and_checked():
    assert STRATEGIES.get("dfa") is DirectFeedbackAlignment and not DirectFeedbackAlignment.worker_predictions
    assert compose_config("strategy=dfa").strategy.name == "dfa"
    assert to_run_config(compose_config("strategy=dfa", "strategy.feedback_scale=2")).strategy.feedback_scale == 2
    with pytest.raises(Exception, match="strategy.feedback_scale"):
        to_run_config(compose_config("strategy=dfa", "strategy.feedback_scale=0"))


def test_each_hidden_layer_gets_its_fixed_matrix_times_the_output_error():
    """delta_l = (e B_l) ⊙ f'(a_l), grad W_l = delta_l^T x_l, for every replica; the output layer's is BP's."""
    R = 2
    model = tiny_mlp(R)
    x, y = tiny_batch()
    strategy = build_strategy("dfa", model)
    strategy.backward(strategy.compute(x, y))
    (W1, b1), (W2, b2), (W3, b3) = [(layer.weight, layer.bias) for layer in [*model.hidden, model.output]]
    B1, B2 = strategy.feedback
    assert B1.shape == (R, 4, 8) and B2.shape == (R, 4, 6)
    for r in range(R):
        w1, w2, w3 = (rows(W, r, R) for W in (W1, W2, W3))
        c1, c2, c3 = (rows(b, r, R) for b in (b1, b2, b3))
        a1 = x @ w1.T + c1
        a2 = torch.relu(a1) @ w2.T + c2
        e = (torch.softmax(torch.relu(a2) @ w3.T + c3, -1) - F.one_hot(y, 4)) / len(y)
        d1 = (e @ B1[r]) * (a1 > 0)
        d2 = (e @ B2[r]) * (a2 > 0)
        torch.testing.assert_close(rows(W1.grad, r, R), d1.T @ x)
        torch.testing.assert_close(rows(b1.grad, r, R), d1.sum(0))
        torch.testing.assert_close(rows(W2.grad, r, R), d2.T @ torch.relu(a1))
        torch.testing.assert_close(rows(b2.grad, r, R), d2.sum(0))
        torch.testing.assert_close(rows(W3.grad, r, R), e.T @ torch.relu(a2))
        torch.testing.assert_close(rows(b3.grad, r, R), e.sum(0))
    # Replica r's matrices are a one-replica network's with seed r; they never change.
    for r in range(R):
        single = build_strategy("dfa", WorkerNetwork(12, 4, model.cfg, [r], predictions=False).double())
        assert all(torch.equal(b[r], s[0]) for b, s in zip(strategy.feedback, single.feedback))
    before = [b.clone() for b in strategy.feedback]
    strategy.backward(strategy.compute(x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, strategy.feedback))


def test_no_layer_reads_another_layers_weights():
    """Change a layer above (the second hidden layer, the output layer) only where it does not change
    the forward pass (in the null space of the batch's inputs to it): BP's gradients below change —
    they travel through the transposed weights — every DFA gradient stays as it was."""
    R = 2
    model = tiny_mlp(R)
    x, y = tiny_batch(n=3)
    dfa, bp = step_grads("dfa", model, x, y), step_grads("bp", model, x, y)
    with torch.no_grad():
        inputs = {"hidden.1.weight": torch.relu(model.hidden[0](x.expand(R, -1, -1)))}
        inputs["output.weight"] = torch.relu(model.hidden[1](inputs["hidden.1.weight"]))
    gen = torch.Generator().manual_seed(5)
    for name, feats in inputs.items():
        changed = tiny_mlp(R)
        changed.load_state_dict(model.state_dict())
        W = dict(changed.named_parameters())[name]
        with torch.no_grad():
            for r in range(R):
                q, _ = torch.linalg.qr(feats[r].T, mode="complete")  # columns 3.. are orthogonal to the batch's 3 inputs
                v = q[:, 3:] @ torch.randn(q.shape[1] - 3, generator=gen, dtype=torch.float64)
                u = torch.randn(W.shape[0] // R, generator=gen, dtype=torch.float64)
                rows(W, r, R).add_(torch.outer(u, v))
        torch.testing.assert_close(changed(x), model(x))  # the same forward pass
        dfa_changed, bp_changed = step_grads("dfa", changed, x, y), step_grads("bp", changed, x, y)
        for key in dfa:
            torch.testing.assert_close(dfa_changed[key], dfa[key], rtol=0, atol=1e-12)
        assert not torch.allclose(bp_changed["hidden.0.weight"], bp["hidden.0.weight"]), name


def conv_model(R: int = 2) -> WorkerNetwork:
    """8x8 images: plain conv (4) -> worker conv (6, 2 workers, max-pool 2) -> FC 10 -> output, no norms."""
    cfg = ModelConfig(conv=[ConvLayerConfig(channels=4, plain=True), ConvLayerConfig(channels=6, pool=2)], hidden=[10],
                      worker_size=3, activation="relu")
    return WorkerNetwork(64, 10, cfg, list(range(R)), predictions=False).double()


def test_conv_layers_get_the_error_on_their_whole_activation_map():
    """B_l maps e onto the C x H x W map before max-pooling; the filters' gradient is the
    convolution's weight gradient of that delta with the layer's own input, per replica."""
    R = 2
    model = conv_model(R)
    x, y = batch()
    strategy = build_strategy("dfa", model)
    assert strategy.units == [4 * 64, 6 * 64, 10]
    strategy.backward(strategy.compute(x, y))
    conv1, conv2, fc = model.stems[0].layers[0], model.hidden[0], model.hidden[1]
    with torch.no_grad():
        x0 = model.inputs(x)
        a1 = conv1(x0)
        a2 = conv2(torch.relu(a1))
        x3 = model.post[0](torch.relu(a2))  # max-pool, flatten: (R, B, 6*4*4)
        a3 = fc(x3)
        logits = model.output(torch.relu(a3))
    e = (torch.softmax(logits, -1) - F.one_hot(y, 10)) / len(y)  # (R, B, C)
    for layer, a, inp, B in [(conv1, a1, x0, strategy.feedback[0]), (conv2, a2, torch.relu(a1), strategy.feedback[1])]:
        signal = torch.bmm(e, B).reshape(R, len(y), -1, 8, 8).transpose(0, 1).reshape(a.shape)
        delta = signal * (a > 0)
        expected = torch.nn.grad.conv2d_weight(inp, layer.weight.shape, delta, layer.stride, layer.padding, layer.dilation, layer.groups)
        torch.testing.assert_close(layer.weight.grad, expected)
        torch.testing.assert_close(layer.bias.grad, delta.sum((0, 2, 3)))
    delta = torch.bmm(e, strategy.feedback[2]) * (a3 > 0)
    torch.testing.assert_close(fc.weight.grad, torch.bmm(delta.transpose(1, 2), x3).reshape(fc.weight.shape))
    torch.testing.assert_close(model.output.weight.grad, torch.bmm(e.transpose(1, 2), torch.relu(a3)).reshape(model.output.weight.shape))


def test_norms_and_plain_layers_train_and_other_gradients_stay_true():
    """Batch/group norms and plain layers between the worker layers: every parameter learns; the
    hooks live only inside the step, so gradients other code takes (EWC's Fisher) are BP's."""
    model = mixed_model()
    x, y = batch()
    strategy = build_strategy("dfa", model)
    assert len(strategy.feedback) == 5  # plain conv, worker conv, plain FC, worker FC, plain FC (the output's stem)
    result = strategy.compute(x, y)
    strategy.backward(result)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad), \
        [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not any(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks for m in model.modules())
    dfa = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.head.global_loss(model(x), y).sum().backward()
    bp = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(dfa["output.weight"], bp["output.weight"])
    assert not torch.allclose(dfa["hidden.0.weight"], bp["hidden.0.weight"])


def test_block_workers_are_refused_by_name():
    run = to_run_config(compose_config("model=resnet_blocks", "model.in_channels=1"))
    with pytest.raises(ConfigError, match="strategy=dfa.*WorkerBlock"):
        build_strategy("dfa", build_model(run.model, 784, 10))


def test_bf16_autocast_step(mnist):
    run = to_run_config(compose_config("model=cnn_mnist_275k", "strategy=dfa", "device=cpu", "trainer.amp=bf16",
                                       "trainer.channels_last=true", "model.conv.0.channels=12", "model.conv.1.channels=12"))
    from agentnet.training import Trainer

    model = build_model(run.model, 784, 10, predictions=False)
    trainer = Trainer(run, model, build_strategy(run.strategy, model), None, None, total_steps=10)
    result = trainer.train_step(mnist.train.x[:32], mnist.train.y[:32])
    assert result.logits.dtype == torch.bfloat16 and torch.isfinite(result.loss).all()
    trained = [p for n, p in model.named_parameters() if not n.startswith("readouts.")]  # worker heads: read by no rule here
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


@pytest.mark.parametrize("extra", [[], [FILTER_CONV], pytest.param(MIXED, marks=pytest.mark.slow),
                                   ["+vary.strategy.feedback_scale=[0.5,1,3]"]], ids=["mlp", "conv", "mixed", "vary-scale"])
def test_replica_r_equals_the_single_run_with_seed_plus_r(mnist, extra):
    data = _data(mnist, torch.float64)
    population, _ = _trained("dfa", extra, data, seed=4, replicas=3, dtype=torch.float64, steps=4)
    scales = [0.5, 1, 3] if extra and "vary" in extra[0] else [1, 1, 1]
    singles = [_trained("dfa", [e for e in extra if "vary" not in e] + [f"strategy.feedback_scale={scales[r]}"], data, seed=4 + r,
                        replicas=1, dtype=torch.float64, steps=4)[0] for r in range(3)]
    start = [build_model(population.cfg, 784, 10, 4 + r, predictions=False).double() for r in range(3)]
    assert _max_relative_error(population, start) > 1e-3
    assert _max_relative_error(population, singles) < (1e-7 if any("norm" in e for e in extra) else 1e-10)


def test_learns_real_mnist_and_resumes_exactly(mnist, quick_overrides, tmp_path):
    """784-100-100-10, 2 epochs of 3000 examples (188 steps of 32), 2 seeds: measured 15 % test error
    (BP 12 %, FA 15 %; chance 90 %), against 48 % when the hidden layers barely move (feedback scaled
    by 1e-9: Adam's eps swamps their gradient), so the hidden layers learn from their feedback. Cut
    after the first epoch and resumed, it is the same run (the matrices are redrawn from the seeds)."""
    base = [*quick_overrides, "strategy=dfa", "model.hidden=[100,100]", "data.subset=3000", "trainer.batch_size=32", "trainer.loggers=[]",
            "replicas=2"]
    whole = train(compose_config(*base, f"output_dir={tmp_path / 'whole'}"), data=mnist)
    losses = [h["train_loss"] for h in whole["history"]]
    assert losses[-1] < losses[0] and whole["test_error"] < 25, (losses, whole["test_error"])
    frozen = train(compose_config(*base, "strategy.feedback_scale=1e-9", f"output_dir={tmp_path / 'frozen'}"), data=mnist)
    assert frozen["test_error"] > whole["test_error"] + 15, (frozen["test_error"], whole["test_error"])
    train(compose_config(*base, "trainer.epochs=1", f"output_dir={tmp_path / 'cut'}"), data=mnist)
    resumed = train(compose_config(*base, f"output_dir={tmp_path / 'cut'}", "resume=true"), data=mnist)
    assert resumed["resumed"]
    for mine, theirs in zip(resumed["replicas"], whole["replicas"]):
        assert mine["test_acc"] == theirs["test_acc"] and mine["history"][-1]["train_loss"] == theirs["history"][-1]["train_loss"]


CL_METHODS = ["ewc", "online_ewc", "si", "replay", "agem", "gem", "lwf", "joint"]


def check_cl_method_composes(strategy: str, method: str, mnist, tmp_path) -> None:
    """``strategy`` with CL ``method`` on 2 short permuted tasks: runs, and learns the first task."""
    overrides = [f"strategy={strategy}", f"cl={method}", "benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.iterations_per_task=40",
                 "data.subset=2000", "data.test_subset=500", "model.hidden=[100]", "trainer.progress=false", "trainer.loggers=[]",
                 "device=cpu", f"output_dir={tmp_path}"]
    overrides += {"ewc": ["cl.fisher_samples=64"], "online_ewc": ["cl.fisher_samples=64"], "agem": ["cl.memory_per_task=64"],
                  "gem": ["cl.memory_per_task=64"], "replay": ["cl.buffer_size=256"]}.get(method, [])
    metrics = run_continual(compose_config(*overrides), data=mnist)
    R = np.array(metrics["acc_matrix"])
    assert R.shape == (3, 2) and np.isfinite(R).all()
    assert R[1, 0] > 0.3  # learned the first task


@pytest.mark.parametrize("method", CL_METHODS)
def test_every_cl_method_composes(mnist, tmp_path, method):
    check_cl_method_composes("dfa", method, mnist, tmp_path)


@pytest.mark.slow
def test_the_compiled_step_trains_what_the_eager_step_trains(mnist):
    from tests.test_compile import _max_difference, _trained as compiled_run

    eager, compiled = compiled_run(mnist, "dfa"), compiled_run(mnist, "dfa", "trainer.compile=true")
    assert compiled.trainer.compiled.compiled is not None and compiled.trainer.compiled.calls == 10
    assert _max_difference(eager, compiled_run(mnist, "dfa", "trainer.max_steps=1")) > 1e-3
    assert _max_difference(eager, compiled) < 1e-4
