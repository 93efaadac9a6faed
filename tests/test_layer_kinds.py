"""Plain layers, normalisation, dropout and standardised worker predictions: what each gradient reaches.

Under ``lfnn_local`` nothing may cross a block boundary, where a block is a worker layer with the
plain layers in front of it (and the output layer with the plain layers in front of it); under
``lfnn`` followers get no global gradient. Normalisation never lets one worker's loss reach another
worker's filters (batch: per channel; group: one group per worker).
"""

from __future__ import annotations

import pytest
import torch

from envs.neural_collective.graph import worker_graph
from agentnet.config import ConfigError, ConvLayerConfig, ModelConfig
from agentnet.network import WorkerNetwork, eval_mode
from agentnet.registry import build_strategy
from agentnet.replica import ReplicaNorm
from strategies.attention import is_mlp
from strategies.leaders import LeaderHook, LeaderSelection, leader_follower_loss
from tests.conftest import compose_config
from tests.test_conv_workers import worker_grad_norms


def mixed_model(seed: int = 0, *, worker_norm: str = "none", replicas: int = 1, **extra) -> WorkerNetwork:
    """8x8 inputs: plain conv (batch norm) -> worker conv (group norm, 2 workers) -> plain FC (batch
    norm) -> worker FC (batch norm, 2 workers) -> plain FC -> output.

    Blocks: [plain conv, worker conv], [plain FC, worker FC], [plain FC, output].
    """
    torch.manual_seed(seed)
    cfg = ModelConfig(
        conv=[ConvLayerConfig(channels=8, plain=True, norm="batch"), ConvLayerConfig(channels=20, pool=2, norm="group")],
        hidden=[30, 20, 10],
        hidden_plain=[0, 2],
        hidden_norm="batch",
        worker_size=10,
        worker_norm=worker_norm,
        worker_logit_scale=2.0,
        **extra,
    )
    return WorkerNetwork(64, 10, cfg, list(range(seed, seed + replicas))).double()


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 64, generator=gen, dtype=torch.float64), torch.randint(0, 10, (16,), generator=gen)


