"""From a composed config to a validated run: Hydra's compose for the app, ``RunConfig`` validation,
the protocol presets (``benchmark=<name>``) as :class:`~agentnet.config.BenchmarkConfig`.

* :func:`compose`: the config ``agentnet <overrides>`` composes, without running anything.
* :func:`to_run_config`: a composed config (or a dict) as a :class:`~agentnet.config.RunConfig`,
  the plugin groups validated against their registered classes' ``Config``; :func:`check_combinations`
  refuses settings that would silently do nothing together.
* :func:`benchmark_config` and :func:`protocol_names`: the continual-learning protocols.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agentnet.config import BenchmarkConfig, ConfigError, RunConfig, TuneConfig, check
from agentnet.hydra_setup import register_all
from agentnet.paths import CONFIG_DIR
from agentnet.registry import CL_METHODS, EXPERIMENTS, STRATEGIES

__all__ = ["to_run_config", "check_combinations", "compose", "protocol_names", "benchmark_config"]


def to_run_config(cfg: DictConfig | RunConfig | dict) -> RunConfig:
    """Validate a composed config into a :class:`RunConfig`; plugin groups by their registered classes.

    Also refuses combinations that would silently do nothing (a CL method without a benchmark).
    """
    if isinstance(cfg, RunConfig):
        check_combinations(cfg)
        return cfg
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    strategy_node = plain.pop("strategy", None)
    cl_node = plain.pop("cl", None)
    experiment_node = plain.pop("experiment", None)
    tune_node = plain.pop("tune", None)
    plain.pop("hydra", None)
    try:
        base = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
        base.strategy = {}
        run: RunConfig = OmegaConf.to_object(base)
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf validation errors carry the full key
        key = getattr(exc, "full_key", "")
        raise ConfigError(f"{key}: {getattr(exc, 'msg', exc)}") from None
    run.strategy = STRATEGIES.config(strategy_node if strategy_node is not None else {})
    if cl_node is not None:
        run.cl = CL_METHODS.config(cl_node)
    if experiment_node is not None:
        run.experiment = EXPERIMENTS.config(experiment_node)
    if tune_node is not None:
        try:
            run.tune = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TuneConfig), tune_node))
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"tune.{getattr(exc, 'full_key', '')}: {getattr(exc, 'msg', exc)}") from None
    check_combinations(run)
    return run


def check_combinations(run: RunConfig) -> None:
    """Refuse settings that would silently do nothing together (a CL method without a benchmark),
    and networks the rule cannot train (worker layers that do not split into predicting workers)."""
    name = getattr(run.strategy, "name", None)
    if name in STRATEGIES.names():
        run.model.check_workers(STRATEGIES.get(name).worker_predictions, f"strategy={name}")
    cl_name = getattr(run.cl, "name", None) if not isinstance(run.cl, dict) else run.cl.get("name")
    if cl_name not in (None, "none") and run.benchmark is None and run.experiment is None:
        raise ConfigError(
            f"cl.name={cl_name!r}: a continual-learning method needs a task sequence; "
            "add a benchmark (e.g. benchmark=pmnist_quick) or drop cl"
        )
    if run.trainer.select == "best_val":
        check(run.data.val_split > 0, "trainer.select", run.trainer.select,
              "selects on validation data: set data.val_split (a count or a fraction of the training set)")
        check(run.benchmark is None, "trainer.select", run.trainer.select,
              "picks one epoch of a single run; a continual run is judged after its last task (use last)")
    check(run.experiment is None or run.data.val_split == 0, "data.val_split", run.data.val_split,
          "the paper experiments (experiment=...) follow their papers' protocols and hold out no validation split")
    if run.data.augment != "none":
        check(run.experiment is None, "data.augment", run.data.augment,
              "the paper experiments (experiment=...) follow their papers' protocols, without augmentation")
        check(run.benchmark is None or run.benchmark.scenario != "permuted", "data.augment", run.data.augment,
              "a permuted benchmark shuffles the pixels: a crop or a flip of them is no image augmentation")


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The app's config for these command-line overrides, composed exactly as ``agentnet`` does
    (``config_name="tune"``: as ``agentnet-tune`` does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_all()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            return hydra_compose(config_name, overrides=list(overrides))
        # Hydra and OmegaConf also fail with plain errors on some overrides: an assertion for a field
        # of a null group (``benchmark.num_tasks=3`` without ``benchmark=...``), a ValueError for a
        # group set to a number (``experiment=0``).
        except (HydraException, OmegaConfBaseException, AssertionError, ValueError, TypeError, KeyError) as exc:
            # Hydra names the override (or the group option it could not find); its cause says why.
            cause = f" ({str(exc.__cause__).splitlines()[0]})" if exc.__cause__ is not None and str(exc.__cause__) else ""
            message = " ".join(str(exc).split()) + cause
            keys = [o.split("=")[0].lstrip("+~") for o in overrides]
            if not any(key and key in message for key in keys):  # a grammar error names no field: name the overrides
                message = f"overrides {list(overrides)}: {message}"
            raise ConfigError(message) from None


def protocol_names() -> list[str]:
    """The continual-learning protocols ``benchmark=<name>`` composes: ``configs/benchmark/*.yaml`` and
    those a plugin package adds to Hydra's search path (the structured ``*_schema`` nodes excluded)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_all()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options("benchmark")
    return sorted(name for name in options if not name.endswith("_schema"))


@functools.lru_cache(maxsize=None)
def _protocol(name: str) -> dict:
    """The ``benchmark`` node ``agentnet benchmark=<name>`` composes (cached: composing takes ~0.1 s)."""
    try:
        cfg = compose([f"benchmark={name}"])
    except ConfigError:
        raise ConfigError(f"benchmark={name!r}: no such protocol; choose one of {protocol_names()}") from None
    return OmegaConf.to_container(cfg.benchmark, resolve=True)


def benchmark_config(node: Any) -> BenchmarkConfig:
    """A validated :class:`BenchmarkConfig` from a protocol name (``"pmnist_quick"``: exactly the
    ``benchmark`` node ``agentnet benchmark=pmnist_quick`` composes), a dict (its ``name`` names the
    protocol composed first, its other keys override fields, e.g. ``{"name": "pmnist_quick",
    "num_tasks": 3}``) or a :class:`BenchmarkConfig` (used as is).

    Only the ``benchmark`` node is taken: a protocol preset's other overrides (its model, learning
    rate) are the CLI's business; callers such as the env choose their network themselves.
    """
    if isinstance(node, BenchmarkConfig):
        return dataclasses.replace(node)
    if isinstance(node, str):
        node = {"name": node}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict) or not isinstance(node.get("name"), str):
        raise ConfigError(f"benchmark={node!r}: give a protocol name ({', '.join(protocol_names())}), "
                          "a dict with a 'name', or a BenchmarkConfig")
    base = _protocol(node["name"])
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchmarkConfig), base, node))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"benchmark.{key or node['name']}: {getattr(exc, 'msg', exc)}") from None
