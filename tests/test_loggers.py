"""Experiment trackers (``trainer.loggers``), fully offline: what TensorBoard, MLflow (its SQLite store,
read back with MLflow's own client) and W&B (offline mode, its run file read back with W&B's own
protobuf records) hold after real runs; a resumed run continues its tracker runs; a sweep is one
MLflow experiment and one W&B group; bad names and missing extras are clear errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from agentnet.composition import to_run_config
from agentnet.config import ConfigError
from agentnet.recipes import train
from agentnet.training import MLflowLogger, TensorBoardLogger, build_loggers
from agentnet.training.loggers import TRACKERS
from tests.conftest import REPO, compose_config, data_root

INSTALLED = [name for name in ("tensorboard", "mlflow", "wandb") if importlib.util.find_spec(name) is not None]
QUICK = ["data.subset=1000", "data.test_subset=500", "trainer.batch_size=100", "trainer.lr_schedule=none",
         "trainer.progress=false", "device=cpu", "strategy=bp", "model.hidden=[104]"]


def _offline_env(tmp: Path) -> dict[str, str]:
    """W&B offline with its caches in ``tmp``; MLflow on its default store (no URI from the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp / "wandb-cache"), WANDB_DATA_DIR=str(tmp / "wandb-data"))
    return env


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, mnist):
    """One run with every installed tracker: 1 epoch, then resumed (``resume=true``) to 2 epochs.
    Returns the output directory and the trackers' record after each part."""
    if not INSTALLED:
        pytest.skip("no tracker installed")
    tmp = tmp_path_factory.mktemp("tracked")
    out = tmp / "run"
    loggers = f"trainer.loggers=[{','.join(INSTALLED)}]"
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("WANDB_", "MLFLOW_")):
                mp.delenv(key)
        for key, value in _offline_env(tmp).items():
            if key.startswith("WANDB_"):
                mp.setenv(key, value)
        train(compose_config(*QUICK, loggers, "trainer.epochs=1", f"output_dir={out}"), data=mnist)
        first = json.loads((out / TRACKERS).read_text()) if (out / TRACKERS).exists() else {}
        train(compose_config(*QUICK, loggers, "trainer.epochs=2", "resume=true", f"output_dir={out}"), data=mnist)
    return out, first, json.loads((out / TRACKERS).read_text()) if (out / TRACKERS).exists() else {}


def test_tensorboard_logs_config_history_final_metrics_and_plots(resumed_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = resumed_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("test_acc")] == [1, 2]  # the resumed run logged epoch 2 only
    assert [e.step for e in events.Scalars("final/test_error")] == [1, 2]  # each part's final metrics
    assert "plots/history" in events.Tags()["images"]
    config = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert '"epochs": 2' in config and '"loggers": [' in config


def test_mlflow_logs_config_history_final_metrics_and_plots_in_one_resumed_run(resumed_run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, first, last = resumed_run
    assert first["mlflow"] == last["mlflow"] and last["mlflow"]["tracking_uri"] == f"sqlite:///{out.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=last["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name("agentnet")  # trainer.project: the experiment of a run outside a sweep
    assert experiment.artifact_location == (out / "mlartifacts").resolve().as_uri()
    [run] = client.search_runs([experiment.experiment_id])  # the resumed run continued it: one run
    assert run.info.run_id == last["mlflow"]["run_id"] and run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["trainer.lr"] == "0.001" and params["model.hidden"] == "[104]" and params["strategy.name"] == "bp"
    assert params["trainer.epochs"] == "1"  # params never change: the first value; config.json has the current one
    config = json.loads((Path(client.download_artifacts(run.info.run_id, "config.json", str(out / "dl")))).read_text())
    assert config["trainer"]["epochs"] == 2 and config["resume"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] == [
        (e["epoch"], pytest.approx(e["train_loss"])) for e in metrics["history"]]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "final/test_error")] == [1, 2]
    assert run.data.metrics["final/test_error"] == pytest.approx(metrics["test_error"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/history.png"]


def _wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``): W&B's own protobuf ``Record`` messages in
    the LevelDB log format it writes (a 7-byte header, 32 KiB blocks of checksum-length-type chunks).
    wandb 0.31 reads these files in its Go core only, so the framing is read here."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the rest of a block is padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_run(directory: Path) -> dict:
    """What an offline W&B run file holds: its run record, config, history rows and summary."""
    [path] = directory.glob("run-*.wandb")
    run, config, history, summary = None, {}, [], {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in record.summary.update})
    return {"run": run, "config": config, "history": history, "summary": summary}


