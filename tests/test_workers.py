"""Worker views, worker predictions, the split-gradient linear op, and leader selection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from agentnet.config import ModelConfig
from agentnet.network import WorkerNetwork
from agentnet.blocks import OutputHead, PlainLayers
from agentnet.replica import ReplicaLinear, split_linear
from agentnet.workers import WorkerLinear, WorkerReadout
from strategies.leaders import LeaderSelection


def output_head(activation: str) -> OutputHead:
    return OutputHead(PlainLayers(torch.relu), ReplicaLinear(4, 10 if activation == "softmax" else 1), activation, replicas=1)


def test_worker_view_maps_rows_to_workers():
    layer = WorkerLinear(784, num_workers=26, worker_size=10)
    assert layer.weight.shape == (260, 784)
    x = torch.randn(1, 5, 784)
    z, _ = layer.forward_path(x, "global")
    view = layer.workers(z)
    assert view.shape == (1, 5, 26, 10)
    # Worker w owns weight rows [10w, 10w + 10).
    w = 7
    torch.testing.assert_close(view[0, :, w], x[0] @ layer.weight[10 * w : 10 * w + 10].T + layer.bias[10 * w : 10 * w + 10])


def test_presets_parameter_counts():
    assert sum(p.numel() for p in WorkerNetwork(784, 10, ModelConfig(hidden=[260, 260])).parameters()) == 274_570
    assert sum(p.numel() for p in WorkerNetwork(784, 10, ModelConfig(hidden=[370, 370])).parameters()) == 431_430


def test_worker_prediction_is_cross_entropy_of_its_units():
    predictor = output_head("softmax")
    readout = WorkerReadout(6, 10, 10, projection=False, head=False)
    workers = torch.randn(1, 4, 6, 10)
    y = torch.tensor([[1, 3, 9, 0]])
    e = predictor.worker_losses(readout(workers), y)
    assert e.shape == (1, 4, 6)
    for w in range(6):
        torch.testing.assert_close(e[0, :, w], F.cross_entropy(workers[0, :, w], y[0], reduction="none"))
    assert not list(readout.parameters())  # predictions add no parameters


def test_binary_worker_prediction_projection_and_head():
    binary = output_head("sigmoid")
    workers, y = torch.randn(1, 3, 5, 1), torch.tensor([[0, 1, 1]])
    torch.testing.assert_close(
        binary.worker_losses(workers, y),
        F.binary_cross_entropy_with_logits(workers[..., 0], y.float()[..., None].expand(1, 3, 5), reduction="none"),
    )
    with pytest.raises(ValueError, match="worker_projection"):
        WorkerReadout(5, 4, 10, projection=False, head=False)
    projected = WorkerReadout(5, 4, 10, projection=True, head=False)
    assert projected(torch.randn(1, 3, 5, 4)).shape == (1, 3, 5, 10) and not list(projected.parameters())
    head = WorkerReadout(5, 4, 10, projection=False, head=True)
    assert sum(p.numel() for p in head.parameters()) == 5 * (4 * 10 + 10)  # documented extra parameters
    workers = torch.randn(1, 3, 5, 4)
    torch.testing.assert_close(head(workers)[0, :, 2], workers[0, :, 2] @ head.weight[2] + head.bias[2])


@pytest.mark.parametrize("R", [1, 3])
def test_split_linear_values_and_gradients(R):
    torch.manual_seed(0)
    x = torch.randn(R, 8, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(R * 4, 5, dtype=torch.float64, requires_grad=True)  # replica-major rows
    b = torch.randn(R * 4, dtype=torch.float64, requires_grad=True)
    z_bp, z_local = split_linear(x, w, b)
    assert z_bp.shape == (R, 8, 4)
    torch.testing.assert_close(z_bp, z_local)
    for r in range(R):  # replica r is replica r's own linear map
        rows = slice(4 * r, 4 * (r + 1))
        torch.testing.assert_close(z_bp[r], x[r].detach() @ w[rows].detach().T + b[rows].detach())
    g_bp, g_local = torch.randn(R, 8, 4, dtype=torch.float64), torch.randn(R, 8, 4, dtype=torch.float64)
    torch.autograd.backward([z_bp, z_local], [g_bp, g_local])
    for r in range(R):
        rows = slice(4 * r, 4 * (r + 1))
        torch.testing.assert_close(x.grad[r], g_bp[r] @ w[rows].detach())  # the local gradient never reaches x
        torch.testing.assert_close(w.grad[rows], (g_bp[r] + g_local[r]).T @ x[r].detach())
        torch.testing.assert_close(b.grad[rows], (g_bp[r] + g_local[r]).sum(0))
    assert torch.autograd.gradcheck(lambda a, c, d: split_linear(a, c, d)[0], (x.detach().requires_grad_(), w, b))


def test_leader_selection_batch_mode_properties():
    torch.manual_seed(0)
    selection = LeaderSelection(delta=0.3, mode="batch", workers_per_layer=[26, 7])
    losses = torch.rand(1, 16, 26)
    mask, best = selection.select(0, losses)
    assert mask.shape == (1, 26) and best.shape == (1,)
    assert mask.sum().item() == math.ceil(0.3 * 26) == 8
    mean = losses[0].mean(0)
    assert mean[mask[0]].max() <= mean[~mask[0]].min()  # leaders have the lowest mean loss
    assert best.item() == mean.argmin().item()
    assert selection.counts[0].shape == (1, 26) and selection.counts[0].sum().item() == 8
    mask2, _ = selection.select(1, torch.rand(1, 4, 7))
    assert mask2.sum().item() == math.ceil(0.3 * 7) == 3


def test_leader_selection_sample_mode():
    selection = LeaderSelection(delta=0.5, mode="sample", workers_per_layer=[6])
    losses = torch.rand(1, 10, 6)
    mask, best = selection.select(0, losses)
    assert mask.shape == (1, 10, 6) and (mask.sum(-1) == 3).all()
    assert best.shape == (1, 10) and torch.equal(best, losses.argmin(-1))
    for b in range(10):
        assert losses[0, b][mask[0, b]].max() <= losses[0, b][~mask[0, b]].min()


def test_leader_selection_epoch_mode_fixed_within_epoch():
    selection = LeaderSelection(delta=0.25, mode="epoch", workers_per_layer=[8])
    first, _ = selection.select(0, torch.arange(8.0).repeat(1, 4, 1))  # workers 0,1 lowest
    later, best = selection.select(0, torch.arange(8.0).flip(0).repeat(1, 4, 1))  # now 6,7 lowest
    assert first.shape == (1, 8)
    assert torch.equal(first, later) and first[0, :2].all()
    assert best.item() == 1  # best among the fixed leaders on this batch
    selection.end_epoch()  # next epoch's leaders come from this epoch's mean loss: all equal -> any 2
    assert selection.epoch_counts[0][0].tolist() == [[2, 2, 0, 0, 0, 0, 0, 0]]
    selection.select(0, torch.arange(8.0).flip(0).repeat(1, 4, 1))
    selection.end_epoch()
    nxt, _ = selection.select(0, torch.zeros(1, 4, 8))
    assert nxt[0, 6:].all()  # epoch 2's mean loss favoured workers 6 and 7


@pytest.mark.parametrize("mode", ["batch", "sample", "epoch"])
def test_leader_selection_per_replica_delta(mode):
    """A population sweeping delta: replica r leads with its own ceil(delta_r * W) lowest-loss workers."""
    torch.manual_seed(0)
    deltas, W, B = [0.2, 0.5, 1.0], 7, 12
    selection = LeaderSelection(delta=deltas, mode=mode, workers_per_layer=[W], replicas=3)
    losses = torch.rand(3, B, W)  # continuous: no ties
    mask, best = selection.select(0, losses)
    per_sample = mode == "sample"
    assert mask.dtype == torch.bool and mask.shape == ((3, B, W) if per_sample else (3, W))
    assert [math.ceil(d * W) for d in deltas] == [2, 4, 7]
    ranked = losses if per_sample else losses.mean(1, keepdim=True)  # (R, B or 1, W): what each replica ranks
    mask_rows = mask if per_sample else mask.unsqueeze(1)
    for r, d in enumerate(deltas):
        n_lead = math.ceil(d * W)
        for row, lead in zip(ranked[r], mask_rows[r]):
            assert lead.sum().item() == n_lead
            lowest = torch.zeros(W, dtype=torch.bool)
            lowest[row.argsort()[:n_lead]] = True
            assert torch.equal(lead, lowest), f"replica {r} did not choose its {n_lead} lowest-loss workers"
    torch.testing.assert_close(best, ranked.argmin(-1) if per_sample else ranked[:, 0].argmin(-1))
    expected_counts = mask.float().mean(1) if per_sample else mask.float()
    torch.testing.assert_close(selection.counts[0], expected_counts)
    with pytest.raises(ValueError, match="delta"):
        LeaderSelection(delta=[0.2, 0.5], mode=mode, workers_per_layer=[W], replicas=3)


def test_leader_selection_rejects_bad_arguments():
    with pytest.raises(ValueError, match="delta"):
        LeaderSelection(1.5, "batch", [4])
    with pytest.raises(ValueError, match="selection"):
        LeaderSelection(0.5, "sometimes", [4])
