"""Sweeps through a real SLURM scheduler: a one-node cluster started by examples/slurm_local.sh.

Slow, and needs root on a Debian-like machine (the script installs slurm-wlm and munge with apt-get
when they are missing); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, data_root, without_timing

pytestmark = pytest.mark.slow
SCRIPT = REPO / "examples" / "slurm_local.sh"


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0 or (shutil.which("slurmctld") is None and shutil.which("apt-get") is None):
        pytest.skip("a local SLURM cluster needs root and apt-get (or SLURM already installed)")
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield
    subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


def _sweep_cmd(sweep: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "agentnet", "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20", "device=cpu", "threads=1",
            "trainer.progress=false", f"data.root={data_root()}", f"hydra.sweep.dir={sweep}", *overrides]


def _array_task_state(job_num: int) -> tuple[str, str] | None:
    """(SLURM id, state) of the sweep's array task for Hydra job ``job_num`` (hydra-submitit submits an array)."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        job_id, state = line.split("|")
        if job_id.endswith(f"_{job_num}"):
            return job_id, state
    return None


def _report(sweep: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentnet.sweep_report", str(sweep), *flags], capture_output=True, text=True, timeout=120)


def _checkpoint_step(job_dir: Path) -> int:
    from agentnet.training import CheckpointError, load_checkpoint

    path = job_dir / "checkpoint.pt"
    try:
        return load_checkpoint(path)["step"] if path.is_file() else -1
    except CheckpointError:
        return -1



def test_sweep_through_slurm_with_a_cancelled_and_a_requeued_job(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    run_args = ["data.subset=20000", "data.test_subset=1000", "trainer.epochs=10", "trainer.checkpoint_every=10",
                "trainer.loggers=[]"]
    # Hydra job 0: bp (finishes), 1: lfnn_local (cancelled with scancel), 2: lfnn (requeued mid-run).
    proc = subprocess.Popen(_sweep_cmd(sweep, "strategy=bp,lfnn_local,lfnn", *run_args), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        cancelled = requeued = None
        while time.monotonic() < deadline and not (cancelled and requeued):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            task = _array_task_state(1)
            if cancelled is None and task and task[1] == "RUNNING":
                cancelled = task[0]
                subprocess.run(["scancel", cancelled], check=True)
            task = _array_task_state(2)
            dirs = list(sweep.glob("2_*"))
            if requeued is None and task and task[1] == "RUNNING" and dirs and _checkpoint_step(dirs[0]) >= 20:
                requeued = task[0]
                subprocess.run(["scontrol", "requeue", requeued], check=True)
            time.sleep(0.2)
        assert cancelled and requeued, f"could not catch the jobs running: {cancelled} {requeued}"
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, "a sweep with a cancelled job must not exit 0"
    # Hydra's submitit launcher stops waiting at the first failed job; the requeued one still runs in
    # SLURM (restarted after its BeginTime delay, ~2 min) and finishes on its own.
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline and not list(sweep.glob("2_*/metrics.json")):
        time.sleep(2)
    done = {p.parent.name.split("_")[0] for p in sweep.glob("*/metrics.json")}
    assert done == {"0", "2"}, output[-3000:]
    report = _report(sweep)
    assert report.returncode == 1 and "Failed jobs" in report.stdout
    failed = report.stdout.split("Failed jobs")[1]
    assert cancelled in failed or "lfnn_local" in failed, report.stdout
    # The requeued job resumed from its checkpoint and ended where an uninterrupted run ends.
    requeued_dir = next(sweep.glob("2_*"))  # SLURM restarts a requeued job after its BeginTime delay (~2 min)
    resumed = json.loads((requeued_dir / "metrics.json").read_text())
    assert resumed["resumed"]["from"] and resumed["resumed"]["step"] >= 20
    straight = tmp_path / "straight"
    local = subprocess.run([sys.executable, "-m", "agentnet", "strategy=lfnn", *run_args, "device=cpu", "threads=1",
                            "trainer.progress=false", f"data.root={data_root()}", f"output_dir={straight}",
                            f"hydra.run.dir={straight}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-2000:]
    assert without_timing(json.loads((straight / "metrics.json").read_text())) == without_timing(resumed)


def test_population_jobs_through_slurm_train_what_local_runs_train(cluster, tmp_path):
    """A strategies x seeds sweep as one population job per strategy: 2 jobs, 2 x 2 networks.

    Each job's replicas are the seeds (``replicas=2`` -> seeds 0, 1); the report counts every replica
    as a run, and a submitted population trains exactly what the same command trains locally.
    """
    sweep = tmp_path / "sweep"
    run_args = ["data.subset=3000", "data.test_subset=500", "trainer.epochs=1", "trainer.loggers=[]", "replicas=2"]
    proc = subprocess.run(_sweep_cmd(sweep, "strategy=bp,lfnn_local", *run_args), cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {json.loads(p.read_text())["strategy"]: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert set(jobs) == {"bp", "lfnn_local"}
    for metrics in jobs.values():
        assert metrics["seeds"] == [0, 1] and [r["seed"] for r in metrics["replicas"]] == [0, 1]
        assert metrics["test_acc"] > 0.2 and metrics["test_acc_std"] >= 0.0  # learned (chance: 0.1)
    report = _report(sweep)
    assert report.returncode == 0, report.stdout + report.stderr
    from agentnet.sweep_report import collect_jobs, group_jobs, summary_rows

    header, rows = summary_rows(group_jobs(collect_jobs(sweep)))
    runs = {row[0]: (row[header.index("jobs")], row[header.index("runs")]) for row in rows}
    assert runs == {"strategy=bp": ("1", "2"), "strategy=lfnn_local": ("1", "2")}, report.stdout  # replicas are runs
    local = tmp_path / "local"
    proc = subprocess.run([sys.executable, "-m", "agentnet", "strategy=lfnn_local", *run_args, "device=cpu", "threads=1",
                           "trainer.progress=false", f"data.root={data_root()}", f"output_dir={local}",
                           f"hydra.run.dir={local}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert without_timing(json.loads((local / "metrics.json").read_text())) == without_timing(jobs["lfnn_local"])


def test_a_preemption_signal_checkpoints_and_requeues_the_job(cluster, tmp_path):
    """``scancel --signal=USR1``: the job finishes its step, checkpoints, records ``stopped.json``,
    requeues itself and, restarted by SLURM, resumes to the uninterrupted run's metrics."""
    sweep = tmp_path / "sweep"
    run_args = ["data.subset=20000", "data.test_subset=1000", "trainer.epochs=12", "trainer.checkpoint_every=10",
                "trainer.loggers=[]"]
    # Two jobs (an array, as sweeps are); job 0 (lfnn) is signalled.
    proc = subprocess.Popen(_sweep_cmd(sweep, "strategy=lfnn,bp", *run_args), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        signalled = None
        while time.monotonic() < deadline and signalled is None:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            task = _array_task_state(0)
            dirs = list(sweep.glob("0_*"))
            if task and task[1] == "RUNNING" and dirs and _checkpoint_step(dirs[0]) >= 20:
                signalled = task[0]
                subprocess.run(["scancel", "--signal=USR1", signalled], check=True)
            time.sleep(0.2)
        assert signalled, "could not catch the job running"
        job_dir = next(sweep.glob("0_*"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (job_dir / "stopped.json").exists():
            time.sleep(0.5)
        stopped = json.loads((job_dir / "stopped.json").read_text())
        assert stopped["reason"] == "SIGUSR1" and stopped["requeued"] == signalled and stopped["step"] >= 20
        # SLURM restarts a requeued job after its BeginTime delay (~2 min); it resumes and finishes.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not (job_dir / "metrics.json").exists():
            time.sleep(2)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = json.loads((job_dir / "metrics.json").read_text())
    assert resumed["resumed"]["step"] == stopped["step"]
    straight = tmp_path / "straight"
    local = subprocess.run([sys.executable, "-m", "agentnet", "strategy=lfnn", *run_args, "device=cpu", "threads=1", "trainer.progress=false",
                            f"data.root={data_root()}", f"output_dir={straight}", f"hydra.run.dir={straight}"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-2000:]
    assert without_timing(json.loads((straight / "metrics.json").read_text())) == without_timing(resumed)


def test_one_run_over_two_slurm_tasks(cluster, tmp_path):
    """Data parallelism on SLURM: one job with 2 tasks (submitit's ``tasks_per_node``) trains one run
    over 2 ranks (gloo), which equals the same run in one process (float tolerance)."""
    import torch

    sweep = tmp_path / "sweep"
    run_args = ["strategy=lfnn", "data.subset=1024", "data.test_subset=500", "trainer.epochs=1", "trainer.max_steps=6",
                "trainer.loggers=[]"]
    proc = subprocess.run(_sweep_cmd(sweep, "hydra.launcher.tasks_per_node=2", *run_args), cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (job,) = [p.parent for p in sweep.glob("*/metrics.json")]
    assert json.loads((job / "metrics.json").read_text())["world_size"] == 2
    local = tmp_path / "local"
    proc = subprocess.run([sys.executable, "-m", "agentnet", *run_args, "device=cpu", "threads=1", "trainer.progress=false",
                           f"data.root={data_root()}", f"hydra.run.dir={local}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = torch.load(job / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(local / "checkpoint.pt", weights_only=True)["model"]
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()) < 5e-5
