"""Plugin registries and the validated run config: a new strategy, CL method or experiment is one module.

A :class:`Registry` imports every module of its package on first lookup; each module registers its
class with ``@<registry>.register("<name>")``. Each class carries a ``Config`` dataclass — the one
source of that plugin's defaults — stored in Hydra's ConfigStore as ``<group>/<name>_schema`` so its
YAML names it in its defaults list, and used to validate configs (unknown names list the registered
ones; bad fields name themselves).

* :data:`STRATEGIES` — package ``strategies``, config group ``strategy``.
* :data:`CL_METHODS` — package ``agentnet.continual.methods``, group ``cl``.
* :data:`EXPERIMENTS` — package ``agentnet.experiments``, group ``experiment``.

Discovery imports those packages by name at run time (the plugin mechanism), so this module sits
below them in the import graph.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agentnet.config import ConfigError, RunConfig, register_configs
from agentnet.paths import CONFIG_DIR

__all__ = [
    "UnknownNameError",
    "Registry",
    "STRATEGIES",
    "CL_METHODS",
    "EXPERIMENTS",
    "register_strategy",
    "build_strategy",
    "register_all",
    "to_run_config",
    "check_combinations",
    "compose",
]

C = TypeVar("C", bound=type)


class UnknownNameError(ConfigError, KeyError):
    """A name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class Registry:
    """Name -> class for one kind of plugin, discovered from one package."""

    def __init__(self, group: str, package: str, kind: str) -> None:
        self.group = group
        self.package = package
        self.kind = kind
        self._classes: dict[str, type] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator registering ``cls`` (with its ``Config`` dataclass) under ``name``."""

        def decorator(cls: C) -> C:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._classes[name].__module__}")
            cls.name = name
            self._classes[name] = cls
            from hydra.core.config_store import ConfigStore

            ConfigStore.instance().store(group=self.group, name=f"{name}_schema", node=cls.Config(name=name))
            return cls

        return decorator

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._discover()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        """The class registered as ``name``; unknown names list the valid ones."""
        self._discover()
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownNameError(
                f"{self.group}.name={name!r}: unknown {self.kind}; registered: {', '.join(self.names())}"
            ) from None

    def config(self, node: Any) -> Any:
        """Validate a config (DictConfig, dict, name or dataclass) against the named class's ``Config``.

        A bare name (``"lfnn"``) gives that plugin's defaults, exactly what ``<group>=<name>`` gives
        on the command line.
        """
        if isinstance(node, str):
            node = {"name": node}
        if not isinstance(node, (DictConfig, dict)):
            node = OmegaConf.structured(node)
        # Plain values: a node typed by one plugin's schema must validate against the named one.
        node = OmegaConf.create(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node)
        name = node.get("name")
        if not name:
            raise ConfigError(f"{self.group}.name is missing; registered: {', '.join(self.names())}")
        cls = self.get(name)
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Config), node))
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None)
            where = f"{self.group}.{key}" if key else f"{self.group} ({name})"
            raise ConfigError(f"{where}: {getattr(exc, 'msg', exc)}") from None

    def build(self, node: Any, *args: Any) -> Any:
        """Instantiate the class a config names: ``cls(validated_config, *args)``."""
        cfg = self.config(node)
        return self.get(cfg.name)(cfg, *args)


STRATEGIES = Registry("strategy", "strategies", "strategy")
CL_METHODS = Registry("cl", "agentnet.continual.methods", "continual-learning method")
EXPERIMENTS = Registry("experiment", "agentnet.experiments", "experiment")


def register_strategy(name: str) -> Callable[[C], C]:
    """Class decorator: register a :class:`~agentnet.strategy.Strategy` subclass under ``name``."""
    return STRATEGIES.register(name)


def build_strategy(node: Any, model, variants: dict[str, list[float]] | None = None) -> Any:
    """Instantiate the strategy a config (or a bare name) names, for ``model`` (and, in a
    population, the per-replica values of its ``replica_fields``)."""
    # Only a population that varies a field passes it: a user's strategy whose __init__ takes
    # (cfg, model) keeps working everywhere else.
    return STRATEGIES.build(node, model, variants) if variants else STRATEGIES.build(node, model)


def register_all() -> None:
    """Fill Hydra's ConfigStore: the group schemas and every plugin's ``<name>_schema`` (idempotent)."""
    register_configs()
    for registry in (STRATEGIES, CL_METHODS, EXPERIMENTS):
        registry.names()


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
    check_combinations(run)
    return run


def check_combinations(run: RunConfig) -> None:
    """Refuse settings that would silently do nothing together (a CL method without a benchmark)."""
    cl_name = getattr(run.cl, "name", None) if not isinstance(run.cl, dict) else run.cl.get("name")
    if cl_name not in (None, "none") and run.benchmark is None and run.experiment is None:
        raise ConfigError(
            f"cl.name={cl_name!r}: a continual-learning method needs a task sequence; "
            "add a benchmark (e.g. benchmark=pmnist_quick) or drop cl"
        )


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The app's config for these command-line overrides, composed exactly as ``agentnet`` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_all()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))
