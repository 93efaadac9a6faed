"""ResNet-18 at the LFNN paper's scale (issue 36 item 3): ``resnet18_blocks`` (every residual block a
layer of 16 block-wise workers) and its BP twin ``resnet18`` (an ordinary ResNet-18), and the sweep
presets ``experiment=lfnn_table3_tiny_imagenet`` (Table 3) and ``experiment=lfnn_table1_cifar10``
(Table 1's CIFAR-10 column), a few steps of each on the CPU with bf16 autocast and channels-last.

Tiny ImageNet and CIFAR-10 are not on this machine: the presets' runs are checked on real MNIST
(``data=mnist model.in_channels=1``, 28 x 28: the strides give 28 -> 14 -> 7 -> 4 maps).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from agentnet.composition import to_run_config
from agentnet.config import ConfigError, ModelConfig
from agentnet.experiments.paper import LEADERSHIP
from agentnet.hydra_setup import register_all
from agentnet.network import build_model, eval_mode
from agentnet.paths import CONFIG_DIR
from agentnet.registry import STRATEGIES, build_strategy
from agentnet.replica import ReplicaNorm
from agentnet.workers import WorkerBlock
from strategies.leaders import LeaderSelection
from tests.conftest import REPO, compose_config, data_root, experiment_presets

SWEEPS = ("lfnn_table3_tiny_imagenet", "lfnn_table1_cifar10")
#: Flat input values and classes: CIFAR-10 (3 x 32 x 32) and Tiny ImageNet (3 x 64 x 64).
CIFAR10, TINY_IMAGENET = (3 * 32 * 32, 10), (3 * 64 * 64, 200)
#: What runs the presets on this machine's data, in every cell: MNIST, tiny subsets, a few steps.
ON_MNIST = ("data=mnist", "model.in_channels=1", "data.subset=48", "data.test_subset=32", "trainer.epochs=1",
            "trainer.max_steps=3", "trainer.batch_size=16", "trainer.eval_batch_size=32", "device=cpu",
            "trainer.progress=false", "trainer.loggers=[]", "threads=1")


def model_cfg(preset: str, strategy: str = "lfnn") -> ModelConfig:
    """The model preset as ``agentnet model=<preset> strategy=<strategy>`` validates it."""
    return to_run_config(compose_config(f"model={preset}", f"strategy={strategy}")).model


@pytest.mark.parametrize("preset, strategy, data, expected, heads", [
    ("resnet18_blocks", "lfnn", CIFAR10, 5_319_242, 20_480),
    ("resnet18_blocks", "lfnn", TINY_IMAGENET, 5_805_832, 409_600),
    ("resnet18", "bp", CIFAR10, 11_173_962, 0),
    ("resnet18", "bp", TINY_IMAGENET, 11_271_432, 0),
])
def test_parameter_counts(preset, strategy, data, expected, heads):
    """The worker preset: ResNet-18's layers with every block split into 16 workers (second convs
    grouped) plus a head per worker (``C * (channels + workers)`` per layer); the twin: ResNet-18's
    11,173,962 (10 classes) exactly."""
    cfg = model_cfg(preset, strategy)
    assert cfg.in_channels == 3
    model = build_model(cfg, *data, predictions=strategy != "bp")
    assert model.num_params == sum(p.numel() for p in model.parameters()) == expected
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("readouts.")) == heads
    assert model.workers_per_layer == [16 if preset == "resnet18_blocks" else 1] * 8
    assert len(model.blocks()[0].stem) == 1  # the 3x3 stem is plain: it belongs to the first block


@pytest.mark.parametrize("preset", ["resnet18_blocks", "resnet18"])
@pytest.mark.parametrize("data", [CIFAR10, TINY_IMAGENET], ids=["32x32", "64x64"])
def test_forward_on_cifar10_and_tiny_imagenet_shapes(preset, data, one_thread):
    model = build_model(model_cfg(preset, "lfnn" if preset == "resnet18_blocks" else "bp"), *data,
                        predictions=preset == "resnet18_blocks")
    dim, classes = data
    x = torch.randn(2, dim)
    with eval_mode(model):
        assert model(x).shape == (1, 2, classes)  # (R, B, C)
    if preset == "resnet18_blocks":
        record = model.forward_record(x, torch.tensor([0, 1]))
        k = [4, 4, 8, 8, 16, 16, 32, 32]  # channels per worker: 64, 128, 256, 512 over 16 workers
        assert [tuple(r.workers.shape) for r in record.layers] == [(1, 2, 16, c) for c in k]
        side = 64 if dim == TINY_IMAGENET[0] else 32
        assert record.layers[-1].activation.shape == (2, 512, side // 8, side // 8)  # strides 1, 2, 2, 2
        logits = model.blocks()[3].readout(record.layers[3].workers)
        assert logits.shape == (1, 2, 16, classes)


class _ReferenceBlock(nn.Module):
    """He et al.'s BasicBlock as torchvision writes it."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _ReferenceResNet18(nn.Module):
    """torchvision's resnet18 with the 3x3 stride-1 stem and no max-pool of CIFAR-sized inputs."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        plan = [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1)]
        self.blocks = nn.ModuleList(_ReferenceBlock(*p) for p in plan)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for block in self.blocks:
            x = block(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _copy_norm(ours: ReplicaNorm, ref: nn.BatchNorm2d) -> None:
    ref.weight.copy_(ours.weight), ref.bias.copy_(ours.bias)
    ref.running_mean.copy_(ours.running_mean), ref.running_var.copy_(ours.running_var)


def test_the_bp_twin_is_an_ordinary_resnet18(one_thread):
    """``resnet18`` computes exactly what torchvision's BasicBlock ResNet-18 computes with the same
    weights, in training mode (batch statistics) and in evaluation mode (running statistics)."""
    torch.manual_seed(0)
    ours = build_model(model_cfg("resnet18", "bp"), *CIFAR10, predictions=False)
    ref = _ReferenceResNet18(3, 10)
    assert sum(p.numel() for p in ref.parameters()) == ours.num_params
    with torch.no_grad():
        for module in ours.modules():  # norms off the identity, so the test sees where they sit
            if isinstance(module, ReplicaNorm):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 1.5)
        ref.conv1.weight.copy_(ours.stems[0].layers[0].weight)
        _copy_norm(ours.stems[0].norms[0], ref.bn1)
        for block, mine in zip(ref.blocks, ours.hidden):
            assert isinstance(mine, WorkerBlock)
            block.conv1.weight.copy_(mine.convs[0].weight), block.conv2.weight.copy_(mine.convs[1].weight)
            _copy_norm(mine.norms[0], block.bn1), _copy_norm(mine.norms[1], block.bn2)
            assert (block.downsample is None) == isinstance(mine.shortcut, nn.Identity)
            if block.downsample is not None:
                block.downsample[0].weight.copy_(mine.shortcut.weight)
                _copy_norm(mine.shortcut_norm, block.downsample[1])
        ref.fc.weight.copy_(ours.output.weight), ref.fc.bias.copy_(ours.output.bias)
    x = torch.randn(4, CIFAR10[0])
    images = x.view(4, 3, 32, 32)
    with torch.no_grad():
        ref.eval()
        with eval_mode(ours):
            torch.testing.assert_close(ours(x)[0], ref(images))
        ref.train()
        torch.testing.assert_close(ours(x)[0], ref(images))
        torch.testing.assert_close(ours.hidden[2].norms[0].running_mean, ref.blocks[2].bn1.running_mean)


def test_basic_block_workers_share_no_parameter():
    """A worker's loss reaches only its own rows of every conv, norm and projection of the block
    (the first conv reads every input channel, the second only the worker's own maps)."""
    torch.manual_seed(0)
    block = WorkerBlock(6, 4, 3, stride=2, norm="batch", bias=False)
    assert isinstance(block.shortcut, nn.Conv2d) and block.shortcut_norm is not None
    out = block(torch.randn(5, 6, 8, 8))
    assert out.shape == (5, 12, 4, 4)
    out[:, 3:6].square().sum().backward()  # worker 1's output channels
    for name, p in block.named_parameters():
        rows = p.grad.reshape(4, -1).abs().sum(1)  # one row group per worker
        assert rows[1] > 0 and rows[[0, 2, 3]].eq(0).all(), name


def test_split_path_updates_batch_statistics_once():
    """``lfnn``'s split path runs a block twice on one batch; its norms' running averages move once."""
    torch.manual_seed(0)
    block = WorkerBlock(4, 2, 4, norm="batch", bias=False)
    twin = WorkerBlock(4, 2, 4, norm="batch", bias=False)
    twin.load_state_dict(block.state_dict())
    x = torch.randn(8, 4, 6, 6)
    z, z_local = block.forward_path(x, "split")
    torch.testing.assert_close(z, z_local)
    twin(x)
    for a, b in zip(block.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)


def test_the_twin_refuses_leader_follower_rules_clearly():
    with pytest.raises(ValueError, match="worker_head"):  # 64-channel single workers cannot predict 10 classes
        build_model(model_cfg("resnet18", "bp"), *CIFAR10)
    with pytest.raises(ConfigError, match="model.global_pool"):
        to_run_config(compose_config("model=mlp_275k", "model.global_pool=true"))


@pytest.mark.parametrize("preset, strategy", [("resnet18_blocks", "lfnn"), ("resnet18_blocks", "lfnn_local"),
                                              ("resnet18_blocks", "bp"), ("resnet18", "bp")])
def test_bf16_channels_last_step_on_the_cpu(mnist, preset, strategy, one_thread):
    """The GPU path's options run every routing path (split blocks twice, local, global) and keep fp32
    master weights; the conv weights, block convs included, are channels-last."""
    from agentnet.training import Trainer

    run = to_run_config(compose_config(f"model={preset}", f"strategy={strategy}", "model.in_channels=1", "device=cpu",
                                       "trainer.amp=bf16", "trainer.channels_last=true"))
    torch.manual_seed(0)
    model = build_model(run.model, 784, 10, predictions=strategy != "bp")
    trainer = Trainer(run, model, build_strategy(run.strategy, model), None, None, total_steps=10)
    assert model.hidden[0].convs[0].weight.is_contiguous(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.hidden[-1].parameters()]
    result = trainer.train_step(mnist.train.x[:8], mnist.train.y[:8])
    assert result.logits.dtype == torch.bfloat16 and torch.isfinite(result.loss).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.hidden[-1].parameters()))  # the last block learned


