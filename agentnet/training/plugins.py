"""Trainer plugins: behaviour around the one training loop, each with named hooks and its own state.

The engine (:class:`agentnet.training.engine.Trainer`) only orchestrates; it calls these hooks in
order for every plugin in its list (Avalanche's template/plugin split):

``before_run`` · ``before_task`` · ``before_epoch`` · ``adapt_batch`` · ``before_step`` ·
``after_backward`` · ``after_step`` · ``epoch_metrics`` · ``after_epoch`` · ``after_task`` · ``after_run``;
a recipe then fires ``after_results`` once it wrote the run's results and plots, or ``after_failure``
when the run stops with an exception (:class:`agentnet.session.Session`).

Every run is a stream of tasks (a single run: one task), so task hooks fire in every run;
:class:`StrategyTaskHooks` passes them on to the strategy (``Strategy.on_task_start`` / ``on_task_end``).
Evaluation (:class:`EpochEvaluation`) and checkpoints (:class:`Checkpointing`) are plugins too. A plugin that keeps state across steps returns it
from ``state_dict`` (tensors and plain containers only: checkpoints are loaded with
``weights_only=True``) and takes it back in ``load_state_dict``; the checkpoint stores it under the
plugin's ``state_key``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from agentnet.data import Split
from agentnet.network import eval_mode
from agentnet.strategy import StepResult
from agentnet.replica import replica_rows

# Hooks receive the agentnet.training.engine.Trainer that calls them; annotated by name only, so
# this module does not import the engine that imports it.
__all__ = ["TrainerPlugin", "StrategyTaskHooks", "EpochEvaluation", "Checkpointing", "BestValidation", "WorkerActivity"]


class TrainerPlugin:
    """Named hooks the trainer calls; override the ones you need. Every hook is a no-op here."""

    @property
    def state_key(self) -> str:
        """Key of this plugin's state in a checkpoint (unique among a run's plugins)."""
        return type(self).__name__

    def before_run(self, trainer: "Trainer") -> None:
        """Once, before the first step of a run (also after a resume)."""

    def before_task(self, trainer: "Trainer", stream: Any, task: Any) -> None:
        """Before training on ``task`` of the continual ``stream`` (not re-fired on a mid-task resume)."""

    def before_epoch(self, trainer: "Trainer") -> None:
        """Before the first step of each pass over the data."""

    def adapt_batch(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Change the mini-batch before the step. Added examples go *after* the fresh ones: the loop
        counts (accuracy, samples seen) only the ``len(y)`` examples the data stream gave."""
        return x, y

    def before_step(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor) -> None:
        """Before the forward pass, with the (adapted) batch."""

    def after_backward(self, trainer: "Trainer", result: StepResult) -> None:
        """After the strategy wrote ``.grad``, before the update (add penalty gradients here)."""

    def after_step(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor, result: StepResult) -> None:
        """After the update was applied."""

    def epoch_metrics(self, trainer: "Trainer") -> dict[str, list[float]]:
        """Per-replica values to add to the history entry of the epoch closing now (an evaluation)."""
        return {}

    def after_epoch(self, trainer: "Trainer", entry: dict) -> None:
        """After an epoch closed; ``entry`` is its history entry."""

    def after_task(self, trainer: "Trainer", stream: Any, task: Any) -> None:
        """After training on ``task`` (consolidate importances, fill buffers...)."""

    def after_run(self, trainer: "Trainer") -> None:
        """Once, after the last step."""

    def after_results(self, trainer: "Trainer", results: dict) -> None:
        """Once, after the recipe wrote the run's results (``results``: what its results file holds)
        and plots into ``trainer.output_dir`` (:meth:`agentnet.session.Session.finish`)."""

    def after_failure(self, trainer: "Trainer", error: BaseException) -> None:
        """The run stopped with ``error`` (a failure, a preemption) before its results were written:
        release what ``before_run`` opened (:class:`agentnet.session.Session` as a context manager)."""

    def state_dict(self) -> dict:
        """State to checkpoint (tensors and plain containers)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Take back what :meth:`state_dict` returned."""


class StrategyTaskHooks(TrainerPlugin):
    """Tells the trainer's strategy where tasks begin and end (its ``on_task_start`` / ``on_task_end``).

    Strategies are not plugins; one that keeps memory across tasks (``attention`` in ``protect``
    mode) learns of task boundaries through this plugin. Its own state is the strategy's, which
    the checkpoint already holds.
    """

    def before_task(self, trainer: "Trainer", stream: Any, task: Any) -> None:
        trainer.strategy.on_task_start()

    def after_task(self, trainer: "Trainer", stream: Any, task: Any) -> None:
        trainer.strategy.on_task_end()


class EpochEvaluation(TrainerPlugin):
    """Evaluates every epoch of a single run: on the validation split when there is one (the test set
    then stays unseen until the run's final evaluation), else on the test split unless
    ``trainer.test=false``; adds ``val_acc``/``val_loss`` or ``test_acc``/``test_loss`` to the history."""

    def __init__(self, split: Split | None, name: str) -> None:
        self.split, self.name = split, name

    def epoch_metrics(self, trainer: "Trainer") -> dict[str, list[float]]:
        if self.split is None:
            return {}
        result = trainer.evaluate(self.split)
        return {f"{self.name}_acc": result["acc"], f"{self.name}_loss": result["loss"]}


