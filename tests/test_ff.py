"""Forward-Forward (Hinton 2022): goodness of positive data rises above negative data in every layer
on real MNIST, no gradient crosses a layer, the prediction is the argmax of summed goodness (by hand
on a tiny net) and the trainer's evaluation uses it, populations equal separate runs, exact resume,
the CL methods that compose and the ones refused by name, and learning on real MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agentnet.composition import to_run_config
from agentnet.config import ConfigError, ConvLayerConfig, ModelConfig
from agentnet.data import Split
from agentnet.network import WorkerNetwork, build_model
from agentnet.recipes import run_continual, train
from agentnet.registry import STRATEGIES, build_strategy
from agentnet.session import build_session
from strategies.ff import ForwardForward, embed_labels
from tests.conftest import compose_config, without_timing


def tiny(seeds=(3, 4), inputs: int = 8, classes: int = 4, hidden=(6, 4), **cfg) -> WorkerNetwork:
    cfg = {"hidden": list(hidden), "worker_size": 2, **cfg}
    return WorkerNetwork(inputs, classes, ModelConfig(**cfg), list(seeds), predictions=False).double()


def batch(n: int = 8, inputs: int = 8, classes: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, inputs, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def rows(p: torch.Tensor, r: int, R: int) -> torch.Tensor:
    return p.view(R, -1, *p.shape[1:])[r]


def test_registered_configured_and_checked():
    assert STRATEGIES.get("ff") is ForwardForward and not ForwardForward.worker_predictions
    run = to_run_config(compose_config("strategy=ff", "model=mlp_ff"))
    assert run.strategy.threshold == 1.0 and run.strategy.prediction == "goodness" and run.model.hidden == [2000] * 4
    for field, value in [("threshold", 0), ("goodness", "max"), ("label_scale", -1), ("negatives", "all"), ("prediction", "both")]:
        with pytest.raises(ConfigError, match=f"strategy.{field}"):
            to_run_config(compose_config("strategy=ff", f"strategy.{field}={value}"))


def test_unsupported_networks_are_refused():
    conv = ModelConfig(hidden=[], conv=[ConvLayerConfig(channels=4)])
    with pytest.raises(ConfigError, match="fully connected layers only"):
        build_strategy("ff", WorkerNetwork(36, 3, conv, 0, predictions=False))
    with pytest.raises(ConfigError, match="no normalisation"):
        build_strategy("ff", tiny(hidden_norm="batch"))
    with pytest.raises(ConfigError, match="two or more"):
        build_strategy({"name": "ff", "predict_first_layer": False}, tiny(hidden=(6,)))


def _by_hand_goodness(layers, x, classes, skip_first=False):
    """Per-class summed goodness ``(B, C)`` of one replica's ``layers`` [(W, b)]: label c one-hot (times
    the example's max) in the first pixels, every layer's input divided by its rms (+ 1e-8)."""
    out = []
    for c in range(classes):
        h = x.clone()
        h[:, :classes] = 0
        h[:, c] = x.max(1).values
        total = torch.zeros(x.shape[0], dtype=x.dtype)
        for i, (W, b) in enumerate(layers):
            h = torch.relu((h / (h.pow(2).mean(1, keepdim=True).sqrt() + 1e-8)) @ W.T + b)
            if i or not skip_first:
                total = total + h.pow(2).sum(1)
        out.append(total)
    return torch.stack(out, 1)


@pytest.mark.parametrize("skip_first", [False, True])
def test_prediction_is_the_argmax_of_summed_goodness(skip_first):
    model = tiny(hidden_plain=[0])  # a plain layer in the first block's stem is an FF layer too
    x, y = batch()
    strategy = build_strategy({"name": "ff", "predict_first_layer": not skip_first}, model)
    logits = strategy.predict_logits(x)
    assert logits.shape == (2, 8, 4)
    for r in range(2):
        layers = [(rows(l.weight, r, 2), rows(l.bias, r, 2)) for l in [*model.stems[0].layers, *model.hidden]]
        torch.testing.assert_close(logits[r], _by_hand_goodness(layers, x, 4, skip_first), rtol=1e-10, atol=1e-12)
    # the trainer's evaluation counts exactly these argmaxes (the output layer is never read)
    run = to_run_config(compose_config("strategy=ff", "device=cpu", "trainer.progress=false", "output_dir=null", "replicas=2"))
    from agentnet.training import Trainer

    trainer = Trainer(run, model, strategy, None, [], total_steps=1)
    acc = trainer.evaluate(Split(x, y))["acc"]
    assert acc == (logits.argmax(-1) == y).double().mean(1).float().tolist()
    with torch.no_grad():
        model.output.weight.normal_()
    assert trainer.evaluate(Split(x, y))["acc"] == acc


def test_no_gradient_crosses_a_layer():
    """Scaling layer 1's weights and bias by a > 0 scales its ReLU activity but not its direction, so
    layer 2's normalised input and gradient are unchanged while layer 1's own gradient changes; every
    layer's input is detached; the output layer gets no gradient."""
    x, y = batch()

    def grads(scale: float):
        model = tiny()
        with torch.no_grad():
            model.hidden[0].weight.mul_(scale)
            model.hidden[0].bias.mul_(scale)
        strategy = build_strategy("ff", model)
        seen = []
        hooks = [l.register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad)) for l in model.hidden]
        model.zero_grad(set_to_none=True)
        strategy.backward(strategy.compute(x, y))
        for h in hooks:
            h.remove()
        assert seen and not any(seen)
        assert model.output.weight.grad is None and model.output.bias.grad is None
        return [p.grad.clone() for p in (*model.hidden[0].parameters(), *model.hidden[1].parameters())]

    base, scaled = grads(1.0), grads(2.5)
    for a, b in zip(base[2:], scaled[2:]):  # equal up to the normalisation's eps (1e-8 on the rms)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert (base[0] - scaled[0]).abs().max() > 0.1 * base[0].abs().max()
    assert base[2].abs().max() > 0


