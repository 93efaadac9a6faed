"""Checkpoints you can trust: exact resume after a real ``kill -9``, refusal of unsafe or mismatched
checkpoints, run-directory locks, unique temporary files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from agentnet.config import ConfigError
from agentnet.recipes import run_continual, train
from agentnet.training import CHECKPOINT, CheckpointError, RunDirectoryLockedError, atomic_save, load_checkpoint
from tests.conftest import REPO, compose_config, data_root, without_timing




def _cli(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "agentnet", *overrides, "device=cpu", "threads=1", "trainer.progress=false",
            f"data.root={data_root()}", f"output_dir={out}", f"hydra.run.dir={out}"]


def _kill_when(cmd: list[str], checkpoint: Path, ready, timeout: float = 240, sig: signal.Signals = signal.SIGKILL) -> subprocess.Popen:
    """Start ``cmd``, wait until its checkpoint satisfies ``ready(state)``, then send it ``sig``
    (``kill -9`` by default) and wait for it to end."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read()[-2000:]}")
            if checkpoint.is_file():
                try:
                    state = load_checkpoint(checkpoint)
                except CheckpointError:
                    state = None  # replaced while we read it; look again
                if state is not None and ready(state):
                    os.kill(proc.pid, sig)
                    proc.wait(timeout=120)
                    assert sig != signal.SIGKILL or proc.returncode == -signal.SIGKILL
                    return proc
            time.sleep(0.02)
        pytest.fail("the checkpoint never reached the kill point")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_single_run_killed_mid_epoch_resumes_to_identical_metrics(tmp_path):
    overrides = ["strategy=lfnn", "data.subset=20000", "data.test_subset=1000", "trainer.epochs=2",
                 "trainer.checkpoint_every=10", "trainer.loggers=[]"]
    _run(_cli(tmp_path / "straight", *overrides))
    killed = tmp_path / "killed"
    # 157 steps per epoch: stop inside the first epoch, after at least two mid-epoch checkpoints.
    _kill_when(_cli(killed, *overrides), killed / CHECKPOINT, lambda s: 20 <= s["step"] < 150)
    assert not (killed / "metrics.json").exists()
    _run(_cli(killed, *overrides, "resume=true"))
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert b["resumed"]["from"] and 0 < b["resumed"]["step"] < 157
    assert without_timing(a) == without_timing(b)


@pytest.mark.parametrize(
    "cl, kill_at, extra",
    [("ewc", "mid_task", []), ("replay", "after_task_2", []),
     # the same two resume points with other methods' state: slow (the default run keeps one of each)
     pytest.param("si", "mid_task", [], marks=pytest.mark.slow),
     # the online protocol's per-seed selection, cycled mid-task (40 steps of 32 over 300 examples)
     pytest.param("agem", "mid_task", ["benchmark.samples_per_task=300", "trainer.batch_size=32", "cl.memory_per_task=64"],
                  marks=pytest.mark.slow)],
)
def test_continual_run_killed_resumes_to_identical_cl_metrics(cl, kill_at, extra, tmp_path):
    overrides = ["strategy=lfnn", "benchmark=pmnist_quick", "benchmark.num_tasks=3", "benchmark.iterations_per_task=40",
                 f"cl={cl}", "data.subset=6000", "data.test_subset=500", *extra]
    if kill_at == "mid_task":
        overrides.append("trainer.checkpoint_every=7")
    if cl == "ewc":
        overrides.append("cl.fisher_samples=200")
    _run(_cli(tmp_path / "straight", *overrides))
    killed = tmp_path / "killed"
    if kill_at == "mid_task":  # inside task 2: the stage began, some of its steps are done
        ready = lambda s: s["plugins"]["StreamProgress"]["stage"] == 1 and s["step"] >= 47  # noqa: E731
    else:  # task 2 finished and evaluated, task 3 not begun (its next checkpoint is at its end)
        ready = lambda s: s["plugins"]["StreamProgress"]["stage"] == 2 and not s["plugins"]["StreamProgress"]["stage_started"]  # noqa: E731
    _kill_when(_cli(killed, *overrides), killed / CHECKPOINT, ready)
    assert not (killed / "cl_metrics.json").exists()
    _run(_cli(killed, *overrides, "resume=true"))
    a = json.loads((tmp_path / "straight" / "cl_metrics.json").read_text())
    b = json.loads((killed / "cl_metrics.json").read_text())
    assert b["resumed"]["from"]
    assert without_timing(a) == without_timing(b)
    assert len(b["acc_matrix"]) == 4 and (killed / "tensorboard").is_dir()


