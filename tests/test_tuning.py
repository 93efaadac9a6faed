"""Fair comparisons: the validation split, best-validation selection, continual validation matrices
and ``agentnet-tune`` (Optuna studies whose trials train as populations), on real MNIST."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from agentnet.composition import compose, to_run_config
from agentnet.config import ConfigError, TuneConfig
from agentnet.recipes import run_continual, train
from agentnet.data import Split, holdout
from agentnet.session import prepare_run
from agentnet.tuning import JOURNAL, default_space, parse_space, run_study
from tests.conftest import data_root

QUICK = ["data.subset=2000", "data.test_subset=1000", "trainer.progress=false", "trainer.loggers=[]", "device=cpu"]


def _run(tmp_path: Path, *overrides: str, config: str = "config"):
    return to_run_config(compose([*QUICK, f"output_dir={tmp_path}", *overrides], config))


def _ids(n: int) -> Split:
    """A split whose every row carries its own index, so held-out rows can be identified."""
    return Split(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))


# -- the validation split --------------------------------------------------------------------------

def test_holdout_is_disjoint_fixed_and_keeps_the_subset():
    split = _ids(1000)
    train, val = holdout(split, 300, 100)
    assert len(train) == 300 and len(val) == 100
    assert not set(train.y.tolist()) & set(val.y.tolist())
    # the subset is exactly the one chosen without a validation split
    plain, none = holdout(split, 300, 0)
    assert none is None and torch.equal(plain.y, train.y)
    # fixed: the same examples every call (no dependence on the global generator)
    torch.manual_seed(123)
    again_train, again_val = holdout(split, 300, 100)
    assert torch.equal(again_val.y, val.y) and torch.equal(again_train.y, train.y)
    # without a subset: every other example trains, in its original order
    whole, held = holdout(split, None, 100)
    assert len(whole) == 900 and torch.all(whole.y[1:] > whole.y[:-1])
    assert set(whole.y.tolist()) | set(held.y.tolist()) == set(range(1000))
    with pytest.raises(ValueError):
        holdout(split, 950, 100)


def test_val_split_is_the_same_for_every_seed(mnist, tmp_path):
    a = prepare_run(_run(tmp_path / "a", "data.val_split=500", "seed=0"), mnist)[3]
    b = prepare_run(_run(tmp_path / "b", "data.val_split=0.25", "seed=7"), mnist)[3]
    assert len(a.val) == 500 and len(b.val) == 500  # 0.25 of the 2000-example subset
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.x, b.train.x)
    plain = prepare_run(_run(tmp_path / "c"), mnist)[3]
    assert plain.val is None and torch.equal(plain.train.x, a.train.x)  # the subset is unchanged


@pytest.mark.parametrize("overrides, field", [
    (["data.val_split=1.5"], "data.val_split"),
    (["data.val_split=-1"], "data.val_split"),
    (["data.val_split=0.0001"], "data.val_split"),  # rounds to no example: refused, not silently none
    (["data.subset=59000", "data.val_split=2000"], "data.val_split"),
    (["trainer.select=best_val"], "trainer.select"),
    (["trainer.select=best_val", "data.val_split=100", "benchmark=pmnist_quick"], "trainer.select"),
    (["trainer.select=newest"], "trainer.select"),
])
def test_bad_validation_settings_name_their_field(mnist, tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field):
        prepare_run(_run(tmp_path, *overrides), mnist)


def test_best_val_restores_each_replicas_best_epoch(mnist, tmp_path):
    # Replica 0 learns steadily; replica 1's huge rate peaks early and degrades: different epochs.
    run = _run(tmp_path, "strategy=bp", "data.val_split=400", "trainer.epochs=4", "trainer.select=best_val",
               "trainer.lr_schedule=none", "replicas=2", "+vary.trainer.lr=[0.001,0.05]", "+vary.seed=[0,0]")
    metrics = train(run, mnist)
    for replica in metrics["replicas"]:
        accs = [h["val_acc"] for h in replica["history"]]
        best = max(range(len(accs)), key=lambda i: (accs[i], -i))
        assert replica["selected_epoch"] == best + 1
        # re-evaluated after the restore: exactly the validation accuracy of that epoch
        assert replica["val_acc"] == pytest.approx(accs[best], abs=1e-6)
        assert "test_acc" not in replica["history"][0]  # the test set is seen once, at the end
    assert metrics["data"] == {"train": 2000, "val": 400, "test": 1000}


def test_continual_validation_matrix(mnist, tmp_path):
    run = _run(tmp_path, "strategy=bp", "benchmark=pmnist_quick", "benchmark.num_tasks=2", "data.val_split=300")
    metrics = run_continual(run, mnist)
    assert len(metrics["val_acc_matrix"]) == 3 and len(metrics["val_acc_matrix"][0]) == 2
    assert 0.5 < metrics["val_ACC"] <= 1.0 and "val_BWT" in metrics and "val_forgetting" in metrics
    # each task's validation examples go through its own permutation: learning task 2 helps task 2 only
    R = metrics["val_acc_matrix"]
    assert R[2][1] > R[1][1] + 0.3
    # without the test set (a study's trials): the validation matrix only, the same numbers
    blind = run_continual(_run(tmp_path / "blind", "strategy=bp", "benchmark=pmnist_quick", "benchmark.num_tasks=2",
                               "data.val_split=300", "trainer.test=false"), mnist)
    assert "acc_matrix" not in blind and "ACC" not in blind
    assert blind["val_acc_matrix"] == metrics["val_acc_matrix"]


# -- agentnet-tune ---------------------------------------------------------------------------------

def test_tune_config_composes_and_validates(tmp_path):
    cfg = compose(["tune.trials=4", "tune.space={trainer:{lr:{log:[1e-4,1e-1]}},strategy:{delta:{uniform:[0.2,1.0]}}}"], "tune")
    run = to_run_config(cfg)
    assert isinstance(run.tune, TuneConfig) and run.tune.trials == 4
    dims = parse_space(run, run.tune.space)
    assert {d.field: d.batchable for d in dims} == {"trainer.lr": True, "strategy.delta": True}
    with pytest.raises(ConfigError, match="tune.sampler"):
        to_run_config(compose(["tune.sampler=bayes"], "tune"))
    with pytest.raises(ConfigError, match="tune.objective"):
        to_run_config(compose(["tune.objective=test_error"], "tune"))
    with pytest.raises(ConfigError, match="tune.space.trainer.nope"):
        parse_space(run, {"trainer.nope": {"log": [1, 2]}})
    with pytest.raises(ConfigError, match="tune.space.trainer.lr"):
        parse_space(run, {"trainer.lr": {"log": [0, 1]}})
    # a field a population cannot vary is not batchable
    assert not parse_space(run, {"trainer.batch_size": {"choice": [64, 128]}})[0].batchable
    # the default space: the learning rate plus the strategy's and the CL method's own
    ewc = to_run_config(compose(["strategy=lfnn_local", "benchmark=pmnist_online", "cl=ewc"], "tune"))
    assert set(default_space(ewc)) == {"trainer.lr", "strategy.delta", "cl.ewc_lambda"}
    assert default_space(ewc)["trainer.lr"] == {"log": [1e-4, 1.0]}  # SGD's range
    # plain agentnet refuses a study
    from agentnet.cli import run_task

    with pytest.raises(ConfigError, match="agentnet-tune"):
        run_task(cfg)


def test_tuning_needs_validation_data(mnist, tmp_path):
    run = _run(tmp_path, config="tune")
    with pytest.raises(ConfigError, match="data.val_split"):
        run_study(run, tmp_path, mnist)


def test_small_study_beats_a_bad_learning_rate(mnist, tmp_path):
    """8 trials as ONE population of 8 (2,000 examples, 1 epoch) find a far better rate than 1e-5."""
    common = ["strategy=bp", "data.val_split=500", "trainer.epochs=1"]
    bad = train(_run(tmp_path / "bad", *common, "trainer.lr=1e-5"), mnist)
    out = tmp_path / "study"
    summary = run_study(_run(out, *common, "tune.trials=8", "tune.batch=8", "tune.final_seeds=3", config="tune"), out, mnist)
    assert summary["best_value"] < bad["val_error"] - 20
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000-0007"]  # one population
    trial = json.loads((out / "trials" / "0000-0007" / "metrics.json").read_text())
    assert "test_error" not in trial and "val_error" in trial  # trials never look at the test set
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 8 and all(r["state"] == "COMPLETE" for r in rows)
    assert yaml.safe_load((out / "best.yaml").read_text()) == summary["best"]
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert final["seeds"] == [100, 101, 102] and final["tuned"] == summary["best"]
    assert final["test_error"] < bad["test_error"] and "test_error_std" in final
    assert (out / "history.png").stat().st_size > 1000
    # the same study again: nothing retrained, the final stage reused
    again = run_study(_run(out, *common, "tune.trials=8", "tune.batch=8", "tune.final_seeds=3", config="tune"), out, mnist)
    assert again["best"] == summary["best"] and len(list((out / "trials").iterdir())) == 1
    # the study refuses a continuation that measures something else
    with pytest.raises(ConfigError, match="trainer.epochs"):
        run_study(_run(out, "strategy=bp", "data.val_split=500", "trainer.epochs=2", "tune.trials=8", config="tune"), out, mnist)


def test_diverged_trials_fail_and_the_rest_are_told(mnist, tmp_path):
    out = tmp_path / "study"
    run = _run(out, "strategy=bp", "data.val_split=300", "trainer.epochs=1", "trainer.optimizer=sgd", "trainer.log_every=2",
               "tune.trials=6", "tune.batch=6", "tune.final_seeds=2", "tune.sampler=grid",
               "tune.space={trainer:{lr:{choice:[0.01,0.05,0.1,1000.0,5000.0,20000.0]}}}", config="tune")
    summary = run_study(run, out, mnist)
    rows = {float(r["trainer.lr"]): r for r in csv.DictReader(open(out / "trials.csv"))}
    assert {lr for lr, r in rows.items() if r["state"] == "FAIL"} >= {5000.0, 20000.0}
    assert all(rows[lr]["state"] == "COMPLETE" for lr in (0.01, 0.05, 0.1))
    assert summary["best"]["trainer.lr"] in (0.01, 0.05, 0.1)


def test_categorical_choices_train_as_separate_populations(mnist, tmp_path):
    out = tmp_path / "study"
    run = _run(out, "strategy=bp", "data.val_split=300", "trainer.epochs=1", "tune.trials=4", "tune.batch=4",
               "tune.final_seeds=2", "tune.sampler=grid",
               "tune.space={trainer:{lr:{choice:[0.001,0.01]},optimizer:{choice:[adam,sgd]}}}", config="tune")
    run_study(run, out, mnist)
    populations = sorted(p.name for p in (out / "trials").iterdir())
    assert len(populations) == 2  # one per optimiser, each varying the two rates
    for name in populations:
        metrics = json.loads((out / "trials" / name / "metrics.json").read_text())
        assert len(metrics["replicas"]) == 2


def _completed(journal: Path) -> list:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not journal.is_file():
        return []
    study = optuna.load_study(study_name="agentnet", storage=JournalStorage(JournalFileBackend(str(journal))))
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]


def _tune_command(out: Path, trials: int) -> tuple[list[str], dict[str, str]]:
    """A real ``agentnet-tune`` process on a small study in ``out`` (2 trials per population), and its environment."""
    cmd = [str(Path(sys.executable).parent / "agentnet-tune"), "strategy=bp", "data.subset=2000", "data.test_subset=500",
           "data.val_split=300", "trainer.epochs=2", f"tune.trials={trials}", "tune.batch=2", "tune.final_seeds=2",
           "trainer.progress=false", "trainer.loggers=[]", "threads=1", "device=cpu", f"hydra.run.dir={out}"]
    return cmd, {**os.environ, "AGENTNET_DATA": str(data_root())}


def test_killed_study_continues_with_its_finished_trials(tmp_path):
    """``kill -9`` mid-study loses at most the running population; the same command continues."""
    out = tmp_path / "study"
    cmd, env = _tune_command(out, trials=6)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while len(_completed(out / JOURNAL)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the study finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = {t.number: (t.params, t.value) for t in _completed(out / JOURNAL)}
    assert 2 <= len(before) < 6
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    after = {t.number: (t.params, t.value) for t in _completed(out / JOURNAL)}
    assert all(after[n] == v for n, v in before.items())  # finished trials kept as they were
    rows = list(csv.DictReader(open(out / "trials.csv")))
    counted = [r for r in rows if not r["note"].startswith("lost")]
    assert len(counted) == 6 and all(r["state"] == "COMPLETE" for r in counted)
    lost = [r for r in rows if r["note"].startswith("lost")]
    retried = {r["trainer.lr"] for r in counted}
    assert all(r["trainer.lr"] in retried for r in lost)  # a lost trial's setting is asked again
    assert (out / "final" / "metrics.json").is_file()


def test_final_stage_takes_its_own_schedule(mnist, tmp_path):
    """Tune on a short schedule, retrain the best setting on a longer one (``tune.final``)."""
    out = tmp_path / "study"
    run = _run(out, "strategy=bp", "data.val_split=300", "trainer.epochs=1", "tune.trials=2", "tune.batch=2",
               "tune.final_seeds=2", "tune.final={trainer:{epochs:2},data:{subset:3000}}", config="tune")
    summary = run_study(run, out, mnist)
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert final["epochs"] == 2 and final["data"]["train"] == 3000 and final["final_settings"]
    assert summary["final"]["epochs"] == 2
    trial = json.loads(next((out / "trials").glob("*/metrics.json")).read_text())
    assert trial["epochs"] == 1 and trial["data"]["train"] == 2000
    with pytest.raises(ConfigError, match="tune.final.trainer.nope"):
        run_study(_run(tmp_path / "other", "strategy=bp", "data.val_split=300", "trainer.epochs=1", "tune.trials=1",
                       "tune.final={trainer:{nope:1}}", config="tune"), tmp_path / "other", mnist)


@pytest.mark.slow
def test_two_tuners_share_one_study(tmp_path):
    """Two tuners started together on one study split its budget; the final stage runs once."""
    out = tmp_path / "study"
    cmd, env = _tune_command(out, trials=8)
    out.mkdir(parents=True)
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
    owners = {t.user_attrs["owner"] for t in _completed(out / JOURNAL)}
    assert len(owners) == 2  # both tuners trained trials
    assert 8 <= len(_completed(out / JOURNAL)) <= 10  # the budget, overshot at most by a batch asked concurrently
    assert json.loads((out / "final" / "metrics.json").read_text())["seeds"] == [100, 101]


def test_final_seed_that_diverges_is_recorded_and_the_others_reported(mnist, tmp_path):
    """A best setting that diverges on a fresh seed: the seed is named, the others are retrained."""
    out = tmp_path / "study"
    # SGD at lr 1.3: seed 0 (tuning) stays finite, while seed 100 of the final seeds does not
    run = _run(out, "strategy=bp", "data.val_split=300", "trainer.epochs=1", "trainer.optimizer=sgd", "trainer.log_every=1",
               "trainer.lr_schedule=none", "tune.trials=1", "tune.batch=1", "tune.final_seeds=6", "tune.sampler=grid",
               "tune.space={trainer:{lr:{choice:[1.3]}}}", config="tune")
    summary = run_study(run, out, mnist)
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert final["planned_seeds"] == list(range(100, 106))
    assert final["diverged_seeds"] == [100] and final["seeds"] == [101, 102, 103, 104, 105]
    assert len(final["replicas"]) == 5 and all(math.isfinite(r["test_error"]) for r in final["replicas"])
    assert summary["final"]["diverged_seeds"] == [100]


def test_trials_on_several_seeds_score_their_mean(mnist, tmp_path):
    """``tune.seeds=2``: every trial trains on seeds 0 and 1 in the one population; its objective is their mean."""
    out = tmp_path / "study"
    run = _run(out, "strategy=bp", "data.val_split=300", "trainer.epochs=1", "tune.trials=2", "tune.batch=2", "tune.seeds=2",
               "tune.final_seeds=2", "tune.sampler=grid", "tune.space={trainer:{lr:{choice:[0.001,0.01]}}}", config="tune")
    run_study(run, out, mnist)
    population = json.loads((out / "trials" / "0000-0001" / "metrics.json").read_text())["replicas"]
    assert [r["seed"] for r in population] == [0, 1, 0, 1]
    assert [r["trainer.lr"] for r in population] == [0.001, 0.001, 0.01, 0.01]
    rows = {float(r["trainer.lr"]): float(r["val_error"]) for r in csv.DictReader(open(out / "trials.csv"))}
    for i, lr in enumerate((0.001, 0.01)):
        mean = (population[2 * i]["val_error"] + population[2 * i + 1]["val_error"]) / 2
        assert rows[lr] == pytest.approx(mean, rel=1e-5)
    with pytest.raises(ConfigError, match="tune.seeds"):
        to_run_config(compose(["tune.seeds=0"], "tune"))