def touched(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def assert_isolated(model: torch.nn.Module, losses: list, units: list) -> None:
    """Loss ``i`` reaches every module of unit ``i`` and none of any other unit (no gradient crosses a unit)."""
    for i, loss in enumerate(losses):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        for j, unit in enumerate(units):
            reached = [touched(m) for m in unit]
            assert all(reached) if i == j else not any(reached), (i, j, reached)


def blocks(model: WorkerNetwork) -> list[list[torch.nn.Module]]:
    """Each block's modules: its plain layers (with their norms), then its worker layer and norm, and
    the workers' trained heads when the model has them."""
    heads = model.cfg.worker_head
    return ([[b.stem, b.layer, b.norm, *([b.readout] if heads else [])] for b in model.blocks()]
            + [[model.head.stem, model.head.layer]])


def test_mixed_model_structure():
    model = mixed_model()
    assert [len(stem) for stem in model.stems] == [1, 1, 1]
    assert model.workers_per_layer == [2, 2]
    assert [type(n).__name__ for n in model.norms] == ["ReplicaNorm", "ReplicaNorm"]
    assert not is_mlp(model)
    graph = worker_graph(model)
    assert {"plain_0", "plain_1", "plain_2"} <= set(graph.nodes)
    assert graph.has_edge("input", "plain_0") and graph.has_edge("plain_0", "worker_0")


@pytest.mark.parametrize("worker_norm,extra", [("none", {}), ("standardize", {}),
                                               ("none", {"worker_pool": 2, "worker_projection": True}),
                                               ("none", {"worker_pool": 2, "worker_head": True}),
                                               ("standardize", {"worker_head": True})])
def test_lfnn_local_no_gradient_crosses_a_block_boundary(worker_norm, extra):
    model = mixed_model(worker_norm=worker_norm, **extra)
    x, y = batch()
    result = build_strategy({"name": "lfnn_local", "delta": 0.5}, model).compute(x, y)
    units = blocks(model)
    losses = [leader_follower_loss(layer, 1.0, 1.0)[0].sum() for layer in result.record.layers]
    losses.append(model.head.global_loss(result.logits, y).sum())  # the output block's own loss
    for i, loss in enumerate(losses):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        for j, block in enumerate(units):
            reached = [touched(m) for m in block]
            if i == j:
                assert all(reached), f"block {i}'s loss missed part of its own block: {reached}"
            else:
                assert not any(reached), f"block {i}'s loss crossed into block {j}: {reached}"


def test_lfnn_followers_get_no_global_gradient_and_plain_layers_learn_from_it():
    model = mixed_model()
    x, y = batch()
    selection = LeaderSelection(0.5, "batch", model.workers_per_layer)
    record = model.forward_record(x, y, path="split", hook=LeaderHook(selection, leaders_carry_global=True))
    model.head.global_loss(record.logits, y).sum().backward()
    for block, rec in zip(model.blocks(), record.layers):
        per_worker = worker_grad_norms(block.layer, block.norm)
        assert (per_worker[~rec.leaders] == 0).all(), "a follower (or its norm) received the global error signal"
        assert (per_worker[rec.leaders] > 0).all()
    # A plain layer in front of a worker layer learns from the global loss through the leaders.
    assert touched(model.stems[0]) and touched(model.stems[1]) and touched(model.stems[2])


def test_lfnn_local_terms_stay_in_their_worker_layer():
    """Under lfnn the local terms train the worker layer (and its norm) only, not its plain layers."""
    model = mixed_model()
    x, y = batch()
    result = build_strategy({"name": "lfnn", "delta": 0.5}, model).compute(x, y)
    for i, layer_record in enumerate(result.record.layers):
        model.zero_grad(set_to_none=True)
        leader_follower_loss(layer_record, 1.0, 1.0)[0].sum().backward(retain_graph=True)
        assert touched(model.hidden[i]) and touched(model.norms[i])
        others = [m for j, block in enumerate(blocks(model)) for m in block if j != i] + [model.stems[i]]
        assert not any(touched(m) for m in others)


def test_group_norm_keeps_workers_apart():
    """One worker's prediction loss reaches its own filters and norm parameters, no other worker's."""
    model = mixed_model()
    x, y = batch()
    record = model.forward_record(x, y, path="local", hook=LeaderHook(LeaderSelection(1.0, "batch", model.workers_per_layer)))
    record.layers[0].worker_loss[..., 0].sum().backward()  # worker 0 of the conv layer
    for p in [*model.hidden[0].parameters(), *model.norms[0].parameters()]:
        per_worker = p.grad.reshape(2, -1).norm(dim=1)
        assert per_worker[0] > 0 and per_worker[1] == 0


def test_batch_norm_statistics_update_once_per_step_and_never_in_evaluation():
    model = mixed_model()
    x, y = batch()
    norm = model.stems[0].norms[0]
    model.forward_record(x, y, path="split", hook=LeaderHook(LeaderSelection(0.5, "batch", model.workers_per_layer)))
    once = norm.running_mean.clone()
    fresh = mixed_model()
    fresh.forward_record(x, y, path="global")
    torch.testing.assert_close(once, fresh.stems[0].norms[0].running_mean)  # split path: one update, not two
    conv_norm = model.norms[1]
    before = conv_norm.running_mean.clone()
    with eval_mode(model), torch.no_grad():
        model(x)
        model.forward_record(x, y, path="local")
    assert model.training
    torch.testing.assert_close(conv_norm.running_mean, before)


def test_standardized_predictions_ignore_the_output_scale():
    model = mixed_model(worker_norm="standardize")
    workers = torch.rand(1, 4, 2, 10, dtype=torch.float64)
    torch.testing.assert_close(model._normalized(3.0 * workers), model._normalized(workers), rtol=1e-3, atol=1e-3)  # up to eps
    out = model._normalized(workers)
    torch.testing.assert_close(out.mean(-1), torch.zeros(1, 4, 2, dtype=torch.float64))
    torch.testing.assert_close(out.pow(2).mean(-1), torch.full((1, 4, 2), 4.0, dtype=torch.float64), rtol=1e-3, atol=1e-3)


def test_worker_pool_predicts_from_a_grid_of_each_workers_own_maps():
    model = mixed_model(worker_pool=2, worker_head=True)
    x, y = batch()
    record = build_strategy({"name": "lfnn_local", "delta": 0.5}, model).compute(x, y).record
    conv, fc = record.layers
    assert conv.workers.shape == (1, 16, 2, 10 * 4) and fc.workers.shape == (1, 16, 2, 10)
    # Worker 0's values are its own 10 maps, each averaged over the 4 quadrants.
    maps = record.layers[0].activation[:, :10]  # worker 0's (B, 10, 8, 8) maps, before max-pooling
    torch.testing.assert_close(conv.workers[0, :, 0], torch.nn.functional.adaptive_avg_pool2d(maps, 2).flatten(1))
    assert model.readouts[0].weight.shape == (2, 40, 10)  # a head per worker over its 40 values


def test_a_workers_head_learns_from_that_worker_alone():
    """With trained heads (the CNN presets), worker 0's prediction loss reaches worker 0's filters,
    norm and head, and nothing of worker 1 — conv workers on a pooled grid and FC workers alike."""
    model = mixed_model(worker_pool=2, worker_head=True)  # conv workers: group norm; FC workers: batch norm
    x, y = batch()
    for layer in range(2):
        record = model.forward_record(x, y, path="local", hook=LeaderHook(LeaderSelection(1.0, "batch", model.workers_per_layer)))
        model.zero_grad(set_to_none=True)
        record.layers[layer].worker_loss[..., 0].sum().backward()
        head = model.readouts[layer]
        assert head.weight.grad[0].abs().sum() > 0 and head.weight.grad[1].abs().sum() == 0
        assert head.bias.grad[0].abs().sum() > 0 and head.bias.grad[1].abs().sum() == 0
        for p in [*model.hidden[layer].parameters(), *model.norms[layer].parameters()]:
            per_worker = p.grad.reshape(2, -1).norm(dim=1)
            assert per_worker[0] > 0 and per_worker[1] == 0
        others = [m for j, block in enumerate(blocks(model)) for m in block if j != layer]
        assert not any(touched(m) for m in others)


@pytest.mark.parametrize("overrides,message", [(["model.worker_pool=0"], "model.worker_pool=0"),
                                                (["model=mlp_275k", "model.worker_pool=2"], "model.worker_pool=2.*an MLP")])
def test_worker_pool_errors_name_the_field(overrides, message):
    from agentnet.composition import to_run_config

    with pytest.raises(ConfigError, match=message):
        to_run_config(compose_config(*(["model=cnn_mnist_438k"] if "model=mlp_275k" not in overrides else []), *overrides))


def test_replicas_of_norm_layers_never_mix():
    """Replica r of a population with plain layers and norms equals the one-replica net seeded r."""
    population = mixed_model(seed=3, replicas=2)
    x, y = batch()
    logits = population.forward_record(x, y, path="global").logits
    for r in range(2):
        single = mixed_model(seed=3 + r)
        torch.testing.assert_close(logits[r], single.forward_record(x, y, path="global").logits[0])
        torch.testing.assert_close(population.stems[0].norms[0].running_mean[8 * r : 8 * (r + 1)], single.stems[0].norms[0].running_mean)


def test_replica_norm_refuses_bad_groups():
    with pytest.raises(ValueError, match="groups"):
        ReplicaNorm("group", 10, 3)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["model.conv=[{channels:20,norm:layer}]"], "model.conv.norm"),
        (["model.conv=[{channels:20,plain:true,block:vgg}]"], "model.conv.plain"),
        (["model.conv=[{channels:20,norm:batchy}]"], "model.conv.norm"),
        (["model.conv=[{channels:20,dropout:1.0}]"], "model.conv.dropout"),
        (["model.hidden_plain=[2]"], "model.hidden_plain"),
        (["model.hidden_plain=[0,0]"], "model.hidden_plain"),
        (["model.hidden_plain=[0,1]"], "model"),
        (["model.hidden_norm=layer"], "model.hidden_norm"),
        (["model.hidden_dropout=-0.1"], "model.hidden_dropout"),
        (["model.worker_norm=l2"], "model.worker_norm"),
        (["model.worker_logit_scale=0"], "model.worker_logit_scale"),
    ],
)
def test_layer_option_errors_name_the_field(overrides, field):
    from agentnet.composition import to_run_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        to_run_config(compose_config(*overrides))


