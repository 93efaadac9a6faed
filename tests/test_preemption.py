"""Preemption signals (issue 33, item 2): a real ``kill -TERM`` / ``-USR1`` of a run finishes its step,
writes a checkpoint, records why it stopped (``stopped.json``) and exits with ``EXIT_PREEMPTED``;
``resume=true`` continues to metrics identical to an uninterrupted run's."""

from __future__ import annotations

import json
import signal

import pytest

from agentnet.session import build_session, prepare_run
from agentnet.training import CHECKPOINT, TrainerPlugin, load_checkpoint
from agentnet.training.preemption import EXIT_PREEMPTED, Preempted
from tests.conftest import compose_config, without_timing
from tests.test_resume import _cli, _kill_when, _run


def test_sigterm_stops_a_single_run_with_a_checkpoint_and_resume_is_identical(tmp_path):
    overrides = ["strategy=lfnn", "data.subset=20000", "data.test_subset=1000", "trainer.epochs=2",
                 "trainer.checkpoint_every=10", "trainer.loggers=[]"]
    _run(_cli(tmp_path / "straight", *overrides))
    stopped = tmp_path / "stopped"
    proc = _kill_when(_cli(stopped, *overrides), stopped / CHECKPOINT, lambda s: 20 <= s["step"] < 120, sig=signal.SIGTERM)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr.read()[-2000:]
    record = json.loads((stopped / "stopped.json").read_text())
    assert record["reason"] == "SIGTERM" and record["checkpoint"] == str(stopped / CHECKPOINT)
    assert load_checkpoint(stopped / CHECKPOINT)["step"] == record["step"] >= 20  # the checkpoint is the stop's own
    assert not (stopped / "metrics.json").exists() and not (stopped / "error.txt").exists()
    _run(_cli(stopped, *overrides, "resume=true"))
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((stopped / "metrics.json").read_text())
    assert b["resumed"]["step"] == record["step"]
    assert without_timing(a) == without_timing(b)
    assert not (stopped / "stopped.json").exists()  # the job is no longer stopped


@pytest.mark.slow
def test_sigusr1_stops_a_continual_run_and_resume_is_identical(tmp_path):
    overrides = ["strategy=lfnn_local", "benchmark=pmnist_quick", "benchmark.num_tasks=3", "benchmark.samples_per_task=2000",
                 "model.hidden=[40,40]", "data.test_subset=500", "trainer.checkpoint_every=5", "trainer.loggers=[]"]
    _run(_cli(tmp_path / "straight", *overrides))
    stopped = tmp_path / "stopped"
    # 16 steps per task: stop inside the second task.
    proc = _kill_when(_cli(stopped, *overrides), stopped / CHECKPOINT, lambda s: 18 <= s["step"] < 30, sig=signal.SIGUSR1)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr.read()[-2000:]
    assert json.loads((stopped / "stopped.json").read_text())["reason"] == "SIGUSR1"
    _run(_cli(stopped, *overrides, "resume=true"))
    a = json.loads((tmp_path / "straight" / "cl_metrics.json").read_text())
    b = json.loads((stopped / "cl_metrics.json").read_text())
    assert b["resumed"]["from"]
    assert without_timing(a) == without_timing(b)


class _Signal(TrainerPlugin):
    state_key = "test_signal"

    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self, trainer, x, y, result) -> None:
        if trainer.step == self.at:
            signal.raise_signal(signal.SIGUSR2)


def test_a_signal_inside_a_step_stops_at_the_next_boundary(mnist, tmp_path):
    before = signal.getsignal(signal.SIGUSR2)
    run, _, out, data = prepare_run(compose_config("strategy=bp", "model=mlp_400x2", "model.hidden=[40,40]", "data.subset=640",
                                                   "data.test_subset=100", "trainer.batch_size=64", "trainer.progress=false",
                                                   "device=cpu", f"output_dir={tmp_path}"), mnist)
    session = build_session(run, data, out, [_Signal(at=3)])
    with pytest.raises(Preempted, match="stopped by SIGUSR2 after step 3") as stop:
        session.run_all()
    assert stop.value.checkpoint == tmp_path / CHECKPOINT and load_checkpoint(tmp_path / CHECKPOINT)["step"] == 3
    assert signal.getsignal(signal.SIGUSR2) is before  # the handler is restored