def test_a_zero_update_scale_freezes_a_basic_block_worker_with_its_norms(mnist, one_thread):
    """Per-worker update scales (the env's actions) act on every parameter of a basic-block worker:
    its convs, its inner norms, its rows of the projection shortcut and of that shortcut's norm."""
    from agentnet.training import ScaledUpdate, Trainer

    run = to_run_config(compose_config("model=resnet18_blocks", "strategy=lfnn_local", "model.in_channels=1", "device=cpu"))
    model = build_model(run.model, 784, 10)
    trainer = Trainer(run, model, build_strategy(run.strategy, model), None, None, total_steps=10)
    block = model.hidden[2]  # stride 2: a projection shortcut with its norm
    assert block.shortcut_norm is not None and len(block.norms) == 2
    before = [p.detach().clone() for p in block.parameters()]
    scale = torch.ones(block.num_workers * block.worker_size)
    scale[: block.worker_size] = 0.0  # freeze worker 0 of the third block layer
    trainer.update = ScaledUpdate([None, None, scale])
    trainer.train_step(mnist.train.x[:16], mnist.train.y[:16])
    for p, old in zip(block.parameters(), before):
        rows = (p.detach() - old).reshape(block.num_workers, -1)
        assert rows[0].abs().max() == 0 and rows[1:].abs().max() > 0