def test_negatives_are_wrong_labels_seeded_per_replica_and_respect_the_head():
    model = build_model(ModelConfig(hidden=[8]), 784, 10, [0, 1, 0], predictions=False)
    strategy = build_strategy("ff", model)
    y = torch.randint(0, 10, (3, 4000), generator=torch.Generator().manual_seed(0))
    y[2] = y[0]
    neg = strategy.negative_labels(y)
    assert (neg != y).all() and torch.equal(neg[0], neg[2]) and not torch.equal(neg[0], neg[1])
    counts = torch.bincount((neg[0] - y[0]) % 10, minlength=10)[1:].double()
    assert counts.min() > 0.8 * counts.mean()  # uniform over the 9 other classes
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 3]] = True
    with model.head.logit_mask_as(mask):
        neg = strategy.negative_labels(torch.full((3, 50), 2))
    assert (neg == 3).all()
    hard = strategy.negative_labels(y[:, :200], torch.zeros(3, 200, 10).scatter_(-1, ((y[:, :200] + 1) % 10).unsqueeze(-1), 50.0))
    assert (hard == (y[:, :200] + 1) % 10).all()  # drawn by the softmax of goodness: the one high wrong label


def test_goodness_separates_positive_from_negative_in_every_layer(mnist):
    """Real MNIST, 2 x 100, Adam lr 3e-3: before training a layer's positive and negative goodness are
    alike (measured 15.4 / 15.2 and 19.0 / 19.0 on test images); after one epoch of the 60,000 training
    examples every layer's positive goodness is above its threshold (100) and its negative goodness
    below (measured 106.0 / 93.4 and 102.0 / 97.6)."""
    run = to_run_config(compose_config("strategy=ff", "model.hidden=[100,100]", "trainer.epochs=1", "trainer.progress=false",
                                       "device=cpu", "output_dir=null", "trainer.checkpoint=false", "trainer.lr=3e-3"))
    from agentnet.data import ImageData

    data = ImageData(train=Split(mnist.train.x, mnist.train.y), test=Split(mnist.test.x[:500], mnist.test.y[:500]))
    session = build_session(run, data)
    strategy = session.trainer.strategy
    x, y = data.test.x.unsqueeze(0), data.test.y.unsqueeze(0)

    def gaps():
        state = [g.get_state() for g in strategy.generators]
        neg = strategy.negative_labels(y)
        for g, s in zip(strategy.generators, state):
            g.set_state(s)
        with torch.no_grad():
            pos = [strategy._goodness(h).mean().item() for h in strategy.activities(embed_labels(x, y, 10, 1.0), dropout=False)]
            negs = [strategy._goodness(h).mean().item() for h in strategy.activities(embed_labels(x, neg, 10, 1.0), dropout=False)]
        return np.array(pos), np.array(negs)

    pos0, neg0 = gaps()
    session.run_all()
    pos1, neg1 = gaps()
    assert (np.abs(pos0 - neg0) < 0.05 * pos0).all(), (pos0, neg0)
    assert (pos1 > 100).all() and (neg1 < 100).all() and (pos1 > neg1 + 3).all(), (pos1, neg1)
    assert (pos1 - neg1 > pos0 - neg0 + 3).all()