class Checkpointing(TrainerPlugin):
    """Writes ``checkpoint.pt`` (through :meth:`Trainer.save_checkpoint`) at every epoch's and task's
    end and every ``every`` steps in between; the last of a run's plugins, so the checkpoint holds
    every other plugin's state after its hooks ran."""

    def __init__(self, every: int = 0) -> None:
        self.every = every

    def after_step(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor, result: StepResult) -> None:
        at_epoch_end = trainer.stream is not None and trainer.stream.at_epoch_end  # saved by after_epoch
        if self.every and trainer.step % self.every == 0 and not at_epoch_end:
            trainer.save_checkpoint()

    def after_epoch(self, trainer: "Trainer", entry: dict) -> None:
        trainer.save_checkpoint()

    def after_task(self, trainer: "Trainer", stream: Any, task: Any) -> None:
        trainer.save_checkpoint()  # the last good state, should a later task diverge


class WorkerActivity(TrainerPlugin):
    """Per-step worker activity: mean |change| of each worker's output on the batch caused by the update.

    The LFNN paper's Fig. 5. Costs two extra no-grad forwards per step, so it is off by default.
    ``steps[i]`` is a list over hidden layers of ``(W,)`` tensors; ``leaders[i]`` the leader masks
    of that step (``None`` for strategies without leaders). A population records its first replica.
    """

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []
        self.leaders: list[list[torch.Tensor | None]] = []
        self._before = None

    @torch.no_grad()
    def before_step(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor) -> None:
        with eval_mode(trainer.model):  # a measurement: no batch-norm statistics updated, no dropout
            self._before = trainer.model.forward_record(x)

    @torch.no_grad()
    def after_step(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor, result: StepResult) -> None:
        with eval_mode(trainer.model):
            after = trainer.model.forward_record(x)
        # Kept on the model's device (a copy to the host would wait for it every step); the
        # series and checkpoints read them on the host.
        self.steps.append([(a.workers[0] - b.workers[0]).abs().mean((0, 2)) for a, b in zip(after.layers, self._before.layers)])
        layers = result.record.layers if result.record is not None else [None] * len(after.layers)
        self.leaders.append([None if r is None or r.leaders is None else r.leaders[0].detach().clone() for r in layers])

    def series(self, layer: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """``(changes, leaders)`` of hidden layer ``layer`` as plain arrays (what
        :func:`agentnet.plots.plot_activity` draws): ``(steps, W)`` output changes and the ``(steps, W)``
        leader masks, ``None`` where the strategy has no per-worker leaders."""
        if not self.steps:
            return np.zeros((0, 0)), None
        changes = np.stack([step[layer].cpu().numpy() for step in self.steps])
        first = self.leaders[0][layer] if self.leaders else None
        if first is None or first.dim() != 1:
            return changes, None
        return changes, np.stack([step[layer].cpu().numpy() for step in self.leaders])

    def state_dict(self) -> dict:
        return {"steps": self.steps, "leaders": self.leaders}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.leaders = state["steps"], state["leaders"]


# The experiment trackers (TensorBoard, MLflow, W&B) are plugins too: agentnet.training.loggers.


class BestValidation(TrainerPlugin):
    """``trainer.select=best_val``: keeps, per replica, the parameters of the epoch with the highest
    validation accuracy (the first such epoch on ties) and puts them back with :meth:`restore`.

    Reads each replica's ``val_acc`` from its history entry; the kept parameters are in every
    checkpoint, so a resumed run selects among all its epochs.
    """

    def __init__(self) -> None:
        self.best: list[float] | None = None
        self.epochs: list[int] | None = None
        self.params: dict[str, torch.Tensor] | None = None

    def after_epoch(self, trainer: "Trainer", entry: dict) -> None:
        accs = [history[-1]["val_acc"] for history in trainer.histories]
        if self.best is None:
            improved = [True] * len(accs)
        else:
            improved = [a > b for a, b in zip(accs, self.best)]
        if not any(improved):
            return
        current = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        if self.params is None:
            self.params, self.best, self.epochs = current, list(accs), [trainer.epoch] * len(accs)
            return
        mask = torch.tensor(improved)
        for key, value in current.items():
            if value.dim() > 0 and value.shape[0] % len(accs) == 0:  # replica-major rows (agentnet.workers)
                kept = self.params[key].to(value.device)  # a resumed state lies on the CPU
                self.params[key] = torch.where(replica_rows(mask.to(value.device), value).bool(), value, kept)
            else:  # shared by every replica (e.g. a counter): taken with any improvement
                self.params[key] = value
        for r, better in enumerate(improved):
            if better:
                self.best[r], self.epochs[r] = accs[r], trainer.epoch

    def restore(self, model: torch.nn.Module) -> list[int]:
        """Load the kept parameters into ``model``; returns each replica's selected epoch."""
        if self.params is None:
            raise RuntimeError("trainer.select=best_val: no epoch was evaluated on validation data")
        model.load_state_dict(self.params)
        return list(self.epochs)

    def state_dict(self) -> dict:
        return {"best": self.best, "epochs": self.epochs, "params": self.params}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.epochs, self.params = state["best"], state["epochs"], state["params"]
