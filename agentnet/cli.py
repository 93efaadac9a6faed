"""Thin Hydra entry point: ``agentnet`` / ``python -m agentnet``.

Dispatches the composed config to its task — :func:`agentnet.experiments.run_experiment`,
:func:`agentnet.recipes.run_continual` or :func:`agentnet.recipes.train` — and turns any
failure into a clear message plus ``error.txt`` in the job's directory. A multirun keeps going past
failed jobs and exits non-zero at the end if any failed (:class:`SweepStatus`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from agentnet.composition import to_run_config
from agentnet.config import ConfigError
from agentnet.data import DataError
from agentnet.distributed import DistributedError, launched
from agentnet.experiments import run_experiment
from agentnet.hydra_setup import register_all
from agentnet.paths import CONFIG_DIR, output_dir_of
from agentnet.recipes import finished, run_continual, train
from agentnet.training import CheckpointError, NonFiniteLossError, RunDirectoryLockedError, atomic_write_json
from agentnet.training.console import EVENTS, HISTORY, configure_console, duration, job_tag
from agentnet.training.preemption import EXIT_PREEMPTED, Preempted

#: What a job stopped by a preemption signal writes into its directory (see agentnet.training.preemption).
STOPPED = "stopped.json"
from agentnet.tuning import run_study

log = logging.getLogger("agentnet")

register_all()  # the group schemas and every plugin's <name>_schema, before Hydra composes

SUMMARY_KEYS = ("strategy", "model", "test_error", "train_error", "num_params", "samples_per_s", "wall_s")
CL_SUMMARY_KEYS = ("strategy", "cl", "benchmark", "ACC", "BWT", "FWT", "forgetting", "wall_s")
#: Failures with a message that says everything; anything else is logged with its traceback.
#: Failures reported by their message alone (an OSError names its file and cause: a full disk, a missing path).
EXPECTED = (ConfigError, DataError, NonFiniteLossError, CheckpointError, RunDirectoryLockedError, DistributedError, OSError)


class SweepStatus(Callback):
    """Counts a multirun's failed jobs (those that wrote ``error.txt``) once every job has ended."""

    failed: list[str] = []
    stopped: list[str] = []
    """Jobs a preemption signal stopped (``stopped.json``): resumable with ``resume=true``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        SweepStatus.failed = sorted(str(p.parent) for p in sweep.glob("**/error.txt"))
        SweepStatus.stopped = sorted(str(p.parent) for p in sweep.glob(f"**/{STOPPED}"))


@dataclass
class Outcome:
    """What a job's task returns: the value a sweeper would optimise and the headline the console shows."""

    value: float | None
    headline: str = ""


def run_task(cfg: DictConfig) -> Outcome:
    """The task the config asks for; returns the value a sweeper would optimise.

    A job that SLURM requeued (preemption, ``scontrol requeue``, submitit's timeout handling) starts
    again with ``SLURM_RESTART_COUNT`` > 0: it resumes from its own checkpoint.
    """
    run = to_run_config(cfg)
    if run.tune is not None:
        raise ConfigError("tune: a study runs through agentnet-tune (same overrides); agentnet trains one configuration")
    _check_torchrun(run)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts and not run.resume:
        log.warning("SLURM requeued this job (restart %d): resuming from its checkpoint", restarts)
        run.resume = True
    # Under torchrun every rank must take the same path: the ranks other than 0 cannot see rank 0's
    # results before they join the process group, so a finished run resumes (at its end) instead.
    done = finished(run) if run.resume and run.experiment is None and not launched().active else None
    if done is not None:  # a resumed sweep: this job finished before the interruption
        log.info("%s finished already; resume=true keeps its results", output_dir_of(run.output_dir))
        key = "ACC" if run.benchmark is not None else "test_error"
        return Outcome(done.get(key), "finished before; results kept")
    if run.experiment is not None:
        result = run_experiment(run, output_dir_of(run.output_dir))
        summary = result["summary"]
        return Outcome(None if not summary else float(next(iter(summary.values()))),
                       ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, (int, float))))
    if run.benchmark is not None:
        metrics = run_continual(run)
        HISTORY.info("%s", json.dumps({k: metrics.get(k) for k in CL_SUMMARY_KEYS}))
        return Outcome(metrics.get("ACC"), _headline(metrics, ("ACC", "BWT", "forgetting")))
    metrics = train(run)
    HISTORY.info("%s", json.dumps({k: metrics.get(k) for k in SUMMARY_KEYS}))
    return Outcome(metrics.get("test_error"), _headline(metrics, ("test_error", "val_error", "train_error")))


