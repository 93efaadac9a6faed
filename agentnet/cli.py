"""Thin Hydra entry point: ``agentnet`` / ``python -m agentnet``. All work happens in :func:`agentnet.trainer.train`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from agentnet.config import ConfigError, register_configs
from agentnet.data import DataError
from agentnet.registry import available_strategies
from agentnet.continual.methods import CL_METHODS
from agentnet.trainer import NonFiniteLossError, to_run_config, train

log = logging.getLogger("agentnet")

register_configs()
available_strategies()  # imports strategies/ so their config schemas are in the ConfigStore
CL_METHODS.names()  # likewise for the continual-learning methods

#: The repository's configs/ (an editable install keeps it beside the package).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
#: The repository's configs/ (an editable install keeps it beside the package).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
SUMMARY_KEYS = ("strategy", "model", "test_error", "train_error", "num_params", "samples_per_s", "wall_s")


CL_SUMMARY_KEYS = ("strategy", "cl", "benchmark", "ACC", "BWT", "FWT", "forgetting", "wall_s")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _app(cfg: DictConfig) -> float:
    from agentnet.continual.runner import run_continual

    try:
        run = to_run_config(cfg)
        if run.benchmark is not None:
            metrics = run_continual(run)
            log.info("%s", json.dumps({k: metrics[k] for k in CL_SUMMARY_KEYS}))
            return metrics["ACC"]
        metrics = train(run)
    except (ConfigError, DataError, NonFiniteLossError, FileNotFoundError) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        sys.exit(1)
    log.info("%s", json.dumps({k: metrics[k] for k in SUMMARY_KEYS}))
    return metrics["test_error"]


def main() -> None:
    """Console script ``agentnet``."""
    _app()


if __name__ == "__main__":
    main()
