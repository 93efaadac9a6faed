"""Conv workers: filter-wise and block-wise workers, their gradient routing, presets, real-MNIST learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from envs.neural_collective.graph import worker_graph
from agentnet.composition import to_run_config
from agentnet.config import ConfigError, ConvLayerConfig, ModelConfig
from agentnet.network import WorkerNetwork, build_model
from agentnet.registry import build_strategy
from agentnet.recipes import train
from agentnet.replica import split_conv2d
from agentnet.workers import WorkerBlock, WorkerConv2d
from strategies.leaders import LeaderHook, LeaderSelection, leader_follower_loss
from tests.conftest import compose_config
from tests.test_routing import reference_local_terms


def conv_model(seed: int = 0, block: str = "residual", head: bool = False, norm: str = "none") -> WorkerNetwork:
    """8x8 single-channel inputs: filter-wise conv (2 workers), a block layer (2 blocks), FC (2 workers);
    ``norm`` on every layer (as ``resnet_blocks``: batch norm)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        conv=[
            ConvLayerConfig(channels=20, pool=2, norm=norm),
            ConvLayerConfig(channels=20 if not head else 24, block=block, workers=2, depth=2, width=6, norm=norm),
        ],
        hidden=[20],
        hidden_norm=norm,
        worker_size=10,
        worker_head=head,
    )
    return WorkerNetwork(64, 10, cfg).double()


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 64, generator=gen, dtype=torch.float64), torch.randint(0, 10, (16,), generator=gen)


def worker_grad_norms(layer, *attached: torch.nn.Module) -> torch.Tensor:
    """Per replica and worker, the norm of the gradient over all of the layer's parameters and
    those of modules ``attached`` to it (its normalisation) ``(R, W)`` (rows replica-major, then
    grouped by worker)."""
    R, W = layer.replicas, layer.num_workers
    params = [p for module in (layer, *attached) for p in module.parameters()]
    parts = [torch.zeros(R * W, 1, dtype=torch.float64) if p.grad is None else p.grad.reshape(R * W, -1) for p in params]
    return torch.cat(parts, 1).norm(dim=1).view(R, W)


def layer_touched(layer) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_split_conv2d_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    z_bp, z_local = split_conv2d(x, w, b, padding=1)
    torch.testing.assert_close(z_bp, F.conv2d(x, w, b, padding=1))
    torch.testing.assert_close(z_bp, z_local)
    g_bp, g_local = torch.randn_like(z_bp), torch.randn_like(z_bp)
    torch.autograd.backward([z_bp, z_local], [g_bp, g_local])
    # The local gradient never reaches x; both reach the filters.
    torch.testing.assert_close(x.grad, torch.nn.grad.conv2d_input(x.shape, w.detach(), g_bp, padding=1))
    torch.testing.assert_close(w.grad, torch.nn.grad.conv2d_weight(x.detach(), w.shape, g_bp + g_local, padding=1))
    torch.testing.assert_close(b.grad, (g_bp + g_local).sum((0, 2, 3)))
    assert torch.autograd.gradcheck(lambda a, c, d: split_conv2d(a, c, d, stride=2, padding=1)[0], (x.detach().requires_grad_(), w, b))


