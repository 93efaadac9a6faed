"""Data parallelism through torchrun (gloo, 2 processes on the CPU): every rank ends with the same
parameters, equal (float tolerance) to one process trained on the same global batches, for every
kind of update a strategy makes — autograd (bp, lfnn, lfnn_local), hooks (fa), forward gradients
(fg_w), hand-written ``.grad`` (attention) — FC and conv with synchronised batch norm, and for
continual runs whose CL method keeps memories (replay) or Fisher estimates (ewc). A rank killed
with ``kill -9`` fails the run with a clear error, and ``resume=true`` continues it.

Each case is a Hydra multirun (basic launcher) started once under torchrun, against the same
multirun in one process; jobs are compared by their checkpoints' parameters.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from agentnet.distributed import World, gather, launched, shard
from tests.conftest import REPO, data_root

pytestmark = pytest.mark.filterwarnings("ignore")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "AGENTNET_DATA": str(data_root()), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(args: list[str], nproc: int = 2, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           "-m", "agentnet", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, **kwargs)


def _agentnet(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentnet", *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def _params(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, weights_only=True)["model"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _compare_sweeps(tmp_path: Path, overrides: list[str], atol: dict[str, float]) -> dict[str, float]:
    """Run ``overrides`` as a multirun under torchrun (2 ranks) and in one process; the largest
    parameter difference of each job (by its ``strategy`` / ``cl`` value)."""
    common = ["-m", *overrides, "hydra/launcher=basic", "threads=1", "trainer.progress=false", "trainer.loggers=[]"]
    two = _torchrun([*common, f"hydra.sweep.dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = _agentnet([*common, f"hydra.sweep.dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    differences = {}
    for checkpoint in sorted((tmp_path / "one").glob("*/checkpoint.pt")):
        job = checkpoint.parent.name
        other = tmp_path / "two" / job / "checkpoint.pt"
        assert other.is_file(), f"{job}: no checkpoint from the torchrun job"
        metrics = json.loads(next((tmp_path / "two" / job).glob("*metrics.json")).read_text())
        assert metrics["world_size"] == 2
        a, b = _params(checkpoint), _params(other)
        assert a.keys() == b.keys()
        swept = [str(o).split("=", 1)[1] for o in yaml.safe_load((checkpoint.parent / ".hydra" / "overrides.yaml").read_text())]
        name = next(value for value in swept if value in atol)
        differences[name] = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert set(differences) == set(atol), differences
    for name, diff in differences.items():
        assert diff <= atol[name], f"{name}: torchrun's parameters differ from one process's by {diff:.3g}"
    # Nothing of rank 1 lands in the outputs: one directory per job, rank 0's.
    assert len(list((tmp_path / "two").glob("*/checkpoint.pt"))) == len(atol)
    return differences


def test_shard_and_gather_in_one_process():
    """Without torchrun a shard is the whole batch and gathering returns it."""
    assert not launched().active and World(1, 2).active and not World(1, 2).main
    batch = torch.arange(12).view(2, 6)
    assert torch.equal(shard(batch), batch) and torch.equal(gather(batch), batch)


def test_fc_rules_match_one_process(tmp_path):
    """bp (autograd), lfnn (leaders chosen from the global batch), fg_w (forward gradients) and
    attention (hand-written updates) on the MLP preset: 4 Adam steps, 2 ranks = 1 process; every
    job a population of 2 replicas (each rank holds all of them)."""
    overrides = ["strategy=bp,lfnn,fg_w,attention", "model=mlp_275k", "data.subset=512", "data.test_subset=500",
                 "trainer.epochs=1", "trainer.max_steps=4", "replicas=2"]
    _compare_sweeps(tmp_path, overrides, {"bp": 5e-5, "lfnn": 5e-5, "fg_w": 5e-5, "attention": 5e-5})


@pytest.mark.slow
def test_every_fc_and_conv_rule_matches_one_process(tmp_path):
    """The six rules on the MLP, then the five that train conv layers on the conv preset (batch
    norm synchronised over the ranks; SGD, whose step is linear in the gradient: Adam turns the
    float noise of the conv biases' gradients, which batch norm makes zero, into whole steps)."""
    _compare_sweeps(tmp_path / "fc", ["strategy=lfnn_local,fa", "model=mlp_275k", "data.subset=512", "data.test_subset=500",
                                      "trainer.epochs=1", "trainer.max_steps=4"], {"lfnn_local": 5e-5, "fa": 5e-5})
    conv = ["strategy=bp,lfnn,lfnn_local,fa", "model=cnn_mnist_275k", "data.subset=256", "data.test_subset=256",
            "trainer.epochs=1", "trainer.max_steps=3", "trainer.batch_size=32", "trainer.optimizer=sgd", "trainer.lr=0.05"]
    # fa's conv update goes through its random feedback kernels, whose larger values grow the float noise.
    _compare_sweeps(tmp_path / "conv", conv, {"bp": 1e-4, "lfnn": 1e-4, "lfnn_local": 1e-4, "fa": 1e-3})


@pytest.mark.slow
def test_continual_memories_match_one_process(tmp_path):
    """Replay's buffer (filled from the global batch, each rank replaying its shard of one sample)
    and EWC's Fisher estimate keep 2 ranks equal to one process over a task boundary."""
    overrides = ["cl=replay,ewc", "benchmark=pmnist_quick", "benchmark.num_tasks=2", "benchmark.iterations_per_task=3",
                 "model=mlp_100x2", "data.subset=512", "data.test_subset=300"]
    _compare_sweeps(tmp_path, overrides, {"replay": 5e-5, "ewc": 5e-5})


@pytest.mark.slow
def test_refusals(tmp_path):
    """Under torchrun: agentnet-tune, a paper experiment and a joblib sweep are refused by name."""
    joblib = _torchrun(["-m", "strategy=bp,lfnn", "hydra/launcher=joblib", f"hydra.sweep.dir={tmp_path / 's'}",
                        "data.subset=256", "trainer.max_steps=1"])
    assert joblib.returncode != 0
    assert "hydra/launcher=basic" in (joblib.stdout + joblib.stderr)


@pytest.mark.slow
def test_killed_rank_fails_clearly_and_resume_continues(tmp_path):
    """kill -9 of rank 1 mid-run: the run fails with a message naming what happened (rank 0's
    error.txt); ``resume=true`` under torchrun continues from the last checkpoint to the end."""
    out = tmp_path / "run"
    args = ["strategy=lfnn", "model=mlp_275k", "data.subset=4096", "data.test_subset=500", "trainer.epochs=2",
            "trainer.batch_size=32", "trainer.checkpoint_every=8", "trainer.progress=false", "threads=1",
            "trainer.loggers=[]", f"hydra.run.dir={out}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "agentnet", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "checkpoint.pt").exists(), "no checkpoint before the kill"
    ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "agentnet"], capture_output=True, text=True).stdout.split()
    children = sorted(int(p) for p in ranks)
    assert len(children) == 2, children
    os.kill(children[-1], signal.SIGKILL)  # the later-started child: rank 1
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    error = (out / "error.txt").read_text() if (out / "error.txt").exists() else output
    assert "another rank died, was killed or stopped answering" in error or "SIGKILL" in output, output[-3000:]
    resumed = _torchrun([*args, "resume=true"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed"]["from"] and metrics["epochs"] == 2 and metrics["world_size"] == 2


@pytest.mark.slow
def test_resume_at_another_world_size(tmp_path):
    """A checkpoint holds nothing rank-specific: one epoch in one process, resumed for a second epoch
    over 2 ranks, ends where two epochs in one process end (float tolerance)."""
    args = ["strategy=lfnn_local", "model=mlp_275k", "data.subset=512", "data.test_subset=300", "trainer.progress=false",
            "trainer.lr_schedule=none",  # a cosine schedule is sized by trainer.epochs, which grows here
            "threads=1", "trainer.loggers=[]"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _agentnet([*args, "trainer.epochs=2", f"hydra.run.dir={straight}"]).returncode == 0
    assert _agentnet([*args, "trainer.epochs=1", f"hydra.run.dir={split}"]).returncode == 0
    resumed = _torchrun([*args, "trainer.epochs=2", "resume=true", f"hydra.run.dir={split}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    metrics = json.loads((split / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["resumed"]["epoch"] == 1 and metrics["epochs"] == 2
    a, b = _params(straight / "checkpoint.pt"), _params(split / "checkpoint.pt")
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 5e-5
