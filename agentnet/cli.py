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
from agentnet.trainer import NonFiniteLossError, train

log = logging.getLogger("agentnet")

register_configs()
available_strategies()  # imports strategies/ so their config schemas are in the ConfigStore

#: The repository's configs/ (an editable install keeps it beside the package).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
#: The repository's configs/ (an editable install keeps it beside the package).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
SUMMARY_KEYS = ("strategy", "model", "test_error", "train_error", "num_params", "samples_per_s", "wall_s")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _app(cfg: DictConfig) -> float:
    try:
        metrics = train(cfg)
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
