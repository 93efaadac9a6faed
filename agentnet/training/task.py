"""The single-run task: ``train(cfg) -> metrics``, the pure function behind ``agentnet`` without a
benchmark, plus what every task starts with (device, seeds, data, output directory, plugins)."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from agentnet import plots
from agentnet.composition import to_run_config
from agentnet.config import ConfigError, RunConfig, check
from agentnet.data import ImageData, load_dataset, run_splits
from agentnet.network import build_model
from agentnet.paths import output_dir_of
from agentnet.population import population_of, summarize
from agentnet.registry import build_strategy
from agentnet.training.checkpoint import RunLock, atomic_write_json
from agentnet.training.engine import Trainer
from agentnet.training.plugins import BestValidation, TensorBoardLogger, TrainerPlugin, WorkerActivity

__all__ = ["resolve_device", "seed_everything", "prepare_run", "standard_plugins", "resume_info", "train"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: CUDA is not available on this machine; use device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_run_data(run: RunConfig, device: torch.device | str | None = None) -> ImageData:
    """The whole dataset ``run.data`` names, loaded as it asks (root, checksums, input scaling) onto
    ``device`` (default: ``run.device``), before any subset is cut."""
    return load_dataset(run.data.name, run.data.root, resolve_device(run.device) if device is None else device,
                        verify=run.data.verify, normalize=run.data.normalize)


def prepare_run(cfg: DictConfig | RunConfig | dict, data: ImageData | None = None) -> tuple[RunConfig, torch.device, Path, ImageData]:
    """What every task starts with: the validated config, its device and output directory (created),
    and the dataset on that device (loaded unless ``data`` is given) cut to ``data.subset`` /
    ``data.test_subset`` — a subset larger than the split is an error, never silently everything.
    Sets torch's CPU thread count to ``threads`` when it is nonzero (here, so that a task called from
    Python — a benchmark script, a notebook — honours it as the CLI does)."""
    run = to_run_config(cfg)
    if run.threads:
        torch.set_num_threads(run.threads)
    device = resolve_device(run.device)
    out = output_dir_of(run.output_dir)
    if data is None:
        data = load_run_data(run, device)
    elif data.standardized is not None:
        # Data loaded elsewhere (shared between runs) must be scaled as this run's config says.
        check(data.standardized == run.data.normalize, "data.normalize", run.data.normalize,
              f"the dataset passed in was loaded with normalize={data.standardized}; load it with "
              "agentnet.training.load_run_data(run) or pass data=None")
    if run.model.conv:
        check(
            run.model.in_channels == data.channels,
            "model.in_channels",
            run.model.in_channels,
            f"data.name={run.data.name} has {data.channels}-channel images",
        )
    data = run_splits(data, run.data)
    out.mkdir(parents=True, exist_ok=True)  # only once the run is accepted: a refused one leaves nothing behind
    return run, device, out, data


def standard_plugins(run: RunConfig, out: Path) -> tuple[list[TrainerPlugin], WorkerActivity | None]:
    """The plugins every kind of run gets from ``trainer.*``: worker activity, TensorBoard and
    (``trainer.select=best_val``) the best-validation selection."""
    plugins: list[TrainerPlugin] = [BestValidation()] if run.trainer.select == "best_val" else []
    activity = WorkerActivity() if run.trainer.record_activity else None
    if activity is not None:
        plugins.append(activity)
    if run.trainer.tensorboard and TensorBoardLogger.available():
        plugins.append(TensorBoardLogger(out / "tensorboard"))
    return plugins, activity


def resume_info(run: RunConfig, trainer: Trainer, out: Path) -> dict[str, Any] | None:
    """Continue from the run's checkpoint when ``resume=true``; what happened, for the metrics file."""
    if not run.resume:
        return None
    directory = Path(run.resume_from) if run.resume_from else out
    if trainer.resume(directory):
        return {"from": trainer.resumed_from, "step": trainer.step, "epoch": trainer.epoch}
    return {"from": None, "note": f"resume=true but there was no checkpoint at {directory / 'checkpoint.pt'}; started from scratch"}


