"""Gradient routing, checked with autograd: who receives which error signal under each strategy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentnet.config import ModelConfig
from agentnet.network import WorkerNetwork
from agentnet.registry import build_strategy
from strategies.leaders import LeaderHook, LeaderSelection, leader_follower_loss


def small_model(seed: int = 0, activation: str = "relu", predict_from: str = "activation") -> WorkerNetwork:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden=[40, 30, 20], worker_size=10, activation=activation, predict_from=predict_from)
    return WorkerNetwork(30, 10, cfg).double()


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 30, generator=gen, dtype=torch.float64), torch.randint(0, 10, (16,), generator=gen)


def row_norms(layer) -> torch.Tensor:
    """Per-worker norm ``(R, W)`` of a layer's weight gradient (zero where the worker got no signal)."""
    grad = layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(layer.weight)
    return grad.view(layer.replicas, layer.num_workers, -1).norm(dim=-1)


def grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def reference_local_terms(z, y, mask, best, lambda1: float, lambda2: float) -> torch.Tensor:
    """Eq. 1's local terms written out for one layer's worker outputs ``z`` ``(B, W, k)``
    (one replica: ``mask`` ``(W,)``, ``best`` an int)."""
    e = F.cross_entropy(z.permute(0, 2, 1), y[:, None].expand(-1, z.shape[1]), reduction="none").mean(0)
    mse = ((z - z[:, best].detach()[:, None]) ** 2).mean((0, 2))
    return lambda1 * e[mask].sum() + lambda2 * mse[~mask].sum()


def test_lfnn_global_loss_reaches_only_leaders():
    model = small_model()
    x, y = batch()
    selection = LeaderSelection(0.5, "batch", model.workers_per_layer)
    record = model.forward_record(x, y, path="split", hook=LeaderHook(selection, leaders_carry_global=True))
    model.head.global_loss(record.logits, y).sum().backward()
    for layer, rec in zip(model.hidden, record.layers):
        norms = row_norms(layer)
        assert norms.shape == rec.leaders.shape == (1, layer.num_workers)
        assert (norms[~rec.leaders] == 0).all(), "a follower received the global error signal"
        assert (norms[rec.leaders] > 0).all(), "a leader received no global error signal"
    assert model.output.weight.grad.abs().sum() > 0


def test_lfnn_local_losses_stay_in_their_layer():
    model = small_model()
    x, y = batch()
    selection = LeaderSelection(0.5, "batch", model.workers_per_layer)
    record = model.forward_record(x, y, path="split", hook=LeaderHook(selection, leaders_carry_global=True))
    local, _ = leader_follower_loss(record.layers[1], 1.0, 1.0)
    local.backward()
    assert model.hidden[0].weight.grad is None or model.hidden[0].weight.grad.abs().sum() == 0
    assert model.hidden[2].weight.grad is None and model.output.weight.grad is None
    assert (row_norms(model.hidden[1]) > 0).all()  # every worker of layer 2 has its own local term


@pytest.mark.parametrize("predict_from", ["activation", "preactivation"])
def test_lfnn_total_gradient_matches_reference_construction(predict_from):
    """The fused single-pass implementation equals the textbook two-pass construction of Eq. 1."""
    model = small_model(activation="tanh", predict_from=predict_from)
    x, y = batch()
    strategy = build_strategy({"name": "lfnn", "delta": 0.4, "lambda1": 0.7, "lambda2": 1.3}, model)
    result = strategy.compute(x, y)
    assert result.loss.shape == (1,)
    result.loss.sum().backward()
    fused = grads(model)
    # Replica 0 (the only one): masks (W,), best leader an int.
    masks = [r.leaders[0] for r in result.record.layers]
    bests = [int(r.best[0]) for r in result.record.layers]
    model.zero_grad(set_to_none=True)

    # Reference: global path with followers stop-gradient, then local terms on detached inputs.
    h, inputs = x, []
    for layer, mask in zip(model.hidden, masks):
        inputs.append(h)
        a = torch.tanh(F.linear(h, layer.weight, layer.bias))
        gate = mask.repeat_interleave(layer.worker_size)
        h = torch.where(gate, a, a.detach())
    loss = F.cross_entropy(F.linear(h, model.output.weight, model.output.bias), y)
    for layer, inp, mask, best in zip(model.hidden, inputs, masks, bests):
        z = F.linear(inp.detach(), layer.weight, layer.bias).view(len(x), layer.num_workers, -1)
        z = torch.tanh(z) if predict_from == "activation" else z
        loss = loss + reference_local_terms(z, y, mask, best, 0.7, 1.3)
    loss.backward()
    torch.testing.assert_close(result.loss[0], loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, msg=name)


def test_lfnn_local_no_gradient_crosses_a_layer():
    model = small_model()
    x, y = batch()
    strategy = build_strategy({"name": "lfnn_local", "delta": 0.5}, model)
    result = strategy.compute(x, y)
    # The output loss trains the output layer only.
    model.head.global_loss(result.logits, y).backward(retain_graph=True)
    assert all(layer.weight.grad is None for layer in model.hidden)
    assert model.output.weight.grad.abs().sum() > 0
    # Each hidden layer's local loss leaves every earlier layer untouched.
    for i in range(len(model.hidden)):
        model.zero_grad(set_to_none=True)
        local, _ = leader_follower_loss(result.record.layers[i], 1.0, 1.0)
        local.backward(retain_graph=True)
        for j, layer in enumerate(model.hidden):
            if j == i:
                assert layer.weight.grad.abs().sum() > 0
            else:
                assert layer.weight.grad is None, f"layer {i + 1}'s loss reached layer {j + 1}"


def test_lfnn_local_followers_align_to_best_leader():
    model = small_model()
    x, y = batch()
    strategy = build_strategy({"name": "lfnn_local", "delta": 0.3, "lambda1": 0.0, "lambda2": 1.0}, model)
    result = strategy.compute(x, y)
    result.loss.sum().backward()
    rec = result.record.layers[0]
    norms = row_norms(model.hidden[0])
    assert norms.shape == rec.leaders.shape == (1, model.hidden[0].num_workers)
    # With lambda1 = 0 leaders get nothing; followers are pulled toward the best leader.
    assert (norms[rec.leaders] == 0).all() and (norms[~rec.leaders] > 0).all()


def test_bp_matches_plain_backprop():
    model = small_model()
    x, y = batch()
    build_strategy({"name": "bp"}, model).compute(x, y).loss.sum().backward()
    ours = grads(model)
    model.zero_grad(set_to_none=True)
    # Plain autograd through a plain-matmul forward of the same weights.
    h = x
    for layer in model.hidden:
        h = model.act(F.linear(h, layer.weight, layer.bias))
    F.cross_entropy(F.linear(h, model.output.weight, model.output.bias), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad)


@pytest.mark.parametrize("mode", ["sample", "epoch"])
def test_lfnn_runs_with_other_selection_modes(mode):
    model = small_model()
    x, y = batch()
    strategy = build_strategy({"name": "lfnn", "selection": mode}, model)
    result = strategy.compute(x, y)
    result.loss.sum().backward()
    assert result.loss.shape == (1,) and torch.isfinite(result.loss).all()
    if mode == "sample":
        assert result.record.layers[0].leaders.shape == (1, 16, 4)
