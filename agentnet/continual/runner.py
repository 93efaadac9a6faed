"""The continual-learning task: tasks in sequence, every task evaluated before training and after each task.

``run_continual(cfg) -> metrics`` is the task behind ``agentnet benchmark=<protocol>``. A
:class:`TaskSequence` builds the stream, model, strategy and CL method, and trains each stage
through the one loop (:meth:`agentnet.training.Trainer.run`); the PettingZoo env's benchmark
episodes advance the same sequence one batch per step. Its own bookkeeping — the accuracy matrix ``R`` (``(T+1, T)``,
row 0 before training), learning curves, which stage is running — is a plugin
(:class:`ContinualProgress`), so it is in every checkpoint and ``resume=true`` continues a killed run
mid-task or between tasks. Writes ``cl_metrics.json``, ``acc_matrix.csv`` and the plots.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from agentnet import plots
from agentnet.config import ConfigError, RunConfig
from agentnet.continual.methods import CLMethod, build_cl_method
from agentnet.continual.metrics import summarize as summarize_matrix
from agentnet.continual.streams import TaskStream, build_stream
from agentnet.data import ImageData
from agentnet.network import build_model
from agentnet.population import population_of
from agentnet.population import summarize as summarize_population
from agentnet.registry import build_strategy
from agentnet.training import RunLock, StrategyTaskHooks, Trainer, TrainerPlugin, atomic_write_json, prepare_run, seed_everything, standard_plugins
from agentnet.training.task import resume_info

__all__ = ["run_continual", "evaluate_all", "TaskHeadMask", "ContinualProgress", "TaskSequence"]

log = logging.getLogger(__name__)


def evaluate_all(trainer: Trainer, stream: TaskStream, split_name: str = "test") -> list[list[float]]:
    """Per replica, accuracy on every task of the stream ``[R][T]`` on its ``test`` (or ``val``)
    examples (task-incremental heads masked per task)."""
    per_task = []
    for task in stream.tasks:
        with trainer.model.logit_mask_as(stream.logit_mask(task)):
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
            trainer.model.logit_mask = self.table[y]

    def after_step(self, trainer: Trainer, x, y, result) -> None:
        if self.table is not None:
            trainer.model.logit_mask = None


class ContinualProgress(TrainerPlugin):
    """Where a continual run stands: the stage, whether it began, its first step, ``R`` and curves.

    ``acc_matrices[r]`` is replica ``r``'s accuracy matrix so far (rows appended after each task);
    curve points hold one accuracy list per replica.
    """

    def __init__(self, stream: TaskStream, eval_every: int | None, test: bool = True) -> None:
        self.stream = stream
        self.test = test  # trainer.test: false in a study's trials, which read the validation matrices only
        self.eval_every = eval_every
        self.stage = 0
        self.stage_started = False
        self.stage_start_step = 0
        self.acc_matrices: list[list[list[float]]] = [[] for _ in range(stream.replicas)]
        self.val_matrices: list[list[list[float]]] = [[] for _ in range(stream.replicas)]
        """As ``acc_matrices``, on each task's validation examples (empty without ``data.val_split``)."""
        self.curves: list[dict] = []
        self.task_seconds: list[float] = []

    def after_step(self, trainer: Trainer, x, y, result) -> None:
        if self.eval_every and self.test and trainer.step % self.eval_every == 0:
            with trainer.model.logit_mask_as(None):
                self.curves.append({"step": trainer.step, "acc": evaluate_all(trainer, self.stream)})

    def state_dict(self) -> dict:
        return {
            "stage": self.stage,
            "stage_started": self.stage_started,
            "stage_start_step": self.stage_start_step,
            "acc_matrices": self.acc_matrices,
            "val_matrices": self.val_matrices,
            "curves": self.curves,
            "task_seconds": self.task_seconds,
        }

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


def _stage_steps(bench, stage_size: int, batch_size: int) -> int:
    if bench.iterations_per_task is not None:
        return bench.iterations_per_task
    return bench.epochs_per_task * math.ceil(stage_size / batch_size)


