"""Plugins from other packages: entry points, config search paths, and the example plugin package.

The example package (``examples/plugin_package``) is pip-installed, without dependencies, into a
temporary directory that only the subprocesses of this module see on their ``PYTHONPATH``: the same
metadata (``*.dist-info/entry_points.txt``) a normal install writes, without adding a plugin to the
developer's environment for every later run. Each run is a fresh interpreter, so entry points are
read as a user's ``agentnet`` reads them. The error paths use fake distributions (a ``.dist-info``
directory with ``entry_points.txt`` on ``sys.path``, which :mod:`importlib.metadata` reads like any other).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agentnet.config import StrategyConfig
from agentnet.hydra_setup import config_search_paths, register_all
from agentnet.registry import PluginError, Registry, UnknownNameError
from agentnet.strategy import Strategy
from tests.conftest import REPO, data_root

EXAMPLE = REPO / "examples" / "plugin_package"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """A directory holding the installed example package (its code and its ``.dist-info``)."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip(f"pip is not installed in {sys.prefix}: cannot install examples/plugin_package")
    root = tmp_path_factory.mktemp("plugin")
    source, site = root / "source", root / "site"
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the repository.
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check", "--target", str(site)]
    if importlib.util.find_spec("setuptools") is not None:  # build offline with the environment's setuptools
        cmd += ["--no-build-isolation", "--no-index"]
    proc = subprocess.run([*cmd, str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert list(site.glob("agentnet_example_plugin-*.dist-info/entry_points.txt"))
    return site


def _env(*paths: Path) -> dict[str, str]:
    """The environment of a subprocess that sees ``paths`` (and this checkout) before anything else."""
    extra = [str(p) for p in paths] + [str(REPO)]
    current = os.environ.get("PYTHONPATH")
    return dict(os.environ, AGENTNET_DATA=str(data_root()), OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(extra + ([current] if current else [])))


def _agentnet(*args: str, paths: tuple[Path, ...], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentnet", *args, "trainer.progress=false", "device=cpu", "threads=1",
                           f"hydra.run.dir={cwd / 'hydra'}"],
                          cwd=cwd, env=_env(*paths), capture_output=True, text=True, timeout=300)


def _python(script: str, paths: tuple[Path, ...], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=_env(*paths),
                          capture_output=True, text=True, timeout=300)


# --- the example package, installed -------------------------------------------------------------

def test_plugin_strategy_and_preset_train_from_the_cli(plugin_site, tmp_path):
    """`strategy=<plugin>` with no YAML anywhere, and `model=<preset the plugin ships>`."""
    out = tmp_path / "run"
    proc = _agentnet("strategy=bp_label_smoothing", "strategy.smoothing=0.2", "model=example_mlp_100x2",
                     "data.subset=2000", "data.test_subset=500", "trainer.max_steps=60", f"output_dir={out}",
                     paths=(plugin_site,), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == "bp_label_smoothing" and metrics["steps"] == 60
    assert metrics["config"]["strategy"] == {"name": "bp_label_smoothing", "smoothing": 0.2}
    assert metrics["model"] == "example_mlp_100x2" and metrics["config"]["model"]["hidden"] == [100, 100]
    assert metrics["num_params"] == 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    losses = [entry["train_loss"] for entry in metrics["history"]]
    assert losses[-1] < losses[0] - 0.3, losses
    assert metrics["test_error"] < 40.0  # 60 steps of BP on 2000 examples: far from chance (90 %)
    assert "automatic schema matching" not in proc.stderr  # no ConfigStore entry shadows a YAML


def test_plugin_cl_method_in_a_continual_run(plugin_site, tmp_path):
    out = tmp_path / "cl"
    proc = _agentnet("benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.iterations_per_task=40",
                     "cl=l2_anchor", "cl.strength=0.5", "strategy=bp_label_smoothing", "model=example_mlp_100x2",
                     "data.subset=2000", "data.test_subset=500", f"output_dir={out}",
                     paths=(plugin_site,), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "cl_metrics.json").read_text())
    assert metrics["cl"] == "l2_anchor" and metrics["strategy"] == "bp_label_smoothing"
    assert metrics["config"]["cl"] == {"name": "l2_anchor", "strength": 0.5}
    R = metrics["acc_matrix"]
    assert len(R) == 3 and all(len(row) == 2 for row in R)
    assert R[1][0] > 0.3 and R[2][1] > 0.3  # each task learned in 40 steps


def test_plugin_api_env_and_hooks(plugin_site, tmp_path):
    """Compose API, the Python API and the PettingZoo env build the plugin's classes; their maths."""
    script = f"""
    import json, numpy as np, torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    from agentnet.config import ModelConfig
    from agentnet.network import WorkerNetwork
    from agentnet.composition import compose, to_run_config
    from agentnet.hydra_setup import config_search_paths
    from agentnet.registry import CL_METHODS, STRATEGIES, build_strategy
    from agentnet.continual.methods import build_cl_method
    from envs import neural_collective_v0
    from agentnet_example_plugin.label_smoothing import LabelSmoothingBP, smoothed_loss
    from agentnet_example_plugin.l2_anchor import L2Anchor
    res = {{}}
    res["paths"] = config_search_paths()
    run = to_run_config(compose(["strategy=bp_label_smoothing", "cl=l2_anchor", "benchmark=pmnist_quick",
                                 "model=example_mlp_100x2"]))
    res["composed"] = [type(run.strategy).__name__, run.strategy.smoothing, type(run.cl).__name__, run.model.hidden]
    res["classes"] = [STRATEGIES.get("bp_label_smoothing") is LabelSmoothingBP, CL_METHODS.get("l2_anchor") is L2Anchor]

    torch.manual_seed(0)
    model = WorkerNetwork(784, 10, ModelConfig(hidden=[20], worker_size=10))
    strategy = build_strategy({{"name": "bp_label_smoothing", "smoothing": 0.3}}, model)
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    result = strategy.compute(x, y)
    reference = F.cross_entropy(result.logits[0], y, label_smoothing=0.3)
    res["loss_vs_torch"] = [result.loss.item(), reference.item()]
    model.head.logit_mask = torch.tensor([True, True] + [False] * 8)  # a two-class task head
    masked = smoothed_loss(model, result.logits, y % 2, 0.3)
    reference = F.cross_entropy(result.logits[0, :, :2], y % 2, label_smoothing=0.3)
    res["masked_vs_torch"] = [masked.item(), reference.item()]
    model.head.logit_mask = None

    method = build_cl_method({{"name": "l2_anchor", "strength": 2.0}}, model)
    method.after_task(None, None, None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model.zero_grad(set_to_none=True)
    method.after_backward(None, result)
    n = sum(p.numel() for p in model.parameters())
    res["l2"] = [type(method).__name__, all(torch.allclose(p.grad, torch.full_like(p, 0.2)) for p in model.parameters()),
                 method.penalty().item(), 0.5 * 2.0 * 0.01 * n, sorted(method.state_dict()["anchor"]) == sorted(dict(model.named_parameters()))]

    par = neural_collective_v0.parallel_env(strategy="bp_label_smoothing", hidden=(20, 20), data_subset=640,
                                            batch_size=64, data_root={str(data_root())!r}, max_cycles=10_000)
    par.reset(seed=0)
    before = par.trainer.evaluate(par.data.test)["loss"][0]
    steps = 0
    while par.agents:
        _, rewards, _, _, _ = par.step({{a: np.ones(1, np.float32) for a in par.agents}})
        steps += 1
    res["env"] = [type(par.strategy).__name__, steps, before, par.trainer.evaluate(par.data.test)["loss"][0],
                  bool(np.isfinite(list(rewards.values())).all())]
    print("RESULT" + json.dumps(res))
    """
    proc = _python(script, paths=(plugin_site,), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert res["paths"] == [["agentnet-plugin-agentnet_example_plugin", "pkg://agentnet_example_plugin.conf"]]
    assert res["composed"] == ["LabelSmoothingConfig", 0.1, "L2AnchorConfig", [100, 100]]
    assert res["classes"] == [True, True]
    assert res["loss_vs_torch"][0] == pytest.approx(res["loss_vs_torch"][1], rel=1e-5)
    assert res["masked_vs_torch"][0] == pytest.approx(res["masked_vs_torch"][1], rel=1e-5)
    name, grads_ok, penalty, expected, state_ok = res["l2"]
    assert name == "L2Anchor" and grads_ok and state_ok and penalty == pytest.approx(expected, rel=1e-4)
    name, steps, before, after, finite = res["env"]
    assert name == "LabelSmoothingBP" and steps == 10 and finite and after < before


# --- error paths, with fake distributions -------------------------------------------------------

def _fake_dist(root: Path, name: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> Path:
    """A minimal installed distribution under ``root``: ``<name>.dist-info`` plus top-level modules."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in entry_points.items())
    )
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    return root


PLUGIN_STRATEGY = """
from agentnet.strategy import Strategy

class {cls}(Strategy):
    '''A strategy whose entry point names the class.'''
"""


@pytest.fixture
def fresh(monkeypatch, request):
    """A strategy registry read only from the test's own entry-point group; forgets the fake modules."""
    group = f"agentnet_test.{request.node.name.replace('[', '_').replace(']', '')}"
    before = set(sys.modules)
    yield Registry("plugin_test", None, "strategy", group, StrategyConfig), group
    for name in set(sys.modules) - before:
        if name.startswith("fake_"):
            del sys.modules[name]


def test_broken_plugin_names_its_entry_point(fresh, tmp_path, monkeypatch):
    registry, group = fresh
    monkeypatch.syspath_prepend(str(_fake_dist(tmp_path, "fake-broken", {group: {"shiny": "fake_broken_mod:Shiny"}},
                                               {"fake_broken_mod": "import no_such_module_xyz\n"})))
    for _ in range(2):  # the same error every time, never a half-filled registry
        with pytest.raises(PluginError) as err:
            registry.names()
        message = str(err.value)
        assert "shiny = fake_broken_mod:Shiny" in message and "fake-broken 0.1" in message and group in message
        assert "ModuleNotFoundError" in message and "no_such_module_xyz" in message
        assert isinstance(err.value.__cause__, ModuleNotFoundError)


def test_entry_point_may_name_a_class_or_a_module(fresh, tmp_path, monkeypatch):
    registry, group = fresh
    decorated = f"""
    import sys
    from agentnet.strategy import Strategy
    registry = sys.modules[{__name__!r}]._CURRENT  # the test's registry, as a plugin would import its own

    @registry.register("by_decorator")
    class ByDecorator(Strategy):
        pass
    """
    root = _fake_dist(tmp_path, "fake-good", {group: {"by_class": "fake_class_mod:ByClass", "by_decorator": "fake_deco_mod"}},
                      {"fake_class_mod": PLUGIN_STRATEGY.format(cls="ByClass"), "fake_deco_mod": decorated})
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(sys.modules[__name__], "_CURRENT", registry, raising=False)
    assert registry.names() == ["by_class", "by_decorator"]
    cls = registry.get("by_class")
    assert cls.__name__ == "ByClass" and cls.name == "by_class"
    assert registry.config("by_class") == StrategyConfig(name="by_class")
    with pytest.raises(UnknownNameError, match="registered: by_class, by_decorator"):
        registry.get("nope")


def test_two_plugins_with_one_name_are_refused(fresh, tmp_path, monkeypatch):
    registry, group = fresh
    for dist, cls in (("fake-one", "One"), ("fake-two", "Two")):
        monkeypatch.syspath_prepend(str(_fake_dist(tmp_path / dist, dist, {group: {"same": f"fake_{cls.lower()}_mod:{cls}"}},
                                                   {f"fake_{cls.lower()}_mod": PLUGIN_STRATEGY.format(cls=cls)})))
    with pytest.raises(PluginError, match="'same' is registered twice") as err:
        registry.names()
    assert "fake-one 0.1" in str(err.value) and "fake-two 0.1" in str(err.value)


def test_plugin_cannot_shadow_a_builtin(fresh, tmp_path, monkeypatch):
    registry, group = fresh

    @registry.register("bp")
    class Builtin(Strategy):  # stands for strategies/bp.py, found before any entry point
        pass

    monkeypatch.syspath_prepend(str(_fake_dist(tmp_path, "fake-shadow", {group: {"bp": "fake_shadow_mod:Shadow"}},
                                               {"fake_shadow_mod": PLUGIN_STRATEGY.format(cls="Shadow")})))
    with pytest.raises(PluginError, match=r"'bp' is registered twice: by .*Builtin and by fake_shadow_mod\.Shadow from entry point 'bp = "):
        registry.names()


@pytest.mark.parametrize("value,source,match", [
    ("fake_empty_mod", "X = 1\n", "registered no strategy"),
    ("fake_obj_mod:X", "X = 1\n", "'X' is a int, not a class"),
    ("fake_noconf_mod:Thing", "class Thing:\n    pass\n", "needs a `Config` dataclass"),
    ("fake_wrongconf_mod:Method", "from agentnet.continual.methods import CLMethod\nclass Method(CLMethod):\n    pass\n",
     "must subclass agentnet.config.StrategyConfig"),
])
def test_entry_point_that_registers_nothing_usable(fresh, tmp_path, monkeypatch, value, source, match):
    registry, group = fresh
    module = value.split(":")[0]  # a new name per case: imported modules stay in sys.modules
    monkeypatch.syspath_prepend(str(_fake_dist(tmp_path, "fake-bad", {group: {"bad": value}}, {module: source})))
    with pytest.raises(PluginError, match=match) as err:
        registry.names()
    assert f"'bad = {value}'" in str(err.value) and "fake-bad 0.1" in str(err.value)


def test_real_cli_refuses_a_duplicate_and_names_a_broken_plugin(tmp_path):
    """The real registries read the real groups; the CLI fails before training, naming the plugin."""
    dup = _fake_dist(tmp_path / "dup", "fake-dup", {"agentnet.strategies": {"bp": "fake_dup_mod:Other"}},
                     {"fake_dup_mod": PLUGIN_STRATEGY.format(cls="Other")})
    proc = _agentnet("strategy=bp", paths=(dup,), cwd=tmp_path)
    assert proc.returncode != 0
    assert "strategy 'bp' is registered twice: by strategies.bp.Backprop and by fake_dup_mod.Other" in proc.stderr
    assert "fake-dup 0.1" in proc.stderr

    broken = _fake_dist(tmp_path / "broken", "fake-broken-cl", {"agentnet.cl_methods": {"oops": "fake_oops_mod"}},
                        {"fake_oops_mod": "raise RuntimeError('plugin bug')\n"})
    proc = _agentnet("strategy=bp", paths=(broken,), cwd=tmp_path)
    assert proc.returncode != 0
    assert ("continual-learning method plugin entry point 'oops = fake_oops_mod' (group agentnet.cl_methods, "
            "distribution fake-broken-cl 0.1) failed to import: RuntimeError: plugin bug") in proc.stderr


# --- config search paths -------------------------------------------------------------------------

def test_config_path_entry_points(tmp_path, monkeypatch):
    conf = tmp_path / "fake_conf_pkg"
    (conf / "model").mkdir(parents=True)
    (conf / "__init__.py").write_text("")
    (conf / "model" / "fake_tiny.yaml").write_text("defaults:\n  - model_schema\n  - _self_\nname: fake_tiny\nhidden: [30]\n")
    (conf / "benchmark").mkdir()
    (conf / "benchmark" / "fake_pmnist3.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /benchmark/benchmark_schema@benchmark\n  - _self_\n"
        "benchmark:\n  name: fake_pmnist3\n  scenario: permuted\n  num_tasks: 3\n")
    other = tmp_path / "elsewhere"
    (other / "model").mkdir(parents=True)
    (other / "model" / "fake_other.yaml").write_text("defaults:\n  - model_schema\n  - _self_\nname: fake_other\nhidden: [40]\n")
    (tmp_path / "fake_conf_attr.py").write_text(f"PATH = {('file://' + str(other))!r}\n")
    _fake_dist(tmp_path, "fake-conf", {"agentnet.config_paths": {"a_pkg": "fake_conf_pkg", "b_attr": "fake_conf_attr:PATH"}}, {})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert config_search_paths() == [("agentnet-plugin-a_pkg", "pkg://fake_conf_pkg"),
                                     ("agentnet-plugin-b_attr", f"file://{other}")]
    from agentnet.composition import compose as agentnet_compose

    assert agentnet_compose(["model=fake_tiny"]).model.hidden == [30]
    assert agentnet_compose(["model=fake_other"]).model.hidden == [40]
    assert agentnet_compose(["model=mlp_275k"]).model.name == "mlp_275k"  # the built-ins are still there
    from agentnet.composition import benchmark_config, protocol_names

    assert {"fake_pmnist3", "pmnist_quick"} <= set(protocol_names())  # error messages list plugin protocols too
    assert not any(n.endswith("_schema") for n in protocol_names())
    assert benchmark_config("fake_pmnist3").num_tasks == 3


def test_broken_config_path_names_its_entry_point(tmp_path, monkeypatch):
    _fake_dist(tmp_path, "fake-conf-broken", {"agentnet.config_paths": {"gone": "fake_missing_conf_pkg"}}, {})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"config path entry point 'gone = fake_missing_conf_pkg'.*fake-conf-broken 0.1"):
        config_search_paths()


def test_a_yaml_of_the_same_name_wins_over_the_registered_option(tmp_path):
    """Built-ins keep their YAML (no same-named ConfigStore entry); a plugin without one gets the option."""
    from hydra.core.config_store import ConfigStore

    register_all()
    repo = ConfigStore.instance().repo
    assert "lfnn.yaml" not in repo["strategy"] and "lfnn_schema.yaml" in repo["strategy"]
    # A config directory whose lfnn.yaml changes a default: the file is what `strategy=lfnn` selects.
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    (configs / "strategy" / "lfnn.yaml").write_text("defaults:\n  - lfnn_schema\n  - _self_\nname: lfnn\ndelta: 0.5\n")
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        assert OmegaConf.to_container(compose("config", overrides=["strategy=lfnn"]).strategy)["delta"] == 0.5
