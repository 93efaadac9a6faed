"""The continual-learning run: tasks in sequence, every task evaluated before training and after each task.

``run_continual(cfg) -> metrics`` is the task behind ``agentnet benchmark=<protocol>``. It builds the
stream, model, strategy and CL method, drives :meth:`agentnet.trainer.Trainer.train_step` task by
task, fills the accuracy matrix ``R`` (``(T+1, T)``, row 0 before training) and writes
``cl_metrics.json``, ``acc_matrix.csv`` and the plots to the output directory.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict
from typing import Any

import torch
from omegaconf import DictConfig

from agentnet.config import ConfigError, RunConfig
from agentnet.continual.methods import CLMethod, build_cl_method
from agentnet.continual.metrics import summarize
from agentnet.continual.streams import Task, TaskStream, build_stream
from agentnet.data import ImageData
from agentnet.network import build_model
from agentnet.registry import build_strategy
from agentnet.trainer import (
    Trainer,
    atomic_write_json,
    prepare_run,
    progress_bar,
    seed_everything,
)

__all__ = ["run_continual", "evaluate_all"]

log = logging.getLogger(__name__)


def evaluate_all(trainer: Trainer, stream: TaskStream) -> list[float]:
    """Test accuracy on every task of the stream (task-incremental heads masked per task)."""
    model = trainer.model
    accs = []
    for task in stream.tasks:
        model.logit_mask = stream.logit_mask(task)
        accs.append(trainer.evaluate(stream.test_split(task))["acc"])
    model.logit_mask = None
    return accs


def _steps_for(stream: TaskStream, task_sizes: int, bench, batch_size: int) -> int:
    if bench.iterations_per_task is not None:
        return bench.iterations_per_task
    return bench.epochs_per_task * math.ceil(task_sizes / batch_size)


def _train_stage(
    trainer: Trainer, stream: TaskStream, tasks: list[Task], steps: int, gen: torch.Generator, label: str, curves: list
) -> None:
    """``steps`` optimiser steps on ``tasks`` (one task, or several mixed for cumulative training)."""
    run = trainer.cfg
    bs = run.trainer.batch_size
    sizes = torch.tensor([len(t.train_idx) for t in tasks])
    offsets = torch.cumsum(sizes, 0) - sizes
    device = tasks[0].train_idx.device

    def shuffled() -> torch.Tensor:
        return torch.randperm(int(sizes.sum()), generator=gen).to(device)

    order = shuffled()
    pos = 0
    loss_sum = torch.zeros((), device=trainer.device)
    correct = torch.zeros((), device=trainer.device)
    seen = 0
    bar = progress_bar(steps, label, run.trainer.progress)
    for step in range(steps):
        if pos + bs > len(order):
            order, pos = shuffled(), 0
        flat = order[pos : pos + bs]
        pos += bs
        if len(tasks) == 1:  # the usual stage: a gather on the device, no host round trip
            x, y = stream.batch(tasks[0], flat)
        else:  # cumulative stage: which task each position belongs to, then each task's own transform
            flat = flat.cpu()
            owner = torch.searchsorted(offsets, flat, right=True) - 1
            parts = [
                stream.batch(task, (flat[owner == t_i] - offsets[t_i]).to(device))
                for t_i, task in enumerate(tasks)
                if bool((owner == t_i).any())
            ]
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        trainer.model.logit_mask = stream.logit_mask(tasks[-1])
        result = trainer.train_step(x, y)
        loss_sum += result.loss.detach() * len(y)
        correct += (trainer.model.predict(result.logits.detach()[: len(y)]) == y).sum()
        seen += len(y)
        if (step + 1) % run.trainer.log_every == 0 or step + 1 == steps:
            trainer.check_finite(loss_sum, f"in {label} at step {trainer.step}")
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
        bar.update(1)
        every = run.benchmark.eval_every
        if every and trainer.step % every == 0:
            trainer.model.logit_mask = None
            curves.append({"step": trainer.step, "acc": evaluate_all(trainer, stream)})
    bar.close()
    trainer.model.logit_mask = None


def run_continual(cfg: DictConfig | RunConfig | dict, data: ImageData | None = None) -> dict[str, Any]:
    """Run a continual-learning protocol; write and return ``cl_metrics``."""
    wall_start = time.perf_counter()
    run, device, out, data = prepare_run(cfg, data)
    if run.benchmark is None:
        raise ConfigError("benchmark=null: choose a protocol, e.g. benchmark=pmnist_quick")
    gen = torch.Generator().manual_seed(run.seed)
    stream = build_stream(data, run.benchmark, run.seed)
    seed_everything(run.seed)
    model = build_model(run.model, stream.input_dim, stream.num_classes, run.seed).to(device)
    strategy = build_strategy(run.strategy, model)
    method: CLMethod = build_cl_method(run.cl, model)
    bs = run.trainer.batch_size
    stage_tasks = [stream.tasks[: i + 1] if method.cumulative else [stream.tasks[i]] for i in range(len(stream))]
    stage_steps = [_steps_for(stream, sum(len(t.train_idx) for t in tasks[-1:]), run.benchmark, bs) for tasks in stage_tasks]
    trainer = Trainer(run, model, strategy, None, out, plugins=[method], total_steps=sum(stage_steps))

    R = [evaluate_all(trainer, stream)]
    curves: list[dict] = []
    task_seconds = []
    for i, (tasks, steps) in enumerate(zip(stage_tasks, stage_steps)):
        start = time.perf_counter()
        method.before_task(trainer, stream, stream.tasks[i])
        _train_stage(trainer, stream, tasks, steps, gen, f"{strategy.name}+{method.name} task {i + 1}/{len(stream)}", curves)
        method.after_task(trainer, stream, stream.tasks[i])
        strategy.on_epoch_end()
        task_seconds.append(time.perf_counter() - start)
        R.append(evaluate_all(trainer, stream))
        if run.trainer.checkpoint:  # the last good state, should a later task diverge
            trainer.save_checkpoint({"acc_matrix": R, "tasks_done": i + 1})
        log.info("after task %d: mean acc over tasks so far %.4f", i + 1, sum(R[-1][: i + 1]) / (i + 1))

    metrics: dict[str, Any] = {
        "strategy": strategy.name,
        "cl": method.name,
        "benchmark": run.benchmark.name,
        "model": run.model.name,
        "seed": run.seed,
        "acc_matrix": R,
        **summarize(R),
        "task_seconds": task_seconds,
        "steps": trainer.step,
        "wall_s": time.perf_counter() - wall_start,
        "curves": curves,
        "config": {
            "strategy": asdict(run.strategy),
            "cl": asdict(method.cfg),
            "benchmark": asdict(run.benchmark),
            "model": asdict(run.model),
            "trainer": asdict(run.trainer),
        },
    }
    atomic_write_json(metrics, out / "cl_metrics.json")
    with open(out / "acc_matrix.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["after"] + [f"task_{j + 1}" for j in range(len(stream))])
        for i, row in enumerate(R):
            writer.writerow(["init" if i == 0 else f"task_{i}"] + [f"{a:.4f}" for a in row])
    from agentnet import reports

    reports.plot_accuracy_matrix(R, out / "acc_matrix.png", title=f"{strategy.name} + {method.name}")
    reports.plot_task_accuracy(R, out / "task_accuracy.png")
    return metrics
