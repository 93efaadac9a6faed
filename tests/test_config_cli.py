"""Config composition and validation (Hydra compose API) and the real CLI in a subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agentnet.composition import to_run_config
from agentnet.fetch import main as fetch_mnist_main, main_cifar10 as fetch_cifar10_main
from agentnet.sweep_report import main as report_main
from agentnet.paths import CONFIG_DIR
from agentnet.config import ConfigError
from agentnet.config import DataConfig, ModelConfig, TrainerConfig
from agentnet.network import WorkerNetwork
from agentnet.registry import CL_METHODS, EXPERIMENTS, STRATEGIES, UnknownNameError, build_strategy
from tests.conftest import REPO, compose_config, data_root, experiment_presets

GROUPS = {
    g: sorted(p.stem for p in (REPO / "configs" / g).glob("*.yaml"))
    for g in ("strategy", "model", "data", "trainer", "benchmark", "cl", "hydra/launcher")
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_validates(group, option):
    cfg = compose_config(f"{group}={option}", *(["benchmark=pmnist_quick"] if group == "cl" else []))
    run = to_run_config(cfg)
    if group == "strategy":
        assert run.strategy.name == option and type(run.strategy) is STRATEGIES.get(option).Config
    if group == "cl":
        assert run.cl.name == option
    if group == "benchmark":
        assert run.benchmark.name == option
    if group == "hydra/launcher":
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            full = compose("config", overrides=[f"hydra/launcher={option}"], return_hydra_config=True)
        assert full.hydra.launcher._target_.startswith("hydra_plugins.")


PLUGIN_GROUPS = {"strategy": STRATEGIES, "cl": CL_METHODS, "experiment": EXPERIMENTS}


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ("strategy", "cl", "trainer", "data") for o in sorted(p.stem for p in (REPO / "configs" / g).glob("*.yaml"))]
    + [("experiment", o) for o in experiment_presets()[0]],
)
def test_yaml_presets_only_select_their_dataclass_defaults(group, option):
    """One source of defaults: a plugin/trainer/data yaml composes to exactly its dataclass's defaults
    (an experiment's: its registered experiment's; the sweep presets set other groups' values and
    select no experiment, tests/test_resnet18.py)."""
    extra = ["benchmark=pmnist_quick"] if group == "cl" else []
    node = OmegaConf.to_container(compose_config(f"{group}={option}", *extra)[group], resolve=True)
    if group in PLUGIN_GROUPS:
        expected = dataclasses.asdict(PLUGIN_GROUPS[group].get(option).Config(name=option))
    else:
        schema = {"trainer": TrainerConfig, "data": DataConfig}[group]
        expected = dataclasses.asdict(schema(**({"name": option} if group == "data" else {})))
    assert node == expected


@pytest.mark.parametrize("name", ["bp", "lfnn", "lfnn_local", "attention"])
def test_python_api_env_and_cli_build_the_same_strategy(name):
    from envs import neural_collective_v0

    cli = to_run_config(compose_config(f"strategy={name}")).strategy
    api = build_strategy(name, WorkerNetwork(784, 10, ModelConfig(hidden=[20], worker_size=10))).cfg
    env_cfg = neural_collective_v0.run_config(strategy=name).strategy
    assert cli == api == env_cfg == STRATEGIES.config({"name": name})
    if name == "lfnn":
        assert (cli.lambda1, cli.lambda2) == (0.1, 0.1)
    if name == "lfnn_local":
        assert (cli.lambda1, cli.lambda2) == (1.0, 1.0)


def test_experiment_group_needs_no_plus():
    run = to_run_config(compose_config("experiment=lfnn_table1_mnist"))
    assert run.experiment.name == "lfnn_table1_mnist" and "cnn_mnist_438k" in run.experiment.models


def test_import_contracts_hold():
    """Imports point one way (pyproject.toml's import-linter contracts); the library never imports the CLI."""
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: " in proc.stdout and " broken" in proc.stdout


def test_cl_without_benchmark_and_oversized_subset_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="cl.name='ewc'.*benchmark"):
        to_run_config(compose_config("cl=ewc"))
    from agentnet.session import prepare_run

    with pytest.raises(ConfigError, match="data.subset=100000.*60000"):
        prepare_run(compose_config("data.subset=100000", f"data.root={data_root()}", "device=cpu", f"output_dir={tmp_path / 'run'}"))
    assert not (tmp_path / "run").exists()  # a refused run leaves no directory behind


def test_builtin_strategies_registered():
    assert {"bp", "lfnn", "lfnn_local"} <= set(STRATEGIES.names())
    assert set(GROUPS["strategy"]) <= set(STRATEGIES.names())


def test_unknown_strategy_lists_registered():
    with pytest.raises(UnknownNameError, match=r"unknown strategy; registered: .*bp.*lfnn.*lfnn_local"):
        STRATEGIES.get("nope")
    cfg = compose_config("strategy=bp")
    cfg.strategy.name = "nope"
    with pytest.raises(ConfigError, match="strategy.name='nope'.*registered"):
        to_run_config(cfg)
    with pytest.raises(ConfigError, match="Could not find 'strategy/nope' Available options"):
        compose_config("strategy=nope")


