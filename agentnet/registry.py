"""Strategy registry: a new strategy is one module in ``strategies/`` plus ``configs/strategy/<name>.yaml``.

Modules in the ``strategies`` package are imported on first lookup; each registers its class with
:func:`register_strategy`. Configs are validated against the class's ``Config`` dataclass.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agentnet.config import ConfigError, StrategyConfig

__all__ = [
    "UnknownStrategyError",
    "register_strategy",
    "get_strategy",
    "available_strategies",
    "strategy_config",
    "build_strategy",
]

_REGISTRY: dict[str, type] = {}
_discovered = False
S = TypeVar("S", bound=type)


class UnknownStrategyError(ConfigError, KeyError):
    """A strategy name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: register a :class:`~agentnet.strategy.Strategy` subclass under ``name``.

    Its ``Config`` dataclass is stored in Hydra's ConfigStore as ``strategy/<name>_schema`` so the
    strategy's YAML can name it in its defaults list.
    """

    def decorator(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy {name!r} is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        from hydra.core.config_store import ConfigStore

        ConfigStore.instance().store(group="strategy", name=f"{name}_schema", node=cls.Config(name=name))
        return cls

    return decorator


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import strategies

    for module in pkgutil.iter_modules(strategies.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"strategies.{module.name}")


def available_strategies() -> list[str]:
    """Names of every registered strategy, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> type:
    """The strategy class registered as ``name``; unknown names list the valid ones."""
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownStrategyError(
            f"strategy.name={name!r}: unknown strategy; registered: {', '.join(available_strategies())}"
        ) from None


def strategy_config(node: Any) -> StrategyConfig:
    """Validate a strategy config (DictConfig, dict or dataclass) against its registered ``Config``."""
    if isinstance(node, StrategyConfig):
        node = OmegaConf.structured(node)
    # Plain values: a node typed by one strategy's schema must validate against the named one.
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node)
    name = node.get("name")
    if not name:
        raise ConfigError(f"strategy.name is missing; registered: {', '.join(available_strategies())}")
    cls = get_strategy(name)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls.Config), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f"strategy.{key}" if key else f"strategy ({name})"
        raise ConfigError(f"{where}: {getattr(exc, 'msg', exc)}") from None


def build_strategy(node: Any, model) -> Any:
    """Instantiate the strategy a config names, for ``model``."""
    cfg = strategy_config(node)
    return get_strategy(cfg.name)(cfg, model)
