"""Memory over long runs (issue 33, item 6): a continual run of 50 short tasks keeps its resident
memory flat — what grows is only what it stores (the accuracy matrix, histories, task seconds)."""

from __future__ import annotations

import gc

import pytest

from agentnet.session import build_session, prepare_run
from agentnet.training import TrainerPlugin
from tests.conftest import compose_config

TASKS = 50
#: Allowed growth of the resident set between task 10 and task 50. What the run stores in those 40
#: tasks is a few hundred kilobytes (a 51 x 50 accuracy matrix, 40 history entries, curves); a leak
#: of one model-sized object per task (mlp_400x2: 2 MB of weights, 6 MB with Adam's moments) would
#: pass 80 MB.
BOUND_MB = 24


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class _Resident(TrainerPlugin):
    state_key = "test_resident"

    def __init__(self) -> None:
        self.after: list[float] = []

    def after_task(self, trainer, stream, task) -> None:
        gc.collect()
        self.after.append(_rss_mb())


@pytest.mark.slow
def test_fifty_tasks_keep_resident_memory_flat(mnist):
    run, _, _, data = prepare_run(compose_config(
        "strategy=lfnn", "benchmark=pmnist_quick", f"benchmark.num_tasks={TASKS}", "benchmark.samples_per_task=64",
        "trainer.batch_size=32", "data.test_subset=100", "trainer.progress=false", "trainer.checkpoint=false", "device=cpu",
        "output_dir=null"), mnist)
    resident = _Resident()
    session = build_session(run, data, None, [resident])
    session.run_all()
    assert len(resident.after) == TASKS and len(session.record.acc_matrices[0]) == TASKS + 1
    growth = resident.after[-1] - resident.after[9]
    print(f"resident set after tasks 10, 30, 50: {resident.after[9]:.1f}, {resident.after[29]:.1f}, {resident.after[-1]:.1f} MB")
    assert growth < BOUND_MB, f"resident memory grew {growth:.1f} MB over 40 tasks: {[round(m) for m in resident.after]}"