def test_conv_workers_are_pooled_filter_groups():
    layer = WorkerConv2d(3, num_workers=4, worker_size=5)
    h = torch.randn(2, 20, 6, 6)
    view = layer.workers(h)
    assert view.shape == (1, 2, 4, 5)  # (R, B, W, k)
    torch.testing.assert_close(view[0, :, 2], h[:, 10:15].mean((2, 3)))
    block = WorkerBlock(3, num_workers=4, worker_size=5, width=2, depth=3)
    assert block(torch.randn(2, 3, 6, 6)).shape == (2, 20, 6, 6)
    assert [c.groups for c in block.convs] == [1, 4, 4]  # only the first conv mixes blocks
    # Two replicas: channels are folded replica-major, replica r's worker w owns channels r*W*k + w*k...
    layer2 = WorkerConv2d(3, num_workers=4, worker_size=5, replicas=2)
    h2 = torch.randn(2, 40, 6, 6)
    view2 = layer2.workers(h2)
    assert view2.shape == (2, 2, 4, 5)
    torch.testing.assert_close(view2[0, :, 2], h2[:, 10:15].mean((2, 3)))
    torch.testing.assert_close(view2[1, :, 2], h2[:, 30:35].mean((2, 3)))
    block2 = WorkerBlock(3, num_workers=4, worker_size=5, width=2, depth=3, replicas=2)
    assert block2(torch.randn(2, 6, 6, 6)).shape == (2, 40, 6, 6)
    assert [c.groups for c in block2.convs] == [2, 8, 8]  # replicas never mix; blocks only in the first conv


def test_blocks_are_independent_workers():
    """A block's output channels depend on its own filters only (grouped convs, per-block shortcut rows)."""
    torch.manual_seed(0)
    block = WorkerBlock(6, num_workers=3, worker_size=4, depth=2, residual=True).double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    block(x)[:, 4:8].sum().backward()  # block 1's output
    for p in block.parameters():
        rows = p.grad.reshape(3, -1).norm(dim=1)
        assert rows[0] == 0 and rows[2] == 0 and rows[1] > 0


@pytest.mark.parametrize("block,norm", [("residual", "none"), ("vgg", "none"), ("residual", "batch")])
def test_lfnn_global_loss_reaches_only_conv_leaders(block, norm):
    model = conv_model(block=block, norm=norm)
    x, y = batch()
    selection = LeaderSelection(0.5, "batch", model.workers_per_layer)
    record = model.forward_record(x, y, path="split", hook=LeaderHook(selection, leaders_carry_global=True))
    model.head.global_loss(record.logits, y).sum().backward()
    for block, rec in zip(model.blocks(), record.layers):
        layer, norms = block.layer, worker_grad_norms(block.layer, block.norm)
        assert norms.shape == rec.leaders.shape == (1, layer.num_workers)
        assert (norms[~rec.leaders] == 0).all(), f"a follower of {type(layer).__name__} received the global error signal"
        assert (norms[rec.leaders] > 0).all(), f"a leader of {type(layer).__name__} received no global error signal"


def test_lfnn_local_losses_stay_in_their_conv_layer_or_block():
    model = conv_model()
    x, y = batch()
    selection = LeaderSelection(0.5, "batch", model.workers_per_layer)
    record = model.forward_record(x, y, path="split", hook=LeaderHook(selection, leaders_carry_global=True))
    for i in range(len(model.hidden)):
        model.zero_grad(set_to_none=True)
        local, _ = leader_follower_loss(record.layers[i], 1.0, 1.0)
        local.backward(retain_graph=True)
        for j, layer in enumerate(model.hidden):
            assert layer_touched(layer) == (i == j), f"layer {i + 1}'s local loss reached layer {j + 1}"
        assert model.output.weight.grad is None
    # Inside a block, the local loss reaches every conv of the block (it is one worker).
    model.zero_grad(set_to_none=True)
    leader_follower_loss(record.layers[1], 1.0, 1.0)[0].backward()
    assert all(conv.weight.grad.abs().sum() > 0 for conv in model.hidden[1].convs)


