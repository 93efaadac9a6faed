"""End-to-end training on real MNIST: learning, metrics.json, resume, non-finite loss, plugins."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from agentnet.config import StrategyConfig
from agentnet.registry import register_strategy
from agentnet.strategy import StepResult, Strategy
from agentnet.recipes import train
from agentnet.training import CHECKPOINT, NonFiniteLossError
from tests.conftest import compose_config

REQUIRED = ("test_acc", "test_error", "train_acc", "final_train_loss", "num_params", "samples_per_s", "wall_s", "history")


@pytest.mark.parametrize("strategy", ["bp", "lfnn", "lfnn_local"])
def test_strategy_learns_real_mnist(strategy, mnist, quick_overrides, tmp_path):
    metrics = train(compose_config(f"strategy={strategy}", *quick_overrides), data=mnist)
    # 5000 training images, 2 epochs: chance is 10 %; every strategy must be far above it.
    assert metrics["test_acc"] > 0.75, metrics["test_acc"]
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in REQUIRED:
        assert key in written
    assert len(written["history"]) == 2 and written["num_params"] == 279_870  # 274,570 in the layers + 5,300 in the worker heads
    assert abs(written["test_error"] - 100 * (1 - written["test_acc"])) < 1e-9
    assert (tmp_path / CHECKPOINT).is_file() and (tmp_path / "history.png").is_file()
    if strategy != "bp":
        assert (tmp_path / "leadership.png").is_file()
        assert len(written["leadership_counts"]) == 2


def test_resume_continues_exactly(mnist, quick_overrides, tmp_path):
    straight = train(compose_config("strategy=lfnn", *quick_overrides, f"output_dir={tmp_path / 'a'}"), data=mnist)
    first = compose_config("strategy=lfnn", *quick_overrides, "trainer.epochs=1", f"output_dir={tmp_path / 'b'}")
    train(first, data=mnist)
    resumed = train(
        compose_config("strategy=lfnn", *quick_overrides, "resume=true", f"output_dir={tmp_path / 'b'}"), data=mnist
    )
    assert resumed["epochs"] == 2 and resumed["steps"] == straight["steps"]
    assert resumed["test_acc"] == straight["test_acc"]
    a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_without_checkpoint_says_so_in_log_and_metrics(mnist, quick_overrides, tmp_path, caplog):
    cfg = compose_config("strategy=bp", *quick_overrides, "trainer.epochs=1", "resume=true", f"resume_from={tmp_path / 'none'}")
    metrics = train(cfg, data=mnist)
    assert "no checkpoint" in caplog.text
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["resumed"]["from"] is None and "no checkpoint" in written["resumed"]["note"]
    assert metrics["epochs"] == 1


@dataclass
class PoisonConfig(StrategyConfig):
    poison_at_step: int = 30


@register_strategy("test_poison")
class Poison(Strategy):
    """Behaves like BP, then returns a NaN loss from a given step on (a diverging run)."""

    Config = PoisonConfig

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.calls = 0

    def compute(self, x, y):
        self.calls += 1
        logits = self.model(x)
        loss = self.model.head.global_loss(logits, y)
        if self.calls > self.cfg.poison_at_step:
            loss = loss * float("nan")
        return StepResult(loss=loss, logits=logits)


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(mnist, quick_overrides, tmp_path):
    # 5000 samples / batch 128 = 40 steps per epoch; poison in epoch 2.
    cfg = compose_config("strategy=bp", "+strategy.poison_at_step=50", *quick_overrides, "trainer.log_every=5")
    cfg.strategy.name = "test_poison"
    with pytest.raises(NonFiniteLossError, match=r"non-finite.*last good checkpoint.*epoch 1"):
        train(cfg, data=mnist)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "metrics.json").exists()


def test_custom_strategy_needs_no_trainer_change(mnist, quick_overrides):
    cfg = compose_config("strategy=bp", *quick_overrides, "trainer.epochs=1", "+strategy.poison_at_step=1000000")
    cfg.strategy.name = "test_poison"
    metrics = train(cfg, data=mnist)
    assert metrics["strategy"] == "test_poison" and metrics["test_acc"] > 0.7


def test_worker_activity_is_recorded(mnist, quick_overrides, tmp_path):
    metrics = train(
        compose_config("strategy=lfnn", *quick_overrides, "trainer.epochs=1", "trainer.record_activity=true"), data=mnist
    )
    assert metrics["steps"] == 40
    assert (tmp_path / "activity.png").is_file()


def test_tensorboard_history_is_logged(mnist, quick_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(compose_config("strategy=bp", *quick_overrides), data=mnist)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("test_acc")] == [1, 2]


def test_threads_is_honoured_by_tasks_called_from_python(mnist, quick_overrides):
    """``threads`` is applied by the task itself, not only by the CLI (benchmark scripts call tasks)."""
    from agentnet.session import prepare_run

    torch.set_num_threads(2)
    prepare_run(compose_config(*quick_overrides, "threads=1"), data=mnist)
    assert torch.get_num_threads() == 1
    prepare_run(compose_config(*quick_overrides), data=mnist)  # 0: torch's setting is left alone
    assert torch.get_num_threads() == 1
