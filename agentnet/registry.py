"""Plugin registries: a new strategy (or continual-learning method) is one module plus one config.

A :class:`Registry` imports every module of its package on first lookup; each module registers its
class with ``@<registry>.register("<name>")``. Each class carries a ``Config`` dataclass, stored in
Hydra's ConfigStore as ``<group>/<name>_schema`` so its YAML can name it in its defaults list, and
used to validate configs (unknown names list the registered ones; bad fields name themselves).

* :data:`STRATEGIES` — package ``strategies``, config group ``strategy``
  (:func:`register_strategy`, :func:`build_strategy`).
* ``agentnet.continual.methods.CL_METHODS`` — continual-learning methods, group ``cl``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agentnet.config import ConfigError

__all__ = [
    "UnknownNameError",
    "UnknownStrategyError",
    "Registry",
    "STRATEGIES",
    "register_strategy",
    "get_strategy",
    "available_strategies",
    "strategy_config",
    "build_strategy",
]

C = TypeVar("C", bound=type)


class UnknownNameError(ConfigError, KeyError):
    """A name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


UnknownStrategyError = UnknownNameError


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
        """Validate a config (DictConfig, dict or dataclass) against the named class's ``Config``."""
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


STRATEGIES = Registry("strategy", "strategies", "strategy")


def register_strategy(name: str) -> Callable[[C], C]:
    """Class decorator: register a :class:`~agentnet.strategy.Strategy` subclass under ``name``."""
    return STRATEGIES.register(name)


def available_strategies() -> list[str]:
    """Names of every registered strategy, sorted."""
    return STRATEGIES.names()


def get_strategy(name: str) -> type:
    """The strategy class registered as ``name``; unknown names list the valid ones."""
    return STRATEGIES.get(name)


def strategy_config(node: Any) -> Any:
    """Validate a strategy config against its registered ``Config``."""
    return STRATEGIES.config(node)


def build_strategy(node: Any, model) -> Any:
    """Instantiate the strategy a config names, for ``model``."""
    cfg = strategy_config(node)
    return get_strategy(cfg.name)(cfg, model)