class TaskSequence:
    """A continual run's task sequence on the one engine, steppable in pieces of any length.

    Builds what a continual run trains — the task stream, model, strategy, CL method, the plugins
    (method, task-head mask, :class:`ContinualProgress`, the strategy's task hooks, then ``extra_plugins``) and the
    :class:`~agentnet.training.Trainer` — exactly as ``agentnet benchmark=...`` does, and runs the
    stages through :meth:`Trainer.run`. :func:`run_continual` advances it a whole task at a time; the
    PettingZoo env (``envs.neural_collective_v0`` with ``benchmark=``) one mini-batch at a time. Both
    are the same calls, so with the same steps the two give the same accuracy matrix bit for bit.

    A task ends inside :meth:`advance` as soon as its step budget is spent: the stage's last
    epoch is closed, ``after_task`` hooks fire, every task's test set is evaluated (a row of ``R``)
    and a checkpoint is written (when the run has an output directory).
    """

    def __init__(self, run: RunConfig, data: ImageData, out: Path | None, extra_plugins: list[TrainerPlugin] = ()) -> None:
        if run.benchmark is None:
            raise ConfigError("benchmark=null: choose a protocol, e.g. benchmark=pmnist_quick")
        self.run = run
        seed_everything(run.seed)
        self.population = population_of(run)
        self.stream = build_stream(data, run.benchmark, self.population.seeds)
        device = data.train.x.device
        self.model = build_model(run.model, self.stream.input_dim, self.stream.num_classes, self.population.seeds).to(device)
        self.strategy = build_strategy(run.strategy, self.model, self.population.of("strategy"))
        self.method: CLMethod = build_cl_method(run.cl, self.model, self.population.of("cl"))
        bs = run.trainer.batch_size
        # Steps per stage: from one task's size, so a cumulative stage trains as long as the others.
        self.stage_steps = [_stage_steps(run.benchmark, task.train_size, bs) for task in self.stream.tasks]
        self.progress = ContinualProgress(self.stream, run.benchmark.eval_every, run.trainer.test)
        # StrategyTaskHooks: the strategy learns of task ends too (attention's protect mode), in the env as in the CLI.
        self.plugins = [self.method, TaskHeadMask(self.stream), self.progress, StrategyTaskHooks(), *extra_plugins]
        self.trainer = Trainer(run, self.model, self.strategy, None, out, plugins=self.plugins, total_steps=sum(self.stage_steps))
        self._batches = None  # the current stage's batch stream, made when the stage first steps

    @property
    def num_tasks(self) -> int:
        return len(self.stream)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole sequence."""
        return sum(self.stage_steps)

    @property
    def done(self) -> bool:
        """Every task has been trained (and evaluated)."""
        return self.progress.stage >= len(self.stream)

    @property
    def task(self) -> int:
        """Index (0-based) of the task training now (``num_tasks`` once done)."""
        return self.progress.stage

    def stage_remaining(self) -> int:
        """Steps left in the current task's budget."""
        start = self.progress.stage_start_step if self.progress.stage_started else self.trainer.step
        return self.stage_steps[self.progress.stage] - (self.trainer.step - start)

    def begin(self) -> None:
        """Evaluate every task before training (row 0 of ``R``, unless a resumed state holds it) and
        fire ``before_run``."""
        if not (self.progress.acc_matrices[0] or self.progress.val_matrices[0]):
            self.progress.record(self.trainer)
        self.trainer.begin_run()

    def advance(self, steps: int | None = None, label: str | None = None, **update: Any):
        """Train up to ``steps`` steps of the current task (``None``: the rest of it); ``update`` is
        :meth:`Trainer.run`'s ``update_scale`` / ``update``. Ends the task when its budget is spent.
        Returns the last step's result (``None`` if no step was taken)."""
        if self.done:
            raise RuntimeError("the task sequence is over")
        progress, i = self.progress, self.progress.stage
        task = self.stream.tasks[i]
        if not progress.stage_started:
            progress.stage_started, progress.stage_start_step = True, self.trainer.step
            progress.task_seconds.append(0.0)
            for plugin in self.plugins:
                plugin.before_task(self.trainer, self.stream, task)
        if self._batches is None:
            tasks = self.method.stage_tasks(self.stream, i)
            self._batches = self.trainer.make_stream(sum(t.train_size for t in tasks), self.stream.stage_gather(tasks))
        start = time.perf_counter()
        remaining = self.stage_remaining()
        n = remaining if steps is None else min(steps, remaining)
        if label is None:
            label = f"{self.strategy.name}+{self.method.name} task {i + 1}/{len(self.stream)}"
        result = self.trainer.run(self._batches, n, label, **update)
        if n == remaining:
            self._end_task(task)
        progress.task_seconds[i] += time.perf_counter() - start
        return result

    def _end_task(self, task) -> None:
        trainer, progress, i = self.trainer, self.progress, self.progress.stage
        trainer.close_epoch()
        for plugin in self.plugins:
            plugin.after_task(trainer, self.stream, task)
        progress.record(trainer)
        progress.stage, progress.stage_started = i + 1, False
        trainer.stream = self._batches = None  # the next stage makes its own
        trainer.save_checkpoint()  # the last good state, should a later task diverge
        seen = [sum(m[-1][: i + 1]) / (i + 1) for m in (progress.acc_matrices if progress.test else progress.val_matrices)]
        log.info("after task %d: mean acc over tasks so far %.4f", i + 1, sum(seen) / len(seen))

    def end(self) -> None:
        """Fire ``after_run``."""
        self.trainer.end_run()


