"""A run built once: :func:`build_session` turns a run config and its data into everything that
trains — the task stream, model, strategy, CL method, plugins and :class:`~agentnet.training.Trainer`.

Every run is a stream of tasks: a continual run's ``benchmark`` gives several, a single run is a
stream of one task (its training split, untransformed). :class:`Session` steps the stream through
the one loop in pieces of any length — a whole task at a time (:mod:`agentnet.recipes`) or one
mini-batch at a time (the PettingZoo env) — so with the same steps both give the same results bit
for bit. What differs between the kinds of run is only which plugins they get: a single run
evaluates every epoch (:class:`~agentnet.training.EpochEvaluation`), a continual run records the
accuracy matrix (:class:`~agentnet.continual.plugins.AccuracyMatrix`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from agentnet.config import ConfigError, RunConfig, check
from agentnet.continual.methods import CLMethod, build_cl_method
from agentnet.continual.plugins import AccuracyMatrix, TaskHeadMask
from agentnet.continual.streams import TaskStream, build_stream
from agentnet.data import ImageData, load_dataset, run_splits
from agentnet.devices import resolve_device
from agentnet.distributed import broadcast_text, init_world, world
from agentnet.network import WorkerNetwork, build_model
from agentnet.paths import output_dir_of
from agentnet.population import Population, population_of
from agentnet.composition import to_run_config
from agentnet.registry import STRATEGIES, build_strategy
from agentnet.strategy import StepResult, Strategy
from agentnet.training.augment import Augmentation
from agentnet.training.console import ConsoleEvents
from agentnet.training.preemption import preemption_signals
from agentnet.training import (
    BatchStream,
    BestValidation,
    Checkpointing,
    EpochEvaluation,
    GradientAveraging,
    StrategyTaskHooks,
    Trainer,
    TrainerPlugin,
    WorkerActivity,
    build_loggers,
)

__all__ = ["Session", "StreamProgress", "build_session", "prepare_run", "load_run_data", "seed_everything"]

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_run_data(run: RunConfig, device: torch.device | str | None = None) -> ImageData:
    """The whole dataset ``run.data`` names, loaded as it asks (root, checksums, input scaling) onto
    ``device`` (default: ``run.device``), before any subset is cut."""
    cfg = run.data
    return load_dataset(cfg.name, cfg.root, resolve_device(run.device) if device is None else device, verify=cfg.verify,
                        normalize=cfg.normalize, folder=cfg.folder, image_size=cfg.image_size, grayscale=cfg.grayscale)


def prepare_run(cfg: DictConfig | RunConfig | dict, data: ImageData | None = None) -> tuple[RunConfig, torch.device, Path, ImageData]:
    """What every recipe starts with: the validated config, its device and output directory (created),
    and the dataset on that device (loaded unless ``data`` is given) cut to ``data.subset`` /
    ``data.val_split`` / ``data.test_subset`` — a subset larger than the split is an error, never
    silently everything. Sets torch's CPU thread count to ``threads`` when it is nonzero (here, so
    that a recipe called from Python — a benchmark script, a notebook — honours it as the CLI does).

    Under torchrun this joins the process group (:func:`agentnet.distributed.init_world`; the
    device becomes this rank's GPU) and the output directory is rank 0's on every rank (the one
    whose checkpoint they resume from; only rank 0 writes into it)."""
    run = to_run_config(cfg)
    if run.threads:
        torch.set_num_threads(run.threads)
    _, device = init_world(resolve_device(run.device))
    out = output_dir_of(run.output_dir)
    if world().active:
        out = Path(broadcast_text(str(out.resolve())))
    if data is None:
        data = load_run_data(run, device)
    elif data.standardized is not None:
        # Data loaded elsewhere (shared between runs) must be scaled as this run's config says.
        check(data.standardized == run.data.normalize, "data.normalize", run.data.normalize,
              f"the dataset passed in was loaded with normalize={data.standardized}; load it with "
              "agentnet.session.load_run_data(run) or pass data=None")
    if run.model.conv:
        check(run.model.in_channels == data.channels, "model.in_channels", run.model.in_channels,
              f"data.name={run.data.name} has {data.channels}-channel images")
    data = run_splits(data, run.data)
    if world().main:
        out.mkdir(parents=True, exist_ok=True)  # only once the run is accepted: a refused one leaves nothing behind
    return run, device, out, data


class StreamProgress(TrainerPlugin):
    """Where a run stands in its stream: the task training now, whether it began and at which step,
    seconds per task, and the current task's batch stream (so a resumed run continues it mid-pass)."""

    def __init__(self) -> None:
        self.stage = 0
        self.stage_started = False
        self.stage_start_step = 0
        self.task_seconds: list[float] = []
        self.batches: BatchStream | None = None
        self.pending: dict | None = None
        """A resumed run's batch-stream state, applied when the session makes that stream."""

    def after_task(self, trainer: Trainer, stream: Any, task: Any) -> None:
        self.stage, self.stage_started = self.stage + 1, False
        trainer.stream = self.batches = None  # the next task makes its own

    def state_dict(self) -> dict:
        batches = self.batches.state_dict() if self.batches is not None else self.pending
        return {"stage": self.stage, "stage_started": self.stage_started, "stage_start_step": self.stage_start_step,
                "task_seconds": self.task_seconds, "batches": batches}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.stage_started = state["stage"], state["stage_started"]
        self.stage_start_step, self.task_seconds = state["stage_start_step"], state["task_seconds"]
        self.pending, self.batches = state["batches"], None


def _stage_steps(bench, stage_size: int, batch_size: int) -> int:
    """Optimiser steps of one continual task: ``iterations_per_task``, or ``epochs_per_task`` passes."""
    if bench.iterations_per_task is not None:
        return bench.iterations_per_task
    return bench.epochs_per_task * math.ceil(stage_size / batch_size)


def _single_steps(trainer, size: int) -> int:
    """Optimiser steps of a single run: ``trainer.epochs`` passes, capped by ``trainer.max_steps``."""
    steps = trainer.epochs * math.ceil(size / trainer.batch_size)
    return min(steps, trainer.max_steps) if trainer.max_steps else steps


class Session:
    """Everything one run trains, built once, and the stepping of its task stream.

    Attributes: ``run`` (the config), ``stream`` (its tasks), ``population``, ``model``, ``strategy``,
    ``method`` (the CL method, ``none`` by default), ``plugins`` (in hook order), ``progress``,
    ``trainer``, ``stage_steps`` (optimiser steps per task). ``record`` is the continual run's
    :class:`AccuracyMatrix` (``None`` for a single run); ``activity`` and ``selector`` the optional
    :class:`WorkerActivity` and :class:`BestValidation` plugins.

    A recipe uses it as a context manager (``with build_session(...) as session``), so that a run
    ending in an exception fires ``after_failure``, and calls :meth:`finish` once it has written the
    results.
    """

    def __init__(self, run: RunConfig, data: ImageData, out: Path | None, plugins: Sequence[TrainerPlugin] = ()) -> None:
        self.run = run
        self.data = data
        self.single = run.benchmark is None
        seed_everything(run.seed)
        self.population: Population = population_of(run)
        seeds = self.population.seeds
        self.stream = TaskStream.one_task(data, seeds) if self.single else build_stream(data, run.benchmark, seeds)
        device = data.train.x.device
        predictions = STRATEGIES.get(run.strategy.name).worker_predictions
        self.model: WorkerNetwork = build_model(run.model, self.stream.input_dim, self.stream.num_classes, seeds, predictions).to(device)
        self.strategy: Strategy = build_strategy(run.strategy, self.model, self.population.of("strategy"))
        self.method: CLMethod = build_cl_method(run.cl, self.model, self.population.of("cl"))
        if self.method.reads_model_outputs and not self.strategy.predicts_with_model:
            raise ConfigError(
                f"cl={self.method.name} with strategy={self.strategy.name} is not supported: {self.method.reads_model_outputs}, "
                f"but {self.strategy.name} does not predict with the network's output (its prediction is "
                f"strategy.predict_logits, not model(x)); choose a CL method that reads only gradients or data (si, replay, agem, gem, joint)"
            )
        # Steps per task: from one task's size, so a cumulative stage trains as long as the others.
        self.stage_steps = ([_single_steps(run.trainer, self.stream.tasks[0].train_size)] if self.single else
                            [_stage_steps(run.benchmark, task.train_size, run.trainer.batch_size) for task in self.stream.tasks])
        self.progress = StreamProgress()
        self.record: AccuracyMatrix | None = None
        self.selector = BestValidation() if run.trainer.select == "best_val" else None
        self.activity = WorkerActivity() if run.trainer.record_activity else None
        # Hook order: under torchrun the ranks' gradients are averaged first (what a CL method does
        # with a step's gradient — A-GEM's projection — must see the global batch's); the CL method,
        # the augmentation (after it: replayed examples are augmented too, the memory keeps them as
        # they were) and the task heads shape each step; the strategy learns of task ends before any
        # evaluation; evaluation; the caller's plugins; bookkeeping; the checkpoint last.
        augmentation = Augmentation.for_run(run.data, self.stream.data, seeds)
        ordered: list[TrainerPlugin | None] = [GradientAveraging() if world().active else None,
                                               self.method, augmentation, TaskHeadMask(self.stream), StrategyTaskHooks()]
        if self.single:
            split, name = (data.val, "val") if data.val is not None else (data.test if run.trainer.test else None, "test")
            ordered.append(EpochEvaluation(split, name))
        else:
            self.record = AccuracyMatrix(self.stream, run.benchmark.eval_every, run.trainer.test)
            ordered.append(self.record)
        ordered += [self.selector, self.activity]
        if out is not None:
            ordered += build_loggers(run, out)
        epochs = math.ceil(self.stage_steps[0] / math.ceil(self.stream.tasks[0].train_size / run.trainer.batch_size))
        ordered += [*plugins, ConsoleEvents(epochs, self.record, len(self.stream)), self.progress]
        if out is not None and run.trainer.checkpoint:
            ordered.append(Checkpointing(run.trainer.checkpoint_every))
        self.plugins = [p for p in ordered if p is not None]
        self.trainer = Trainer(run, self.model, self.strategy, out, self.plugins, total_steps=sum(self.stage_steps))

    @property
    def num_tasks(self) -> int:
        return len(self.stream)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole stream."""
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

    def resume(self, directory: Path) -> dict[str, Any]:
        """Continue from ``<directory>/checkpoint.pt``; what happened, for the results file. A single
        run whose ``trainer.epochs`` grew continues its one task."""
        trainer = self.trainer
        if not trainer.resume(directory):
            return {"from": None, "note": f"resume=true but there was no checkpoint at {Path(directory) / 'checkpoint.pt'}; started from scratch"}
        if self.single:
            epochs = self.run.trainer.epochs
            if trainer.epoch > epochs:
                raise ConfigError(f"trainer.epochs={epochs}: the checkpoint at {trainer.resumed_from} has already "
                                  f"completed {trainer.epoch} epochs")
            if self.done and trainer.step < self.stage_steps[0]:
                self.progress.stage, self.progress.stage_started, self.progress.stage_start_step = 0, True, 0
        return {"from": trainer.resumed_from, "step": trainer.step, "epoch": trainer.epoch}

    def begin(self) -> None:
        """Fire ``before_run`` (a continual run evaluates every task first: row 0 of ``R``)."""
        self.trainer.begin_run()

    def advance(self, steps: int | None = None, label: str | None = None) -> StepResult | None:
        """Train up to ``steps`` steps of the current task (``None``: the rest of it); the task ends
        (``after_task``: evaluation, checkpoint) as soon as its budget is spent. Returns the last
        step's result (``None`` if no step was taken)."""
        if self.done:
            raise RuntimeError("the task stream is over")
        progress, trainer, i = self.progress, self.trainer, self.progress.stage
        task = self.stream.tasks[i]
        if not progress.stage_started:
            progress.stage_started, progress.stage_start_step = True, trainer.step
            progress.task_seconds.append(0.0)
            for plugin in self.plugins:
                plugin.before_task(trainer, self.stream, task)
        if progress.batches is None:
            tasks = self.method.stage_tasks(self.stream, i)
            progress.batches = trainer.make_stream(sum(t.train_size for t in tasks), self.stream.stage_gather(tasks))
            if progress.pending is not None:
                progress.batches.load_state_dict(progress.pending)
                progress.pending = None
        start = time.perf_counter()
        remaining = self.stage_remaining()
        n = remaining if steps is None else min(steps, remaining)
        if label is None:
            label = self.strategy.name if self.single else f"{self.strategy.name}+{self.method.name} task {i + 1}/{len(self.stream)}"
        result = trainer.train(progress.batches, n, label)
        if n == remaining:
            trainer.close_epoch()
            for plugin in self.plugins:
                plugin.after_task(trainer, self.stream, task)
        progress.task_seconds[i] += time.perf_counter() - start
        return result

    def end(self) -> None:
        """Fire ``after_run``."""
        self.trainer.end_run()

    def finish(self, results: dict[str, Any]) -> None:
        """Fire ``after_results``: the recipe has written ``results`` (what its results file holds)
        and the run's plots into the output directory (the trackers log them and close)."""
        for plugin in self.plugins:
            plugin.after_results(self.trainer, results)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        """Leaving a ``with`` block by an exception fires ``after_failure`` (the trackers close their
        runs as failed, or killed when preempted); the exception goes on."""
        if error is None:
            return
        for plugin in self.plugins:
            try:
                plugin.after_failure(self.trainer, error)
            except Exception as exc:  # the run's own error is the one to report
                log.warning("%s.after_failure failed: %s", type(plugin).__name__, exc)

    def run_all(self) -> None:
        """Train the whole stream, task after task (continuing where a resumed run stopped). A
        preemption signal stops it at the next step with a checkpoint (:class:`Preempted`)."""
        with preemption_signals(self.trainer):
            self.begin()
            while not self.done:
                self.advance()
            self.end()


def build_session(run: RunConfig, data: ImageData, out: Path | None = None, plugins: Sequence[TrainerPlugin] = ()) -> Session:
    """Build everything ``run`` trains on ``data`` (already cut by :func:`prepare_run`): the one place
    a run is assembled. ``out`` is where checkpoints and logs go (``None``: nowhere); ``plugins`` are
    added after the run's own, before its bookkeeping and checkpoint."""
    return Session(run, data, out, plugins)