def _check_torchrun(run) -> None:
    """What a run under torchrun (several ranks) cannot be: a paper experiment (several runs of its
    own), or a job of a sweep whose launcher starts other processes (they would not be ranks)."""
    if not launched().active:
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if run.experiment is not None:
        raise ConfigError(f"experiment={run.experiment.name} under torchrun: a paper experiment trains several runs of its own; "
                          "run it without torchrun, or its runs one by one under torchrun")
    hydra_cfg = HydraConfig.get()
    in_submitit = bool(os.environ.get("SUBMITIT_EXECUTOR"))  # a multi-task SLURM job: its tasks are the ranks
    if hydra_cfg.mode == RunMode.MULTIRUN and not in_submitit and "BasicLauncher" not in str(hydra_cfg.launcher.get("_target_", "")):
        raise ConfigError("hydra/launcher: under torchrun a sweep runs its jobs one after another in the ranks themselves; "
                          "add hydra/launcher=basic (a joblib or SLURM launcher would start processes that are not ranks)")


def _rank_argv(argv: list[str]) -> list[str]:
    """Under torchrun, ranks other than 0 write nothing into the outputs: their Hydra run (and sweep)
    directory — its log and .hydra — goes to a temporary directory of their own."""
    w = launched()
    if not w.active or w.main:
        return argv
    job = f"{os.environ.get('TORCHELASTIC_RUN_ID') or 'run'}-{os.getppid()}"  # the id is 'none' unless set: the agent's pid tells launches apart
    base = Path(tempfile.gettempdir()) / "agentnet-torchrun" / job / f"rank{w.rank}"
    kept = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    return [*kept, f"hydra.run.dir={base}", f"hydra.sweep.dir={base}"]


def _headline(metrics: dict, keys: tuple[str, ...]) -> str:
    """``ACC 91.20 % ± 0.31, BWT ...`` of a run's metrics (± over replicas when it has several)."""
    parts = []
    for key in keys:
        value = metrics.get(key)
        if not isinstance(value, (int, float)):
            continue
        spread = metrics.get(f"{key}_std")  # present when the run trained several replicas
        scale = 1 if key.endswith("_error") else 100  # errors are percentages already, ACC & co. fractions
        parts.append(f"{key} {scale * value:.2f} %" + (f" ± {scale * spread:.2f}" if isinstance(spread, (int, float)) else ""))
    return ", ".join(parts) or "no metric"


def tune_task(cfg: DictConfig) -> Outcome:
    """``agentnet-tune``'s task: a study in the job's directory (:func:`agentnet.tuning.run_study`);
    returns the final runs' mean test metric (error, or ACC for continual runs)."""
    run = to_run_config(cfg)
    if run.experiment is not None:
        raise ConfigError(f"experiment={run.experiment.name}: the paper experiments follow their papers' settings; tune a run or a benchmark")
    if launched().active:
        raise ConfigError("agentnet-tune under torchrun: a study trains its trials as populations in one process; "
                          "run agentnet-tune without torchrun (or sweep studies over machines with a Hydra launcher)")
    out = output_dir_of(run.output_dir)
    summary = run_study(run, out)
    final = summary.get("final")
    HISTORY.info("%s", json.dumps({"best": summary["best"], "objective": summary["objective"]}))
    best = f"best {summary['best']}"
    if not final:
        return Outcome(None, best)
    keys = ("ACC", "BWT", "forgetting") if run.benchmark is not None else ("test_error",)
    return Outcome(final.get(keys[0]), f"{best}; final runs: {_headline(final, keys)}")


