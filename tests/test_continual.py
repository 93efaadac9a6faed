"""Continual learning: metrics, streams, CL methods (composable with every strategy), and real forgetting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agentnet.composition import to_run_config
from agentnet.config import ModelConfig
from agentnet.continual.methods import CL_METHODS, build_cl_method
from agentnet.continual.methods.replay import ReservoirBuffer
from agentnet.continual.metrics import (
    accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    summarize,
)
from agentnet.recipes import run_continual
from agentnet.continual.streams import TaskStream
from agentnet.network import WorkerNetwork
from agentnet.registry import STRATEGIES
from tests.conftest import compose_config

# Rows: before training, after task 1, 2, 3 (GEM's R with an init row for FWT).
R3 = [
    [0.10, 0.10, 0.10],
    [0.90, 0.20, 0.10],
    [0.80, 0.95, 0.30],
    [0.70, 0.90, 0.85],
]


def test_metrics_on_hand_computed_3x3():
    assert accuracy(R3) == pytest.approx((0.7 + 0.9 + 0.85) / 3)
    assert backward_transfer(R3) == pytest.approx(((0.7 - 0.9) + (0.9 - 0.95)) / 2)
    assert forward_transfer(R3) == pytest.approx(((0.2 - 0.1) + (0.3 - 0.1)) / 2)
    assert forgetting(R3) == pytest.approx(((0.9 - 0.7) + (0.95 - 0.9)) / 2)
    assert summarize(R3)["learning_acc"] == pytest.approx([0.9, 0.95, 0.85])


def test_metrics_no_forgetting_and_shape_check():
    perfect = [[0.1, 0.1], [1.0, 0.1], [1.0, 1.0]]
    assert backward_transfer(perfect) == 0 and forgetting(perfect) == 0 and accuracy(perfect) == 1
    # Forgetting counts the best accuracy ever reached, even if it rose after learning the task.
    rising = [[0, 0, 0], [0.5, 0, 0], [0.9, 0.8, 0], [0.6, 0.8, 0.9]]
    assert forgetting(rising) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.8)) / 2)
    with pytest.raises(ValueError, match=r"\(T\+1, T\)"):
        accuracy([[1.0, 1.0], [1.0, 1.0]])


def test_permutations_fixed_distinct_and_seeded(mnist):
    a = TaskStream(mnist, "permuted", 4, seeds=3, first_unpermuted=True)
    b = TaskStream(mnist, "permuted", 4, seeds=3, first_unpermuted=True)
    c = TaskStream(mnist, "permuted", 4, seeds=4, first_unpermuted=True)
    assert a.tasks[0].permutation is None
    assert all(t.permutation.shape == (1, 784) for t in a.tasks[1:])  # (R, D)
    perms = [t.permutation[0] for t in a.tasks[1:]]
    for i in range(3):
        assert sorted(perms[i].tolist()) == list(range(784))  # a real permutation
        assert torch.equal(perms[i], b.tasks[i + 1].permutation[0])  # same seed, same permutation
        assert not torch.equal(perms[i], c.tasks[i + 1].permutation[0])
        for j in range(i):
            assert not torch.equal(perms[i], perms[j])
    x, y = a.batch(a.tasks[2], torch.arange(5))
    assert x.shape == (1, 5, 784) and torch.equal(y, mnist.train.y[:5].unsqueeze(0))
    assert torch.equal(x[0], mnist.train.x[:5][:, perms[1]])  # a gather of the pixels
    # A population: replica r draws exactly the permutations of a one-replica stream seeded seeds[r].
    pop = TaskStream(mnist, "permuted", 4, seeds=[3, 4], first_unpermuted=True)
    for i in range(1, 4):
        assert torch.equal(pop.tasks[i].permutation[0], a.tasks[i].permutation[0])
        assert torch.equal(pop.tasks[i].permutation[1], c.tasks[i].permutation[0])
    x, y = pop.batch(pop.tasks[2], torch.arange(5))  # one shared batch, each replica's own view
    assert x.shape == (2, 5, 784) and y.shape == (2, 5)
    assert torch.equal(x[0], mnist.train.x[:5][:, perms[1]])
    assert torch.equal(x[1], mnist.train.x[:5][:, c.tasks[2].permutation[0]])


def test_pad32_and_split_and_rotated_streams(mnist):
    padded = TaskStream(mnist, "permuted", 2, pad32=True)
    assert padded.input_dim == 1024
    x, _ = padded.batch(padded.tasks[0], torch.arange(3))
    assert x.shape == (1, 3, 1024)
    split = TaskStream(mnist, "split_task", 5)
    assert [t.classes.tolist() for t in split.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert set(mnist.train.y[split.tasks[2].train_idx].unique().tolist()) == {4, 5}
    assert split.logit_mask(split.tasks[1]).tolist() == [False, False, True, True] + [False] * 6
    rotated = TaskStream(mnist, "rotated", 4)
    x0, _ = rotated.batch(rotated.tasks[0], torch.arange(2))
    x2, _ = rotated.batch(rotated.tasks[2], torch.arange(2))
    assert x0.shape == x2.shape == (1, 2, 784)
    assert torch.allclose(x0[0], mnist.train.x[:2]) and not torch.allclose(x2, x0)


def _model():
    torch.manual_seed(0)
    return WorkerNetwork(784, 10, ModelConfig(hidden=[20], worker_size=10))


@pytest.mark.parametrize("name", ["ewc", "online_ewc", "si"])
def test_penalties_zero_at_anchor_and_grow(name, mnist):
    model = _model()
    method = build_cl_method({"name": name}, model)
    stream = TaskStream(mnist.__class__(train=mnist.train.subset(500), test=mnist.test.subset(100)), "permuted", 2)
    method.before_task(None, stream, stream.tasks[0])
    if name == "si":  # give SI a path: a few manual gradient steps
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(5):
            x, y = stream.batch(stream.tasks[0], torch.arange(64 * i, 64 * (i + 1)))
            opt.zero_grad()
            model.head.global_loss(model(x), y).backward()
            method.after_backward(None, None)
            opt.step()
            method.after_step(None, x, y, None)
    method.after_task(None, stream, stream.tasks[0])
    assert method.penalty().item() == pytest.approx(0.0, abs=1e-12)
    values = []
    for scale in (0.01, 0.1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale)
        values.append(method.penalty().item())
    assert 0 < values[0] < values[1]


def test_ewc_gradient_is_the_penalty_gradient_over_every_anchor(mnist):
    """The merged form ``F (p - theta_bar)`` used per step is the gradient of the documented penalty
    ``lambda/2 sum_t F_t (p - theta_t)^2`` over all anchored tasks (and survives a checkpoint)."""
    model = _model()
    method = build_cl_method({"name": "ewc", "ewc_lambda": 7.0, "fisher_samples": 50}, model)
    stream = TaskStream(mnist.__class__(train=mnist.train.subset(500), test=mnist.test.subset(100)), "permuted", 3)
    for t in range(3):
        method.before_task(None, stream, stream.tasks[t])
        with torch.no_grad():  # move away from the last anchor, so the anchors differ
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        method.after_task(None, stream, stream.tasks[t])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    params = list(model.parameters())
    expected = torch.autograd.grad(_penalty_with_grad(method), params)
    for restored in (method, _reloaded(method, model)):
        for p in params:
            p.grad = None
        restored.after_backward(None, None)
        for p, e in zip(params, expected):
            # float32 rounding of the two forms: relative to the gradient's scale
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6 * float(e.abs().max()))


@pytest.mark.parametrize("name", sorted(CL_METHODS.names()))
def test_state_before_the_first_task_ends_round_trips(name, mnist):
    """A checkpoint written during task 1 (nothing consolidated yet) loads into a fresh method, and the
    restored method acts as the original does. The runner does not call ``before_task`` again when it
    resumes mid-stage, so the restored one gets only the state. (EWC crashed here: ``_merge`` of no anchors.)"""
    model = _model()
    stream = TaskStream(mnist.__class__(train=mnist.train.subset(500), test=mnist.test.subset(100)), "permuted", 2)
    method = build_cl_method({"name": name}, model)
    method.before_task(None, stream, stream.tasks[0])
    restored = build_cl_method({"name": name}, model)
    restored.load_state_dict(method.state_dict())
    x, y = stream.batch(stream.tasks[0], torch.arange(32))
    grads = []
    for m in (method, restored):
        model.zero_grad()
        model.head.global_loss(model(x), y).backward()
        m.after_backward(None, None)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _penalty_with_grad(method):
    """``penalty()`` with the graph kept (the method's own one is detached: a report, not a loss)."""
    lam = method.cfg.ewc_lambda
    return sum(0.5 * lam * (f[n] * (p - th[n]).pow(2)).sum() for f, th in method.anchors for n, p in method.model.named_parameters())


def _reloaded(method, model):
    copy = build_cl_method({"name": "ewc", "ewc_lambda": 7.0, "fisher_samples": 50}, model)
    copy.load_state_dict(method.state_dict())
    return copy


def test_replay_buffer_respects_budget_and_is_uniform():
    buffer = ReservoirBuffer(100, seed=0)
    for start in range(0, 5000, 50):
        x = torch.arange(start, start + 50, dtype=torch.float32).view(1, 50, 1)  # (R, B, D)
        buffer.add(x, torch.arange(start, start + 50).unsqueeze(0))
        assert len(buffer) <= 100
    assert len(buffer) == 100 and buffer.x.shape == (1, 100, 1) and buffer.y.shape == (1, 100)
    kept = buffer.y[0].numpy()
    assert len(np.unique(kept)) == 100
    assert 1500 < kept.mean() < 3500  # a uniform sample of 0..4999, not the most recent items
    x, y = buffer.sample(32)
    assert x.shape == (1, 32, 1) and y.shape == (1, 32) and torch.equal(x[0, :, 0].long(), y[0])
    # Two replicas: each keeps its own examples, in the slots a one-replica buffer would keep.
    pair = ReservoirBuffer(100, seed=0)
    for start in range(0, 5000, 50):
        ids = torch.arange(start, start + 50)
        ids2 = torch.stack([ids, ids + 10_000])
        pair.add(ids2.float().unsqueeze(-1), ids2)
    assert pair.x.shape == (2, 100, 1) and torch.equal(pair.y[0], buffer.y[0]) and torch.equal(pair.y[1], buffer.y[0] + 10_000)
    x, y = pair.sample(32)
    assert x.shape == (2, 32, 1) and torch.equal(x[..., 0].long(), y) and torch.equal(y[1], y[0] + 10_000)


def _cl_overrides(tmp_path, *extra):
    return [
        "benchmark=split_mnist", "benchmark.num_tasks=5", "data.subset=6000", "data.test_subset=2000",
        "benchmark.iterations_per_task=60", "trainer.progress=false", "device=cpu", f"output_dir={tmp_path}", *extra,
    ]


def test_finetuning_forgets_while_joint_does_not(mnist, tmp_path):
    """Class-incremental split MNIST on real data: the first task is forgotten unless data is joint."""
    finetune = run_continual(compose_config("strategy=bp", "cl=none", *_cl_overrides(tmp_path / "ft")), data=mnist)
    joint = run_continual(compose_config("strategy=bp", "cl=joint", *_cl_overrides(tmp_path / "joint")), data=mnist)
    R_ft, R_joint = np.array(finetune["acc_matrix"]), np.array(joint["acc_matrix"])
    assert R_ft[1, 0] > 0.9 and R_ft[-1, 0] < 0.3  # learned, then forgotten
    assert R_joint[-1, 0] > 0.8  # still known at the end
    assert joint["ACC"] > finetune["ACC"] + 0.3 and finetune["forgetting"] > 0.5
    written = json.loads((tmp_path / "ft" / "cl_metrics.json").read_text())
    for key in ("acc_matrix", "ACC", "BWT", "FWT", "forgetting", "learning_acc", "wall_s", "config"):
        assert key in written
    assert len(written["acc_matrix"]) == 6 and len(written["acc_matrix"][0]) == 5
    for name in ("acc_matrix.csv", "acc_matrix.png", "task_accuracy.png"):
        assert (tmp_path / "ft" / name).is_file()


@pytest.mark.parametrize("method", ["none", "ewc", "online_ewc", "si", "replay", "joint"])
@pytest.mark.parametrize("strategy", ["bp", "lfnn", "lfnn_local", "attention"])
def test_every_method_composes_with_every_strategy(method, strategy, mnist, tmp_path):
    overrides = [
        "benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.iterations_per_task=40", "data.subset=2000",
        "data.test_subset=500", "trainer.progress=false", "device=cpu", f"output_dir={tmp_path}",
        "cl.fisher_samples=64" if "ewc" in method else "trainer.log_every=50",
    ]
    metrics = run_continual(compose_config(f"strategy={strategy}", f"cl={method}", *overrides), data=mnist)
    R = np.array(metrics["acc_matrix"])
    assert R.shape == (3, 2) and np.isfinite(R).all()
    assert R[1, 0] > 0.3  # learned something in 40 steps


#: Every rule with at least one gradient-reading method in the default suite; the whole product is slow.
_QUICK_PAIRS = {("fa", "ewc"), ("fa", "replay"), ("lg_bp", "si"), ("fg_w", "ewc"), ("lg_fg_w", "si"), ("fg_a", "replay"),
                ("fg_a", "ewc"), ("lg_fg_a", "si"), ("pepita", "ewc"), ("pepita", "si")}
_RULE_METHODS = [(s, m) for s in ["fa", "lg_bp", "fg_w", "lg_fg_w", "fg_a", "lg_fg_a"] for m in ["ewc", "si", "replay"]]
_RULE_METHODS += [("pepita", m) for m in ["ewc", "online_ewc", "si", "replay", "joint"]]  # writes .grad with no backward pass


@pytest.mark.parametrize("strategy,method", [
    pytest.param(s, m, marks=() if (s, m) in _QUICK_PAIRS else pytest.mark.slow) for s, m in _RULE_METHODS
])
def test_methods_compose_with_the_other_learning_rules(strategy, method, mnist, tmp_path):
    """The Table 1 rules with the methods that read gradients (EWC's Fisher, SI's path integral) or
    change the batch (replay): finite, complete accuracy matrices (fg_w barely learns in 40 steps)."""
    overrides = [
        "benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.iterations_per_task=40", "data.subset=2000",
        "data.test_subset=500", "trainer.progress=false", "device=cpu", f"output_dir={tmp_path}", "model.hidden=[100]",
        "cl.fisher_samples=64" if "ewc" in method else "trainer.log_every=50",
    ]
    metrics = run_continual(compose_config(f"strategy={strategy}", f"cl={method}", *overrides), data=mnist)
    R = np.array(metrics["acc_matrix"])
    assert R.shape == (3, 2) and np.isfinite(R).all()
    if strategy not in ("fg_w", "lg_fg_w"):
        assert R[1, 0] > 0.12  # above chance after the first task


def test_cl_registry_and_configs():
    assert set(CL_METHODS.names()) >= {"none", "ewc", "online_ewc", "si", "replay", "joint"}
    run = to_run_config(compose_config("benchmark=pmnist_vdv", "cl=si"))
    assert run.benchmark.iterations_per_task == 5000 and run.benchmark.pad32 and run.model.hidden == [1000, 1000]
    assert run.trainer.lr == 1e-4 and run.cl.name == "si"
    with pytest.raises(Exception, match="cl.ewc_lambda"):
        to_run_config(compose_config("cl=ewc", "cl.ewc_lambda=-1"))
    with pytest.raises(Exception, match="registered"):
        to_run_config(compose_config("cl=none", "cl.name=magic"))
    assert STRATEGIES.names()


def test_cl_run_checkpoints_after_every_task(mnist, tmp_path):
    run_continual(compose_config("strategy=bp", *_cl_overrides(tmp_path), "benchmark.num_tasks=2",
                                 "benchmark.iterations_per_task=10"), data=mnist)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    progress, record = state["plugins"]["StreamProgress"], state["plugins"]["AccuracyMatrix"]
    assert state["format"] == 4 and len(state["shuffle"]) == 1  # one replica, one shuffle generator
    assert progress["stage"] == 2 and len(record["acc_matrices"]) == 1 and state["step"] == 20
    assert len(record["acc_matrices"][0]) == 3 and all(len(row) == 2 for row in record["acc_matrices"][0])


@pytest.mark.parametrize("labels", ["all", "pred", "true"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("path", ["linear", "per_sample", "batch_norm", "worker_heads"])
def test_diagonal_fisher_matches_a_per_sample_loop(labels, masked, path):
    """EWC's Fisher against autograd one sample, one replica and one class at a time (``all``: every
    class weighted by its predicted probability; a task's logit mask removes the other classes).
    Both computations: the per-layer formula for fully connected nets (what ``diagonal_fisher``
    picks for an MLP), ``torch.func`` per-sample gradients (forced on the MLP, and picked for a net
    with batch norm). Worker heads (``model.worker_head``, as in mlp_275k and mlp_1000x2) keep the
    fast per-layer formula: inference never runs them, so their Fisher is zero."""
    import torch.nn.functional as F

    from agentnet.continual.methods import ewc
    from agentnet.network import build_model, eval_mode

    torch.manual_seed(0)
    overrides = {"batch_norm": ["model.hidden_norm=batch"], "worker_heads": ["model.worker_head=true"]}.get(path, [])
    model = build_model(to_run_config(compose_config("model=mlp_100x2", "replicas=2", *overrides)).model, 20, 10, [0, 1])
    assert ewc._linear_only(model) == (path != "batch_norm")
    if path == "batch_norm":  # non-trivial running statistics (the Fisher is taken in evaluation mode)
        with torch.no_grad():
            model(torch.randn(2, 64, 20) * 2 + 1)
    diagonal_fisher = ewc.diagonal_fisher if path != "per_sample" else (
        lambda m, x, labels, y=None: ewc._per_sample_fisher(m, x, labels, y, chunk=4) if labels in ewc.FISHER_LABELS
        else ewc.diagonal_fisher(m, x, labels, y))
    x, y = torch.randn(2, 7, 20), torch.randint(0, 10, (2, 7))
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 5]] = True
    if masked:  # a masked task's data belongs to its own classes
        y = torch.tensor([2, 5])[torch.randint(0, 2, (2, 7))]
    expected = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for r in range(2):
        for i in range(7):
            with eval_mode(model):
                logits = model(x[:, i : i + 1])[r, 0]
            logp = F.log_softmax(logits.masked_fill(~mask, float("-inf")) if masked else logits, -1)
            chosen = {"all": range(10), "pred": [int(logp.argmax())], "true": [int(y[r, i])]}[labels]
            for c in chosen:
                if not torch.isfinite(logp[c]):
                    continue
                weight = logp[c].exp().item() if labels == "all" else 1.0
                grads = torch.autograd.grad(logp[c], list(model.parameters()), retain_graph=True, allow_unused=True)
                for (k, _), g in zip(model.named_parameters(), grads):
                    if g is not None:
                        expected[k] += weight * g**2 / 7
    with model.head.logit_mask_as(mask if masked else None):
        fisher = diagonal_fisher(model, x, labels, y)
    for k in expected:
        assert torch.allclose(fisher[k], expected[k], rtol=1e-4, atol=1e-9), k
    with pytest.raises(ValueError, match="cl.fisher_labels"):
        diagonal_fisher(model, x, "sampled")