@pytest.mark.parametrize("head,norm", [(False, "none"), (True, "none"), (True, "batch")])
def test_lfnn_local_no_gradient_crosses_a_conv_layer_or_block(head, norm):
    """``head=True, norm="batch"`` is how ``resnet_blocks`` and the CNN presets are built."""
    model = conv_model(head=head, norm=norm)
    x, y = batch()
    result = build_strategy({"name": "lfnn_local", "delta": 0.5}, model).compute(x, y)
    model.head.global_loss(result.logits, y).backward(retain_graph=True)
    assert not any(layer_touched(m) for b in model.blocks() for m in (b.layer, b.norm, b.readout))
    assert model.output.weight.grad.abs().sum() > 0
    for i in range(len(model.hidden)):
        model.zero_grad(set_to_none=True)
        leader_follower_loss(result.record.layers[i], 1.0, 1.0)[0].backward(retain_graph=True)
        for j, block in enumerate(model.blocks()):
            assert layer_touched(block.layer) == (i == j), f"layer {i + 1}'s loss reached layer {j + 1}"
            if norm != "none":
                assert layer_touched(block.norm) == (i == j), f"layer {i + 1}'s loss reached layer {j + 1}'s norm"
            if head:  # a worker's head is trained by that worker's local loss only
                assert layer_touched(block.readout) == (i == j)


@pytest.mark.parametrize("block", ["residual", "vgg"])
def test_lfnn_conv_gradient_matches_reference_construction(block):
    """The fused pass (split conv, block run twice) equals the textbook two-pass construction of Eq. 1."""
    model = conv_model(block=block)
    x, y = batch()
    strategy = build_strategy({"name": "lfnn", "delta": 0.5, "lambda1": 0.7, "lambda2": 1.3}, model)
    result = strategy.compute(x, y)
    assert result.loss.shape == (1,)  # one replica
    result.loss.sum().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    # The one replica's leader masks (W,) and best leaders.
    masks = [r.leaders[0] for r in result.record.layers]
    bests = [int(r.best[0]) for r in result.record.layers]
    model.zero_grad(set_to_none=True)

    # One replica: conv maps are (B, C, H, W) and, after the flatten, FC activations (1, B, n).
    h, inputs = x.view(-1, 1, 8, 8), []
    for block, mask in zip(model.blocks(), masks):
        layer, post = block.layer, block.post
        inputs.append(h)
        a = torch.relu(layer(h))
        gate = mask.repeat_interleave(layer.worker_size)
        gate = gate.view(1, -1, 1, 1) if a.dim() == 4 else gate.view(1, 1, -1)
        h = post(torch.where(gate, a, a.detach()))
    loss = F.cross_entropy(model.output(h)[0], y)
    for layer, inp, mask, best in zip(model.hidden, inputs, masks, bests):
        a = torch.relu(layer(inp.detach()))
        z = (a.mean((2, 3)) if a.dim() == 4 else a[0]).view(len(x), layer.num_workers, -1)
        loss = loss + reference_local_terms(z, y, mask, best, 0.7, 1.3)
    loss.backward()
    torch.testing.assert_close(result.loss[0], loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, msg=name)


def test_bp_on_conv_model_matches_plain_backprop():
    model = conv_model()
    x, y = batch()
    build_strategy({"name": "bp"}, model).compute(x, y).loss.sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits = model(x)
    assert logits.shape == (1, len(x), 10)  # (R, B, C)
    F.cross_entropy(logits[0], y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad)


@pytest.mark.parametrize(
    "preset, input_dim, channels, expected",
    [("cnn_mnist_438k", 784, 1, 435_400), ("cnn_mnist_275k", 784, 1, 281_270), ("cnn_cifar10_900k", 3072, 3, 900_430),
     ("resnet_blocks", 784, 1, 228_970)],
)
def test_conv_presets_parameter_counts(preset, input_dim, channels, expected):
    run = to_run_config(compose_config(f"model={preset}", "strategy=lfnn"))
    assert run.model.in_channels == channels
    model = build_model(run.model, input_dim, 10)
    assert sum(p.numel() for p in model.parameters()) == expected
    logits = model(torch.randn(2, input_dim))
    assert logits.shape == (1, 2, 10)  # (R, B, C)
    graph = worker_graph(model)  # input, one node per worker, the output
    assert graph.number_of_nodes() == 2 + sum(model.workers_per_layer)