def test_resume_reproduces_the_uninterrupted_run(mnist, quick_overrides, tmp_path):
    """Negative labels drawn from the checkpointed per-replica generators; two replicas."""
    base = [*quick_overrides, "strategy=ff", "model.hidden=[32,32]", "replicas=2", "data.subset=640", "data.test_subset=300",
            "trainer.batch_size=64", "trainer.loggers=[]"]
    whole = train(compose_config(*base, f"output_dir={tmp_path / 'whole'}"), data=mnist)
    train(compose_config(*base, "trainer.epochs=1", f"output_dir={tmp_path / 'cut'}"), data=mnist)
    resumed = train(compose_config(*base, f"output_dir={tmp_path / 'cut'}", "resume=true"), data=mnist)
    assert resumed["resumed"]["epoch"] == 1
    assert without_timing({k: v for k, v in resumed.items() if k != "resumed"}) == without_timing(whole)


def test_skipping_the_training_accuracy_changes_nothing_learned(mnist, quick_overrides, tmp_path):
    """``trainer.train_accuracy=false`` drops FF's per-class prediction pass from each step: the same
    parameters and evaluations bit for bit, and no running training accuracy; a resumed run may flip it."""
    base = [*quick_overrides, "strategy=ff", "model.hidden=[32,32]", "replicas=2", "data.subset=640", "data.test_subset=300",
            "trainer.batch_size=64", "trainer.epochs=1", "trainer.loggers=[]"]
    runs = {flag: train(compose_config(*base, f"trainer.train_accuracy={flag}", f"output_dir={tmp_path / str(flag)}"), data=mnist)
            for flag in (True, False)}
    measured, skipped = runs[True]["history"][-1], runs[False]["history"][-1]
    assert "train_acc_running" in measured and "train_acc_running" not in skipped
    assert runs[True]["test_error"] == runs[False]["test_error"] and measured["train_loss"] == skipped["train_loss"]
    weights = {flag: torch.load(tmp_path / str(flag) / "checkpoint.pt", weights_only=True)["model"] for flag in (True, False)}
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])
    # The switch does not change what is trained: a run resumes with it flipped, and measures from then on.
    resumed = train(compose_config(*base, "trainer.epochs=2", f"output_dir={tmp_path / 'False'}", "resume=true"), data=mnist)
    assert [("train_acc_running" in h) for h in resumed["history"]] == [False, True]


@pytest.mark.parametrize("prediction", ["goodness", "linear"])
def test_learns_real_mnist(mnist, quick_overrides, prediction):
    """3 epochs of 5000 examples (237 steps), 2 x 200, Adam lr 3e-3: measured 24.1 % test error
    predicting by goodness, 22.9 % with the linear output layer (chance 90 %)."""
    overrides = [*quick_overrides, "strategy=ff", f"strategy.prediction={prediction}", "model.hidden=[200,200]",
                 "trainer.epochs=3", "trainer.checkpoint=false", "trainer.lr=3e-3"]
    metrics = train(compose_config(*overrides), data=mnist)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics["test_error"] < 35, metrics["test_error"]
    assert metrics["history"][-1]["train_acc_running"] > 0.6  # the running accuracy is FF's own prediction


CL = ["benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.iterations_per_task=40", "data.subset=2000",
      "data.test_subset=500", "trainer.progress=false", "device=cpu", "model.hidden=[100]", "trainer.lr=3e-3"]


@pytest.mark.parametrize("method,extra", [
    ("si", []), ("replay", []), ("joint", []),
    ("agem", ["cl.memory_per_task=64", "cl.memory_batch=64"]),
    pytest.param("gem", ["cl.memory_per_task=64"], marks=pytest.mark.slow),
])
def test_cl_methods_compose(mnist, tmp_path, method, extra):
    metrics = run_continual(compose_config("strategy=ff", f"cl={method}", *CL, *extra, f"output_dir={tmp_path}"), data=mnist)
    R = np.array(metrics["acc_matrix"])
    assert R.shape == (3, 2) and np.isfinite(R).all()
    assert R[1, 0] > 0.3  # above chance after the first task


@pytest.mark.parametrize("method", ["ewc", "online_ewc", "lwf"])
def test_cl_methods_reading_the_model_output_are_refused(mnist, tmp_path, method):
    with pytest.raises(ConfigError, match=f"cl={method} with strategy=ff is not supported"):
        run_continual(compose_config("strategy=ff", f"cl={method}", *CL, f"output_dir={tmp_path}"), data=mnist)
