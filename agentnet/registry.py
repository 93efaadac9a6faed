"""Plugin registries and the validated run config: a new strategy, CL method or experiment is one module.

A :class:`Registry` imports every module of its package on first lookup; each module registers its
class with ``@<registry>.register("<name>")``. Each class carries a ``Config`` dataclass — the one
source of that plugin's defaults — stored in Hydra's ConfigStore as ``<group>/<name>_schema`` (so a
YAML preset names it in its defaults list) and, where no ``<group>/<name>.yaml`` exists, also as the
option ``<group>/<name>`` itself (so ``<group>=<name>`` composes without any YAML). The ``Config``
also validates configs (unknown names list the registered ones; bad fields name themselves).

* :data:`STRATEGIES` — package ``strategies``, config group ``strategy``, entry points ``agentnet.strategies``.
* :data:`CL_METHODS` — package ``agentnet.continual.methods``, group ``cl``, entry points ``agentnet.cl_methods``.
* :data:`EXPERIMENTS` — package ``agentnet.experiments``, group ``experiment``, entry points ``agentnet.experiments``.

Other installed packages add plugins through Python entry points in those groups (``docs/extending.md``):
the value names a module (importing it registers its classes) or a class (registered under the entry
point's name). A package may also add a directory of YAML presets to Hydra's config search path
through the ``agentnet.config_paths`` group (:func:`config_search_paths`).

Discovery imports those packages by name at run time (the plugin mechanism), so this module sits
below them in the import graph.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.resources
import pkgutil
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agentnet.config import BenchmarkConfig, CLConfig, ConfigError, ExperimentConfig, RunConfig, StrategyConfig, TuneConfig, check, register_configs
from agentnet.paths import CONFIG_DIR

__all__ = [
    "UnknownNameError",
    "PluginError",
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
    "benchmark_config",
    "CONFIG_PATH_GROUP",
    "config_search_paths",
    "register_search_path_plugin",
]

C = TypeVar("C", bound=type)


class UnknownNameError(ConfigError, KeyError):
    """A name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class PluginError(RuntimeError):
    """A plugin that cannot be loaded or registered: a broken entry point, a class without a usable
    ``Config``, or a name that two plugins claim. The message names where each one came from."""


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    """``entry point 'name = value' (group ..., distribution name version)`` for error messages."""
    dist = getattr(ep, "dist", None)
    where = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "unknown distribution"
    return f"entry point '{ep.name} = {ep.value}' (group {ep.group}, distribution {where})"


def _yaml_on_search_path(relative: str) -> bool:
    """Whether ``configs/<relative>`` or the same file under a plugin's config path exists."""
    if (Path(CONFIG_DIR) / relative).is_file():
        return True
    for _, path in config_search_paths():
        if path.startswith("pkg://"):
            module, _, sub = path[len("pkg://"):].partition("/")
            try:
                if importlib.resources.files(module).joinpath(sub, relative).is_file():
                    return True
            except ModuleNotFoundError:
                continue
        elif (Path(path.removeprefix("file://")) / relative).is_file():
            return True
    return False


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
            from hydra.core.config_store import ConfigStore

            store = ConfigStore.instance()
            store.store(group=self.group, name=f"{name}_schema", node=cls.Config(name=name))
            # The option itself, so `<group>=<name>` needs no YAML (a plugin from another package has
            # none). Only without a YAML of that name: Hydra would validate the YAML against a
            # same-named ConfigStore entry (deprecated "automatic schema matching", with a warning).
            if not _yaml_on_search_path(f"{self.group}/{name}.yaml"):
                store.store(group=self.group, name=name, node=cls.Config(name=name))
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
        where = _describe(ep)
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


def register_all() -> None:
    """Prepare Hydra for the app (idempotent): the group schemas, every plugin's ``<name>_schema``
    (and ``<name>`` option, where no YAML of that name exists) in the ConfigStore, and the plugins'
    config search paths."""
    register_configs()
    for registry in (STRATEGIES, CL_METHODS, EXPERIMENTS):
        registry.names()
    register_search_path_plugin()


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
    """Refuse settings that would silently do nothing together (a CL method without a benchmark)."""
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


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The app's config for these command-line overrides, composed exactly as ``agentnet`` does
    (``config_name="tune"``: as ``agentnet-tune`` does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_all()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


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
    from hydra.errors import MissingConfigException

    try:
        cfg = compose([f"benchmark={name}"])
    except MissingConfigException:
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


#: Entry-point group through which an installed package adds YAML presets to the config search path.
CONFIG_PATH_GROUP = "agentnet.config_paths"


def config_search_paths() -> list[tuple[str, str]]:
    """``(provider, path)`` for every ``agentnet.config_paths`` entry point, in Hydra's search-path form.

    An entry point's value is either a package (``my_pkg.conf``: its directory holds group folders
    such as ``model/``, giving ``pkg://my_pkg.conf``) or an attribute holding — or a function
    returning — a search-path string (``pkg://...``, ``file://...`` or a directory).
    """
    paths = []
    for ep in sorted(importlib.metadata.entry_points(group=CONFIG_PATH_GROUP), key=lambda e: e.name):
        if ep.attr is None:
            # Import it anyway, so a misspelt package fails here with the entry point's name
            # rather than as a silently empty search-path entry.
            try:
                importlib.import_module(ep.module)
            except Exception as exc:
                raise PluginError(f"config path {_describe(ep)} failed to import: {type(exc).__name__}: {exc}") from exc
            path = f"pkg://{ep.module}"
        else:
            try:
                value = ep.load()
                path = value() if callable(value) else value
            except Exception as exc:
                raise PluginError(f"config path {_describe(ep)} failed to load: {type(exc).__name__}: {exc}") from exc
            if not isinstance(path, str):
                raise PluginError(f"config path {_describe(ep)}: gave {path!r}, not a search-path string")
        paths.append((f"agentnet-plugin-{ep.name}", path))
    return paths


_search_path_plugin: type | None = None


def register_search_path_plugin() -> None:
    """Make every Hydra run and compose in this process append :func:`config_search_paths` (idempotent).

    A Hydra ``SearchPathPlugin`` registered by hand instead of from a ``hydra_plugins`` package, so
    that neither agentnet nor a plugin package ships a namespace package of its own. The paths come
    after the repository's ``configs/`` (a built-in preset of the same name wins) and before the
    ConfigStore.
    """
    global _search_path_plugin
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    if _search_path_plugin is None:

        class AgentnetSearchPathPlugin(SearchPathPlugin):
            """Appends the ``agentnet.config_paths`` entry points to Hydra's config search path."""

            def manipulate_search_path(self, search_path) -> None:
                for provider, path in config_search_paths():
                    search_path.append(provider=provider, path=path)

        _search_path_plugin = AgentnetSearchPathPlugin
    Plugins.instance().register(_search_path_plugin)