class _RunsCode:
    """Unpickling this object runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_is_refused_and_runs_no_code(mnist, quick_overrides, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": 2, "model": _RunsCode(marker)}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="refused to load"):
        train(compose_config("strategy=bp", *quick_overrides, "resume=true"), data=mnist)
    assert not marker.exists()


@pytest.mark.parametrize(
    "changes, keys",
    [
        (["strategy=bp"], ["strategy.name: checkpoint='lfnn', this run='bp'"]),
        (["trainer.lr=0.01"], ["trainer.lr: checkpoint=0.001, this run=0.01"]),
        (["data.subset=1000"], ["data.subset: checkpoint=5000, this run=1000"]),
        (["model=mlp_400x2"], ["model.hidden", "model.name"]),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_config(changes, keys, mnist, quick_overrides, tmp_path):
    train(compose_config("strategy=lfnn", *quick_overrides, "trainer.epochs=1"), data=mnist)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(ConfigError) as info:
        train(compose_config("strategy=lfnn", *quick_overrides, *changes, "resume=true"), data=mnist)
    for key in keys:
        assert key in str(info.value)
    assert (tmp_path / CHECKPOINT).read_bytes() == before  # nothing was overwritten


def test_growing_epochs_is_allowed(mnist, quick_overrides, tmp_path):
    train(compose_config("strategy=bp", *quick_overrides, "trainer.epochs=1"), data=mnist)
    metrics = train(compose_config("strategy=bp", *quick_overrides, "trainer.epochs=2", "resume=true"), data=mnist)
    assert metrics["epochs"] == 2 and metrics["resumed"]["epoch"] == 1


def test_a_live_run_holds_its_directory(mnist, quick_overrides, tmp_path):
    # A live process holds the directory the way a run does (an flock on .agentnet.lock with its PID).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from agentnet.training import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('held', flush=True); time.sleep(60)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryLockedError, match=f"PID {holder.pid}"):
            train(compose_config("strategy=bp", *quick_overrides, "trainer.epochs=1"), data=mnist)
        assert not (tmp_path / "metrics.json").exists()
    finally:
        holder.kill()  # kill -9: the operating system drops its lock
        holder.wait()
    (tmp_path / "error.txt").write_text("an earlier attempt failed\n")
    # The holder is dead now: the lock is taken over (and the stale error.txt cleared), and released at the end.
    train(compose_config("strategy=bp", *quick_overrides, "trainer.epochs=1"), data=mnist)
    assert (tmp_path / "metrics.json").is_file() and not (tmp_path / ".agentnet.lock").exists()
    assert not (tmp_path / "error.txt").exists()


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    path = tmp_path / CHECKPOINT
    errors: list[BaseException] = []

    def writer(value: float) -> None:
        try:
            for _ in range(25):
                atomic_save({"value": torch.full((20_000,), value)}, path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(float(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    value = load_checkpoint(path)["value"]
    assert torch.equal(value, torch.full_like(value, value[0].item()))  # one writer's whole file
    assert list(tmp_path.glob("*.tmp")) == []


def test_continual_resume_refuses_a_changed_protocol(mnist, tmp_path):
    overrides = ["strategy=lfnn_local", "benchmark=pmnist_quick", "benchmark.num_tasks=3", "benchmark.iterations_per_task=15",
                 "cl=ewc", "cl.fisher_samples=100", "data.subset=3000", "data.test_subset=300", "device=cpu",
                 "trainer.progress=false", f"data.root={data_root()}"]
    straight = run_continual(compose_config(*overrides, f"output_dir={tmp_path / 'a'}"), data=mnist)
    # Stop after task 2 by shrinking the protocol, then continue with the full one: refused (benchmark differs).
    run_continual(compose_config(*overrides, "benchmark.num_tasks=2", f"output_dir={tmp_path / 'b'}"), data=mnist)
    with pytest.raises(ConfigError, match="benchmark.num_tasks"):
        run_continual(compose_config(*overrides, "resume=true", f"output_dir={tmp_path / 'b'}"), data=mnist)
    assert straight["steps"] == 45


# slow: the default run keeps the ewc mid-task and replay after-task kill -9 resumes; this adds attention's own state
@pytest.mark.slow
def test_attention_protect_killed_mid_task_resumes_to_identical_cl_metrics(tmp_path):
    """``mode=protect`` keeps state across tasks (importances, anchors, this task's running sums) in the
    strategy's checkpoint entry: killed inside task 2, the resumed run ends bit-identical."""
    overrides = ["strategy=attention", "strategy.mode=protect", "strategy.protect_lambda=100", "strategy.protect_c=1",
                 "benchmark=pmnist_quick", "benchmark.num_tasks=3", "benchmark.iterations_per_task=40",
                 "data.subset=6000", "data.test_subset=500", "trainer.checkpoint_every=7"]
    _run(_cli(tmp_path / "straight", *overrides))
    killed = tmp_path / "killed"

    def ready(s):  # inside task 2, with task 1 consolidated and some of task 2's attention accumulated
        return s["plugins"]["StreamProgress"]["stage"] == 1 and s["step"] >= 47 and s["strategy"]["protect"]["steps"] > 0

    _kill_when(_cli(killed, *overrides), killed / CHECKPOINT, ready)
    assert not (killed / "cl_metrics.json").exists()
    _run(_cli(killed, *overrides, "resume=true"))
    a = json.loads((tmp_path / "straight" / "cl_metrics.json").read_text())
    b = json.loads((killed / "cl_metrics.json").read_text())
    assert b["resumed"]["from"] and 40 < b["resumed"]["step"] < 80
    assert without_timing(a) == without_timing(b)


def test_a_field_added_after_the_checkpoint_left_off_is_no_difference():
    """Checkpoints outlive new optional fields: absent + ``None`` now matches; absent + a value does not."""
    from agentnet.training.checkpoint import config_differences

    saved = {"benchmark": {"num_tasks": 10}, "trainer": {"lr": 1e-3}}
    assert config_differences(saved, {"benchmark": {"num_tasks": 10, "samples_per_task": None}, "trainer": {"lr": 1e-3}}) == []
    diffs = config_differences(saved, {"benchmark": {"num_tasks": 10, "samples_per_task": 1000}, "trainer": {"lr": 1e-3}})
    assert diffs == ["benchmark.samples_per_task: checkpoint='<absent>', this run=1000"]
