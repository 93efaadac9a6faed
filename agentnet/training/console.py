"""What a run prints: one line per event on the console, every detail in the job's log file.

A single run shows its progress bar and one line per epoch (or per continual task). In a Hydra
multirun, jobs run side by side and share one terminal, so no job draws a bar: each prints one
line per event — started, each epoch or task done with its headline metric, finished, failed or
stopped with its wall time — tagged with the job's number and the swept settings that tell it
apart (``[#2 strategy=lfnn_local]``). Everything else (the per-epoch history, the final metrics as
JSON) goes to the job's log file (``<job>/<app>.log``) under the ``agentnet.history`` logger.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agentnet.distributed import launched
from agentnet.training.plugins import TrainerPlugin

__all__ = ["EVENTS", "HISTORY", "in_multirun", "job_tag", "configure_console", "duration", "progress_bar", "ConsoleEvents"]

EVENTS = logging.getLogger("agentnet.events")
"""A run's events: what the console shows of it."""
HISTORY = logging.getLogger("agentnet.history")
"""The detailed record (history entries, final metrics as JSON): the log file only, under the CLI."""


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (its console is shared with other jobs)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):  # no Hydra app around this run
        return False


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """The progress bar of a run; none in a Hydra multirun, whose jobs share one console and
    report their events instead."""
    return tqdm(total=total, desc=desc, disable=not enabled or in_multirun(), leave=False, dynamic_ncols=True)


_SWEEP_FUNCTION = re.compile(r"^\s*(choice|range|interval|glob|tag|sort|shuffle)\(")
_NESTED = re.compile(r"\[[^\[\]]*\]|\{[^{}]*\}|'[^']*'|\"[^\"]*\"")


def _swept(value: str) -> bool:
    """Whether an override's value sweeps (``a,b``, ``range(...)``, ``choice(...)``), as Hydra's
    grammar reads it: a comma inside a list, a dict or quotes does not sweep."""
    if _SWEEP_FUNCTION.match(value):
        return True
    previous = None
    while previous != value:  # innermost brackets and quotes first
        previous, value = value, _NESTED.sub("", value)
    return "," in value


def job_tag() -> str:
    """``#<job number> <swept key=value ...>``: the settings in which this job differs from the
    sweep's other jobs (read from the sweep's ``multirun.yaml``); all of its overrides when the
    sweep's own are unavailable."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hydra_cfg = HydraConfig.get()
    mine = list(hydra_cfg.overrides.task)
    swept: set[str] | None = None
    sweep_file = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    try:
        sweep = OmegaConf.load(sweep_file)
        swept = {o.split("=", 1)[0] for o in sweep.hydra.overrides.task if "=" in o and _swept(o.split("=", 1)[1])}
    except Exception:  # noqa: BLE001 - the tag only reads better with it
        swept = None
    shown = [o for o in mine if swept is None or o.split("=", 1)[0] in swept]
    return f"#{hydra_cfg.job.num}" + (f" {' '.join(shown)}" if shown else "")


class _ConsoleFilter(logging.Filter):
    """A console handler's filter: the history never; in a multirun only events and warnings."""

    def __init__(self, multirun: bool) -> None:
        super().__init__()
        self.multirun = multirun

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(HISTORY.name):
            return False
        return not self.multirun or record.name.startswith(EVENTS.name) or record.levelno >= logging.WARNING


class _BarSafeHandler(logging.StreamHandler):
    """A console handler that writes through ``tqdm.write``: a line never lands inside a progress
    bar (the bar is cleared, the line written, the bar drawn again below it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def configure_console(multirun: bool, tag: str = "") -> None:
    """Take over the console handlers Hydra configured (stream handlers on the root logger, not its
    file handler): lines are written around the progress bar, the history stays in the log file, a
    multirun job's console shows only its events and warnings, each line tagged with ``tag``; lines
    carry the time of day only (the log file keeps Hydra's full format). Under torchrun, ranks other
    than 0 show only warnings and errors, tagged with their rank (rank 0 tells the run's events). Idempotent."""
    rank = launched()
    if not rank.main:
        tag = f"rank {rank.rank}" + (f" {tag}" if tag else "")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
            continue
        console = handler if isinstance(handler, _BarSafeHandler) else _BarSafeHandler(handler.stream)
        console.setLevel(handler.level if rank.main else max(handler.level, logging.WARNING))
        console.filters = [_ConsoleFilter(multirun)]
        console.setFormatter(logging.Formatter(f"[%(asctime)s][{tag}] %(message)s" if tag else "[%(asctime)s] %(message)s",
                                               datefmt="%H:%M:%S"))
        if console is not handler:
            root.removeHandler(handler)
            root.addHandler(console)


def duration(seconds: float) -> str:
    """``42 s``, ``4 min 12 s`` or ``2 h 05 min``."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _percent(value: float) -> str:
    return f"{100 * value:.2f} %"


class ConsoleEvents(TrainerPlugin):
    """Logs a run's progress as events: each epoch of a single run with its headline metric
    (validation or test error when evaluated, else the running training accuracy), each task of a
    continual run with its accuracy and the mean over the tasks seen (means over replicas).

    ``record`` is the continual run's accuracy matrix (``None`` for a single run): it must come
    before this plugin, so the task's row is there when ``after_task`` fires.
    """

    def __init__(self, epochs: int, record: Any = None, num_tasks: int = 1) -> None:
        self.epochs = epochs
        self.record = record
        self.num_tasks = num_tasks

    def after_epoch(self, trainer, entry: dict) -> None:
        if self.record is not None:
            return  # continual runs report per task
        split = next((name for name in ("val", "test") if f"{name}_acc" in entry), None)
        if split:
            metric = f"{split} acc {_percent(entry[f'{split}_acc'])}"
        elif "train_acc_running" in entry:
            metric = f"train acc {_percent(entry['train_acc_running'])} (running)"
        else:  # trainer.train_accuracy=false
            metric = "no accuracy measured"
        EVENTS.info("epoch %d/%d: %s, train loss %.4f (%s)", entry["epoch"], self.epochs, metric, entry["train_loss"],
                    duration(entry["epoch_s"]))

    def after_task(self, trainer, stream, task) -> None:
        if self.record is None:
            return
        i = task.index
        matrices = self.record.acc_matrices if self.record.test else self.record.val_matrices
        if not matrices or not matrices[0]:
            return
        split = "test" if self.record.test else "val"
        own = _mean([m[-1][i] for m in matrices])
        seen = _mean([_mean(m[-1][: i + 1]) for m in matrices])
        mean = f", {_percent(seen)} mean over tasks 1-{i + 1}" if i else ""
        EVENTS.info("task %d/%d done: %s acc %s on it%s", i + 1, self.num_tasks, split, _percent(own), mean)