def test_resnet18_blocks_is_an_env(mnist):
    """Every block worker is an agent of the PettingZoo env (8 layers x 16, plus the output agent)."""
    import numpy as np

    from envs import neural_collective_v0

    par = neural_collective_v0.parallel_env(strategy="lfnn_local", max_cycles=2, model={"name": "resnet18_blocks", "in_channels": 1},
                                            data_subset=32, batch_size=16, data_root=str(data_root()))
    par.reset(seed=0)
    assert par.num_workers == 8 * 16 + 1
    obs, rewards, *_ = par.step({agent: np.ones(1, np.float32) for agent in par.agents})
    assert len(obs) == len(rewards) == 129 and all(np.isfinite(r) for r in rewards.values())


# --- the sweep presets ------------------------------------------------------------------------------


def _hydra_config(*overrides: str):
    """The app's config with its ``hydra`` node (the launcher, the sweeper's parameters)."""
    register_all()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def _sweep_params(name: str) -> dict[str, list[str]]:
    """``hydra.sweeper.params`` of an experiment preset, each as its list of values."""
    cfg = _hydra_config(f"experiment={name}", "data=mnist")
    return {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}


def _cells(name: str) -> list[list[str]]:
    """One override list per job of the preset's sweep."""
    params = _sweep_params(name)
    return [[f"{k}={v}" for k, v in zip(params, values)] for values in itertools.product(*params.values())]


