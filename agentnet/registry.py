"""Plugin registries: a new strategy, CL method or experiment is one module that registers its class.

A :class:`Registry` imports every module of its package on first lookup; each module registers its
class with ``@<registry>.register("<name>")``. Each class carries a ``Config`` dataclass, the one
source of that plugin's defaults, which also validates configs (unknown names list the registered
ones; bad fields name themselves).

* :data:`STRATEGIES`: package ``strategies``, config group ``strategy``, entry points ``agentnet.strategies``.
* :data:`CL_METHODS`: package ``agentnet.continual.methods``, group ``cl``, entry points ``agentnet.cl_methods``.
* :data:`EXPERIMENTS`: package ``agentnet.experiments``, group ``experiment``, entry points ``agentnet.experiments``.

Other installed packages add plugins through Python entry points in those groups (``docs/extending.md``):
the value names a module (importing it registers its classes) or a class (registered under the entry
point's name).

Elsewhere: turning a composed config into a validated ``RunConfig`` is :mod:`agentnet.composition`;
making the registered ``Config`` classes and the plugins' YAML directories known to Hydra is
:mod:`agentnet.hydra_setup`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import pkgutil
from typing import Any, Callable, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agentnet.config import CLConfig, ConfigError, ExperimentConfig, StrategyConfig

__all__ = [
    "UnknownNameError",
    "PluginError",
    "Registry",
    "STRATEGIES",
    "CL_METHODS",
    "EXPERIMENTS",
    "register_strategy",
    "build_strategy",
    "describe_entry_point",
]

C = TypeVar("C", bound=type)


class UnknownNameError(ConfigError, KeyError):
    """A name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class PluginError(RuntimeError):
    """A plugin that cannot be loaded or registered: a broken entry point, a class without a usable
    ``Config``, or a name that two plugins claim. The message names where each one came from."""


def describe_entry_point(ep: importlib.metadata.EntryPoint) -> str:
    """``entry point 'name = value' (group ..., distribution name version)`` for error messages."""
    dist = getattr(ep, "dist", None)
    where = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "unknown distribution"
    return f"entry point '{ep.name} = {ep.value}' (group {ep.group}, distribution {where})"


class Registry:
    """Name -> class for one kind of plugin, discovered from one package and, optionally, from
    the entry points other installed packages declare in ``entry_point_group``."""

    def __init__(
        self,
        group: str,
        package: str | None,
        kind: str,
        entry_point_group: str | None = None,
        config_base: type | None = None,
    ) -> None:
        self.group = group
        self.package = package
        self.kind = kind
        self.entry_point_group = entry_point_group
        #: Every registered class's ``Config`` must subclass this (catches a plugin in the wrong group).
        self.config_base = config_base
        self._classes: dict[str, type] = {}
        self._sources: dict[str, str] = {}
        self._loading: str | None = None  # the entry point being loaded, for error messages
        self._discovered = False
        self._failure: BaseException | None = None

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator registering ``cls`` (with its ``Config`` dataclass) under ``name``."""

        def decorator(cls: C) -> C:
            source = f"{cls.__module__}.{cls.__qualname__}" + (f" from {self._loading}" if self._loading else "")
            if name in self._classes and self._classes[name] is not cls:
                raise PluginError(
                    f"{self.kind} {name!r} is registered twice: by {self._sources[name]} and by {source}; "
                    "rename one of them (plugin names must be unique, built-ins included)"
                )
            config = getattr(cls, "Config", None)
            if not (isinstance(config, type) and dataclasses.is_dataclass(config)
                    and "name" in {f.name for f in dataclasses.fields(config)}):
                raise PluginError(f"{self.kind} {name!r} ({source}): needs a `Config` dataclass with a `name` field")
            if self.config_base is not None and not issubclass(config, self.config_base):
                raise PluginError(
                    f"{self.kind} {name!r} ({source}): its Config {config.__name__} must subclass "
                    f"{self.config_base.__module__}.{self.config_base.__name__}"
                )
            cls.name = name
            self._classes[name] = cls
            self._sources[name] = source
            return cls

        return decorator

    def _discover(self) -> None:
        if self._failure is not None:
            # Every later lookup fails the same way, rather than working on a half-filled registry.
            raise self._failure
        if self._discovered:
            return
        self._discovered = True
        try:
            if self.package is not None:
                package = importlib.import_module(self.package)
                for module in pkgutil.iter_modules(package.__path__):
                    if not module.name.startswith("_"):
                        importlib.import_module(f"{self.package}.{module.name}")
            if self.entry_point_group is not None:
                for ep in importlib.metadata.entry_points(group=self.entry_point_group):
                    self._load_entry_point(ep)
        except Exception as exc:
            self._failure = exc
            raise

    def _load_entry_point(self, ep: importlib.metadata.EntryPoint) -> None:
        """Import what ``ep`` names; a class not registered by its own decorator is registered as ``ep.name``."""
        where = describe_entry_point(ep)
        self._loading = where
        try:
            try:
                obj = ep.load()
            except PluginError:  # raised by a decorator at import (a duplicate name): already says where
                raise
            except Exception as exc:
                raise PluginError(f"{self.kind} plugin {where} failed to import: {type(exc).__name__}: {exc}") from exc
            if isinstance(obj, type):
                if obj not in self._classes.values():
                    self.register(ep.name)(obj)
            elif ep.attr is None:  # a module: its decorators registered what it defines
                if not any(cls.__module__ == ep.module or cls.__module__.startswith(ep.module + ".")
                           for cls in self._classes.values()):
                    raise PluginError(
                        f"{self.kind} plugin {where}: module {ep.module!r} registered no {self.kind}; decorate its "
                        f"class with the registry's decorator (@register_strategy, @CL_METHODS.register, "
                        f"@EXPERIMENTS.register) or point the entry point at the class ('module:Class')"
                    )
            else:
                raise PluginError(f"{self.kind} plugin {where}: {ep.attr!r} is a {type(obj).__name__}, not a class")
        finally:
            self._loading = None

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


# The three packages below are imported by name, at the first lookup, not by an import statement:
# they import this module to register their classes, so a static import here would be a cycle.
# These are the registry's only imports that point upward (into `strategies`, `agentnet.continual`
# and `agentnet.experiments`), and neither import-linter nor an AST scan sees them.
STRATEGIES = Registry("strategy", "strategies", "strategy", "agentnet.strategies", StrategyConfig)
CL_METHODS = Registry("cl", "agentnet.continual.methods", "continual-learning method", "agentnet.cl_methods", CLConfig)
EXPERIMENTS = Registry("experiment", "agentnet.experiments", "experiment", "agentnet.experiments", ExperimentConfig)


def register_strategy(name: str) -> Callable[[C], C]:
    """Class decorator: register a :class:`~agentnet.strategy.Strategy` subclass under ``name``."""
    return STRATEGIES.register(name)


def build_strategy(node: Any, model, variants: dict[str, list[float]] | None = None) -> Any:
    """Instantiate the strategy a config (or a bare name) names, for ``model`` (and, in a
    population, the per-replica values of its ``replica_fields``)."""
    # Only a population that varies a field passes it: a user's strategy whose __init__ takes
    # (cfg, model) keeps working everywhere else.
    return STRATEGIES.build(node, model, variants) if variants else STRATEGIES.build(node, model)
