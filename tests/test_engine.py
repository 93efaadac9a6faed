"""The one training loop: hook order, the same loop under single runs, continual stages and the env."""

from __future__ import annotations

import json

import torch

from agentnet.continual.runner import run_continual
from agentnet.network import build_model
from agentnet.composition import to_run_config
from agentnet.registry import build_strategy
from agentnet.training import BatchStream, Trainer, TrainerPlugin, prepare_run
from envs import neural_collective_v0
from tests.conftest import compose_config, data_root


class Recorder(TrainerPlugin):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattribute__(self, name):
        hooks = ("before_run", "before_epoch", "adapt_batch", "before_step", "after_backward", "after_step", "after_epoch", "after_run")
        if name in hooks:
            calls = object.__getattribute__(self, "calls")
            inherited = object.__getattribute__(self, name)

            def record(*args):
                calls.append(name)
                return inherited(*args)

            return record
        return object.__getattribute__(self, name)


def test_hooks_fire_in_order_and_partial_epochs_close(mnist, quick_overrides):
    run, device, out, data = prepare_run(compose_config("strategy=lfnn", *quick_overrides, "data.subset=640", "trainer.max_steps=7"), mnist)
    model = build_model(run.model, data.input_dim, data.num_classes, run.seed)
    recorder = Recorder()
    trainer = Trainer(run, model, build_strategy(run.strategy, model), data, out, [recorder])
    trainer.fit()
    step = ["adapt_batch", "before_step", "after_backward", "after_step"]
    # 640 / 128 = 5 steps per epoch; max_steps=7 cuts the second epoch, which still closes.
    assert recorder.calls == ["before_run", "before_epoch", *step * 5, "after_epoch", "before_epoch", *step * 2, "after_epoch", "after_run"]
    assert [h["step"] for h in trainer.history] == [5, 7] and trainer.epoch == 2


def _gather(data):
    return lambda idx: (data[idx], data[idx])


def test_batch_stream_resumes_mid_pass_exactly():
    data = torch.arange(10)
    cpu = torch.device("cpu")
    # Two replicas, each with its own generator: each draws its own order over all 10 examples.
    stream = BatchStream(10, 3, [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)], _gather(data), cpu)
    first = [stream.next()[0] for _ in range(5)]  # one pass of 4 batches (last one short), then one more
    assert all(b.shape[0] == 2 for b in first) and first[3].shape == (2, 1)
    one_pass = torch.cat(first[:4], 1)  # (R, 10)
    for r in range(2):
        assert sorted(one_pass[r].tolist()) == list(range(10))
    assert not torch.equal(one_pass[0], one_pass[1])  # replicas shuffle independently
    # Replica r's order is exactly that of a one-replica stream on its own generator.
    alone = BatchStream(10, 3, [torch.Generator().manual_seed(4)], _gather(data), cpu)
    assert torch.equal(torch.cat([alone.next()[0] for _ in range(4)], 1)[0], one_pass[1])
    state = stream.state_dict()
    assert isinstance(state["pass_start"], list) and len(state["pass_start"]) == 2
    expected = [stream.next()[0] for _ in range(6)]
    gens = [torch.Generator().manual_seed(99), torch.Generator().manual_seed(98)]
    again = BatchStream(10, 3, gens, _gather(data), cpu)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [again.next()[0] for _ in range(6)]))


def test_batch_stream_resumes_after_a_cut_pass():
    """A pass cut short (a stage's step budget) must not be replayed after a resume."""
    data = torch.arange(10)
    cpu = torch.device("cpu")
    stream = BatchStream(10, 3, [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)], _gather(data), cpu)
    stream.next()
    stream.end_pass()
    state = stream.state_dict()
    expected = [stream.next()[0] for _ in range(4)]
    again = BatchStream(10, 3, [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)], _gather(data), cpu)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [again.next()[0] for _ in range(4)]))


def test_task_incremental_heads_mask_each_example_by_its_own_task(mnist, tmp_path):
    """split_task + replay: replayed examples of earlier tasks keep their heads (no infinite loss)."""
    overrides = ["strategy=bp", "benchmark=split_mnist", "benchmark.scenario=split_task", "benchmark.num_tasks=5",
                 "benchmark.iterations_per_task=20", "cl=replay", "data.subset=3000", "data.test_subset=500",
                 "trainer.progress=false", "trainer.log_every=1", "device=cpu", f"data.root={data_root()}", f"output_dir={tmp_path}"]
    metrics = run_continual(compose_config(*overrides), data=mnist)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in metrics["history"])
    assert metrics["ACC"] > 0.8  # task-incremental binary heads: easy once each example uses its own head


def test_continual_runs_get_the_loops_accounting_and_standard_plugins(mnist, tmp_path):
    overrides = ["strategy=lfnn", "benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.iterations_per_task=12",
                 "data.subset=1280", "data.test_subset=300", "trainer.record_activity=true", "trainer.progress=false",
                 "device=cpu", f"data.root={data_root()}", f"output_dir={tmp_path}"]
    metrics = run_continual(compose_config(*overrides), data=mnist)
    # 1280 examples = 10 steps per pass: each 12-step task is one full pass and a cut-short one.
    assert [h["step"] for h in metrics["history"]] == [10, 12, 22, 24]
    assert (tmp_path / "activity.png").is_file() and any((tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "cl_metrics.json").read_text())["epochs"] == 4


def test_env_steps_through_the_trainers_loop_in_both_modes():
    for mode in ("scale", "delta"):
        env = neural_collective_v0.parallel_env(strategy="lfnn", action_mode=mode, data_subset=256, batch_size=64, max_cycles=10)
        env.reset(seed=1)
        trainer = env.trainer
        while env.agents:
            env.step({a: env.action_space(a).sample() * (0 if mode == "delta" else 1) for a in env.agents})
        # 256 / 64 = 4 steps per epoch, one epoch: the loop closed it (history entry, leader counts).
        assert trainer.step == 4 and trainer.epoch == 1 and len(trainer.history) == 1
        assert len(env.strategy.selection.epoch_counts[0]) == 1
