"""The recipes behind the ``agentnet`` command: pure functions from a config to written results.

``train(cfg)`` trains one configuration (``metrics.json``); ``run_continual(cfg)`` a continual-
learning benchmark (``cl_metrics.json``, ``acc_matrix.csv``). Both build the run once
(:func:`agentnet.session.build_session`), train its stream, and write through one results writer
(:func:`results`): what differs is only what each measures at the end.
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from agentnet import plots
from agentnet.config import ConfigError, RunConfig
from agentnet.continual.metrics import summarize as summarize_matrix
from agentnet.data import ImageData
from agentnet.distributed import world
from agentnet.paths import output_dir_of
from agentnet.population import summarize
from agentnet.session import Session, build_session, prepare_run
from agentnet.training import RunLock, atomic_write_json
from agentnet.training.checkpoint import config_differences

__all__ = ["train", "run_continual", "results", "finished"]


def finished(run: RunConfig) -> dict[str, Any] | None:
    """The results a finished run left in its output directory, if they are this run's: what a
    rerun with ``resume=true`` (a resumed sweep) returns instead of training again. ``None`` when
    there are none, or when they were written with a different seed or a config that changes
    training (the rerun then resumes or refuses as usual)."""
    out = output_dir_of(run.output_dir)
    path = out / ("cl_metrics.json" if run.benchmark is not None else "metrics.json")
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: train (or resume) and write it again
    current = asdict(run)
    mine = {"strategy": current["strategy"], "model": current["model"], "trainer": current["trainer"],
            **({"cl": current["cl"], "benchmark": current["benchmark"]} if run.benchmark is not None else {})}
    if saved.get("seed") != run.seed or config_differences(saved.get("config", {}), mine):
        return None
    # A run asked to train longer (trainer.epochs / max_steps grew: resumable keys) is not finished.
    length = ("epochs", "max_steps")
    if any(saved.get("config", {}).get("trainer", {}).get(k) != getattr(run.trainer, k) for k in length):
        return None
    return saved


def _writer(out: Path):
    """The run directory's lock where this process writes (rank 0 under torchrun; the only process otherwise)."""
    return RunLock(out) if world().main else contextlib.nullcontext()


def _trained(session: Session, out: Path) -> dict | None:
    """Resume the run when asked and train its whole stream; what the resume did."""
    run = session.run
    resumed = session.resume(Path(run.resume_from) if run.resume_from else out) if run.resume else None
    session.run_all()
    return resumed


