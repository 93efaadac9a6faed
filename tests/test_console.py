"""What a user sees in the terminal: a single run's bar and epoch lines; a parallel sweep's one
line per job event, tagged with the job, in a real pseudo-terminal and in a captured log."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from agentnet.training.console import duration

AGENTNET = [sys.executable, "-m", "agentnet"]
TINY = ["data.subset=600", "data.test_subset=500", "trainer.batch_size=100", "threads=1", "trainer.checkpoint=false"]


def _in_a_terminal(args: list[str], cwd: Path, timeout: float = 240) -> tuple[int, str]:
    """Run ``args`` with a pseudo-terminal (120 x 40) as stdin, stdout and stderr: what a user sees."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, cwd=cwd, close_fds=True,
                            env={**os.environ, "TERM": "xterm"})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")


def _lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def _check_sweep_console(text: str, sweep: Path) -> None:
    lines = _lines(text)
    assert "\x1b[A" not in text and "it/s" not in text, "a parallel sweep draws no progress bars"
    assert not any("agentnet.history" in line or '"epoch"' in line for line in lines), "the history stays in the log files"
    for tag in ("#0 strategy=bp trainer.lr=0.001", "#1 strategy=bp trainer.lr=-1", "#2 strategy=lfnn trainer.lr=0.001"):
        events = [line.split(f"[{tag}] ", 1)[1] for line in lines if f"[{tag}] " in line]
        assert events and events[0].startswith("started: "), (tag, lines)
        if "-1" in tag:
            assert any(e.startswith("ConfigError: trainer.lr=-1.0: must be a positive number") for e in events), events
            assert events[-1].startswith("failed after ") and "ConfigError" in events[-1], events
            continue
        assert re.fullmatch(r"task 1/2 done: test acc \d+\.\d\d % on it", events[1]), events
        assert re.fullmatch(r"task 2/2 done: test acc \d+\.\d\d % on it, \d+\.\d\d % mean over tasks 1-2", events[2]), events
        assert re.fullmatch(r"finished in .* s: ACC \d+\.\d\d % ± \d+\.\d\d, BWT .*, forgetting .*", events[3]), events
        assert len(events) == 4, events
    # every line of a job is one of its events (or Hydra's launcher lines, the failure summary)
    tagged = [line for line in lines if re.match(r"\[\d\d:\d\d:\d\d\]\[#\d", line)]
    assert len(tagged) == 4 + 4 + 3 + 3, lines
    log = next(sweep.glob("0_*/*.log")).read_text()
    assert "[agentnet.history][INFO] - epoch 1: {" in log and "[agentnet.events][INFO] - task 2/2 done" in log


@pytest.mark.parametrize("console", ["terminal", pytest.param("captured", marks=pytest.mark.slow)])
def test_a_parallel_sweep_prints_one_line_per_job_event(tmp_path, console):
    sweep = tmp_path / "sweep"
    args = [*AGENTNET, "-m", "benchmark=pmnist_quick", "benchmark.num_tasks=2", "strategy=bp,lfnn", "trainer.lr=0.001,-1",
            "replicas=2", *TINY, f"hydra.sweep.dir={sweep}", "hydra.launcher.n_jobs=2"]
    if console == "terminal":
        code, text = _in_a_terminal(args, tmp_path)
    else:
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        code, text = done.returncode, done.stdout + done.stderr
    assert code == 1, text  # one job failed
    _check_sweep_console(text, sweep)
    assert "agentnet: 2 job(s) of the sweep failed" in text


def test_a_single_run_keeps_its_bar_and_prints_each_epoch(tmp_path):
    code, text = _in_a_terminal([*AGENTNET, "strategy=bp", *TINY, "trainer.epochs=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert code == 0, text
    assert "it/s" in text, "the progress bar is drawn"
    lines = _lines(text)
    events = [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in lines if re.match(r"\[\d\d:\d\d:\d\d\] ", line)]
    assert events[0] == "started: strategy=bp " + " ".join(TINY) + " trainer.epochs=2"
    assert re.fullmatch(r"epoch 1/2: test acc \d+\.\d\d %, train loss \d\.\d{4} \(.* s\)", events[1]), events
    assert re.fullmatch(r"finished in .* s: test_error \d+\.\d\d %, train_error \d+\.\d\d %", events[-1]), events
    assert not any("agentnet.history" in line for line in lines)


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (3.14159, 42.4, 252, 7530)] == ["3.1 s", "42 s", "4 min 12 s", "2 h 05 min"]


def test_a_job_is_tagged_by_the_settings_its_sweep_varies():
    from agentnet.training.console import _swept

    assert [_swept(v) for v in ("bp,lfnn", "range(0,3)", "choice(1,2)", "[1,2],[3,4]")] == [True] * 4
    assert [_swept(v) for v in ("0.001", "[mlflow,wandb]", "'a,b'", "{a:1,b:2}", "[[1,2],[3]]")] == [False] * 5