def test_wandb_offline_logs_config_history_final_metrics_and_plots(resumed_run):
    pytest.importorskip("wandb")
    out, first, last = resumed_run
    assert first["wandb"]["id"] == last["wandb"]["id"]  # the resumed run continues the same W&B run
    parts = sorted((out / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in parts] == [last["wandb"]["id"]] * 2  # `wandb sync` joins them
    before, after = (_wandb_run(p) for p in parts)
    assert after["run"].project == "agentnet" and after["run"].run_group == "" and after["run"].display_name == "run"
    assert after["config"]["trainer"]["lr"] == 0.001 and after["config"]["trainer"]["epochs"] == 2
    assert [row["_step"] for row in before["history"] if "train_loss" in row] == [1]
    assert [row["_step"] for row in after["history"] if "train_loss" in row] == [2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert after["summary"]["final/test_error"] == pytest.approx(metrics["test_error"])
    assert after["summary"]["final/steps"] == metrics["steps"] == 20
    assert list(parts[1].glob("files/media/images/plots/history_*.png"))


@pytest.mark.skipif(not {"mlflow", "wandb"} <= set(INSTALLED), reason="needs agentnet[mlflow,wandb]")
@pytest.mark.parametrize("launcher", ["basic", pytest.param("local", marks=pytest.mark.slow)])
def test_a_sweep_is_one_mlflow_experiment_and_one_wandb_group(resumed_run, tmp_path, launcher):
    """Two jobs, one after the other in one process (``basic``), or at once in two (``local``:
    joblib) creating the sweep's SQLite store together. (``basic`` finds the store there already, a
    copy of ``resumed_run``'s: MLflow takes seconds to create one.)"""
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "sweep"
    if launcher == "basic":
        sweep.mkdir()
        shutil.copy(resumed_run[0] / "mlflow.db", sweep / "mlflow.db")
    env = dict(_offline_env(tmp_path), AGENTNET_DATA=str(data_root()), PYTHONPATH=str(REPO))
    launch = ["hydra/launcher=basic"] if launcher == "basic" else ["hydra/launcher=local", "hydra.launcher.n_jobs=2"]
    proc = subprocess.run([sys.executable, "-m", "agentnet", "-m", *launch,
                           *QUICK, "seed=0,1", "trainer.epochs=1", "threads=1", "trainer.loggers=[mlflow,wandb]",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 2 and not list(sweep.glob("*/mlflow.db"))
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep}/mlflow.db")
    experiment = client.get_experiment_by_name(str(sweep))
    runs = client.search_runs([experiment.experiment_id])
    # named by the jobs' console tags (``#<num> <swept settings>``)
    assert [name.split()[:2] for name in sorted(r.info.run_name for r in runs)] == [["#0", "seed=0"], ["#1", "seed=1"]]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.params["seed"] in ("0", "1")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    groups = {_wandb_run(next(job.glob("wandb/offline-run-*")))["run"].run_group for job in jobs}
    assert groups == {str(sweep)}


def test_a_failed_run_closes_its_tracker_run(resumed_run, mnist, tmp_path, monkeypatch):
    """(In a store given by ``trainer.tracking_uri``: a copy of ``resumed_run``'s, since creating
    one costs MLflow seconds.)"""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    def broken(*args, **kwargs):
        raise RuntimeError("no plots today")

    shutil.copy(resumed_run[0] / "mlflow.db", tmp_path / "given.db")
    uri = f"sqlite:///{tmp_path / 'given.db'}"
    monkeypatch.chdir(tmp_path)  # a given store has MLflow's default artifact root, ./mlruns
    monkeypatch.setattr("agentnet.plots.write_run_plots", broken)
    with pytest.raises(RuntimeError, match="no plots today"):
        train(compose_config(*QUICK, "trainer.loggers=[mlflow]", "trainer.epochs=1", "data.subset=200", f"trainer.tracking_uri={uri}",
                             "trainer.project=failing", f"output_dir={tmp_path}"), data=mnist)
    assert not (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert run.info.status == "FAILED" and [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]


def test_loggers_are_checked_by_name():
    assert to_run_config(compose_config()).trainer.loggers == ["tensorboard"]
    assert to_run_config(compose_config("trainer.loggers=[]")).trainer.loggers == []
    for bad in ("[tensorboard,neptune]", "[mlflow,mlflow]"):
        with pytest.raises(ConfigError, match=r"^trainer\.loggers="):
            to_run_config(compose_config(f"trainer.loggers={bad}"))
    with pytest.raises(ConfigError, match=r"^trainer\.project="):
        to_run_config(compose_config("trainer.project="))


def test_a_missing_tracker_names_its_extra_and_tensorboard_is_skipped(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(MLflowLogger, "available", classmethod(lambda cls: False))
    with pytest.raises(ConfigError, match=r"trainer\.loggers=.*mlflow is not installed: pip install 'agentnet\[mlflow\]'"):
        build_loggers(to_run_config(compose_config("trainer.loggers=[mlflow]")), tmp_path)
    monkeypatch.setattr(TensorBoardLogger, "available", classmethod(lambda cls: False))
    assert build_loggers(to_run_config(compose_config()), tmp_path) == []
    assert "pip install 'agentnet[tensorboard]'" in caplog.text
