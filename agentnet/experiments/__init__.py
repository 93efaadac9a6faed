"""The LFNN paper's experiments, each one command: ``agentnet experiment=<name>``.

An experiment is a class registered in :data:`EXPERIMENTS` with a ``Config`` dataclass; its
``configs/experiment/<name>.yaml`` selects it (and may override other groups). ``run`` trains what
the figure or table needs, writes its plot (PNG) and a Markdown table beside the paper's values
where the paper gives them, and returns a flat summary that ``agentnet-report`` can tabulate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf

from agentnet.config import ExperimentConfig, ModelConfig, RunConfig
from agentnet.data import ImageData
from agentnet.paths import CONFIG_DIR
from agentnet.registry import EXPERIMENTS, STRATEGIES
from agentnet.session import load_run_data
from agentnet.training import RunLock, atomic_write_json

__all__ = ["EXPERIMENTS", "Experiment", "preset", "run_experiment"]

class Experiment:
    """Base class: ``run(out, data) -> summary``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[ExperimentConfig]] = ExperimentConfig

    def __init__(self, cfg: ExperimentConfig, run: RunConfig) -> None:
        self.cfg = cfg
        self.run_cfg = run

    def run(self, out: Path, data: ImageData) -> dict[str, float]:
        raise NotImplementedError


def preset(group: str, name: str) -> Any:
    """A config preset as its validated dataclass: a strategy's registered defaults (what
    ``strategy=<name>`` selects), or a model preset from ``configs/model/<name>.yaml``."""
    if group == "strategy":
        return STRATEGIES.config(name)
    node = OmegaConf.load(Path(CONFIG_DIR) / group / f"{name}.yaml")
    node.pop("defaults", None)
    if group == "model":
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))
    raise ValueError(f"no preset loader for group {group!r}")


def run_experiment(run: RunConfig, out: Path, data: ImageData | None = None) -> dict[str, Any]:
    """Run ``run.experiment`` into ``out``; writes and returns ``experiment.json``."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_run_data(run)
    experiment = EXPERIMENTS.get(run.experiment.name)(run.experiment, run)
    with RunLock(out):
        summary = experiment.run(out, data)
    result = {
        "experiment": run.experiment.name,
        "summary": summary,
        "wall_s": time.perf_counter() - start,
        "config": OmegaConf.to_container(OmegaConf.structured(run.experiment)),
    }
    atomic_write_json(result, out / "experiment.json")
    print(json.dumps(summary, indent=1))
    return result