def test_the_sweep_presets_are_the_experiment_configs_without_a_registered_experiment():
    assert set(SWEEPS) == set(experiment_presets()[1])


def test_table3_sweeps_both_rules_over_every_leadership_fraction_with_the_gpu_settings():
    params = _sweep_params("lfnn_table3_tiny_imagenet")
    assert params == {"strategy": ["lfnn", "lfnn_local"], "strategy.delta": [f"{d / 10:.1f}" for d in range(1, 11)]}
    assert len(_cells("lfnn_table3_tiny_imagenet")) == 20
    for strategy in params["strategy"]:  # each rule's jobs validate (on this machine's data)
        run = to_run_config(compose_config("experiment=lfnn_table3_tiny_imagenet", f"strategy={strategy}", "strategy.delta=0.1",
                                           "data=mnist", "model.in_channels=1"))
        assert run.experiment is None and run.model.name == "resnet18_blocks" and run.strategy.name == strategy
        assert [STRATEGIES.config({"name": strategy, "delta": float(d)}).delta for d in params["strategy.delta"]] == LEADERSHIP
        trainer = run.trainer
        assert (trainer.amp, trainer.channels_last) == ("bf16", True)
        assert (trainer.optimizer, trainer.lr, trainer.momentum, trainer.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
        assert (trainer.epochs, trainer.batch_size, trainer.lr_schedule) == (200, 32, "cosine")
    # 16 workers per block layer: every fraction selects a different number of leaders in every layer
    selection = LeaderSelection(LEADERSHIP, "batch", [16] * 8, replicas=len(LEADERSHIP))
    assert all(n.view(-1).tolist() == [2, 4, 5, 7, 8, 10, 12, 13, 15, 16] for n in selection.num_leaders)


def test_table3_reads_tiny_imagenet_by_its_data_config_name():
    """``data=tiny_imagenet`` comes with the data-folders branch (issue 36 item 2): once it is there the
    preset composes as it is (3 x 64 x 64, 200 classes); before, composing names what is missing."""
    if (REPO / "configs" / "data" / "tiny_imagenet.yaml").is_file():
        run = to_run_config(compose_config("experiment=lfnn_table3_tiny_imagenet"))
        assert run.data.name == "tiny_imagenet" and run.model.in_channels == 3
    else:
        with pytest.raises(ConfigError, match="data/tiny_imagenet"):
            compose_config("experiment=lfnn_table3_tiny_imagenet")


def test_table1_cifar10_sweeps_the_three_rules_on_the_papers_network():
    assert _cells("lfnn_table1_cifar10") == [["strategy=bp"], ["strategy=lfnn"], ["strategy=lfnn_local"]]
    run = to_run_config(compose_config("experiment=lfnn_table1_cifar10", "strategy=lfnn"))
    assert (run.data.name, run.model.name, run.model.in_channels, run.replicas) == ("cifar10", "cnn_cifar10_900k", 3, 3)
    assert run.strategy.delta == 0.7 and (run.trainer.optimizer, run.trainer.lr, run.trainer.batch_size, run.trainer.epochs) == (
        "adam", 1e-3, 128, 50)
    assert (run.trainer.amp, run.trainer.channels_last) == ("bf16", True)
    # the same column on the ResNet-18 workers, and bp's plain twin
    assert to_run_config(compose_config("experiment=lfnn_table1_cifar10", "model=resnet18_blocks")).model.name == "resnet18_blocks"
    assert to_run_config(compose_config("experiment=lfnn_table1_cifar10", "strategy=bp", "model=resnet18")).model.name == "resnet18"


def test_the_gpu_launcher_asks_slurm_for_one_gpu_per_job():
    launcher = _hydra_config("experiment=lfnn_table1_cifar10", "hydra/launcher=slurm_gpu").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1 and launcher.max_num_timeout > 0


@pytest.mark.parametrize("name, cell", [
    ("lfnn_table3_tiny_imagenet", ["strategy=lfnn", "strategy.delta=0.1"]),
    ("lfnn_table3_tiny_imagenet", ["strategy=lfnn_local", "strategy.delta=1.0"]),
    ("lfnn_table1_cifar10", ["strategy=bp"]),
    ("lfnn_table1_cifar10", ["strategy=lfnn"]),
    ("lfnn_table1_cifar10", ["strategy=lfnn_local"]),
])
def test_a_few_steps_of_every_rule_of_each_preset(name, cell, tmp_path):
    """A job of each sweep through the CLI's own task function: its preset's model and recipe, bf16
    and channels-last, a few steps on MNIST, metrics written."""
    from agentnet.cli import run_task

    outcome = run_task(compose_config(f"experiment={name}", *cell, *ON_MNIST, "replicas=1", f"output_dir={tmp_path}"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert outcome.value == metrics["test_error"] and 0 <= metrics["test_error"] <= 100
    assert metrics["strategy"] == cell[0].split("=")[1] and len(metrics["history"]) == 1
    model = build_model(to_run_config(compose_config(f"experiment={name}", *cell, *ON_MNIST)).model, 784, 10)
    assert metrics["num_params"] == model.num_params


def _multirun(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    sweep = tmp_path / "sweep"
    return subprocess.run([sys.executable, "-m", "agentnet", "-m", "hydra/launcher=basic", f"hydra.sweep.dir={sweep}",
                           f"data.root={data_root()}", *ON_MNIST, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name, narrow, jobs", [
    pytest.param("lfnn_table1_cifar10", [], 3, marks=pytest.mark.slow),  # a real 3-job multirun
    pytest.param("lfnn_table3_tiny_imagenet", ["strategy.delta=1.0"], 2, marks=pytest.mark.slow),  # two ResNet-18 jobs
])
def test_the_preset_sweeps_as_one_command(tmp_path, name, narrow, jobs):
    """``agentnet -m experiment=<preset>`` runs the preset's jobs, the sweeper's parameters coming from
    the preset (narrowed on the command line for the CPU), and ``agentnet-report`` tabulates them by rule."""
    proc = _multirun(tmp_path, f"experiment={name}", "replicas=1", *narrow)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(done) == jobs
    report = subprocess.run([sys.executable, "-m", "agentnet.sweep_report", str(tmp_path / "sweep")],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert report.stdout.count("| strategy=") == jobs
