"""What Hydra needs to know about agentnet before it composes: the schemas, the plugins' configs, their YAML.

:func:`register_all` (called by the CLI at import and by :func:`agentnet.composition.compose`) stores

* the run config's group schemas (:func:`agentnet.config.register_configs`);
* every registered plugin's ``Config`` as ``<group>/<name>_schema`` (so a YAML preset names it in its
  defaults list) and, where no ``<group>/<name>.yaml`` exists on the search path, also as the option
  ``<group>/<name>`` itself (so ``<group>=<name>`` composes without any YAML);
* a search-path plugin that appends the YAML directories installed packages declare in the
  ``agentnet.config_paths`` entry-point group (:func:`config_search_paths`);
* the resolvers ``agentnet.groups``, with which ``--help`` (``configs/hydra/help/``) lists the groups,
  and ``agentnet.dirname``, which keeps a sweep job's directory name short enough for the file system.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
from pathlib import Path

from agentnet.config import register_configs
from agentnet.paths import CONFIG_DIR
from agentnet.registry import CL_METHODS, EXPERIMENTS, STRATEGIES, PluginError, Registry, describe_entry_point

__all__ = ["register_all", "store_plugin_configs", "CONFIG_PATH_GROUP", "config_search_paths", "register_search_path_plugin",
           "GROUP_HELP", "help_groups", "short_dirname"]

#: Entry-point group through which an installed package adds YAML presets to the config search path.
CONFIG_PATH_GROUP = "agentnet.config_paths"


def register_all() -> None:
    """Prepare Hydra for the app (idempotent): the group schemas, every plugin's ``<name>_schema``
    (and ``<name>`` option, where no YAML of that name exists) in the ConfigStore, and the plugins'
    config search paths. A plugin registered later is stored by the next call."""
    register_configs()
    for registry in (STRATEGIES, CL_METHODS, EXPERIMENTS):
        store_plugin_configs(registry)
    register_search_path_plugin()
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("agentnet.groups", help_groups, replace=True)
    OmegaConf.register_new_resolver("agentnet.dirname", short_dirname, replace=True)


#: The longest job directory name a sweep makes from its overrides (file systems allow 255 bytes).
MAX_DIRNAME = 200


def short_dirname(name: str) -> str:
    """A sweep job's directory name from its overrides (``hydra.job.override_dirname``): as it is
    when short, else its first characters and a hash of the whole, so many overrides never make a
    name the file system refuses. The job's overrides are always in its ``.hydra/overrides.yaml``."""
    import hashlib

    if len(name.encode()) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name.encode()[: MAX_DIRNAME - len(digest) - 1].decode(errors='ignore')}_{digest}"


#: What each config group chooses, as ``--help`` explains it (a group a plugin adds is listed bare).
GROUP_HELP = {
    "strategy": "the learning rule every worker follows",
    "model": "the network (MLP and conv presets)",
    "data": "the dataset",
    "benchmark": "a continual-learning task sequence (none: one training run)",
    "cl": "the continual-learning method (with a benchmark)",
    "experiment": "a paper experiment, run as its paper did (lfnn_table1_cifar10, lfnn_table3_tiny_imagenet: GPU sweeps, run with -m)",
    "trainer": "the optimisation loop",
    "tune": "the study's search (agentnet-tune)",
    "hydra/launcher": "where a sweep's jobs run: local (joblib processes), local_submitit, slurm, slurm_gpu (one GPU per job)",
}
#: Groups each app's ``--help`` leaves out (``tune`` belongs to agentnet-tune).
_HIDDEN = {"agentnet": {"tune"}, "agentnet-tune": set()}


def help_groups(app: str = "agentnet") -> str:
    """The config groups and their options as ``--help`` lists them: the app's groups (plugins'
    presets included), then the launchers; the structured ``*_schema`` entries left out."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return ""
    loader = GlobalHydra.instance().config_loader()
    groups = [g for g in loader.list_groups("") if g != "hydra" and g not in _HIDDEN.get(app, set())]
    groups = sorted(groups, key=lambda g: (list(GROUP_HELP).index(g) if g in GROUP_HELP else len(GROUP_HELP), g))
    lines = []
    for group in [*groups, "hydra/launcher"]:
        options = sorted(o for o in loader.get_group_options(group) if not o.endswith("_schema"))
        if group == "hydra/launcher":
            options = [o for o in options if o in ("local", "local_submitit", "slurm", "slurm_gpu")] or options
        what = GROUP_HELP.get(group)
        lines.append(f"  {group}: {what}" if what else f"  {group}")
        lines.append(f"      {', '.join(options)}")
    return "\n".join(lines) + "\n"


#: ``(group, name) -> class`` already in the ConfigStore: each class is looked up on the search path once.
_stored: dict[tuple[str, str], type] = {}


def store_plugin_configs(registry: Registry) -> None:
    """Store every class ``registry`` holds (discovering them first) in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name in registry.names():
        cls = registry.get(name)
        if _stored.get((registry.group, name)) is cls:
            continue
        store.store(group=registry.group, name=f"{name}_schema", node=cls.Config(name=name))
        # The option itself, so `<group>=<name>` needs no YAML (a plugin from another package has
        # none). Only without a YAML of that name: Hydra would validate the YAML against a
        # same-named ConfigStore entry (deprecated "automatic schema matching", with a warning).
        if not _yaml_on_search_path(f"{registry.group}/{name}.yaml"):
            store.store(group=registry.group, name=name, node=cls.Config(name=name))
        _stored[(registry.group, name)] = cls


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


def config_search_paths() -> list[tuple[str, str]]:
    """``(provider, path)`` for every ``agentnet.config_paths`` entry point, in Hydra's search-path form.

    An entry point's value is either a package (``my_pkg.conf``: its directory holds group folders
    such as ``model/``, giving ``pkg://my_pkg.conf``) or an attribute holding (or a function
    returning) a search-path string (``pkg://...``, ``file://...`` or a directory).
    """
    paths = []
    for ep in sorted(importlib.metadata.entry_points(group=CONFIG_PATH_GROUP), key=lambda e: e.name):
        if ep.attr is None:
            # Import it anyway, so a misspelt package fails here with the entry point's name
            # rather than as a silently empty search-path entry.
            try:
                importlib.import_module(ep.module)
            except Exception as exc:
                raise PluginError(f"config path {describe_entry_point(ep)} failed to import: {type(exc).__name__}: {exc}") from exc
            path = f"pkg://{ep.module}"
        else:
            try:
                value = ep.load()
                path = value() if callable(value) else value
            except Exception as exc:
                raise PluginError(f"config path {describe_entry_point(ep)} failed to load: {type(exc).__name__}: {exc}") from exc
            if not isinstance(path, str):
                raise PluginError(f"config path {describe_entry_point(ep)}: gave {path!r}, not a search-path string")
        paths.append((f"agentnet-plugin-{ep.name}", path))
    return paths


_search_path_plugin: type | None = None


def register_search_path_plugin() -> None:
    """Make every Hydra run and compose in this process append :func:`config_search_paths` (idempotent).

    A Hydra ``SearchPathPlugin`` registered by hand (``Plugins.instance().register``) instead of found
    in a ``hydra_plugins`` namespace package, so that neither agentnet nor a plugin package ships a
    namespace package of its own. The paths come after the repository's ``configs/`` (a built-in
    preset of the same name wins) and before the ConfigStore.
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