def run_continual(cfg: DictConfig | RunConfig | dict, data: ImageData | None = None) -> dict[str, Any]:
    """Run a continual-learning protocol; write and return ``cl_metrics``."""
    wall_start = time.perf_counter()
    run, device, out, data = prepare_run(cfg, data)
    if run.benchmark is None:
        raise ConfigError("benchmark=null: choose a protocol, e.g. benchmark=pmnist_quick")
    with RunLock(out):
        extra, activity = standard_plugins(run, out)
        sequence = TaskSequence(run, data, out, extra)
        stream, model, strategy, method = sequence.stream, sequence.model, sequence.strategy, sequence.method
        trainer, progress, population = sequence.trainer, sequence.progress, sequence.population
        resumed = resume_info(run, trainer, out)
        sequence.begin()
        while not sequence.done:
            sequence.advance()
        sequence.end()

        per_replica = []
        selection = strategy.selection
        for r in range(model.replicas):
            R = progress.acc_matrices[r]
            replica: dict[str, Any] = {
                "strategy": strategy.name,
                "cl": method.name,
                "benchmark": run.benchmark.name,
                "model": run.model.name,
                **population.describe(r),
                **({} if not R else {"acc_matrix": R, **summarize_matrix(R)}),
                **({} if not progress.val_matrices[r] else {
                    "val_acc_matrix": progress.val_matrices[r],
                    **{f"val_{k}": v for k, v in summarize_matrix(progress.val_matrices[r]).items()}}),
                "steps": trainer.step,
                "epochs": trainer.epoch,
                "curves": [{"step": c["step"], "acc": c["acc"][r]} for c in progress.curves],
                "history": trainer.histories[r],
            }
            if selection is not None:
                replica["leadership_counts"] = [c[r].cpu().tolist() for c in selection.counts]
            per_replica.append(replica)
        metrics = summarize_population(per_replica)
        for key in population.describe(0):  # who each replica is, not a measurement
            metrics.pop(key, None)
            metrics.pop(f"{key}_std", None)
        R = metrics.get("acc_matrix")  # the mean over replicas (none without trainer.test)
        metrics.update({
            "seed": run.seed,
            "seeds": population.seeds,
            "task_seconds": progress.task_seconds,
            "wall_s": time.perf_counter() - wall_start,
            "curves": [{"step": c["step"], "acc": [sum(a) / len(a) for a in zip(*c["acc"])]} for c in progress.curves],
            "history": trainer.history,
            "config": {
                "strategy": asdict(run.strategy),
                "cl": asdict(method.cfg),
                "benchmark": asdict(run.benchmark),
                "model": asdict(run.model),
                "trainer": asdict(run.trainer),
                "replicas": model.replicas,
                "vary": population.variants,
            },
        })
        if resumed is not None:
            metrics["resumed"] = resumed
        atomic_write_json(metrics, out / "cl_metrics.json")
        if R is not None:
            with open(out / "acc_matrix.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["after"] + [f"task_{j + 1}" for j in range(len(stream))])
                for i, row in enumerate(R):
                    writer.writerow(["init" if i == 0 else f"task_{i}"] + [f"{a:.4f}" for a in row])
            plots.plot_accuracy_matrix(R, out / "acc_matrix.png", title=f"{strategy.name} + {method.name}")
            plots.plot_task_accuracy(R, out / "task_accuracy.png", progress.acc_matrices)
        if activity is not None:
            plots.plot_activity(*activity.series(), out / "activity.png")
    return metrics
