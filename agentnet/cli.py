"""Thin Hydra entry point: ``agentnet`` / ``python -m agentnet``. All work happens in :func:`agentnet.trainer.train`."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from agentnet.config import ConfigError, register_configs
from agentnet.continual.methods import CL_METHODS
from agentnet.data import DataError
from agentnet.experiments import EXPERIMENTS
from agentnet.registry import available_strategies
from agentnet.trainer import NonFiniteLossError, to_run_config, train

log = logging.getLogger("agentnet")

# configs/hydra/launcher/*.yaml share their names with the launcher plugins' schemas on purpose: Hydra
# then validates them against those schemas (and warns that this matching is deprecated).
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema with the same name")

register_configs()
available_strategies()  # imports strategies/ so their config schemas are in the ConfigStore
CL_METHODS.names()  # likewise for the continual-learning methods
EXPERIMENTS.names()  # and the paper experiments

#: The repository's configs/ (an editable install keeps it beside the package).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
#: The repository's configs/ (an editable install keeps it beside the package).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
SUMMARY_KEYS = ("strategy", "model", "test_error", "train_error", "num_params", "samples_per_s", "wall_s")


CL_SUMMARY_KEYS = ("strategy", "cl", "benchmark", "ACC", "BWT", "FWT", "forgetting", "wall_s")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from agentnet.continual.runner import run_continual

    try:
        run = to_run_config(cfg)
        if run.threads:
            torch.set_num_threads(run.threads)
        if run.experiment is not None:
            from agentnet.experiments import run_experiment
            from agentnet.trainer import output_dir_of

            result = run_experiment(run, output_dir_of(run))
            return None if not result["summary"] else float(next(iter(result["summary"].values())))
        if run.benchmark is not None:
            metrics = run_continual(run)
            log.info("%s", json.dumps({k: metrics[k] for k in CL_SUMMARY_KEYS}))
            return metrics["ACC"]
        metrics = train(run)
        log.info("%s", json.dumps({k: metrics[k] for k in SUMMARY_KEYS}))
        return metrics["test_error"]
    except (ConfigError, DataError, NonFiniteLossError, FileNotFoundError) as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.error("%s", message)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # Record the failure for agentnet-report and let the sweep's other jobs run.
            (Path(HydraConfig.get().runtime.output_dir) / "error.txt").write_text(message + "\n")
            return None
        sys.exit(1)


def main() -> None:
    """Console script ``agentnet``."""
    _app()


if __name__ == "__main__":
    main()
