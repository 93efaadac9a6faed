"""A killed sweep resumes (issue 33, item 4): the same multirun command with ``resume=true`` keeps
the jobs that finished, resumes the interrupted one from its checkpoint and runs the rest; every job
ends where an uninterrupted sweep's does, and the report groups them as before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from agentnet.training import CHECKPOINT, CheckpointError, load_checkpoint
from tests.conftest import REPO, data_root, without_timing

pytestmark = pytest.mark.slow
ARGS = ["hydra/launcher=basic", "strategy=bp,lfnn,lfnn_local", "model=mlp_400x2", "model.hidden=[40,40]", "data.subset=3000",
        "data.test_subset=500", "trainer.epochs=2", "trainer.batch_size=50", "trainer.checkpoint_every=5", "trainer.loggers=[]",
        "trainer.progress=false", "device=cpu", "threads=1", f"data.root={data_root()}"]


def _sweep(sweep, *extra: str) -> list[str]:
    return [sys.executable, "-m", "agentnet", "-m", *ARGS, f"hydra.sweep.dir={sweep}", *extra]


def _step(job) -> int:
    try:
        return load_checkpoint(job / CHECKPOINT)["step"] if (job / CHECKPOINT).is_file() else -1
    except CheckpointError:
        return -1


def test_a_killed_sweep_resumes_where_it_stopped(tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run(_sweep(straight), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "killed"
    proc = subprocess.Popen(_sweep(sweep), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            second = list(sweep.glob("1_*"))
            if list(sweep.glob("0_*/metrics.json")) and second and 10 <= _step(second[0]) < 100:
                os.killpg(proc.pid, signal.SIGKILL)  # the sweep and everything it started
                proc.wait()
                break
            time.sleep(0.05)
        else:
            pytest.fail("the sweep never reached its second job's checkpoint")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = next(sweep.glob("0_*/metrics.json"))
    kept = first.read_bytes()
    assert not list(sweep.glob("1_*/metrics.json")) and not list(sweep.glob("2_*"))

    again = subprocess.run(_sweep(sweep, "resume=true"), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(p.name for p in straight.iterdir() if p.is_dir())
    assert first.read_bytes() == kept  # finished: kept, not trained again
    assert "finished already; resume=true keeps its results" in again.stdout + again.stderr
    resumed = json.loads(next(sweep.glob("1_*/metrics.json")).read_text())
    assert resumed["resumed"]["from"] and resumed["resumed"]["step"] >= 10
    fresh = json.loads(next(sweep.glob("2_*/metrics.json")).read_text())
    assert fresh.get("resumed", {}).get("from") is None  # it had not started: it trained from scratch
    for job in straight.glob("*/metrics.json"):
        ours = json.loads((sweep / job.parent.name / "metrics.json").read_text())
        ours.pop("resumed", None)
        assert without_timing(ours) == without_timing(json.loads(job.read_text())), job.parent.name

    def groups(directory) -> list[str]:
        report = subprocess.run([sys.executable, "-m", "agentnet.sweep_report", str(directory)], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
        assert report.returncode == 0, report.stderr
        return [line.split(",")[0] for line in (directory / "summary.csv").read_text().splitlines()]

    assert groups(sweep) == groups(straight)
