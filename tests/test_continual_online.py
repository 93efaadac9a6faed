"""The online protocol: ``benchmark.samples_per_task`` (each task trains on N of its examples) and
the ``pmnist_online`` preset (GEM's 20 permutations x 1000 samples, 2x100 MLP, SGD, batch 10, one pass)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from agentnet.config import BenchmarkConfig, ConfigError
from agentnet.continual.methods._episodic import EpisodicMemory
from agentnet.recipes import run_continual
from agentnet.session import _stage_steps
from agentnet.continual.streams import TaskStream
from agentnet.network import WorkerNetwork
from agentnet.composition import to_run_config
from agentnet.training.engine import BatchStream
from tests.conftest import compose_config, without_timing


def test_samples_per_task_validation_names_the_field(mnist):
    for bad in (0, -3):
        with pytest.raises(ConfigError, match=r"^benchmark\.samples_per_task"):
            BenchmarkConfig(samples_per_task=bad)
    with pytest.raises(ConfigError, match=r"^benchmark\.samples_per_task=-1"):
        to_run_config(compose_config("benchmark=pmnist_online", "benchmark.samples_per_task=-1"))
    # A task length fixed twice is refused rather than one of them silently ignored.
    with pytest.raises(ConfigError, match=r"^benchmark\.epochs_per_task=2.*iterations_per_task=50"):
        BenchmarkConfig(epochs_per_task=2, iterations_per_task=50)
    BenchmarkConfig(samples_per_task=100, iterations_per_task=50)  # cycles over the 100 examples
    # More than a task holds: after data.subset, and per split task (only its classes' examples).
    small = mnist.__class__(train=mnist.train.subset(300), test=mnist.test.subset(100))
    with pytest.raises(ConfigError, match=r"^benchmark\.samples_per_task=301: task 1 has only 300"):
        TaskStream(small, "permuted", 2, samples_per_task=301)
    TaskStream(small, "permuted", 2, samples_per_task=300)  # all of it is allowed
    sizes = [int(torch.isin(mnist.train.y, torch.tensor(c)).sum()) for c in ([0, 1], [2, 3], [4, 5], [6, 7], [8, 9])]
    with pytest.raises(ConfigError, match=rf"^benchmark\.samples_per_task={min(sizes) + 1}: task {sizes.index(min(sizes)) + 1} has only"):
        TaskStream(mnist, "split_class", 5, samples_per_task=min(sizes) + 1)


def test_selection_is_per_seed_per_task_and_replica_exact(mnist):
    n = 100
    pop = TaskStream(mnist, "permuted", 3, seeds=[5, 6], samples_per_task=n)
    one = [TaskStream(mnist, "permuted", 3, seeds=s, samples_per_task=n) for s in (5, 6)]
    full = TaskStream(mnist, "permuted", 3, seeds=[5, 6])
    again = TaskStream(mnist, "permuted", 3, seeds=[5, 6], samples_per_task=n)
    for t, task in enumerate(pop.tasks):
        assert task.train_idx.shape == (2, n) and task.train_size == n and len(task.test_idx) == len(mnist.test)
        for r in range(2):
            rows = task.train_idx[r]
            assert len(rows.unique()) == n and int(rows.max()) < len(mnist.train)
            assert torch.equal(rows, one[r].tasks[t].train_idx[0])  # replica r is the run with seeds[r]
            assert torch.equal(rows, again.tasks[t].train_idx[r])  # reproducible
        assert not torch.equal(task.train_idx[0], task.train_idx[1])  # each seed its own choice
        assert torch.equal(task.permutation, full.tasks[t].permutation)  # permutations do not depend on n
        # Shared positions (B,) and per-replica positions (R, B) both index each replica's own examples.
        x, y = pop.batch(task, torch.arange(4))
        for r in range(2):
            rows = task.train_idx[r, :4]
            assert torch.equal(y[r], mnist.train.y[rows])
            assert torch.equal(x[r], mnist.train.x[rows][:, task.permutation[r]])
        positions = torch.tensor([[3, 0], [99, 7]])
        x, y = pop.batch(task, positions)
        for r in range(2):
            rows = task.train_idx[r, positions[r]]
            assert torch.equal(y[r], mnist.train.y[rows]) and torch.equal(x[r], mnist.train.x[rows][:, task.permutation[r]])
    assert not torch.equal(pop.tasks[0].train_idx, pop.tasks[1].train_idx)  # a fresh choice per task


def test_one_pass_visits_exactly_the_selected_examples_and_memory_draws_from_them(mnist):
    n, batch = 95, 10
    stream = TaskStream(mnist, "permuted", 2, seeds=[0, 1], samples_per_task=n)
    task = stream.tasks[1]
    seen = []

    def gather(idx):
        seen.append(idx.clone())
        return stream.stage_gather([task])(idx)

    batches = BatchStream(task.train_size, batch, [torch.Generator().manual_seed(s) for s in (0, 1)], gather, torch.device("cpu"))
    sizes = [batches.next()[1].shape[1] for _ in range(batches.steps_per_epoch)]
    assert batches.steps_per_epoch == math.ceil(n / batch) and sizes == [10] * 9 + [5] and batches.at_epoch_end
    positions = torch.cat(seen, 1)
    for r in range(2):
        assert sorted(task.train_idx[r, positions[r]].tolist()) == sorted(task.train_idx[r].tolist())
    # GEM/A-GEM memories (and EWC's Fisher, through the same stream.batch) keep only selected examples.
    memory = EpisodicMemory(40, seed=0)
    memory.add_task(stream, task)
    selected, _ = stream.batch(task, torch.arange(n))
    everything = TaskStream(mnist, "permuted", 2, seeds=[0, 1])
    for r in range(2):
        kept = memory.x[0][r]  # (m, D): task 2's memory, replica r's view
        assert kept.shape[0] == 40 and bool((kept[:, None, :] == selected[r][None]).all(-1).any(1).all())
    # Without the selection the same draw lands outside it: the check above can fail.
    memory_all = EpisodicMemory(40, seed=0)
    memory_all.add_task(everything, everything.tasks[1])
    assert not bool((memory_all.x[0][0][:, None, :] == selected[0][None]).all(-1).any(1).all())


def _online(tmp_path, *extra):
    return compose_config(
        "benchmark=pmnist_online", "benchmark.num_tasks=2", "benchmark.samples_per_task=95", "data.test_subset=300",
        "strategy=bp", "trainer.progress=false", "trainer.loggers=[]", "device=cpu", f"output_dir={tmp_path}", *extra,
    )


def test_task_length_is_passes_over_the_samples_and_runs_reproduce(mnist_pixels, tmp_path):
    a = run_continual(_online(tmp_path / "a", "benchmark.epochs_per_task=2"), data=mnist_pixels)
    assert a["steps"] == 2 * 2 * math.ceil(95 / 10) and a["epochs"] == 4  # tasks x passes x ceil(N / batch)
    assert [h["step"] for h in a["history"]] == [10, 20, 30, 40]
    b = run_continual(_online(tmp_path / "b", "benchmark.epochs_per_task=2"), data=mnist_pixels)
    assert without_timing(a) == without_timing(b)  # per-seed reproducible
    # iterations_per_task fixes the length instead (the stream cycles over the N examples).
    assert _stage_steps(BenchmarkConfig(samples_per_task=95, iterations_per_task=25), 95, 10) == 25
    assert _stage_steps(BenchmarkConfig(samples_per_task=95, epochs_per_task=3), 95, 10) == 30
    written = json.loads((tmp_path / "a" / "cl_metrics.json").read_text())
    assert written["config"]["benchmark"]["samples_per_task"] == 95 and len(written["acc_matrix"]) == 3


def test_data_passed_in_must_be_scaled_as_the_config_says(mnist, mnist_pixels, tmp_path):
    """Shared data loaded with the default standardisation is refused by a pixels-in-[0, 1] preset
    (and the other way round) instead of silently training on other inputs; nothing is written."""
    with pytest.raises(ConfigError, match=r"^data\.normalize=False: the dataset passed in was loaded with normalize=True"):
        run_continual(_online(tmp_path / "a"), data=mnist)
    assert not (tmp_path / "a").exists()  # refused before its output directory was made
    with pytest.raises(ConfigError, match=r"^data\.normalize=True: .*normalize=False"):
        run_continual(_online(tmp_path / "b", "data.normalize=true"), data=mnist_pixels)
    assert mnist_pixels.standardized is False and float(mnist_pixels.train.x.min()) == 0.0
    assert float(mnist_pixels.train.x.max()) == 1.0 and mnist.standardized is True


def test_pmnist_online_preset_is_gems_protocol():
    run = to_run_config(compose_config("benchmark=pmnist_online", "strategy=bp"))
    b, t = run.benchmark, run.trainer
    assert (b.name, b.scenario, b.num_tasks, b.samples_per_task, b.epochs_per_task, b.iterations_per_task) == (
        "pmnist_online", "permuted", 20, 1000, 1, None)
    assert not b.first_unpermuted and not b.pad32 and b.eval_every is None
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size, t.lr_schedule) == ("sgd", 0.1, 0.0, 0.0, 10, "none")
    assert run.model.name == "mlp_100x2" and run.model.hidden == [100, 100] and run.model.worker_size == 10
    assert run.model.activation == "relu" and run.data.normalize is False  # GEM's pixels in [0, 1]
    model = WorkerNetwork(784, 10, run.model)
    assert sum(p.numel() for p in model.parameters()) == 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10 == 89_610