def train(cfg: DictConfig | RunConfig | dict, data: ImageData | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; write ``metrics.json`` (and plots) to the output directory.

    ``data`` lets callers that run several configurations share one loaded dataset.
    Returns the metrics dictionary that was written.
    """
    wall_start = time.perf_counter()
    run, device, out, data = prepare_run(cfg, data)
    if run.benchmark is not None:
        raise ConfigError(
            f"benchmark.name={run.benchmark.name!r}: train() runs one training job; a benchmark is a "
            "continual run (agentnet.continual.runner.run_continual, or the agentnet CLI)"
        )
    with RunLock(out):
        seed_everything(run.seed)
        population = population_of(run)
        model = build_model(run.model, data.input_dim, data.num_classes, population.seeds).to(device)
        strategy = build_strategy(run.strategy, model, population.of("strategy"))
        plugins, activity = standard_plugins(run, out)
        trainer = Trainer(run, model, strategy, data, out, plugins)
        resumed = resume_info(run, trainer, out)
        trainer.fit()

        selector = next((p for p in plugins if isinstance(p, BestValidation)), None)
        selected = selector.restore(model) if selector is not None else None
        # the test set's one evaluation when there is a validation split (none in a study's trials)
        test = trainer.evaluate(data.test) if run.trainer.test else None
        train_eval = trainer.evaluate(data.train)
        val = trainer.evaluate(data.val) if data.val is not None else None
        num_params = model.num_params
        wall_s = time.perf_counter() - wall_start
        selection = strategy.selection
        per_replica = []
        for r in range(model.replicas):
            replica: dict[str, Any] = {
                "strategy": strategy.name,
                "model": run.model.name,
                **population.describe(r),
                "device": str(device),
                **({} if test is None else {"test_acc": test["acc"][r], "test_error": 100.0 * (1.0 - test["acc"][r]),
                                            "test_loss": test["loss"][r]}),
                "train_acc": train_eval["acc"][r],
                "train_error": 100.0 * (1.0 - train_eval["acc"][r]),
                "train_loss": train_eval["loss"][r],
                "final_train_loss": trainer.histories[r][-1]["train_loss"] if trainer.histories[r] else float("nan"),
                **({} if val is None else {"val_acc": val["acc"][r], "val_error": 100.0 * (1.0 - val["acc"][r]),
                                           "val_loss": val["loss"][r]}),
                **({} if selected is None else {"selected_epoch": selected[r]}),
                "num_params": num_params,
                "epochs": trainer.epoch,
                "steps": trainer.step,
                "history": trainer.histories[r],
            }
            if selection is not None:
                replica["leadership_counts"] = [c[r].cpu().tolist() for c in selection.counts]
                replica["leadership_epoch_counts"] = [[c[r].tolist() for c in layer] for layer in selection.epoch_counts]
            per_replica.append(replica)
        metrics = summarize(per_replica)
        metrics.update(
            samples_per_s=trainer.samples_seen / trainer.train_seconds if trainer.train_seconds else 0.0,
            wall_s=wall_s,
            history=trainer.history,
            config={"strategy": asdict(run.strategy), "model": asdict(run.model), "trainer": asdict(run.trainer),
                    "replicas": model.replicas, "vary": population.variants},
        )
        for key in population.describe(0):  # who each replica is, not a measurement
            metrics.pop(key, None)
            metrics.pop(f"{key}_std", None)
        metrics["seed"], metrics["seeds"] = run.seed, population.seeds
        metrics["data"] = {"train": len(data.train), "val": 0 if data.val is None else len(data.val), "test": len(data.test)}
        if resumed is not None:
            metrics["resumed"] = resumed
        atomic_write_json(metrics, out / "metrics.json")
        plots.write_run_plots(out, trainer.history, trainer.histories,
                              leadership=None if selection is None else selection.epoch_counts,
                              activity=None if activity is None else activity.series())
    return metrics