@pytest.mark.parametrize(
    "override,field",
    [
        ("strategy.delta=1.5", "strategy.delta"),
        ("strategy.delta=0", "strategy.delta"),
        ("strategy.selection=sometimes", "strategy.selection"),
        ("model.worker_size=7", "model.worker_size"),
        ("model.activation=gelu", "model.activation"),
        ("trainer.lr=-0.1", "trainer.lr"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("data.subset=-5", "data.subset"),
        ("device=tpu", "device"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        to_run_config(compose_config(override))
    assert str(err.value).startswith(field), str(err.value)


def test_wrong_types_fail_at_compose_with_the_key():
    with pytest.raises(ConfigError, match=r"override trainer.epochs=many \(Value 'many' of type 'str' could not be converted to Integer\)"):
        compose_config("trainer.epochs=many")
    with pytest.raises(ConfigError, match="model.no_such_field"):
        to_run_config(compose_config("+model.no_such_field=1"))
    with pytest.raises(ConfigError, match=r"strategy.*no_such_field"):
        to_run_config(compose_config("strategy=lfnn", "+strategy.no_such_field=1"))


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, AGENTNET_DATA=str(data_root()))
    return subprocess.run([sys.executable, "-m", "agentnet", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_run_writes_metrics(tmp_path):
    out = tmp_path / "run"
    proc = _run_cli(
        "strategy=lfnn_local", "data.subset=2000", "data.test_subset=500", "trainer.epochs=1",
        "trainer.progress=false", "device=cpu", f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == "lfnn_local" and metrics["steps"] == 16


def test_cli_bad_config_exits_nonzero_with_field(tmp_path):
    proc = _run_cli("model.worker_size=7", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 1
    assert "model.worker_size=7" in proc.stderr + proc.stdout


def test_cli_uncaught_exception_writes_error_txt(tmp_path):
    """A failure nobody anticipated still leaves error.txt (with its traceback) and exits non-zero.
    The fault is injected into the real CLI process: a ``sitecustomize`` makes the training recipe raise."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import agentnet.recipes\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('an injected fault in the recipe')\n"
        "agentnet.recipes.train = broken\n")
    out = tmp_path / "run"
    env = dict(os.environ, AGENTNET_DATA=str(data_root()), PYTHONPATH=os.pathsep.join([str(inject), str(REPO)]))
    proc = subprocess.run([sys.executable, "-m", "agentnet", "strategy=bp", "device=cpu", f"output_dir={out}",
                           f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = (out / "error.txt").read_text()
    assert "Traceback" in error and "RuntimeError: an injected fault in the recipe" in error


def test_cli_missing_data_explains_fetch(tmp_path):
    proc = _run_cli(f"data.root={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 1
    assert "agentnet-fetch-mnist" in proc.stderr + proc.stdout


def _sweep(tmp_path, launcher: str, *extra: str, failures: int = 0) -> Path:
    sweep = tmp_path / "sweep"
    proc = _run_cli(
        "-m", f"hydra/launcher={launcher}", "data.subset=1500", "data.test_subset=500", "trainer.epochs=1",
        "trainer.progress=false", "device=cpu", "threads=1", f"hydra.sweep.dir={sweep}", *extra, cwd=tmp_path,
    )
    if failures:  # every job ran; the sweep as a whole says it failed
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert f"{failures} job(s) of the sweep failed" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ConfigStore schema with the same name" not in proc.stderr + proc.stdout
    return sweep


def _report(sweep: Path, *flags: str, rc: int = 0) -> str:
    proc = subprocess.run([sys.executable, "-m", "agentnet.sweep_report", str(sweep), *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode == rc, proc.stderr
    assert (sweep / "summary.md").is_file() and (sweep / "summary.csv").is_file() and (sweep / "summary.png").is_file()
    return proc.stdout


def test_real_multirun_basic_launcher_and_report(tmp_path):
    """2 strategies x 1 seed plus one invalid job: the failure is reported and hides nothing."""
    sweep = _sweep(tmp_path, "basic", "strategy=lfnn", "strategy.delta=0.5,1.5,0.3", failures=1)
    found = sorted(json.loads(p.read_text())["config"]["strategy"]["delta"] for p in sweep.glob("*/metrics.json"))
    assert found == [0.3, 0.5]
    assert "strategy.delta=1.5" in next(sweep.glob("*/error.txt")).read_text()
    assert "Failed jobs" in _report(sweep, rc=1)  # a report listing failed jobs exits non-zero...
    report = _report(sweep, "--allow-failed")  # ...unless asked not to
    assert "strategy.delta=0.5 | 1 | 0 |" in report and "strategy.delta=0.3 | 1 | 0 |" in report
    assert "strategy.delta=1.5 | 1 | 1 |" in report and "Failed jobs" in report and "strategy.delta=1.5" in report


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "local_submitit"])
def test_real_multirun_through_launcher(tmp_path, launcher):
    sweep = _sweep(tmp_path, launcher, "strategy=bp,lfnn_local", "benchmark=pmnist_quick", "benchmark.num_tasks=2",
                   "benchmark.iterations_per_task=30", "hydra.launcher.n_jobs=2" if launcher == "local" else "hydra.launcher.timeout_min=10")
    assert len(list(sweep.glob("*/cl_metrics.json"))) == 2
    report = _report(sweep)
    assert "strategy=bp" in report and "strategy=lfnn_local" in report and "ACC (%)" in report


def test_report_plot_of_a_strategy_by_method_grid(tmp_path):
    """A grid of many continual groups (4 strategies x 3 methods) is reported and plotted in the
    wide layout (one panel per row, legend beside its panel) without error."""
    from agentnet.sweep_report import write_report

    sweep = tmp_path / "grid"
    for num, (strategy, method) in enumerate((s, m) for s in ("bp", "lfnn", "lfnn_local", "attention") for m in ("si", "ewc", "replay")):
        job = sweep / f"{num}_job"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- strategy={strategy}\n- cl={method}\n")
        acc = 0.5 + 0.03 * num
        (job / "cl_metrics.json").write_text(json.dumps({
            "ACC": acc, "BWT": -0.1, "FWT": 0.01, "forgetting": 0.1, "wall_s": 1.0,
            "acc_matrix": [[0.1, 0.1, 0.1], [0.9, 0.1, 0.1], [0.8, 0.9, 0.1], [0.7, 0.8, acc]],
        }))
    text = write_report(sweep)
    assert text.count("| cl=") == 12 and "cl=replay strategy=attention" in text
    from PIL import Image

    with Image.open(sweep / "summary.png") as img:
        assert img.size[1] > img.size[0] * 0.6  # two stacked panels, not a 11 x 3.8 strip


@pytest.mark.parametrize("app", ["agentnet", "agentnet-tune"])
def test_help_says_what_the_app_is_and_how_to_start(app):
    """``--help``: what the app does, its groups and their options (no *_schema nodes), the commands a
    new user needs and where the docs are; no config dump."""
    module = "agentnet" if app == "agentnet" else "agentnet.cli"
    code = "import sys; from agentnet.cli import tune_main; sys.argv[0] = 'agentnet-tune'; tune_main()"
    args = [sys.executable, "-m", module, "--help"] if app == "agentnet" else [sys.executable, "-c", code, "--help"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert text.startswith(f"{app}: ") and "powered by Hydra" not in text and "_schema" not in text
    assert "== Start here ==" in text and "Docs: " in text and "== Config ==" not in text
    lines = text.splitlines()
    strategies = lines[lines.index("  strategy: the learning rule every worker follows") + 1]
    listed = [s.strip() for s in strategies.split(",")]
    assert listed == sorted(listed) and set(GROUPS["strategy"]) <= set(listed)  # the presets (and any plugin's)
    assert "  hydra/launcher: " in text and "local, local_submitit, slurm" in text
    if app == "agentnet":
        for command in ("agentnet strategy=lfnn", "agentnet benchmark=pmnist_quick", "agentnet -m ", "agentnet-report ", "agentnet <the same arguments> resume=true"):
            assert f"\n  {command}" in text, command
        assert "\n  tune:" not in text  # agentnet-tune's group
    else:
        assert "\n  tune: " in text and "agentnet-tune -m " in text


@pytest.mark.parametrize("main,prog", [(report_main, "agentnet-report"), (fetch_mnist_main, "agentnet-fetch-mnist"),
                                       (fetch_cifar10_main, "agentnet-fetch-cifar10")])
def test_console_scripts_explain_themselves(main, prog, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {prog} ") and f"\n{prog}: " in text and "\nexamples:\n" in text and "``" not in text


def test_a_sweep_job_directory_name_stays_within_the_file_system_limit():
    from agentnet.hydra_setup import MAX_DIRNAME, short_dirname

    short = "strategy=bp,trainer.lr=0.001"
    assert short_dirname(short) == short  # the usual names are unchanged
    long = ",".join(f"trainer.option_{i}=value_{i}" for i in range(20))
    other = long.replace("value_19", "value_20")
    assert len(short_dirname(long)) == MAX_DIRNAME and short_dirname(long) == short_dirname(long)
    assert short_dirname(long) != short_dirname(other) and short_dirname(long).startswith(long[:100])
    # what the configs use: Hydra resolves it for every job directory (agentnet and agentnet-tune)
    assert "${agentnet.dirname:${hydra.job.override_dirname}}" in (Path(CONFIG_DIR) / "config.yaml").read_text()
    assert (Path(CONFIG_DIR) / "tune.yaml").read_text().count("${agentnet.dirname:${hydra.job.override_dirname}}") == 2
