"""The LFNN paper's online experiments (Sec. 3.1) as populations: one-vs-all classifiers on one
pass over a data stream, trained by the engine's ``lfnn`` rule.

Setup (paper): one hidden FC layer of ``N`` single-neuron sigmoid workers per binary classifier,
one classifier per class (one-vs-all), Adam lr 5e-3, one pass over pixel-permuted MNIST, BCE for the
global and leader losses, MSE for followers, ``lambda1 = lambda2 = 1``.

Every classifier of every setting being compared (leadership fraction, loss variant, BP reference)
is one *replica* of a population (:mod:`agentnet.population`): replica ``s * C + c`` answers "is it
class ``c``?" under setting ``s`` (its ``strategy.delta`` / ``lambda1`` / ``lambda2`` through
``vary``), so a whole figure trains as one batched model through :meth:`Trainer.train`. Every replica
sees the same batch at each step (the one-vs-all vote needs it); only the labels differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from agentnet.config import ModelConfig, RunConfig
from agentnet.network import build_model, eval_mode
from agentnet.population import population_of
from agentnet.registry import STRATEGIES, build_strategy
from agentnet.strategy import StepResult
from agentnet.training import Trainer, TrainerPlugin

__all__ = ["Setting", "OnlineResult", "PrequentialAccuracy", "OutputChange", "one_vs_all_model", "one_vs_all_accuracy", "train_one_vs_all"]


@dataclass
class Setting:
    """One curve/point of a figure: a leadership fraction and loss weights (``bp``: plain BP)."""

    label: str
    delta: float = 0.3
    lambda1: float = 1.0
    lambda2: float = 1.0
    bp: bool = False

    def strategy_values(self) -> dict[str, float]:
        """Its ``lfnn`` fields. BP is LFNN with every worker leading and no local terms: the
        global loss then reaches every unit, exactly as back-propagation."""
        if self.bp:
            return {"delta": 1.0, "lambda1": 0.0, "lambda2": 0.0}
        return {"delta": self.delta, "lambda1": self.lambda1, "lambda2": self.lambda2}


@dataclass
class OnlineResult:
    """Per setting: final test accuracy, prequential accuracy curve; optional worker activity."""

    test_acc: list[float]
    curve_steps: list[int]
    curves: list[list[float]]
    activity: Tensor | None = None
    """``(steps, N)``: each worker's mean |change of sigmoid output| from the step's update (Fig. 5)."""
    activity_leaders: Tensor | None = None
    """``(steps, N)`` bool: who led at that step."""


def one_vs_all_model(width: int) -> ModelConfig:
    """One hidden layer of ``width`` single-neuron sigmoid workers and one sigmoid output unit. A
    worker predicts from its pre-activation, the logit of its sigmoid output (so its BCE is the
    paper's), and followers align their sigmoid outputs (the paper's MSE)."""
    return ModelConfig(name=f"one_vs_all_{width}", hidden=[width], worker_size=1, activation="sigmoid",
                       output_activation="sigmoid", predict_from="preactivation", align_from="activation")


def _one_vs_all(labels: Tensor, classes: int) -> Tensor:
    """``(S*C, B)``: the true class of each example from its binary labels (exactly one is 1)."""
    return labels[:classes].argmax(0)


class PrequentialAccuracy(TrainerPlugin):
    """Per setting, the one-vs-all accuracy of each batch's predictions made before its update
    (predict, then train), averaged over every ``every`` steps."""

    def __init__(self, settings: int, classes: int, every: int) -> None:
        self.settings, self.classes, self.every = settings, classes, every
        self.steps: list[int] = []
        self.curves: list[list[float]] = []
        self._correct: Tensor | None = None
        self._seen = 0

    @torch.no_grad()
    def after_step(self, trainer: Trainer, x: Tensor, y: Tensor, result: StepResult) -> None:
        logits = result.logits.detach()[..., 0]  # (S*C, B), from before the update
        votes = logits.view(self.settings, self.classes, -1).argmax(1)  # (S, B)
        correct = (votes == _one_vs_all(y, self.classes)).sum(1)
        self._correct = correct if self._correct is None else self._correct + correct
        self._seen += y.shape[1]
        if trainer.step % self.every == 0 or trainer.step == trainer.total_steps:
            self.curves.append((self._correct / self._seen).tolist())
            self.steps.append(trainer.step)
            self._correct, self._seen = None, 0


class OutputChange(TrainerPlugin):
    """The LFNN paper's Fig. 5 for replica 0: per step, each hidden worker's mean |change of its
    sigmoid output| on the step's batch caused by the update, and who led.

    (The engine's :class:`~agentnet.training.WorkerActivity` measures the worker's prediction
    values, here the pre-activations; the paper plots the neuron's output.)
    """

    def __init__(self) -> None:
        self.activity: list[Tensor] = []
        self.leaders: list[Tensor] = []

    @torch.no_grad()
    def after_step(self, trainer: Trainer, x: Tensor, y: Tensor, result: StepResult) -> None:
        before = result.record.layers[0]
        with eval_mode(trainer.model):
            after = trainer.model.forward_record(x[0]).layers[0].activation  # every replica sees the same batch
        self.activity.append((after[0] - before.activation[0].detach()).abs().mean(0).cpu())
        self.leaders.append(before.leaders[0].cpu())


def train_one_vs_all(
    base: RunConfig,
    x: Tensor,
    y: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    settings: list[Setting],
    width: int,
    *,
    num_classes: int = 10,
    lr: float = 5e-3,
    batch_size: int = 10,
    seed: int = 0,
    curve_every: int = 100,
    record_activity: bool = False,
    label: str = "",
) -> OnlineResult:
    """One pass over ``(x, y)`` for every setting at once, as one population run by the engine;
    returns test accuracy and prequential curves (and, with ``record_activity``, the worker
    activity of setting 0's class-0 classifier). ``base`` gives the run-level settings (device
    placement of the data, ``trainer.max_steps``, ``trainer.progress``)."""
    S, C = len(settings), num_classes
    values = [s.strategy_values() for s in settings]
    vary = {name: [v[name] for v in values for _ in range(C)] for name in ("delta", "lambda1", "lambda2")}
    lfnn = STRATEGIES.config("lfnn")
    run = dataclasses.replace(
        base,
        model=one_vs_all_model(width),
        strategy=dataclasses.replace(lfnn, **{k: v[0] for k, v in vary.items()}),
        trainer=dataclasses.replace(base.trainer, epochs=1, batch_size=batch_size, optimizer="adam", lr=lr, betas=[0.9, 0.999],
                                    weight_decay=0.0, lr_schedule="none", checkpoint=False),
        benchmark=None, cl=None, experiment=None, seed=seed, replicas=S * C, vary={"strategy": vary},
    )
    model = build_model(run.model, x.shape[1], 2, population_of(run).seeds).to(x.device)
    strategy = build_strategy(run.strategy, model, vary)
    steps_per_pass = -(-len(x) // batch_size)
    steps = min(run.trainer.max_steps or steps_per_pass, steps_per_pass)
    accuracy = PrequentialAccuracy(S, C, curve_every)
    activity = OutputChange() if record_activity else None
    trainer = Trainer(run, model, strategy, None, [accuracy, *([activity] if activity else [])], total_steps=steps)
    stream = trainer.make_stream(len(x), _shared_batches(x, y, C, S))
    trainer.begin_run()
    trainer.train(stream, steps, label)
    trainer.close_epoch()
    trainer.end_run()
    return OnlineResult(
        test_acc=one_vs_all_accuracy(model, x_test, y_test, S, C, run.trainer.eval_batch_size),
        curve_steps=accuracy.steps,
        curves=[list(c) for c in zip(*accuracy.curves)],
        activity=torch.stack(activity.activity) if activity else None,
        activity_leaders=torch.stack(activity.leaders) if activity else None,
    )


def _shared_batches(x: Tensor, y: Tensor, classes: int, settings: int) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """A stream's ``gather``: replica 0's shuffled order for every replica (one shared batch
    ``(B, D)``) with replica ``s*C + c``'s binary labels "is it class ``c``?" ``(S*C, B)``."""
    classes_of = torch.arange(classes, device=x.device).repeat(settings).unsqueeze(1)  # (S*C, 1)

    def gather(indices: Tensor) -> tuple[Tensor, Tensor]:
        shared = indices[0]
        return x[shared], (y[shared].unsqueeze(0) == classes_of).long()

    return gather


@torch.no_grad()
def one_vs_all_accuracy(model, x: Tensor, y: Tensor, settings: int, classes: int, batch_size: int = 2000) -> list[float]:
    """Per setting, the accuracy of the one-vs-all vote (the class whose classifier is most sure)."""
    correct = torch.zeros(settings, device=x.device)
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            votes = model(xb)[..., 0].view(settings, classes, -1).argmax(1)
            correct += (votes == yb).sum(1)
    return (correct / max(len(x), 1)).tolist()