def results(session: Session, replica: Callable[[int], dict[str, Any]], wall_start: float,
            resumed: dict | None, config: dict[str, Any]) -> dict[str, Any]:
    """What a results file holds: per replica who it is, ``replica(r)`` (what the recipe measured),
    its steps, epochs, history and leader counts; then the mean and std over replicas
    (:func:`agentnet.population.summarize`), the seeds, wall time, mean history and the config
    (``config`` adds to the strategy, model and trainer sections)."""
    run, population, trainer = session.run, session.population, session.trainer
    selection = session.strategy.selection
    per_replica = []
    for r in range(session.model.replicas):
        entry = {"strategy": session.strategy.name, **replica(r), "model": run.model.name, **population.describe(r),
                 "steps": trainer.step, "epochs": trainer.epoch, "history": trainer.histories[r]}
        if selection is not None:
            entry["leadership_counts"] = [c[r].cpu().tolist() for c in selection.counts]
        per_replica.append(entry)
    metrics = summarize(per_replica)
    for key in population.describe(0):  # who each replica is, not a measurement
        metrics.pop(key, None)
        metrics.pop(f"{key}_std", None)
    metrics.update(seed=run.seed, seeds=population.seeds, wall_s=time.perf_counter() - wall_start, history=trainer.history,
                   config={"strategy": asdict(run.strategy), **config, "model": asdict(run.model),
                           "trainer": asdict(run.trainer), "replicas": session.model.replicas, "vary": population.variants})
    if resumed is not None:
        metrics["resumed"] = resumed
    return metrics


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
            "continual run (agentnet.recipes.run_continual, or the agentnet CLI)"
        )
    writes = world().main  # under torchrun only rank 0 writes (and checkpoints, and logs to trackers)
    with _writer(out), build_session(run, data, out if writes else None) as session:
        resumed = _trained(session, out)
        trainer, model = session.trainer, session.model
        selected = session.selector.restore(model) if session.selector is not None else None
        # the test set's one evaluation when there is a validation split (none in a study's trials)
        evaluated = {"test": trainer.evaluate(data.test) if run.trainer.test else None,
                     "train": trainer.evaluate(data.train),
                     "val": trainer.evaluate(data.val) if data.val is not None else None}
        selection = session.strategy.selection

        def replica(r: int) -> dict[str, Any]:
            measured: dict[str, Any] = {"device": str(device)}
            for name, result in evaluated.items():
                if result is not None:
                    measured.update({f"{name}_acc": result["acc"][r], f"{name}_error": 100.0 * (1.0 - result["acc"][r]),
                                     f"{name}_loss": result["loss"][r]})
            history = trainer.histories[r]
            measured["final_train_loss"] = history[-1]["train_loss"] if history else float("nan")
            if selected is not None:
                measured["selected_epoch"] = selected[r]
            measured["num_params"] = model.num_params
            if selection is not None:
                measured["leadership_epoch_counts"] = [[c[r].tolist() for c in layer] for layer in selection.epoch_counts]
            return measured

        metrics = results(session, replica, wall_start, resumed, {})
        metrics["samples_per_s"] = trainer.samples_seen / trainer.train_seconds if trainer.train_seconds else 0.0
        metrics["data"] = {"train": len(data.train), "val": 0 if data.val is None else len(data.val), "test": len(data.test)}
        metrics["world_size"] = world().size
        if not writes:
            return metrics
        atomic_write_json(metrics, out / "metrics.json")
        plots.write_run_plots(out, trainer.history, trainer.histories,
                              leadership=None if selection is None else selection.epoch_counts,
                              activity=None if session.activity is None else session.activity.series())
        session.finish(metrics)
    return metrics


def run_continual(cfg: DictConfig | RunConfig | dict, data: ImageData | None = None) -> dict[str, Any]:
    """Run a continual-learning benchmark; write and return ``cl_metrics`` (and ``acc_matrix.csv``, plots)."""
    wall_start = time.perf_counter()
    run, _, out, data = prepare_run(cfg, data)
    if run.benchmark is None:
        raise ConfigError("benchmark=null: choose a protocol, e.g. benchmark=pmnist_quick")
    writes = world().main
    with _writer(out), build_session(run, data, out if writes else None) as session:
        resumed = _trained(session, out)
        record, method = session.record, session.method

        def replica(r: int) -> dict[str, Any]:
            R, V = record.acc_matrices[r], record.val_matrices[r]
            return {"cl": method.name, "benchmark": run.benchmark.name,
                    **({} if not R else {"acc_matrix": R, **summarize_matrix(R)}),
                    **({} if not V else {"val_acc_matrix": V, **{f"val_{k}": v for k, v in summarize_matrix(V).items()}}),
                    "curves": [{"step": c["step"], "acc": c["acc"][r]} for c in record.curves]}

        metrics = results(session, replica, wall_start, resumed, {"cl": asdict(method.cfg), "benchmark": asdict(run.benchmark)})
        metrics["task_seconds"] = session.progress.task_seconds
        metrics["curves"] = [{"step": c["step"], "acc": [sum(a) / len(a) for a in zip(*c["acc"])]} for c in record.curves]
        metrics["world_size"] = world().size
        if not writes:
            return metrics
        atomic_write_json(metrics, out / "cl_metrics.json")
        R = metrics.get("acc_matrix")  # the mean over replicas (none without trainer.test)
        if R is not None:
            with open(out / "acc_matrix.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["after"] + [f"task_{j + 1}" for j in range(len(session.stream))])
                for i, row in enumerate(R):
                    writer.writerow(["init" if i == 0 else f"task_{i}"] + [f"{a:.4f}" for a in row])
            plots.plot_accuracy_matrix(R, out / "acc_matrix.png", title=f"{session.strategy.name} + {method.name}")
            plots.plot_task_accuracy(R, out / "task_accuracy.png", record.acc_matrices)
        if session.activity is not None:
            plots.plot_activity(*session.activity.series(), out / "activity.png")
        session.finish(metrics)
    return metrics
