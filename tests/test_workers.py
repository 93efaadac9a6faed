"""Worker views, worker predictions, the split-gradient linear op, and leader selection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from agentnet.config import ModelConfig
from agentnet.network import WorkerNetwork
from agentnet.workers import (
    LeaderSelection,
    WorkerLinear,
    WorkerPredictor,
    WorkerReadout,
    split_linear,
)


def test_worker_view_maps_rows_to_workers():
    layer = WorkerLinear(784, num_workers=26, worker_size=10)
    assert layer.weight.shape == (260, 784)
    x = torch.randn(5, 784)
    z, _ = layer.forward_path(x, "global")
    view = layer.workers(z)
    assert view.shape == (5, 26, 10)
    # Worker w owns weight rows [10w, 10w + 10).
    w = 7
    torch.testing.assert_close(view[:, w], x @ layer.weight[10 * w : 10 * w + 10].T + layer.bias[10 * w : 10 * w + 10])


def test_presets_parameter_counts():
    assert sum(p.numel() for p in WorkerNetwork(784, 10, ModelConfig(hidden=[260, 260])).parameters()) == 274_570
    assert sum(p.numel() for p in WorkerNetwork(784, 10, ModelConfig(hidden=[370, 370])).parameters()) == 431_430


def test_worker_prediction_is_cross_entropy_of_its_units():
    predictor = WorkerPredictor("softmax")
    readout = WorkerReadout(6, 10, 10, projection=False, head=False)
    workers = torch.randn(4, 6, 10)
    y = torch.tensor([1, 3, 9, 0])
    e = predictor.loss(readout(workers), y)
    assert e.shape == (4, 6)
    for w in range(6):
        torch.testing.assert_close(e[:, w], F.cross_entropy(workers[:, w], y, reduction="none"))
    assert not list(predictor.parameters()) and not list(readout.parameters())  # predictions add no parameters


def test_binary_worker_prediction_projection_and_head():
    binary = WorkerPredictor("sigmoid")
    workers, y = torch.randn(3, 5, 1), torch.tensor([0, 1, 1])
    torch.testing.assert_close(binary.loss(workers, y), F.binary_cross_entropy_with_logits(workers[..., 0], y.float()[:, None].expand(3, 5), reduction="none"))
    with pytest.raises(ValueError, match="worker_projection"):
        WorkerReadout(5, 4, 10, projection=False, head=False)
    projected = WorkerReadout(5, 4, 10, projection=True, head=False)
    assert projected(torch.randn(3, 5, 4)).shape == (3, 5, 10) and not list(projected.parameters())
    head = WorkerReadout(5, 4, 10, projection=False, head=True)
    assert sum(p.numel() for p in head.parameters()) == 5 * (4 * 10 + 10)  # documented extra parameters
    workers = torch.randn(3, 5, 4)
    torch.testing.assert_close(head(workers)[:, 2], workers[:, 2] @ head.weight[2] + head.bias[2])


def test_split_linear_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    z_bp, z_local = split_linear(x, w, b)
    torch.testing.assert_close(z_bp, z_local)
    g_bp, g_local = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    torch.autograd.backward([z_bp, z_local], [g_bp, g_local])
    torch.testing.assert_close(x.grad, g_bp @ w.detach())  # the local gradient never reaches x
    torch.testing.assert_close(w.grad, (g_bp + g_local).T @ x.detach())
    torch.testing.assert_close(b.grad, (g_bp + g_local).sum(0))
    assert torch.autograd.gradcheck(lambda a, c, d: split_linear(a, c, d)[0], (x.detach().requires_grad_(), w, b))


def test_leader_selection_batch_mode_properties():
    torch.manual_seed(0)
    selection = LeaderSelection(delta=0.3, mode="batch", workers_per_layer=[26, 7])
    losses = torch.rand(16, 26)
    mask, best = selection.select(0, losses)
    assert mask.sum().item() == math.ceil(0.3 * 26) == 8
    mean = losses.mean(0)
    assert mean[mask].max() <= mean[~mask].min()  # leaders have the lowest mean loss
    assert best.item() == mean.argmin().item()
    assert selection.counts[0].sum().item() == 8
    mask2, _ = selection.select(1, torch.rand(4, 7))
    assert mask2.sum().item() == math.ceil(0.3 * 7) == 3


def test_leader_selection_sample_mode():
    selection = LeaderSelection(delta=0.5, mode="sample", workers_per_layer=[6])
    losses = torch.rand(10, 6)
    mask, best = selection.select(0, losses)
    assert mask.shape == (10, 6) and (mask.sum(1) == 3).all()
    assert torch.equal(best, losses.argmin(1))
    for b in range(10):
        assert losses[b][mask[b]].max() <= losses[b][~mask[b]].min()


def test_leader_selection_epoch_mode_fixed_within_epoch():
    selection = LeaderSelection(delta=0.25, mode="epoch", workers_per_layer=[8])
    first, _ = selection.select(0, torch.arange(8.0).repeat(4, 1))  # workers 0,1 lowest
    later, best = selection.select(0, torch.arange(8.0).flip(0).repeat(4, 1))  # now 6,7 lowest
    assert torch.equal(first, later) and first[:2].all()
    assert best.item() == 1  # best among the fixed leaders on this batch
    selection.end_epoch()  # next epoch's leaders come from this epoch's mean loss: all equal -> any 2
    assert selection.epoch_counts[0][0].tolist() == [2, 2, 0, 0, 0, 0, 0, 0]
    selection.select(0, torch.arange(8.0).flip(0).repeat(4, 1))
    selection.end_epoch()
    nxt, _ = selection.select(0, torch.zeros(4, 8))
    assert nxt[6:].all()  # epoch 2's mean loss favoured workers 6 and 7


def test_leader_selection_rejects_bad_arguments():
    with pytest.raises(ValueError, match="delta"):
        LeaderSelection(1.5, "batch", [4])
    with pytest.raises(ValueError, match="selection"):
        LeaderSelection(0.5, "sometimes", [4])