def test_dropout_is_off_in_evaluation():
    torch.manual_seed(0)
    cfg = ModelConfig(conv=[ConvLayerConfig(channels=20, pool=2, dropout=0.5)], hidden=[20], hidden_dropout=0.5)
    model = WorkerNetwork(64, 10, cfg).double()
    x, _ = batch()
    assert not torch.equal(model(x), model(x))  # training mode: two different masks
    with eval_mode(model):
        torch.testing.assert_close(model(x), model(x))


def stable_run_overrides(tmp_path) -> list[str]:
    from tests.conftest import data_root

    return [f"data.root={data_root()}", "model=cnn_mnist_438k", "strategy=lfnn_local", "data.subset=10000", "data.test_subset=2000",
            "trainer.epochs=3", "trainer.lr_schedule=none", "trainer.progress=false", "trainer.loggers=[]",
            "trainer.checkpoint=false", "device=cpu", f"output_dir={tmp_path}"]


# slow: a longer training run (tests/test_conv_workers.py checks that conv lfnn_local learns in the default run)
@pytest.mark.slow
def test_lfnn_local_cnn_trains_stably_at_its_defaults(mnist, tmp_path):
    """The collapse this guards against: without the preset's batch norms these settings give epoch
    objectives 40.9, 48.5, 69.8 and 19.9 % test error (and 88.6 % on the full set at 6 epochs)."""
    from agentnet.recipes import train

    metrics = train(compose_config(*stable_run_overrides(tmp_path)), data=mnist)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] <= losses[0] and max(losses) <= 1.25 * losses[0], losses
    assert metrics["test_error"] < 6.0, metrics["test_error"]
