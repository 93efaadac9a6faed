"""Preemption: SIGTERM, SIGUSR1 or SIGUSR2 stop a run cleanly instead of losing its work.

Clusters warn before they kill a job: SLURM sends SIGTERM (and, with ``--signal=USR1@<seconds>``,
SIGUSR1 or SIGUSR2 earlier). While :func:`preemption_signals` is active, such a signal only asks the
trainer to stop; the trainer finishes the step it is in, writes a checkpoint and raises
:class:`Preempted`. The entry point records why it stopped (``stopped.json``) and exits with
:data:`EXIT_PREEMPTED`; ``resume=true`` then continues to the metrics of an uninterrupted run (a
job SLURM requeues resumes by itself).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator

__all__ = ["EXIT_PREEMPTED", "PREEMPTION_SIGNALS", "Preempted", "preemption_signals"]

#: The exit status of a run stopped by a preemption signal (``EX_TEMPFAIL``: run it again with ``resume=true``).
EXIT_PREEMPTED = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """A run stopped by a preemption signal after checkpointing (``checkpoint`` is ``None`` when the
    run writes none: ``trainer.checkpoint=false`` or no output directory)."""

    def __init__(self, signal_name: str, step: int, epoch: int, checkpoint: Path | None) -> None:
        kept = f"checkpoint {checkpoint}; continue with resume=true" if checkpoint else "no checkpoint (trainer.checkpoint=false): the work is lost"
        super().__init__(f"stopped by {signal_name} after step {step} (epoch {epoch}); {kept}")
        self.signal_name, self.step, self.epoch, self.checkpoint = signal_name, step, epoch, checkpoint

    def record(self) -> dict:
        """What ``stopped.json`` holds."""
        return {"reason": self.signal_name, "step": self.step, "epoch": self.epoch,
                "checkpoint": None if self.checkpoint is None else str(self.checkpoint), "resume": "rerun the same command with resume=true"}


@contextlib.contextmanager
def preemption_signals(trainer) -> Iterator[None]:
    """While inside, a preemption signal sets ``trainer.stop_requested`` (its name) instead of killing
    the process; the previous handlers come back on exit. Only the main thread can take signals: in
    any other thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum: int, frame) -> None:
        trainer.stop_requested = signal.Signals(signum).name

    previous = {s: signal.signal(s, request) for s in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
