"""The continual-learning plugins: task-incremental heads and the accuracy matrix.

A continual run is a stream of tasks trained one after another by the one loop
(:func:`agentnet.session.build_session` builds it); these plugins add what continual learning
measures and needs. Their state is in every checkpoint, so ``resume=true`` continues a killed run
mid-task or between tasks.
"""

from __future__ import annotations


import torch

from agentnet.continual.streams import TaskStream
from agentnet.training import Trainer, TrainerPlugin

__all__ = ["evaluate_all", "TaskHeadMask", "AccuracyMatrix"]



def evaluate_all(trainer: Trainer, stream: TaskStream, split_name: str = "test") -> list[list[float]]:
    """Per replica, accuracy on every task of the stream ``[R][T]`` on its ``test`` (or ``val``)
    examples (task-incremental heads masked per task)."""
    per_task = []
    for task in stream.tasks:
        with trainer.model.head.logit_mask_as(stream.logit_mask(task)):
            split, transform = stream.val_split(task) if split_name == "val" else stream.test_split(task)
            per_task.append(trainer.evaluate(split, transform)["acc"])
    return [list(accs) for accs in zip(*per_task)]


class TaskHeadMask(TrainerPlugin):
    """Task-incremental heads: each training example competes only among its own task's classes.

    The mask is per example (looked up from its label), so replayed or cumulative examples of
    earlier tasks keep their own heads. Only the ``split_task`` scenario has heads; elsewhere this
    does nothing.
    """

    def __init__(self, stream: TaskStream) -> None:
        self.table: torch.Tensor | None = None  # (C, C): row c = the classes of the task holding c
        if stream.scenario == "split_task":
            self.table = torch.zeros(stream.num_classes, stream.num_classes, dtype=torch.bool, device=stream.tasks[0].classes.device)
            for task in stream.tasks:
                self.table[task.classes] = stream.logit_mask(task)

    def before_step(self, trainer: Trainer, x, y) -> None:
        if self.table is not None:
            trainer.model.head.logit_mask = self.table[y]

    def after_step(self, trainer: Trainer, x, y, result) -> None:
        if self.table is not None:
            trainer.model.head.logit_mask = None


class AccuracyMatrix(TrainerPlugin):
    """The continual-learning record: every task evaluated before training and after each task
    (the accuracy matrix ``R``, ``(T+1, T)``, row 0 before training) and, every
    ``benchmark.eval_every`` steps, a learning-curve point.

    ``acc_matrices[r]`` is replica ``r``'s accuracy matrix so far (rows appended after each task);
    curve points hold one accuracy list per replica.
    """

    def __init__(self, stream: TaskStream, eval_every: int | None, test: bool = True) -> None:
        self.stream = stream
        self.test = test  # trainer.test: false in a study's trials, which read the validation matrices only
        self.eval_every = eval_every
        self.acc_matrices: list[list[list[float]]] = [[] for _ in range(stream.replicas)]
        self.val_matrices: list[list[list[float]]] = [[] for _ in range(stream.replicas)]
        """As ``acc_matrices``, on each task's validation examples (empty without ``data.val_split``)."""
        self.curves: list[dict] = []

    def before_run(self, trainer: Trainer) -> None:
        if not (self.acc_matrices[0] or self.val_matrices[0]):  # row 0, unless a resumed state holds it
            self.record(trainer)

    def after_task(self, trainer: Trainer, stream, task) -> None:
        self.record(trainer)  # the console's task event (agentnet.training.console) reads this row

    def after_step(self, trainer: Trainer, x, y, result) -> None:
        if self.eval_every and self.test and trainer.step % self.eval_every == 0:
            with trainer.model.head.logit_mask_as(None):
                self.curves.append({"step": trainer.step, "acc": evaluate_all(trainer, self.stream)})

    def state_dict(self) -> dict:
        return {"acc_matrices": self.acc_matrices, "val_matrices": self.val_matrices, "curves": self.curves}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def record(self, trainer: Trainer) -> None:
        """Evaluate every task and append one row per replica to the accuracy matrices (and, with a
        validation split, to the validation matrices)."""
        if self.test:
            for matrix, row in zip(self.acc_matrices, evaluate_all(trainer, self.stream)):
                matrix.append(row)
        if self.stream.has_val:
            for matrix, row in zip(self.val_matrices, evaluate_all(trainer, self.stream, "val")):
                matrix.append(row)