def _slurm_requeue() -> str | None:
    """Under SLURM, put this job back in the queue (``scontrol requeue``, as submitit does at its
    time limit): it restarts with ``SLURM_RESTART_COUNT`` > 0 and resumes from its checkpoint. The
    job's id (``<array>_<task>`` in an array), or ``None`` outside SLURM or when SLURM refuses."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    target = f"{array}_{index}" if array and index else job
    try:
        done = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not requeue SLURM job %s (%s); rerun it with resume=true", target, exc)
        return None
    if done.returncode != 0:
        log.warning("could not requeue SLURM job %s (%s); rerun it with resume=true", target, done.stderr.strip())
        return None
    log.warning("requeued SLURM job %s: it resumes from its checkpoint when it starts again", target)
    return target


def _guarded(task: Callable[[DictConfig], Outcome], cfg: DictConfig) -> float | None:
    """Run ``task(cfg)``; turn a failure into a clear message and ``error.txt`` in the job's directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    configure_console(multirun, job_tag() if multirun else "")
    started = time.perf_counter()
    EVENTS.info("started: %s", " ".join(HydraConfig.get().overrides.task) or "the default config")
    try:
        result = task(cfg)
    except Preempted as stop:  # not a failure: the run checkpointed and can resume
        log.warning("%s", stop)
        EVENTS.info("stopped after %s; resumable with resume=true", duration(time.perf_counter() - started))
        out = Path(cfg.get("output_dir") or HydraConfig.get().runtime.output_dir)
        if not launched().main:  # under torchrun rank 0 records the stop
            sys.exit(EXIT_PREEMPTED)
        out.mkdir(parents=True, exist_ok=True)
        record = {**stop.record(), "requeued": None}
        atomic_write_json(record, out / STOPPED)  # first: requeueing has SLURM stop this process
        if stop.checkpoint is not None and (requeued := _slurm_requeue()) is not None:
            atomic_write_json({**record, "requeued": requeued}, out / STOPPED)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # main() exits with EXIT_PREEMPTED at the end
        sys.exit(EXIT_PREEMPTED)
    except Exception as exc:  # every failure leaves error.txt; expected ones without a traceback
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, EXPECTED):
            log.error("%s", message)
            detail = message
        else:
            detail = traceback.format_exc()
            log.error("%s", detail)
        EVENTS.info("failed after %s: %s (the message above; error.txt in the job's directory)",
                    duration(time.perf_counter() - started), type(exc).__name__)
        hydra_cfg = HydraConfig.get()
        if not isinstance(exc, RunDirectoryLockedError) and launched().main:  # a locked directory belongs to the live run
            out = Path(cfg.get("output_dir") or hydra_cfg.runtime.output_dir)
            try:
                out.mkdir(parents=True, exist_ok=True)
                (out / "error.txt").write_text(detail.rstrip() + "\n")
            except OSError as write_error:  # a full disk may refuse this too; the log has the message
                log.error("could not write %s: %s", out / "error.txt", write_error.strerror or write_error)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return None  # the sweep's other jobs go on; main() exits non-zero at the end
        sys.exit(1)
    # error.txt tells why the last attempt failed: a job that now succeeded (resumed, or a study
    # continued) is no longer failed
    job = Path(cfg.get("output_dir") or HydraConfig.get().runtime.output_dir)
    if launched().main:
        (job / "error.txt").unlink(missing_ok=True)
        (job / STOPPED).unlink(missing_ok=True)
    EVENTS.info("finished in %s: %s", duration(time.perf_counter() - started), result.headline)
    return result.value


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _app(cfg: DictConfig) -> float | None:
    return _guarded(run_task, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="tune")
def _tune_app(cfg: DictConfig) -> float | None:
    return _guarded(tune_task, cfg)


def _finish() -> None:
    if SweepStatus.failed:
        print(f"agentnet: {len(SweepStatus.failed)} job(s) of the sweep failed (see error.txt):", file=sys.stderr)
        for job in SweepStatus.failed:
            print(f"  {job}", file=sys.stderr)
        sys.exit(1)
    if SweepStatus.stopped:
        print(f"agentnet: {len(SweepStatus.stopped)} job(s) of the sweep were stopped by a signal (see {STOPPED}); "
              "rerun the command with resume=true:", file=sys.stderr)
        for job in SweepStatus.stopped:
            print(f"  {job}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)


def main() -> None:
    """Console script ``agentnet`` (also every rank of ``torchrun -m agentnet``)."""
    SweepStatus.failed, SweepStatus.stopped = [], []
    sys.argv = _rank_argv(sys.argv)
    _app()
    _finish()


def tune_main() -> None:
    """Console script ``agentnet-tune``: tune a run's hyperparameters on validation data (Optuna),
    then retrain the best setting with fresh seeds and evaluate it on the test set once."""
    SweepStatus.failed, SweepStatus.stopped = [], []
    _tune_app()
    _finish()


if __name__ == "__main__":
    main()
