"""Experiment trackers as trainer plugins: TensorBoard, MLflow and W&B, selected by ``trainer.loggers``.

Every tracker logs the same things at the same moments (:class:`RunLogger`); a subclass only says
how its tracker opens, logs and closes a run:

* when the run starts (``before_run``, after any resume): the resolved config;
* at every epoch's end: the epoch's history entry, its scalars with step = epoch;
* once the recipe has written its results and plots (``after_results``): the final metrics (the
  results file's numeric top-level values as ``final/<key>``, step = the last epoch: a history key
  such as ``train_loss``, the epoch's running mean, differs from the final evaluation's) and the
  run directory's PNG plots; then the tracker run closes. A run that fails or is stopped (``after_failure``) closes
  its tracker run as failed, or killed.

Where they write: TensorBoard to ``<run>/tensorboard``; MLflow to ``trainer.tracking_uri`` (else
``$MLFLOW_TRACKING_URI``, else a SQLite store ``mlflow.db`` with artifacts in ``mlartifacts/``, in
the run's directory or, for the jobs of a Hydra multirun, in the sweep's: one experiment per sweep);
W&B under ``<run>/wandb`` (online, offline or disabled as W&B's own settings say; a sweep is one
group of ``trainer.project``). Each tracker's run id is kept in ``<run>/trackers.json``, so a run
resumed from its checkpoint (``resume=true``) continues the same tracker run instead of starting
another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from agentnet.config import ConfigError, RunConfig, check
from agentnet.training.checkpoint import atomic_write_json
from agentnet.training.console import in_multirun, job_tag
from agentnet.training.plugins import TrainerPlugin
from agentnet.training.preemption import Preempted

__all__ = ["RunLogger", "TensorBoardLogger", "MLflowLogger", "WandbLogger", "LOGGERS", "TRACKERS", "build_loggers",
           "flatten", "sweep_dir"]

log = logging.getLogger(__name__)

TRACKERS = "trackers.json"
"""The file in a run's directory that keeps each tracker's run id (for ``resume=true``)."""


def sweep_dir() -> Path | None:
    """The sweep directory of the Hydra multirun this process is a job of; ``None`` outside one."""
    if not in_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().sweep.dir)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (``{"trainer": {"lr": 0.1}}`` -> ``{"trainer.lr": 0.1}``)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _scalars(values: dict[str, Any], skip: tuple[str, ...]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _read_trackers(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / TRACKERS).read_text())
    except (OSError, ValueError):
        return {}


class RunLogger(TrainerPlugin):
    """What every tracker logs, and when (see the module docstring); subclasses implement
    :meth:`open`, :meth:`log_config`, :meth:`log_metrics`, :meth:`log_images` and :meth:`close`.

    ``run`` is the run's config, ``directory`` its output directory; ``sweep`` the multirun's sweep
    directory (``None`` outside one).
    """

    name = ""
    """The tracker's name in ``trainer.loggers``."""
    package = ""
    """The module that must be importable (installed by the extra ``agentnet[<name>]``)."""

    def __init__(self, run: RunConfig, directory: Path) -> None:
        self.run, self.directory = run, Path(directory)
        self.sweep = sweep_dir()
        self.run_name = job_tag() if self.sweep is not None else self.directory.name
        """The tracker run's name: the job's tag in a sweep (``#2 strategy=lfnn``), else the directory's name."""
        self.active = False

    @classmethod
    def available(cls) -> bool:
        """Whether the tracker's package is installed."""
        return importlib.util.find_spec(cls.package) is not None

    # -- what a tracker implements ---------------------------------------------------------------
    def open(self, trainer: "Trainer", previous: dict | None) -> tuple[dict | None, bool]:
        """Start (or, with ``previous``, the record this tracker kept for the checkpoint's run,
        continue) the tracker run. Returns the record to keep in ``trackers.json`` (``None``: none)
        and whether an earlier tracker run continues (its epochs up to the checkpoint are logged)."""
        raise NotImplementedError

    def log_config(self, config: dict[str, Any]) -> None:
        """Log the resolved config (nested dicts)."""
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalars at ``step`` (an epoch)."""
        raise NotImplementedError

    def log_final(self, metrics: dict[str, float], step: int) -> None:
        """Log the final metrics (``final/<key>``; by default as metrics at the last epoch)."""
        self.log_metrics(metrics, step)

    def log_images(self, paths: list[Path], step: int) -> None:
        """Log PNG files."""
        raise NotImplementedError

    def close(self, status: str) -> None:
        """End the tracker run: ``FINISHED``, ``FAILED`` or ``KILLED`` (stopped; it may resume)."""
        raise NotImplementedError

    # -- the hooks ---------------------------------------------------------------------------------
    def before_run(self, trainer: "Trainer") -> None:
        previous = None
        if trainer.resumed_from is not None:  # continue the tracker run of the checkpoint's run
            previous = _read_trackers(Path(trainer.resumed_from).parent).get(self.name)
        record, continued = self.open(trainer, previous)
        self.active = True
        if record is not None:
            kept = _read_trackers(self.directory)
            kept[self.name] = record
            atomic_write_json(kept, self.directory / TRACKERS)
        self.log_config(json.loads(json.dumps(dataclasses.asdict(trainer.cfg), default=str)))
        if not continued:  # a resumed run in a new tracker run: the epochs before the checkpoint too
            for entry in trainer.history:
                self.log_metrics(_scalars(entry, ("epoch",)), entry["epoch"])

    def after_epoch(self, trainer: "Trainer", entry: dict) -> None:
        if self.active:
            self.log_metrics(_scalars(entry, ("epoch",)), trainer.epoch)

    def after_results(self, trainer: "Trainer", results: dict) -> None:
        if not self.active:
            return
        self.log_final({f"final/{k}": v for k, v in _scalars(results, ("seed",)).items()}, trainer.epoch)
        self.log_images(sorted(self.directory.glob("*.png")), trainer.epoch)
        self.active = False
        self.close("FINISHED")

    def after_failure(self, trainer: "Trainer", error: BaseException) -> None:
        if self.active:
            self.active = False
            self.close("KILLED" if isinstance(error, (Preempted, KeyboardInterrupt)) else "FAILED")


class TensorBoardLogger(RunLogger):
    """Writes to ``<output>/tensorboard``: the config as text, the history and final metrics as
    scalars (x axis: epochs), the plots as images. A resumed run appends to the same directory."""

    name = package = "tensorboard"

    def __init__(self, run: RunConfig, directory: Path) -> None:
        super().__init__(run, directory)
        self.writer = None

    def open(self, trainer: "Trainer", previous: dict | None) -> tuple[dict | None, bool]:
        from torch.utils.tensorboard import SummaryWriter

        events = self.directory / "tensorboard"
        continued = trainer.resumed_from is not None and any(events.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(events))
        return None, continued

    def log_config(self, config: dict[str, Any]) -> None:
        text = json.dumps(config, indent=2)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))  # a markdown code block

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_images(self, paths: list[Path], step: int) -> None:
        from matplotlib import image

        for path in paths:
            self.writer.add_image(f"plots/{path.stem}", image.imread(path), step, dataformats="HWC")

    def close(self, status: str) -> None:
        self.writer.close()


@contextlib.contextmanager
def _sqlite_lock(uri: str) -> Iterator[None]:
    """Hold an ``flock`` beside a SQLite store while it may be created: the jobs of a parallel sweep
    share one file, and MLflow's first-use migrations must not run twice at once (later writes are
    SQLite's own business). Other stores need no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class MLflowLogger(RunLogger):
    """An MLflow run: the config as params (dotted keys; ``config.json`` as an artifact too), the
    history and final metrics as metrics (step: epoch), the plots as artifacts under ``plots/``.

    Without ``trainer.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` the store is
    ``sqlite:///<dir>/mlflow.db`` with artifacts in ``<dir>/mlartifacts``, ``<dir>`` being the
    sweep's directory for the jobs of a multirun (its experiment is named after the sweep
    directory), else the run's (experiment ``trainer.project``). MLflow's params cannot change, so
    a resumed run keeps its first values there; ``config.json`` holds the current ones.
    """

    name = package = "mlflow"

    def __init__(self, run: RunConfig, directory: Path) -> None:
        super().__init__(run, directory)
        self.client = None
        self.run_id: str | None = None

    def store(self) -> tuple[str, Path | None]:
        """The tracking URI, and the directory of agentnet's own store (``None`` for a given URI)."""
        uri = self.run.trainer.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri, None
        home = (self.sweep or self.directory).resolve()
        return f"sqlite:///{home / 'mlflow.db'}", home

    def open(self, trainer: "Trainer", previous: dict | None) -> tuple[dict | None, bool]:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri, home = self.store()
        with _sqlite_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            if previous is not None and previous.get("tracking_uri") == uri:
                try:
                    found = self.client.get_run(previous["run_id"])
                except MlflowException:
                    found = None  # deleted for good: start another
                if found is not None and found.info.lifecycle_stage == "active":
                    self.run_id = found.info.run_id
                    self.client.update_run(self.run_id, status="RUNNING")
                    return previous, True
            experiment = self._experiment(str(self.sweep) if self.sweep else self.run.trainer.project, home)
            self.run_id = self.client.create_run(experiment, run_name=self.run_name,
                                                 tags={"agentnet.output_dir": str(self.directory.resolve())}).info.run_id
        return {"tracking_uri": uri, "run_id": self.run_id}, False

    def _experiment(self, name: str, home: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is None:
            location = None if home is None else (home / "mlartifacts").as_uri()
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created meanwhile by another job (a shared server)
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        check(found.lifecycle_stage == "active", "trainer.loggers", self.run.trainer.loggers,
              f"the MLflow experiment {name!r} is deleted; restore it or delete it for good (mlflow gc)")
        return found.experiment_id

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        kept = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)) for k, v in flatten(config).items() if k not in kept]
        if params:
            self.client.log_batch(self.run_id, params=params)
        self.client.log_dict(self.run_id, config, "config.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_images(self, paths: list[Path], step: int) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class WandbLogger(RunLogger):
    """A W&B run in project ``trainer.project`` (a multirun's jobs: one group, named after the sweep
    directory), writing under ``<output>/wandb``: the config (nested), the history with step =
    epoch, the final metrics as the run's summary, the plots as images under ``plots/``.

    Online, offline or disabled as W&B's own settings say (``WANDB_MODE``, ``wandb offline``; the
    entity and API key likewise); ``wandb sync <output>/wandb/offline-run-*`` uploads an offline
    run, a resumed one (same id) into the same W&B run.
    """

    name = package = "wandb"

    def __init__(self, run: RunConfig, directory: Path) -> None:
        super().__init__(run, directory)
        self.wandb_run = None

    def open(self, trainer: "Trainer", previous: dict | None) -> tuple[dict | None, bool]:
        import wandb

        run_id = None if previous is None else previous.get("id")
        try:
            # in a sweep, whose jobs share one console (agentnet.training.console), W&B says less
            settings = wandb.Settings(quiet=True) if self.sweep is not None else None
            self.wandb_run = wandb.init(dir=str(self.directory), project=self.run.trainer.project, name=self.run_name,
                                        group=str(self.sweep) if self.sweep else None, id=run_id,
                                        resume="allow" if run_id else None, reinit="create_new", settings=settings)
        except wandb.errors.UsageError as exc:  # online without an API key, most often
            raise ConfigError(f"trainer.loggers={self.run.trainer.loggers!r}: W&B did not start ({exc}); log in "
                              "(wandb login) or set WANDB_MODE=offline (wandb sync uploads later) or disabled") from exc
        return {"id": self.wandb_run.id, "project": self.run.trainer.project}, run_id is not None

    def log_config(self, config: dict[str, Any]) -> None:
        self.wandb_run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.wandb_run.log(metrics, step=step)

    def log_final(self, metrics: dict[str, float], step: int) -> None:
        self.wandb_run.summary.update(metrics)

    def log_images(self, paths: list[Path], step: int) -> None:
        import wandb

        if paths:
            self.wandb_run.log({f"plots/{path.stem}": wandb.Image(str(path)) for path in paths}, step=step)

    def close(self, status: str) -> None:
        if status == "KILLED":
            self.wandb_run.mark_preempting()
        self.wandb_run.finish(exit_code=0 if status == "FINISHED" else 1)


LOGGERS: dict[str, type[RunLogger]] = {cls.name: cls for cls in (TensorBoardLogger, MLflowLogger, WandbLogger)}
"""``trainer.loggers``' names and their plugins."""


def build_loggers(run: RunConfig, directory: Path) -> list[RunLogger]:
    """The trackers ``run.trainer.loggers`` selects, for the run writing to ``directory``.

    A selected tracker that is not installed is a :class:`~agentnet.config.ConfigError` naming its
    extra, except ``tensorboard`` (the default, not a dependency): skipped with a warning.
    """
    loggers = []
    for name in run.trainer.loggers:
        cls = LOGGERS[name]
        if cls.available():
            loggers.append(cls(run, directory))
        elif name == "tensorboard":
            log.warning("trainer.loggers: tensorboard is not installed, so this run logs no TensorBoard events "
                        "(pip install 'agentnet[tensorboard]', or trainer.loggers=[] to log nothing)")
        else:
            check(False, "trainer.loggers", run.trainer.loggers, f"{name} is not installed: pip install 'agentnet[{name}]'")
    return loggers