def test_conv_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.worker_size"):  # for a rule that reads worker predictions
        build_model(ModelConfig(conv=[ConvLayerConfig(channels=25)], worker_size=10), 784, 10)
    with pytest.raises(ConfigError, match="model.conv.block"):
        ConvLayerConfig(block="inception")
    with pytest.raises(ConfigError, match="model.conv.workers"):
        ConvLayerConfig(channels=30, block="residual", workers=4)
    with pytest.raises(ValueError, match="model.in_channels=3"):
        build_model(ModelConfig(conv=[ConvLayerConfig(channels=10)], hidden=[], in_channels=3), 784, 10)
    with pytest.raises(ValueError, match="worker_head"):
        build_model(ModelConfig(conv=[ConvLayerConfig(channels=40, block="vgg", workers=1)], hidden=[]), 784, 10)
    with pytest.raises(ValueError, match="attention"):
        build_strategy({"name": "attention"}, conv_model())


def test_zero_update_scale_freezes_a_whole_block_worker(mnist):
    run = to_run_config(compose_config("model=resnet_blocks", "strategy=lfnn_local", "device=cpu"))
    from agentnet.training import ScaledUpdate, Trainer

    model = build_model(run.model, 784, 10)
    trainer = Trainer(run, model, build_strategy(run.strategy, model), None, None, total_steps=10)
    block = model.hidden[1]
    before = [p.detach().clone() for p in block.parameters()]
    scale = torch.ones(block.num_workers * block.worker_size)
    scale[: block.worker_size] = 0.0  # freeze block worker 0
    scales = [None, scale]
    trainer.update = ScaledUpdate(scales)
    trainer.train_step(mnist.train.x[:64], mnist.train.y[:64])
    for p, old in zip(block.parameters(), before):
        rows = p.detach().reshape(block.num_workers, -1) - old.reshape(block.num_workers, -1)
        assert rows[0].abs().max() == 0, "a frozen block worker moved"
        assert rows[1:].abs().max() > 0


@pytest.mark.parametrize("strategy, max_error", [("bp", 8.0), ("lfnn", 25.0), ("lfnn_local", 45.0)])
def test_mnist_cnn_clearly_learns(quick_overrides, mnist, strategy, max_error):
    cfg = compose_config(*quick_overrides, "model=cnn_mnist_438k", f"strategy={strategy}", "trainer.loggers=[]")
    metrics = train(cfg, data=mnist)
    # Chance is 90 % error; thresholds leave room for seeds while failing a network that does not learn.
    assert metrics["test_error"] < max_error, metrics["test_error"]
    saved = json.loads((Path(quick_overrides[-1].split("=", 1)[1]) / "metrics.json").read_text())
    assert saved["num_params"] == 435_400


@pytest.mark.parametrize("model_name", ["resnet_blocks", "cnn_mnist_438k"])
@pytest.mark.parametrize("strategy", ["bp", "lfnn", "lfnn_local"])
def test_bf16_autocast_and_channels_last_train_conv_workers(mnist, strategy, model_name):
    """The GPU-path options run every routing path (split conv, blocks) and keep fp32 master weights."""
    run = to_run_config(compose_config(f"model={model_name}", f"strategy={strategy}", "device=cpu",
                                       "trainer.amp=bf16", "trainer.channels_last=true"))
    from agentnet.training import Trainer

    torch.manual_seed(0)
    model = build_model(run.model, 784, 10)
    trainer = Trainer(run, model, build_strategy(run.strategy, model), None, None, total_steps=10)
    assert model.hidden[0].weight.is_contiguous(memory_format=torch.channels_last)
    result = trainer.train_step(mnist.train.x[:32], mnist.train.y[:32])
    assert result.logits.dtype == torch.bfloat16
    assert result.loss.shape == (1,) and torch.isfinite(result.loss).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    acc = trainer.evaluate(mnist.test.subset(256))["acc"]
    assert len(acc) == 1 and 0.0 <= acc[0] <= 1.0
